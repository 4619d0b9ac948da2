"""Re-drive runs that stopped moving with no message of theirs left (Redis broker only).

kombu's Redis transport pops a message (BRPOP) and records it unacked in a second
command: a worker killed in between, or with the popped reply still unread in its
socket, loses the message for good, and no broker setting closes that window. A chord's
body sent by a worker that could not reach the broker, or the body of a stage joined by
a worker of an older version (one that left the join to Celery's backend), never goes.
Either way the run waits forever for a message nobody holds.

Every live run is watched in ``LIVE`` until it ends. A run whose log has not moved for
``2 x lease_s`` and of which no message is in any of its queues (at any priority) or
unacked, in two passes at least a third of the lease apart (the first leaves a mark in
``STALLED``), is re-driven from its last sealed versions. A run re-driven
``MAX_REDRIVES`` times and still stuck is compensated. A run waiting for a person, or
whose queue is too long to read through (``SCAN_LIMIT``), is looked at again later.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from .. import catalog, saga
from ..errors import RunNotFound, StoreError, UnknownWorkflow, WorkflowDefinitionError
from ..flow import recorded_route
from ..keys import LIVE, STALLED, RunKeys
from ..route import Route, agent_of
from ..state import StateStore, translate_errors
from .common import BATCH, MAX_REDRIVES, SweepReport, text
from .flows import owed, redrive_route
from .redeliver import broker, read, unacked

__all__ = ["SCAN_LIMIT", "redrive_stalled"]

log = logging.getLogger(__package__)  # the sweeper's one logger, whichever part logs

SCAN_LIMIT = 1000
"""Longest queue read through to find a stalled run's messages; behind a longer one, the
run is looked at again later (its message most likely waits there)."""


@dataclass(slots=True)
class _Idle:
    """A live run whose log has not moved for twice the lease."""

    run_id: str
    route: Route
    last: tuple[str, dict[str, str]]  # its newest log entry: (id, fields)
    mark: str | None  # ``<log id>|<ms>`` when a sweep first found none of its messages
    owed: list[str] = field(default_factory=list)  # steps / deliveries it waits for
    queues: set[str] = field(default_factory=set)


class _Marks:
    """What a pass writes back about the runs it looked at, sent in one round trip."""

    def __init__(self, store: StateStore) -> None:
        self.pipe = store.redis.pipeline(transaction=False)

    def forget(self, run_id: str) -> None:  # ended: no longer watched
        self.pipe.zrem(LIVE, run_id)
        self.pipe.hdel(STALLED, run_id)

    def later(self, run_id: str, at_ms: int) -> None:  # looked at again 2 leases after at_ms
        self.pipe.zadd(LIVE, {run_id: at_ms}, xx=True)
        self.pipe.hdel(STALLED, run_id)

    def suspect(self, run_id: str, last_id: str, now_ms: int) -> None:  # confirmed next pass
        self.pipe.hset(STALLED, run_id, f"{last_id}|{now_ms}")


def redrive_stalled(app: Celery, store: StateStore, lease_s: float,
                    report: SweepReport) -> None:
    """Re-drive each live run idle for ``2 x lease_s`` of which no message is left in the
    broker, once two passes at least ``lease_s / 3`` apart have found it so."""
    with translate_errors(store.url):
        seconds, micros = store.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        ids = [text(i) for i in store.redis.zrangebyscore(
            LIVE, "-inf", now_ms - 2 * lease_s * 1000, start=0, num=BATCH)]
        if not ids:
            return
        pipe = store.redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.hmget(RunKeys(run_id).run, "status", "workflow", "route")
            pipe.xrevrange(RunKeys(run_id).log, count=1)
            pipe.hget(STALLED, run_id)
        replies = pipe.execute()
    marks = _Marks(store)
    try:
        idle = _idle(store, ids, replies, now_ms, lease_s, marks)
        if not idle:
            return
        _find_owed(store, idle)
        with broker(app) as (channel, client):
            present = _present(channel, client, idle)
        for run in idle:
            seen_id, _, seen_ms = (run.mark or "").partition("|")
            if run.run_id in present or not run.owed:
                marks.later(run.run_id, now_ms)  # waiting its turn, held, or owes nothing
            elif seen_id != run.last[0] or not seen_ms:  # first found so: confirm later
                marks.suspect(run.run_id, run.last[0], now_ms)
            elif now_ms - int(seen_ms) >= lease_s * 1000 / 3:
                _redrive(app, store, run, report)
                marks.later(run.run_id, now_ms)
    finally:
        with translate_errors(store.url):
            marks.pipe.execute()


def _idle(store: StateStore, ids: list[str], replies: list[Any], now_ms: int, lease_s: float,
          marks: _Marks) -> list[_Idle]:
    """The runs of ``ids`` still running whose log has not moved for twice the lease
    (``replies``: status and workflow, newest log entry, stalled mark, for each)."""
    idle = []
    for i, run_id in enumerate(ids):
        (status, workflow, route), last, mark = replies[3 * i:3 * i + 3]
        last_id, fields = (text(last[0][0]), last[0][1]) if last else ("0-0", {})
        moved_ms = int(last_id.split("-")[0])
        if status not in ("running", "waiting_for_human"):  # ended, compensating, gone
            marks.forget(run_id)
        elif status == "waiting_for_human":  # a person's to move
            marks.later(run_id, int(now_ms - lease_s * 1000))
        elif moved_ms > now_ms - 2 * lease_s * 1000:
            marks.later(run_id, moved_ms)
        elif (found := _route(store, run_id, str(workflow), route)) is None:
            marks.later(run_id, now_ms)
        else:
            idle.append(_Idle(run_id, found, (last_id, fields),
                              None if mark is None else text(mark)))
    return idle


def _route(store: StateStore, run_id: str, workflow: str, recorded: str | None) -> Route | None:
    try:
        return recorded_route(run_id, workflow, recorded or "")
    except (UnknownWorkflow, WorkflowDefinitionError) as e:
        log.warning("sweeper: run %s of workflow %s stopped moving, and cannot be re-driven: "
                    "%s", run_id, workflow, e)
        with contextlib.suppress(StoreError):
            store.note_once(run_id, "run.redrive_failed", by="sweeper", error=str(e)[:2000],
                            reason="the run stopped moving, and the sweeper cannot re-drive it: "
                                   "it records no route this worker can read")
        return None


def _find_owed(store: StateStore, idle: list[_Idle]) -> None:
    """What each idle run waits for, and the queues its messages would wait in."""
    for run in idle:
        try:
            run.owed = owed(store, run.route, run.run_id)
        except (StoreError, RunNotFound) as e:
            log.warning("sweeper: cannot tell what run %s waits for: %s", run.run_id, e)
            continue
        run.queues = {catalog.queue_of(store.redis, agent_of(key), run.route)
                      for key in run.owed}


def _present(channel: Any, client: Any, idle: list[_Idle]) -> set[str]:
    """The idle runs of which a message is waiting in a queue (at any priority) or unacked.

    Queues first, then the unacked hash: a message moving from one to the other in
    between is seen in neither, and the second pass that a re-drive waits for catches it.
    A queue longer than ``SCAN_LIMIT`` is not read: every run that needs it counts as
    present (its message most likely waits there).
    """
    names = {q: [channel._q_for_pri(q, p) for p in channel.priority_steps]
             for q in sorted({q for run in idle for q in run.queues})}
    flat = [n for listed in names.values() for n in listed]
    pipe = client.pipeline(transaction=False)
    for name in flat:
        pipe.llen(name)
    lengths = dict(zip(flat, pipe.execute(), strict=True))
    too_long = {q for q, listed in names.items() if sum(lengths[n] for n in listed) > SCAN_LIMIT}
    to_read = [n for q, listed in names.items() if q not in too_long for n in listed
               if lengths[n]]
    pipe = client.pipeline(transaction=False)
    for name in to_read:
        pipe.lrange(name, 0, SCAN_LIMIT - 1)
    runs = {run.run_id for run in idle if run.queues & too_long}
    for raw in (raw for listed in pipe.execute() for raw in listed):
        try:
            message = read("", json.loads(text(raw)), 0.0)
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if message is not None:
            runs.add(str(message.kwargs.get("run_id", "")))
    runs |= {str(m.kwargs.get("run_id", "")) for m in unacked(client, channel)}
    return runs


def _redrive(app: Celery, store: StateStore, run: _Idle, report: SweepReport) -> None:
    """Hand out what the run owes again, or compensate it when re-driving did not help:
    re-drives count up while nothing but the last re-drive happened to the run."""
    last_id, fields = run.last
    redrives = int(fields.get("redrive", 0)) + 1 if fields.get("event") == "run.redriven" else 1
    try:
        with translate_errors(store.url):  # moved since the broker was read: not stalled
            newest = store.redis.xrevrange(RunKeys(run.run_id).log, count=1)
        if newest and text(newest[0][0]) != last_id:
            return
        if redrives > MAX_REDRIVES:
            reason = (f"the run stopped moving again after {MAX_REDRIVES} re-drives from its "
                      "last sealed versions")
            saga.start(app, store, run.run_id, reason=reason)
            report.stuck.append(run.run_id)
            log.warning("sweeper: compensating run %s: %s", run.run_id, reason)
            return
        handed = redrive_route(app, store, run.route, run.run_id)
        store.note(run.run_id, "run.redriven", by="sweeper", steps=",".join(handed),
                   redrive=redrives,
                   reason="it stopped moving, and no message of it was left in the broker")
    except Exception as e:  # noqa: BLE001 - one run's trouble never stops the pass
        log.warning("sweeper: re-driving run %s failed: %s: %s", run.run_id, type(e).__name__, e)
        with contextlib.suppress(StoreError):
            store.note_once(run.run_id, "run.redrive_failed", by="sweeper",
                            error=f"{type(e).__name__}: {e}"[:2000],
                            reason="the run stopped moving and re-driving it failed; the next "
                                   "sweep tries again")
        return
    report.redriven[run.run_id] = handed
    log.warning("sweeper: re-drove run %s (%s): it stopped moving, with no message of it left "
                "in the broker", run.run_id, ", ".join(handed) or "nothing owed")
