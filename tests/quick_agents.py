"""Saga test agents small enough for a short broker visibility timeout, and the
side-effect bookkeeping every saga test agent shares.

``create_app`` refuses any registered agent whose time limit, hard-limit grace
and longest retry countdown (at least the 30 s store backoff) reach half the
visibility timeout. A worker that must see a killed worker's messages again
quickly therefore loads this module alone (``PIPELINE_AGENT_MODULES=
tests.quick_agents``): its agents need only 2 * (3 + 5 + 30) = 76 s. It must
not import ``tests.agents``, whose agents need 150 s.
"""

from __future__ import annotations

import time
from typing import Any

from marshmallow import Schema, fields

from pipeline import StepContext, Workflow, agent, contract
from pipeline.saga import CompensationContext

QUICK_TIME_LIMIT_S = 3
QUICK_VISIBILITY_TIMEOUT_S = 2 * (QUICK_TIME_LIMIT_S + 5 + 30)

HOLD_KEY = "test:hold:{run_id}"
"""A step of the run waits while this key exists (a sibling still at work)."""
EXECUTIONS_KEY = "test:executions:{run_id}:{agent}"
SIDE_EFFECTS_KEY = "test:side-effects:{run_id}"
"""Hash agent -> "1": what the run's agents did, like the credit ledger."""
COMP_TRIES_KEY = "test:comp-tries:{run_id}:{agent}"
"""Compensations of the agent's step that started (retries and redeliveries count)."""
UNDONE_KEY = "test:undone:{run_id}:{agent}"
"""Compensations of the agent's step that ran to the end."""
COMP_HOLD_KEY = "test:comp-hold:{run_id}"
"""Every compensation of the run waits while this key exists."""


def book(ctx: StepContext) -> None:
    """Leave this step's side effect (idempotent per run and agent)."""
    ctx.redis.hset(SIDE_EFFECTS_KEY.format(run_id=ctx.run_id), ctx.agent, "1")


def hold(ctx: StepContext) -> None:
    """Count the execution, then wait while the test holds the run."""
    ctx.redis.incr(EXECUTIONS_KEY.format(run_id=ctx.run_id, agent=ctx.agent))
    while ctx.redis.exists(HOLD_KEY.format(run_id=ctx.run_id)):
        time.sleep(0.02)


def undo(ctx: CompensationContext) -> None:
    """Drop the step's side effect, counting tries and completions; wait while held."""
    ctx.redis.incr(COMP_TRIES_KEY.format(run_id=ctx.run_id, agent=ctx.agent))
    while ctx.redis.exists(COMP_HOLD_KEY.format(run_id=ctx.run_id)):
        time.sleep(0.02)
    finish_undo(ctx)


def finish_undo(ctx: CompensationContext) -> None:
    ctx.redis.hdel(SIDE_EFFECTS_KEY.format(run_id=ctx.run_id), ctx.agent)
    ctx.redis.incr(UNDONE_KEY.format(run_id=ctx.run_id, agent=ctx.agent))


@contract("quick_count", 1)
class QuickCount(Schema):
    n = fields.Integer(required=True)


QUICK = {"time_limit_s": QUICK_TIME_LIMIT_S, "max_retries": 0, "retry_backoff_max_s": 1.0,
         "compensation_retries": 1, "retry_backoff_s": 0.1}


@agent(input="quick_count@1", output="quick_count@1", **QUICK)
def quick_hold(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Wait while the run is held, then add one."""
    hold(ctx)
    book(ctx)
    return {"n": payload["n"] + 1}


@agent(input="quick_count@1", output="quick_count@1", compensate=undo, **QUICK)
def quick_booked(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one, leaving a side effect that its compensation undoes."""
    book(ctx)
    return {"n": payload["n"] + 1}


@agent(input="quick_count@1", output="quick_count@1", compensate=undo, **QUICK)
def quick_trip(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one; the tests fail it with PIPELINE_CHAOS."""
    book(ctx)
    return {"n": payload["n"] + 1}


quick_held = Workflow("quick_held", [quick_hold])
quick_undone = Workflow("quick_undone", [quick_booked, quick_trip])
