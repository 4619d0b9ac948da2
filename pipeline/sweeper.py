"""The sweeper: no run stays stuck (a Celery beat task, and ``pipeline sweep``).

Celery alone loses time, never work, when a whole worker dies: its unacked
messages wait in the broker for the visibility timeout (an hour by default)
before anyone runs them again (celery/celery#5935). Each pass here:

1. **Messages whose worker died.** Every unacked message of a pipeline task
   in the Redis broker is looked at. One that no live worker has marked held
   for ``lease_s`` (``lease.py``: every worker's main process marks what it
   holds, running, reserved or waiting for an ETA) and that was delivered (or
   came due) longer ago than that is handed out again, the way kombu's own
   restore does it (one transaction: it leaves the unacked set and joins its
   queue once). The step key makes a step's rerun safe, a compensation is
   claimed by its task id, and a step delivered too often fails as a crash
   loop and is compensated.
2. **Runs created and never enqueued** (the client died in between), past
   the lease: their canvas is sent now. Were the client alive after all, each
   step would still seal once.
3. **Sagas that stopped moving** (a worker died between beginning a saga and
   sending its planner, or between two stages): the planner is sent again; it
   plans once and dispatches only compensations nobody has claimed.
4. **Runs that stopped moving with no message left** (``pipeline:live``): a
   run whose log has not moved for ``2 x lease_s`` and of which no message is
   in any queue or unacked, in two passes at least a third of the lease apart,
   is re-driven from its last sealed versions (``Flow.redrive``). kombu's Redis
   transport pops a message (BRPOP) and records it unacked in a second command:
   a worker killed in between, or with the popped reply still unread in its
   socket, loses the message for good (celery/kombu#305, celery/celery#4354),
   and no broker setting closes that window. A chord whose member was
   redelivered after it had joined counts one member too many and never runs
   its body. A run re-driven ``MAX_REDRIVES`` times and still stuck is
   compensated.

RabbitMQ hands a dead consumer's messages out again when its connection
drops, so parts 1 and 4 are for a Redis broker only.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from celery import Celery

from . import canvas, catalog, choreography, saga
from .errors import RunNotFound, StoreError, UnknownWorkflow, WorkflowDefinitionError
from .flow import recorded_route
from .keys import HELD, LIVE, SAGAS, STALLED, SWEEP_LOCK, UNENQUEUED, RunKeys
from .names import COMPENSATE_RUN_TASK, SWEEP_TASK, is_pipeline_task
from .route import FlowKind, Route, agent_of
from .state import StateStore, translate_errors

__all__ = ["SWEEP_TASK", "Redelivered", "SweepReport", "sweep"]

log = logging.getLogger(__name__)

BATCH = 500
"""Most runs looked at per pass in each of parts 2 and 3 (the oldest first)."""
MAX_REDRIVES = 3
"""Re-drives of one run that stopped moving; stuck once more, it is compensated."""


@dataclass(frozen=True, slots=True)
class Redelivered:
    """A message the sweeper handed out again."""

    task: str
    task_id: str
    run_id: str
    step: str
    silent_s: float
    reason: str


@dataclass(slots=True)
class SweepReport:
    unacked: int = 0
    redelivered: list[Redelivered] = field(default_factory=list)
    enqueued: list[str] = field(default_factory=list)
    nudged: list[str] = field(default_factory=list)
    redriven: dict[str, list[str]] = field(default_factory=dict)
    """Run id -> the steps (or deliveries) handed out again: the run had stopped moving."""
    stuck: list[str] = field(default_factory=list)
    """Runs re-driven ``MAX_REDRIVES`` times that stopped again: compensated."""
    busy: bool = False
    """Another sweeper held the lock: this pass did nothing."""

    def to_dict(self) -> dict[str, Any]:
        return {"unacked": self.unacked, "redelivered": [asdict(r) for r in self.redelivered],
                "enqueued": self.enqueued, "nudged": self.nudged, "redriven": self.redriven,
                "stuck": self.stuck, "busy": self.busy}

    def summary(self) -> str:
        if self.busy:
            return "another sweeper is running: nothing done"
        lines = [f"{self.unacked} unacked message(s) looked at; {len(self.redelivered)} handed "
                 f"out again; {len(self.enqueued)} run(s) enqueued; {len(self.nudged)} saga(s) "
                 f"nudged; {len(self.redriven)} stopped run(s) re-driven"
                 + (f", {len(self.stuck)} compensated" if self.stuck else "")]
        lines += [f"  redelivered {r.task} run {r.run_id} {r.step}: {r.reason}"
                  for r in self.redelivered]
        lines += [f"  enqueued run {run_id} (its client died before sending it)"
                  for run_id in self.enqueued]
        lines += [f"  nudged the saga of run {run_id}" for run_id in self.nudged]
        lines += [f"  re-drove run {run_id} ({', '.join(steps) or 'nothing owed'}): it had "
                  "stopped moving, with no message of it left in the broker"
                  for run_id, steps in self.redriven.items()]
        lines += [f"  compensating run {run_id}: it stopped moving again after "
                  f"{MAX_REDRIVES} re-drives" for run_id in self.stuck]
        return "\n".join(lines)


def sweep(app: Celery, store: StateStore, *, lease_s: float | None = None) -> SweepReport:
    """One pass of all four parts; one sweeper at a time across the fleet."""
    lease_s = store.lease_s if lease_s is None else lease_s
    report = SweepReport()
    lock = store.redis.lock(SWEEP_LOCK, timeout=lock_ttl_s(lease_s), blocking=False)
    with translate_errors(store.url):
        if not lock.acquire(token=uuid.uuid4().hex):
            report.busy = True
            return report
    redis_broker = app.pipeline_settings.broker_is_redis
    parts = [*([_redeliver_silent] if redis_broker else []), _enqueue_forgotten, _nudge_sagas,
             *([_redrive_stalled] if redis_broker else [])]
    try:
        for part in parts:
            part(app, store, lease_s, report)
            _renew(lock)
    finally:
        try:
            lock.release()
        except Exception:  # noqa: BLE001 - it expires by itself
            log.warning("the sweep lock could not be released; it expires by itself")
    return report


def lock_ttl_s(lease_s: float) -> float:
    """How long the sweep lock lives unless renewed (after each part of a pass).

    Short, because the sweeper may be killed with its worker (beat's sweep runs on
    whichever worker serves the ``pipeline`` queue): a lock that outlived a dead sweeper
    by minutes stopped every recovery for that long. Two sweeps that do overlap, after
    a part ran longer than this, do no harm: a message is handed out again by one
    transaction (the second finds it gone), and every step and delivery runs once.
    """
    return max(5.0, min(float(lease_s), 30.0))


def _renew(lock: Any) -> None:
    try:
        lock.reacquire()
    except Exception:  # noqa: BLE001 - it expired meanwhile: the pass goes on regardless
        log.warning("the sweep lock expired during a pass; another sweeper may overlap it")


# -- 1. steps whose worker went silent -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Message:
    tag: str
    task: str
    task_id: str
    kwargs: dict[str, Any]
    due: float  # when it was delivered, or its ETA if later (epoch seconds)


def _redeliver_silent(app: Celery, store: StateStore, lease_s: float,
                      report: SweepReport) -> None:
    with _broker(app) as (channel, client):
        _redeliver_from(store, channel, client, lease_s, report)


@contextmanager
def _broker(app: Celery) -> Iterator[tuple[Any, Any]]:
    """kombu's Redis channel and a client of its connection pool."""
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        with channel.conn_or_acquire() as client:
            yield channel, client


