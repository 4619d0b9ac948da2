"""The saga, stage by stage: each step's compensation on its agent's queue, its outcome
recorded once (``done.lua``), and the next stage dispatched when the last one is in."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

from celery import Celery, Task

from .. import catalog
from ..agent import Agent
from ..counters import count_compensation
from ..flow import known_route
from ..keys import SAGAS, RunKeys
from ..lua import Batch, Script, checked
from ..names import compensate_task
from ..route import agent_of
from ..state import StateStore, Version, input_payload, translate_errors
from .undo import SELF_COMPENSATED, CompensationContext, dead_letter

__all__ = ["DONE", "advance", "compensate_step", "give_up_or_record"]

log = logging.getLogger(__name__)

DONE = Script("pipeline.saga", "done.lua")


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
    return CompensationContext(
        run_id=run_id, step=step, agent=agent.name,
        input=input_payload(inputs, len(inputs) > 1),
        input_versions=tuple(parents), output=output,
        version=output_version.version if output_version else None,
        data=json.loads(data) if data else None, attempt=attempt, redis=store.redis,
    )
