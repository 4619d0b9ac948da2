"""What ties a replay to the run it was replayed from, in both runs' records."""

from __future__ import annotations

from ..keys import RunKeys
from ..lua import Batch, Script, checked
from .connection import translate_errors
from .store import StateStore

__all__ = ["link_replay", "unlink_replay"]

HSET_LIVE = Script("pipeline.state", "hset_live.lua")


def link_replay(store: StateStore, source: str, version: int, replay: str,
                start_at: str) -> None:
    """Name each run in the other's record: ``replay_of`` (and where the replay started: a
    stage, or an event type) and ``replay:<run>``; only while each run exists."""
    batch = Batch(store.redis)
    batch.script(HSET_LIVE, [RunKeys(replay).run], ["replay_of", f"{source}@{version}"])
    batch.script(HSET_LIVE, [RunKeys(replay).run], ["replay_start", start_at])
    batch.script(HSET_LIVE, [RunKeys(source).run], [f"replay:{replay}", str(version)])
    with translate_errors(store.url):
        for reply in batch.execute():
            checked(reply)


def unlink_replay(store: StateStore, source: str, replay: str) -> None:
    with translate_errors(store.url):
        store.redis.hdel(RunKeys(source).run, f"replay:{replay}")
