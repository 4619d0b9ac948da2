"""Agents used only by the tests, loaded by the test workers via PIPELINE_AGENT_MODULES."""

from __future__ import annotations

import os
from typing import Any

from celery.signals import task_postrun
from marshmallow import Schema, fields

from pipeline import StepContext, Workflow, agent, contract

EXECUTIONS_KEY = "test:executions:{run_id}:{agent}"
CRASH_AFTER_SEAL_KEY = "test:crash-after-seal:{run_id}"


@contract("count", 1)
class Count(Schema):
    n = fields.Integer(required=True)


def _count(ctx: StepContext) -> None:
    ctx.redis.incr(EXECUTIONS_KEY.format(run_id=ctx.run_id, agent=ctx.agent))


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0)
def increment(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one, counting every execution in Redis."""
    _count(ctx)
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0)
def double(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Double, counting every execution in Redis."""
    _count(ctx)
    return {"n": payload["n"] * 2}


counting = Workflow("counting", [increment, double])


@task_postrun.connect
def _crash_after_seal(task_id: str, task: Any, kwargs: dict[str, Any] | None = None,
                      **_: Any) -> None:
    """Kill the pool process right after a step sealed, before its message is acked,
    once per run whose test asked for it: the broker then delivers the step again."""
    run_id = (kwargs or {}).get("run_id")
    if not run_id or task.name != "agent.increment":
        return
    from pipeline.app import store_for

    client = store_for(task.app).redis
    if client.delete(CRASH_AFTER_SEAL_KEY.format(run_id=run_id)):
        os._exit(1)
