"""Runs whose client died before enqueuing them, and sagas that stopped moving.

A client creates a run, then enqueues it; one that died in between leaves the run in
``UNENQUEUED``. Past the lease, the sweeper sends its canvas (or its first deliveries)
from the route the run recorded. Were the client alive after all, each step would still
seal once.

A saga stops moving when a worker dies between beginning it and sending its planner, or
between two stages. A run still compensating whose saga recorded nothing for the lease
gets its planner sent again; the planner plans once and dispatches only compensations
nobody has claimed. Both parts look at no more than ``BATCH`` runs a pass, the oldest
first.
"""

from __future__ import annotations

import contextlib
import logging

from celery import Celery

from ..errors import StoreError, UnknownWorkflow, WorkflowDefinitionError
from ..flow import recorded_route
from ..keys import SAGAS, UNENQUEUED, RunKeys
from ..names import COMPENSATE_RUN_TASK
from ..state import StateStore, translate_errors
from .common import BATCH, SweepReport, text
from .flows import enqueue

__all__ = ["enqueue_forgotten", "nudge_sagas"]

log = logging.getLogger(__package__)  # the sweeper's one logger, whichever part logs


def enqueue_forgotten(app: Celery, store: StateStore, lease_s: float,
                      report: SweepReport) -> None:
    """Enqueue the runs created longer than ``lease_s`` ago and never enqueued."""
    with translate_errors(store.url):
        seconds, _ = store.redis.time()
        ids = [text(i) for i in store.redis.zrangebyscore(
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
        enqueue(app, store, route, run_id)
        store.mark_enqueued(run_id)
        store.note(run_id, "run.enqueued", by="sweeper",
                   reason="its client died between creating and enqueuing it")
        report.enqueued.append(run_id)


def nudge_sagas(app: Celery, store: StateStore, lease_s: float, report: SweepReport) -> None:
    """Send the planner again for each saga that recorded nothing for ``lease_s``."""
    with translate_errors(store.url):
        seconds, _ = store.redis.time()
        now_ms = seconds * 1000
        ids = [text(i) for i in store.redis.zrangebyscore(
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
