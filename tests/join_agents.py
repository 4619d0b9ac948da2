"""Agents for the chord-join tests (``tests/test_join.py``), loaded by every test worker
through ``tests.agents``: a stage of three members that can wait for one another or fail
on purpose, a body that counts its executions, and hooks that kill a pool process (or
lose the body's message) at the edges of the join.

The hooks wrap the pipeline's result backend in the worker processes only, and fire only
for a run whose key the test set: every other run goes through untouched.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery.signals import task_postrun
from marshmallow import Schema, fields

from pipeline import AgentError, StepContext, Workflow, agent, contract, parallel
from pipeline.join import JOINED, Backend
from pipeline.keys import RunKeys
from tests.quick_agents import EXECUTIONS_KEY

HOLD_KEY = "test:join-hold:{run_id}"
"""The stage's members wait, once started, while this key exists."""
FAIL_N = 13
"""A run whose input is this fails in its ``right`` member."""
CRASH_AFTER_BODY_KEY = "test:join-crash-after-body:{run_id}"
"""The member that joined dies after its body went out and was opened, before its ack."""
CRASH_BEFORE_BODY_KEY = "test:join-crash-before-body:{run_id}"
"""The member that joined dies after its seal joined the stage, before the body went out."""
ENDED_KEY = "test:join-ended:{run_id}"
"""Hash step key -> tasks that ended (before their ack) for a run with
``CRASH_AFTER_BODY_KEY``."""
DROP_BODY_KEY = "test:join-drop-body:{run_id}"
"""The body's message is lost: the member that joined returns without sending it."""
BODY_STEP = "2:gather"


def _member(ctx: StepContext) -> None:
    client = ctx.redis
    client.incr(EXECUTIONS_KEY.format(run_id=ctx.run_id, agent=ctx.agent))
    deadline = time.monotonic() + 4.0
    while client.exists(HOLD_KEY.format(run_id=ctx.run_id)) and time.monotonic() < deadline:
        time.sleep(0.005)


@contract("trio", 1)
class Trio(Schema):
    """The fan-in of ``left``, ``middle`` and ``right``."""

    left = fields.Nested("Count", required=True)
    middle = fields.Nested("Count", required=True)
    right = fields.Nested("Count", required=True)


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0)
def seed(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Pass the count on."""
    return {"n": payload["n"]}


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0)
def left(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one."""
    _member(ctx)
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0)
def middle(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add ten."""
    _member(ctx)
    return {"n": payload["n"] + 10}


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0)
def right(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add a hundred; fail for good on ``FAIL_N``."""
    _member(ctx)
    if payload["n"] == FAIL_N:
        raise AgentError(f"run {ctx.run_id}: agent right fails on {FAIL_N} on purpose")
    return {"n": payload["n"] + 100}


@agent(input="trio@1", output="count@1", time_limit_s=5, max_retries=0)
def gather(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add the three branches, counting every execution."""
    ctx.redis.incr(EXECUTIONS_KEY.format(run_id=ctx.run_id, agent=ctx.agent))
    return {"n": sum(payload[k]["n"] for k in ("left", "middle", "right"))}


trio = Workflow("trio", [seed, parallel(left, middle, right), gather])


def _store_redis(app: Any) -> Any:
    from pipeline.app import store_for  # a worker's own store (the app layer, lazily)

    return store_for(app).redis


_send_body = Backend.on_chord_part_return


def _edges_of_the_join(self: Backend, request: Any, state: str, result: Any,
                       *args: Any, **kwargs: Any) -> None:
    run_id = (getattr(request, "kwargs", None) or {}).get("run_id")
    if run_id and getattr(request, JOINED, None):
        client = _store_redis(self.app)
        if client.delete(CRASH_BEFORE_BODY_KEY.format(run_id=run_id)):
            os._exit(1)
        if client.delete(DROP_BODY_KEY.format(run_id=run_id)):
            return
    _send_body(self, request, state, result, *args, **kwargs)


Backend.on_chord_part_return = _edges_of_the_join  # type: ignore[method-assign]


@task_postrun.connect
def _crash_after_body(task_id: str, task: Any, kwargs: dict[str, Any] | None = None,
                      **_: Any) -> None:
    run_id = (kwargs or {}).get("run_id")
    if not run_id or not str(task.name).startswith("agent."):
        return
    client = _store_redis(task.app)
    if client.exists(CRASH_AFTER_BODY_KEY.format(run_id=run_id), ENDED_KEY.format(run_id=run_id)):
        client.hincrby(ENDED_KEY.format(run_id=run_id), kwargs["step"], 1)  # type: ignore[index]
        client.expire(ENDED_KEY.format(run_id=run_id), 3600)
    if not getattr(task.request, JOINED, None):
        return
    if not client.delete(CRASH_AFTER_BODY_KEY.format(run_id=run_id)):
        return
    deadline = time.monotonic() + 10.0  # the body opened: its message is in a worker's hands
    while not client.hexists(RunKeys(run_id).deliveries, BODY_STEP) \
            and time.monotonic() < deadline:
        time.sleep(0.005)
    os._exit(1)