def _redeliver_from(store: StateStore, channel: Any, client: Any, lease_s: float,
                    report: SweepReport) -> None:
    now = time.time()
    messages = list(_unacked(client, channel))
    report.unacked = len(messages)
    old = [m for m in messages if now - m.due >= lease_s]  # younger: too recent to tell
    if not old:
        return
    with translate_errors(store.url):  # two round trips a pass, however many messages
        seconds, micros = store.redis.time()
        marks = store.redis.zmscore(HELD, [m.task_id for m in old])
    now_ms = seconds * 1000 + micros // 1000
    for message, held in zip(old, marks, strict=True):
        why = _why_stuck(message, held, now_ms, lease_s, now)
        if why is None:
            continue
        silent_s, reason = why
        channel.qos.restore_by_tag(message.tag, client=client)
        run_id = str(message.kwargs.get("run_id", ""))
        step = str(message.kwargs.get("step", ""))
        report.redelivered.append(Redelivered(message.task, message.task_id, run_id, step,
                                              round(silent_s, 1), reason))
        log.warning("sweeper: handed out %s %s again (run %s %s): %s", message.task,
                    message.task_id, run_id, step, reason)
        if run_id:
            try:
                store.note(run_id, "step.redelivered", step=step, task_id=message.task_id,
                           silent_s=round(silent_s, 1), reason=reason)
            except StoreError:
                pass


