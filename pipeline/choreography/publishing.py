"""Publishing events and handing out their deliveries, from a run's route alone.

An event is recorded once (``emit.lua``: its id, type, cause and version, and one
``dispatched`` delivery per subscriber) and then sent, one Celery task per
subscriber on its queue. None of this needs the flow's agent code: a worker that
imports none of them can start, re-drive or redeliver a run from its recorded route.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery

from .. import catalog, saga
from ..agent import agents
from ..errors import InputError
from ..events import failure_event
from ..keys import RunKeys
from ..lua import Script
from ..names import ERRBACK_TASK, default_queue, step_task
from ..route import Route
from ..state import StateStore, translate_errors

__all__ = ["CLIENT", "EMIT", "RECLAIM", "START", "Handover", "dispatch", "emit_args",
           "enqueue", "event_record", "fail_delivery", "follow_up", "owed", "publish",
           "redeliver", "redrive"]

log = logging.getLogger(__name__)

EMIT = Script("pipeline.choreography", "emit.lua", include=["pipeline.state:budget.lua"])
RECLAIM = Script("pipeline.choreography", "reclaim.lua")
START = "start"
"""The publisher key of a run's starting event."""
CLIENT = "client"


@dataclass(frozen=True, slots=True)
class Handover:
    """What ``emit.lua`` answered: an event to dispatch, or how the run stands."""

    outcome: str  # published | again | succeeded | compensating | done | missing | unsealed
    event: str = ""
    version: int = -1
    subscribers: tuple[str, ...] = ()
    event_type: str = ""
    reason: str = ""  # why the saga began (compensating)

    @classmethod
    def from_reply(cls, reply: Sequence[Any]) -> Handover:
        if reply[0] in ("published", "again"):
            return cls(reply[0], str(reply[1]), int(reply[3]), tuple(reply[4:]), str(reply[2]))
        if reply[0] == "succeeded":
            return cls("succeeded", version=int(reply[1]))
        if reply[0] == "compensating":  # the call began the saga
            return cls("compensating", reason=str(reply[1]))
        return cls(str(reply[0]))


def emit_args(*, delivery: str, outcome: str, task_id: str, source: str, event_type: str,
               publisher: str, cause: str, version: str, terminal: Sequence[str], failure: bool,
               retention_s: int, subscribers: Sequence[str]) -> list[str | int]:
    return [delivery, outcome, task_id, source, event_type, publisher, cause, version,
            ",".join(terminal), "1" if failure else "0", retention_s, *subscribers]


def publish(store: StateStore, run_id: str, *, source: str, event_type: str, publisher: str,
            version: int, subscribers: Sequence[str], terminal: Sequence[str] = ()) -> Handover:
    """Record an event outside any delivery (a run's start), once per ``source``;
    ``terminal`` (with the start) names the event types that end the run."""
    with translate_errors(store.url):
        reply = EMIT(store.redis, RunKeys(run_id).all(), emit_args(
            delivery="", outcome="", task_id="", source=source, event_type=event_type,
            publisher=publisher, cause="", version=str(version), terminal=terminal,
            failure=False, retention_s=store.retention_s, subscribers=subscribers))
    return Handover.from_reply(reply)


def enqueue(app: Celery, store: StateStore, route: Route, run_id: str) -> None:
    """Publish the run's starting event (once: ``route.start`` to ``route.subscribers``)
    and dispatch its deliveries. Needs no agent code: a worker that imports none of the
    flow's agents enqueues a run its client forgot from the run's recorded route."""
    handover = publish(store, run_id, source=START, event_type=route.start,
                       publisher=CLIENT, version=route.input_version,
                       subscribers=route.subscribers, terminal=route.terminal)
    follow_up(app, store, run_id, handover, queue_of=catalog.resolver(store.redis, route))


def owed(store: StateStore, run_id: str) -> list[tuple[str, str]]:
    """(delivery, its ledger state) of every delivery the run's ledger still owes (never
    claimed, or claimed and not ended), oldest event first."""
    with translate_errors(store.url):
        ledger = store.redis.hgetall(RunKeys(run_id).ledger)
    found = [(str(k), str(v)) for k, v in ledger.items()
             if str(v).partition(":")[0] in ("dispatched", "running")]
    return sorted(found, key=lambda kv: (int(kv[0].split(":")[0].lstrip("e") or 0), kv[0]))


