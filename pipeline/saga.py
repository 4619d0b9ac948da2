"""Compensation (saga): undo a failed run's sealed steps, newest first, once each.

The canvas's errback only *begins* the saga (one atomic guard per run, however
many times Celery calls it) and enqueues ``pipeline.compensate_run``. That task
plans from the state stream, never from the errback's request: every sealed
agent version, and every step whose output broke its contract (its side
effects happened), grouped by workflow stage, newest stage first. A stage's
compensations run side by side, each on its agent's queue; the last one in
moves the saga to the next stage (Redis counts them, in one script), and the
last stage ends the run ``compensated`` (``cancelled`` for a run a person
cancelled) or ``compensation_failed``. A
compensation that keeps failing goes to the dead-letter stream ``pipeline:dead``
and the saga goes on; ``pipeline compensate RUN`` re-drives what is still owed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, Task

from . import catalog
from .agent import Agent
from .counters import count_compensation
from .errors import RunNotFound, RunNotLive, UnknownWorkflow, WorkflowDefinitionError
from .flow import known_route, route_of
from .keys import DEAD_LETTERS, SAGAS, RunKeys
from .lua import Batch, Script, checked
from .names import COMPENSATE_RUN_TASK, compensate_task
from .route import EDIT_STEP, agent_of, newest_first
from .state import RunStatus, StateStore, Version, translate_errors

__all__ = ["CompensationContext", "begin", "compensate_run", "compensate_step", "dead_letter",
           "redrive"]

log = logging.getLogger(__name__)

DEFAULT_COMPENSATION_RETRIES = 3
DEAD_LETTERS_MAXLEN = 100_000
SELF_COMPENSATED = "self"
"""``c:<step>`` in the saga hash of a step that claimed its own compensation (runner)."""

_PKG = "pipeline.state"
BEGIN = Script(_PKG, "saga_begin.lua")
PLAN = Script(_PKG, "saga_plan.lua")
DONE = Script(_PKG, "saga_done.lua")
REDRIVE = Script(_PKG, "saga_redrive.lua")


@dataclass(frozen=True, slots=True, kw_only=True)
class CompensationContext:
    """What an agent's ``compensate`` receives to undo its step.

    ``output`` is the sealed output (``version`` its number), or the output
    that broke the contract (``version`` None); ``data`` is what the agent
    recorded at execute time with ``ctx.remember``. Compensations must be
    idempotent: a worker killed mid-compensation runs it again.
    """

    run_id: str
    step: str
    agent: str
    input: Any
    input_versions: tuple[int, ...]
    output: Any
    version: int | None
    data: Any
    attempt: int
    redis: redis.Redis


def begin(store: StateStore, run_id: str, *, reason: str, agent: str = "",
          cancelled: bool = False) -> tuple[bool, bool]:
    """Mark the run compensating, once: (True for the call that did it, whether the saga
    still needs its planner: begun, here or elsewhere, and not planned yet). A run
    ``cancelled`` by a person ends ``cancelled`` once compensated."""
    keys = RunKeys(run_id)
    batch = Batch(store.redis)
    # watched first, in the same round trip: a worker that dies right after leaves the saga
    # where the sweeper looks (it drops the entry if the run was not compensating after all)
    batch.command("ZADD", SAGAS, "NX", int(time.time() * 1000), run_id)
    at = batch.script(BEGIN, [keys.run, keys.log, keys.saga], [reason[:2000], agent,
                                                         "1" if cancelled else ""])
    with translate_errors(store.url):
        reply = checked(batch.execute()[at])
    if reply[0] == "missing":
        raise RunNotFound(f"no run {run_id!r} to compensate")
    if reply[0] == "started":
        return True, True
    return False, reply[1] == "compensating" and reply[2] == "0"


def start(app: Celery, store: StateStore, run_id: str, *, reason: str, agent: str = "",
          cancelled: bool = False) -> bool:
    """Begin the saga and enqueue its planner; False when it had begun already.

    A saga begun elsewhere (a choreography's failure event) and not planned yet gets its
    planner enqueued here too: planning twice is harmless, never planning leaves the run
    compensating for good.
    """
    started, unplanned = begin(store, run_id, reason=reason, agent=agent, cancelled=cancelled)
    if started or unplanned:
        app.send_task(COMPENSATE_RUN_TASK, args=(run_id,), queue=app.conf.task_default_queue)
    return started


def plan(store: StateStore, run_id: str, *, owed_only: bool = False) -> list[list[str]]:
    """Stages of step keys to compensate, newest first (see the module docstring):
    a workflow's by stage, a choreography's one step a stage, newest sealed first."""
    info = store.run_info(run_id)
    # a degraded stand-in and a person's edit (replay --edit) executed nothing to undo
    sealed = {v.step: v for v in store.history(run_id)[1:]
              if not v.degraded and v.step != EDIT_STEP}
    broken = {e["step"] for e in store.log(run_id)
              if e.get("event") == "step.failed" and e.get("side") == "output"}
    if owed_only:
        with translate_errors(store.url):
            saga = store.redis.hgetall(RunKeys(run_id).saga)
        sealed = {s: v for s, v in sealed.items() if saga.get(f"c:{s}") != "done"}
        broken = {s for s in broken if saga.get(f"c:{s}") != "done"}
    try:
        return route_of(info).compensation_stages(sealed, broken)
    except (UnknownWorkflow, WorkflowDefinitionError) as e:
        # A run from before routes were recorded, of a flow not registered here (or a
        # route this version cannot read): one step at a time, newest first, is a valid
        # order for any flow (only slower).
        log.warning("run %s of %s: %s; compensating one step at a time, newest first",
                    run_id, info.workflow, e)
        return newest_first(sealed, broken)


def compensate_run(app: Celery, store: StateStore, run_id: str, redrive: bool = False) -> None:
    """The saga's planner: record the plan and dispatch its first stage."""
    info = store.run_info(run_id)
    if info.status is not RunStatus.COMPENSATING:
        log.info("run %s is %s: nothing to compensate", run_id, info.status.value)
        return
    stages = plan(store, run_id, owed_only=redrive)
    keys = RunKeys(run_id)
    if not stages and not redrive:  # nothing had run: nothing to undo
        with translate_errors(store.url):
            cancelled = store.redis.hget(keys.saga, "cancelled") == "1"
        store.finish(run_id, RunStatus.CANCELLED if cancelled else RunStatus.FAILED,
                     error=info.error or "", agent=info.failed_agent or "")
        return
    with translate_errors(store.url):
        PLAN(store.redis, [keys.run, keys.log, keys.saga],
             [json.dumps(stages), "1" if redrive else "0"])
    advance(app, store, run_id)


def advance(app: Celery, store: StateStore, run_id: str, step: str = "", outcome: str = "done",
            agent: str = "", detail: str = "") -> str:
    """Record ``step``'s outcome (if any) and dispatch what the saga owes next."""
    batch = Batch(store.redis)
    batch.script(DONE, RunKeys(run_id).all(), [step, outcome, agent, detail, store.retention_s])
    batch.command("ZADD", SAGAS, "XX", int(time.time() * 1000), run_id)  # it moved
    with translate_errors(store.url):
        reply = checked(batch.execute()[0])
        if reply[0] in ("finished", "idle"):
            store.redis.zrem(SAGAS, run_id)
    if reply[0] == "next":
        _dispatch(app, store, run_id, reply[1:])
    return str(reply[0])


def compensate_step(app: Celery, task: Task, store: StateStore, agent: Agent, run_id: str,
                    step: str) -> None:
    """Undo one step, retrying with backoff; record it done or dead, and move the saga on."""
    keys = RunKeys(run_id)
    mine = f"claimed:{task.request.id}"
    with translate_errors(store.url):
        # Claim the step: one compensation task at a time undoes it. A step
        # whose output broke its contract after the saga began may have claimed
        # it first and undone itself (runner).
        claimed = store.redis.hsetnx(keys.saga, f"c:{step}", mine)
        state = mine if claimed else store.redis.hget(keys.saga, f"c:{step}")
    if state in ("done", "dead"):
        # Recorded already: delivered again, perhaps because the worker died
        # before it handed over to the next stage. Hand over again.
        advance(app, store, run_id)
        return
    if state not in (mine, SELF_COMPENSATED):
        return  # another task holds it (a duplicate message): it will record it
    outcome, detail = "done", ""
    if agent.compensate is not None and state != SELF_COMPENSATED:
        try:
            agent.compensate(_context(store, agent, run_id, step, task.request.retries + 1))
        except Exception as e:
            if task.request.retries < agent.compensation_retries:
                countdown = agent.retry_countdown_s(task.request.retries)
                store.note(run_id, "compensation.retry", step=step, agent=agent.name,
                           attempt=task.request.retries + 1, error_type=type(e).__name__,
                           error=str(e)[:500], countdown_s=countdown)
                raise task.retry(exc=e, countdown=countdown,
                                 max_retries=agent.compensation_retries) from e
            outcome, detail = "dead", f"{type(e).__name__}: {e}"[:2000]
    give_up_or_record(app, store, run_id, step, agent.name, outcome, detail)


def give_up_or_record(app: Celery, store: StateStore, run_id: str, step: str, agent: str,
                      outcome: str, detail: str) -> None:
    """Record a compensation's outcome once; a dead one also goes to ``pipeline:dead``.
    Each outcome recorded is counted for the exporter (a separate command: the counters
    live in another slot than the run's keys)."""
    if advance(app, store, run_id, step, outcome, agent, detail) == "dup":
        return
    if outcome == "dead":
        dead_letter(store, run_id, step, agent, detail)
    count_compensation(store.redis, agent, outcome)


def redrive(app: Celery, store: StateStore, run_id: str) -> None:
    """Compensate again what a ``compensation_failed`` run still owes."""
    keys = RunKeys(run_id)
    batch = Batch(store.redis)
    batch.command("ZADD", SAGAS, "NX", int(time.time() * 1000), run_id)  # as begin() does
    at = batch.script(REDRIVE, [keys.run, keys.log, keys.saga], [])
    with translate_errors(store.url):
        reply = checked(batch.execute()[at])
    if reply[0] != "ok":
        if not reply[1]:
            raise RunNotFound(f"no run {run_id!r}")
        raise RunNotLive(f"run {run_id} is {reply[1]}, not compensation_failed: nothing to "
                         "re-drive")
    app.send_task(COMPENSATE_RUN_TASK, args=(run_id,), kwargs={"redrive": True},
                  queue=app.conf.task_default_queue)


def _dispatch(app: Celery, store: StateStore, run_id: str, steps: Sequence[str]) -> None:
    """Send each step's compensation to its agent's queue, as the run's route names it
    (this worker need not know the agent)."""
    route = known_route(store.run_info(run_id))
    for step in steps:
        name = agent_of(step)
        app.send_task(compensate_task(name), args=(run_id, step),
                      queue=catalog.queue_of(store.redis, name, route))


def _context(store: StateStore, agent: Agent, run_id: str, step: str,
             attempt: int) -> CompensationContext:
    keys = RunKeys(run_id)
    with translate_errors(store.url):
        sealed = store.redis.hget(keys.steps, step)
        data = store.redis.hget(keys.undo, step)
    output_version: Version | None = store.get(run_id, int(sealed)) if sealed else None
    if output_version is not None:
        parents = output_version.parents
        output = output_version.payload
    else:  # its output broke the contract: never sealed, taken from the trace
        started = [e for e in store.log(run_id)
                   if e.get("event") == "step.started" and e.get("step") == step]
        parents = tuple(int(v) for v in started[-1]["inputs"].split(",")) if started else ()
        output = None
    inputs = [store.get(run_id, p) for p in parents]
    payload = inputs[0].payload if len(inputs) == 1 else {v.agent: v.payload for v in inputs}
    return CompensationContext(
        run_id=run_id, step=step, agent=agent.name, input=payload,
        input_versions=tuple(parents), output=output,
        version=output_version.version if output_version else None,
        data=json.loads(data) if data else None, attempt=attempt, redis=store.redis,
    )


def dead_letter(store: StateStore, run_id: str, step: str, agent: str, error: str) -> None:
    """Add a compensation that failed for good to ``pipeline:dead`` for a person."""
    with translate_errors(store.url):
        version = store.redis.hget(RunKeys(run_id).steps, step) or ""
        store.redis.xadd(DEAD_LETTERS, {"run_id": run_id, "step": step, "agent": agent,
                                        "version": version, "error": error[:2000]},
                         maxlen=DEAD_LETTERS_MAXLEN, approximate=True)
