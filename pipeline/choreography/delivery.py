"""One event delivery's dealings with the run's ledger, inside the step that handles it:
ended, and what its agent emits published, in the round trip that seals its output."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task

from ..agent import Agent, agents
from ..keys import RunKeys
from ..lua import Batch
from ..state import StateStore, translate_errors
from ..state.store import Extra
from .publishing import EMIT, Handover, emit_args, follow_up

__all__ = ["HANDOVER_BACKOFF_MAX_S", "HANDOVER_RETRIES", "Delivery"]

log = logging.getLogger(__name__)

HANDOVER_RETRIES = 8
HANDOVER_BACKOFF_MAX_S = 30.0


class Delivery:
    """One event delivery's dealings with the ledger, inside a step (the runner's helper)."""

    def __init__(self, agent: Agent, *, run_id: str, step: str, event: str) -> None:
        self.agent = agent
        self.run_id = run_id
        self.step = step
        self.event = event

    def seal_extra(self, store: StateStore, task_id: str) -> Extra:
        """Queue ``emit.lua`` behind the seal: end this delivery and publish what it emits."""
        a = self.agent
        subs = [s.name for s in agents.subscribers(a.emits)] if a.emits else []

        def emit(batch: Batch) -> int:
            return batch.script(EMIT, RunKeys(self.run_id).all(), emit_args(
                delivery=self.step, outcome="handled", task_id=task_id, source=self.step,
                event_type=a.emits or "", publisher=a.name, cause=self.event, version="",
                terminal=(), failure=False, retention_s=store.retention_s,
                subscribers=subs))

        return emit

    def hand_over(self, app: Celery, store: StateStore, reply: Any) -> Handover:
        """Dispatch what the delivery published; enqueue the saga's planner if it stalled."""
        if isinstance(reply, Exception):
            raise reply
        handover = Handover.from_reply(reply)
        follow_up(app, store, self.run_id, handover)
        return handover

    def hand_over_or_retry(self, task: Task, store: StateStore, reply: Any) -> None:
        """Hand over; if sending fails (the broker, Redis), retry the task: the retry opens
        the step as sealed by this task and sends what nobody has picked up. A delivery
        that was handled is never failed, and so never compensated, for a broker blip."""
        try:
            self.hand_over(task.app, store, reply)
        except Exception as e:
            retries = int(task.request.retries or 0)
            if retries >= HANDOVER_RETRIES:
                raise
            log.warning("run %s: %s sealed, handing over failed (%s); retrying", self.run_id,
                        self.step, e)
            raise task.retry(exc=e, countdown=float(min(2**retries, HANDOVER_BACKOFF_MAX_S)),
                             max_retries=HANDOVER_RETRIES) from e

    def hand_over_again(self, task: Task, store: StateStore, task_id: str) -> None:
        """A redelivered handler whose step is sealed: finish its handover (idempotent)."""
        batch = Batch(store.redis)
        index = self.seal_extra(store, task_id)(batch)
        with translate_errors(store.url):
            reply = batch.execute()[index]
        self.hand_over_or_retry(task, store, reply)

    def release(self, store: StateStore, task_id: str) -> None:
        """Give up this task's claim (the run parked): a resume hands the delivery out again."""
        with translate_errors(store.url):
            key = RunKeys(self.run_id).ledger
            if store.redis.hget(key, self.step) == f"running:{task_id}":
                store.redis.hset(key, self.step, "dispatched")
