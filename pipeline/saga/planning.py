"""Beginning a saga (once per run, however many times Celery reports the failure),
planning it from the run's versions and log, and re-driving one whose undo died."""

from __future__ import annotations

import json
import logging
import time

from celery import Celery

from ..errors import RunNotFound, RunNotLive, UnknownWorkflow, WorkflowDefinitionError
from ..flow import route_of
from ..keys import SAGAS, RunKeys
from ..lua import Batch, Script, checked
from ..names import COMPENSATE_RUN_TASK
from ..route import EDIT_STEP, newest_first
from ..state import RunStatus, StateStore, translate_errors
from .stages import advance

__all__ = ["BEGIN", "PLAN", "REDRIVE", "begin", "compensate_run", "plan", "redrive", "start"]

log = logging.getLogger(__name__)

BEGIN = Script("pipeline.saga", "begin.lua", include=["pipeline.state:budget.lua"])
PLAN = Script("pipeline.saga", "plan.lua")
REDRIVE = Script("pipeline.saga", "redrive.lua")


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