def redrive(app: Celery, store: StateStore, route: Route, run_id: str) -> list[str]:
    """Hand out again every delivery the run's ledger still owes; the delivery keys.

    For a run that stopped moving with none of its messages left in the broker (the
    sweeper). A delivery never claimed goes out as a new task. One claimed by a task whose
    message is gone is claimed for the new task first (in one script), so the new task
    opens it as its own, and finishes its handover if it had sealed; the old task, should
    it turn up after all, is a duplicate. Queues come from the run's route, so this needs
    no agent code.
    """
    handed = []
    for key, state in owed(store, run_id):
        event_id, name = key.split(":", 1)
        task_id = str(uuid.uuid4())
        if state.startswith("running:"):
            with translate_errors(store.url):
                moved = RECLAIM(store.redis, [RunKeys(run_id).ledger],
                                [key, state, f"running:{task_id}"])
            if not moved:
                continue  # it moved on meanwhile: nothing is owed there any more
        event = event_record(store, run_id, event_id)
        dispatch(app, run_id, Handover("again", event_id, int(event["version"]), (name,),
                                       str(event["type"])), task_ids={name: task_id},
                 queue_of=catalog.resolver(store.redis, route))
        handed.append(key)
    return handed


def follow_up(app: Celery, store: StateStore, run_id: str, handover: Handover,
              queue_of: Callable[[str], str] | None = None) -> None:
    """Send what a publication owes: its deliveries, or the planner of the saga it began."""
    if handover.outcome in ("published", "again"):
        dispatch(app, run_id, handover, queue_of=queue_of)
    elif handover.outcome == "compensating":
        saga.start(app, store, run_id, reason=handover.reason)


def dispatch(app: Celery, run_id: str, handover: Handover,
             task_ids: Mapping[str, str] | None = None,
             queue_of: Callable[[str], str] | None = None) -> None:
    """Send one task per subscriber, on its queue, carrying the event id and its version
    (under the task id ``task_ids`` gives a subscriber, else a new one). ``queue_of`` finds
    a subscriber's queue (``catalog.resolver``: the run's route, this process, the fleet);
    without it, the subscriber's queue here, else ``agents.<name>``."""
    for name in handover.subscribers:
        queue = queue_of(name) if queue_of is not None else (
            agents.get(name).queue if name in agents else default_queue(name))
        sig = app.signature(
            step_task(name), args=(handover.version,),
            kwargs={"run_id": run_id, "step": f"{handover.event}:{name}",
                    "event": handover.event, "event_type": handover.event_type},
            queue=queue, ignore_result=True,
        )
        sig.link_error(app.signature(ERRBACK_TASK))
        sig.apply_async(task_id=(task_ids or {}).get(name))


def fail_delivery(store: StateStore, run_id: str, step: str, agent: str, task_id: str,
                  reason: str) -> Handover:
    """Record a delivery that failed for good, publish ``<agent>.failed`` and begin the
    saga, in one script (no sibling can end the run in between)."""
    cause = step.split(":", 1)[0]
    with translate_errors(store.url):
        reply = EMIT(store.redis, RunKeys(run_id).all(), emit_args(
            delivery=step, outcome="failed", task_id=task_id, source=f"{step}#failed",
            event_type=failure_event(agent), publisher=agent, cause=cause, version="",
            terminal=(), failure=True, retention_s=store.retention_s,
            subscribers=(reason[:2000],)))
    return Handover.from_reply(reply)


def event_record(store: StateStore, run_id: str, event_id: str) -> dict[str, Any]:
    with translate_errors(store.url):
        raw = store.redis.hget(RunKeys(run_id).events, event_id)
    if raw is None:
        raise InputError(f"run {run_id} has no event {event_id!r}")
    event: dict[str, Any] = json.loads(raw)
    return event


def redeliver(app: Celery, store: StateStore, run_id: str, event_id: str,
              queue_of: Callable[[str], str] | None = None) -> list[str]:
    """Send an event's deliveries again, to every subscriber (an operator's at-least-once).

    Handling stays once per (event, subscriber): a delivery handled before is
    recorded ``duplicate`` and does nothing.
    """
    event = event_record(store, run_id, event_id)
    subs = tuple(str(s) for s in event.get("subscribers", []))
    if event.get("failure"):
        raise InputError(f"event {event_id} of run {run_id} is a failure event, handled by "
                         "the saga: there is nothing to redeliver")
    dispatch(app, run_id, Handover("again", event_id, int(event["version"]), subs,
                                   str(event["type"])), queue_of=queue_of)
    return list(subs)
