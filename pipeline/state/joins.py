"""Joining a workflow's parallel stage again, for a chord member whose step was sealed
before its message came back (``rejoin.lua``); the first join is in the seal."""

from __future__ import annotations

from ..keys import RunKeys
from ..lua import Script
from .connection import translate_errors
from .replies import versions
from .store import StateStore

__all__ = ["rejoin"]

REJOIN = Script("pipeline.state", "rejoin.lua", include=["stages.lua"])


def rejoin(store: StateStore, run_id: str, step: str, group: str, *, first: bool = False,
           route: str = "") -> tuple[int, ...] | None:
    """The versions to send the chord's body with, when member ``step`` of chord
    ``group`` must send it (again): its stage is complete, no step of the next stage was
    delivered or sealed, and no other member of this chord joined the stage. Else ().

    None when the run recorded no route and ``route`` (its route's JSON) is not given.
    ``first``: the first join of such a run, which its seal could not make."""
    keys = RunKeys(run_id)
    with translate_errors(store.url):
        reply = REJOIN(store.redis, [keys.steps, keys.run, keys.deliveries, keys.log],
                       [step, group, "stage.joined" if first else "stage.rejoined", route])
    return versions(reply[0]) if reply else ()