def _unacked(client: Any, channel: Any) -> Iterator[_Message]:
    """The pipeline's messages kombu holds unacked (its ``unacked`` hash: a few per worker)."""
    delivered = {_text(tag): score for tag, score in
                 client.zrange(channel.unacked_index_key, 0, -1, withscores=True)}
    for raw_tag, raw in client.hgetall(channel.unacked_key).items():
        tag = _text(raw_tag)
        try:
            message = _read(tag, json.loads(_text(raw))[0], delivered.get(tag, time.time()))
        except (ValueError, KeyError, IndexError, TypeError) as e:
            log.warning("sweeper: unacked message %s is not one it can read: %s", tag, e)
            continue
        if message is not None:
            yield message


def _read(tag: str, payload: dict[str, Any], delivered: float) -> _Message | None:
    """One of the pipeline's messages (None for anyone else's)."""
    headers = payload.get("headers") or {}
    task, task_id = str(headers.get("task", "")), str(headers.get("id", ""))
    if not is_pipeline_task(task):  # a user's own tasks in the same broker are not ours
        return None
    due = delivered
    eta = headers.get("eta")
    if eta:
        due = max(due, datetime.fromisoformat(str(eta)).timestamp())
    return _Message(tag, task, task_id, _kwargs(payload), due)


def _kwargs(payload: dict[str, Any]) -> dict[str, Any]:
    """The task's keyword arguments (and its positional ones as ``args``), read as JSON only:
    a message of any other content type is never decoded here."""
    if payload.get("content-type") != "application/json":
        return {}
    body = payload.get("body", "")
    if (payload.get("properties") or {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, kwargs, _ = json.loads(body)
    out = dict(kwargs)
    if args and "run_id" not in out:  # compensate.<agent>(run_id, step), compensate_run(run_id)
        out["run_id"] = args[0]
        if len(args) > 1 and isinstance(args[1], str):
            out["step"] = args[1]
    return out


def _why_stuck(message: _Message, held: float | None, now_ms: int, lease_s: float,
               now: float) -> tuple[float, str] | None:
    """(seconds silent, why) when no live worker holds ``message`` (``held``: until when
    one last marked it held, by Redis's clock), else None."""
    if held is not None and held > now_ms:
        return None  # its worker is alive (it marks what it holds every third of the lease)
    if held is not None:
        silent = (now_ms - held) / 1000.0 + lease_s
        return silent, (f"unacked, and no live worker has held it for {silent:.0f}s "
                        f"(lease {lease_s:g}s): its worker is gone")
    waited = now - message.due
    return waited, (f"unacked {waited:.0f}s after its delivery, and no live worker ever held "
                    "it: its worker is gone")


# -- 2. runs created and never enqueued -------------------------------------------------------


def _enqueue_forgotten(app: Celery, store: StateStore, lease_s: float,
                       report: SweepReport) -> None:
    with translate_errors(store.url):
        seconds, _ = store.redis.time()
        ids = [_text(i) for i in store.redis.zrangebyscore(
            UNENQUEUED, "-inf", (seconds - lease_s) * 1000, start=0, num=BATCH)]
        pipe = store.redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.hmget(RunKeys(run_id).run, "status", "workflow", "enqueued", "route")
        records = pipe.execute()
    for run_id, (status, flow_name, enqueued, recorded) in zip(ids, records, strict=True):
        if status != "running" or enqueued == "1":
            with translate_errors(store.url):
                store.redis.zrem(UNENQUEUED, run_id)
            continue
        try:
            route = recorded_route(run_id, str(flow_name), recorded or "")
        except (UnknownWorkflow, WorkflowDefinitionError) as e:
            log.warning("sweeper: run %s of workflow %s was never enqueued, and cannot be: %s",
                        run_id, flow_name, e)
            with contextlib.suppress(StoreError):
                store.note_once(run_id, "run.enqueue_failed", by="sweeper", error=str(e)[:2000],
                                reason="its client died before enqueuing it, and the sweeper "
                                       "cannot: the run records no route it can read")
            continue
        _enqueue(app, store, route, run_id)
        store.mark_enqueued(run_id)
        store.note(run_id, "run.enqueued", by="sweeper",
                   reason="its client died between creating and enqueuing it")
        report.enqueued.append(run_id)


# -- 3. sagas that stopped moving ---------------------------------------------------------------


def _nudge_sagas(app: Celery, store: StateStore, lease_s: float, report: SweepReport) -> None:
    with translate_errors(store.url):
        seconds, _ = store.redis.time()
        now_ms = seconds * 1000
        ids = [_text(i) for i in store.redis.zrangebyscore(
            SAGAS, "-inf", now_ms - lease_s * 1000, start=0, num=BATCH)]
    for run_id in ids:
        with translate_errors(store.url):
            status = store.redis.hget(RunKeys(run_id).run, "status")
            if status != "compensating":
                store.redis.zrem(SAGAS, run_id)
                continue
            store.redis.zadd(SAGAS, {run_id: now_ms}, xx=True)
        app.send_task(COMPENSATE_RUN_TASK, args=(run_id,),
                      queue=app.conf.task_default_queue)
        store.note(run_id, "saga.nudged", by="sweeper",
                   reason=f"no compensation recorded for {lease_s:g}s")
        report.nudged.append(run_id)


# -- 4. runs that stopped moving, with no message left ------------------------------------------


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


def _redrive_stalled(app: Celery, store: StateStore, lease_s: float,
                     report: SweepReport) -> None:
    """Re-drive each live run idle for ``2 x lease_s`` of which no message is left in the
    broker, once two passes at least ``lease_s / 3`` apart have found it so."""
    with translate_errors(store.url):
        seconds, micros = store.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        ids = [_text(i) for i in store.redis.zrangebyscore(
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
        with _broker(app) as (channel, client):
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
        last_id, fields = (_text(last[0][0]), last[0][1]) if last else ("0-0", {})
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
                              None if mark is None else _text(mark)))
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
            run.owed = _owed(store, run.route, run.run_id)
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
            message = _read("", json.loads(_text(raw)), 0.0)
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if message is not None:
            runs.add(str(message.kwargs.get("run_id", "")))
    runs |= {str(m.kwargs.get("run_id", "")) for m in _unacked(client, channel)}
    return runs


def _redrive(app: Celery, store: StateStore, run: _Idle, report: SweepReport) -> None:
    """Hand out what the run owes again, or compensate it when re-driving did not help:
    re-drives count up while nothing but the last re-drive happened to the run."""
    last_id, fields = run.last
    redrives = int(fields.get("redrive", 0)) + 1 if fields.get("event") == "run.redriven" else 1
    try:
        with translate_errors(store.url):  # moved since the broker was read: not stalled
            newest = store.redis.xrevrange(RunKeys(run.run_id).log, count=1)
        if newest and _text(newest[0][0]) != last_id:
            return
        if redrives > MAX_REDRIVES:
            reason = (f"the run stopped moving again after {MAX_REDRIVES} re-drives from its "
                      "last sealed versions")
            saga.start(app, store, run.run_id, reason=reason)
            report.stuck.append(run.run_id)
            log.warning("sweeper: compensating run %s: %s", run.run_id, reason)
            return
        owed = _redrive_route(app, store, run.route, run.run_id)
        store.note(run.run_id, "run.redriven", by="sweeper", steps=",".join(owed),
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
    report.redriven[run.run_id] = owed
    log.warning("sweeper: re-drove run %s (%s): it stopped moving, with no message of it left "
                "in the broker", run.run_id, ", ".join(owed) or "nothing owed")


# -- what each kind of flow does, from its route alone (no agent code) --------------------------


def _enqueue(app: Celery, store: StateStore, route: Route, run_id: str) -> None:
    if route.kind is FlowKind.WORKFLOW:  # from the first stage, or where a replay starts
        canvas.send(app, canvas.compile_route(app, route, run_id, start=int(route.start or 0),
                                              upstream=route.input_version))
    else:
        choreography.enqueue(app, store, route, run_id)


def _owed(store: StateStore, route: Route, run_id: str) -> list[str]:
    if route.kind is FlowKind.WORKFLOW:
        return canvas.owed(store, route, run_id)[1]
    return [key for key, _ in choreography.owed(store, run_id)]


def _redrive_route(app: Celery, store: StateStore, route: Route, run_id: str) -> list[str]:
    if route.kind is FlowKind.WORKFLOW:
        return canvas.redrive(app, store, route, run_id)
    return choreography.redrive(app, store, route, run_id)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
