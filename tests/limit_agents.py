"""Agents that draw on named limits (``tests/test_limited_steps.py``), loaded by every test
worker through ``tests.agents``: one limit per test, so that no test's draws meet
another's (the tests share a database between workers of a test, never across tests).
"""

from __future__ import annotations

import time
from typing import Any

from pipeline import Budget, RateLimited, StepContext, Workflow, agent, limit
from pipeline.choreography import Choreography
from tests.quick_agents import EXECUTIONS_KEY, book, undo

IN_FLIGHT_KEY = "test:limited:in-flight:{agent}"
"""How many calls of the agent run right now, and (``:max``) the most that ever did."""

ONE_AT_A_TIME = limit("test:one-at-a-time", concurrency=1)
TOKENS = limit("test:tokens", tokens_per_minute=600)
"""10 tokens a second: an estimate of 600 fills the minute, a usage of 20 gives back most."""
HELD = limit("test:held", concurrency=1)
"""A test holds its one slot itself (a ``Limiter`` in the test process)."""
SMALL = limit("test:small", tokens_per_minute=1000)
STORM = limit("test:storm", requests_per_minute=6000, concurrency=4)
STORM_KEY = "test:storm"
"""How many more calls the ``touchy`` agent's API answers 429 (Retry-After 0.2 s): a storm
counted in calls, not in time, so a slow machine sees it as a fast one does."""
PRICED = limit("test:priced", tokens_per_minute=1_000_000, price_per_1k_prompt=0.01,
               price_per_1k_completion=0.03)
"""A call of the budgeted agents uses 200 prompt and 100 completion tokens: 300 tokens,
costing 0.005; each reserves its estimate of 300 tokens, 0.009 at the dearer price."""


def _in_flight(ctx: StepContext, hold_s: float) -> None:
    key = IN_FLIGHT_KEY.format(agent=ctx.agent)
    now = ctx.redis.incr(key)
    ctx.redis.eval("if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then "
                   "redis.call('SET', KEYS[1], ARGV[1]) end", 1, key + ":max", now)
    time.sleep(hold_s)
    ctx.redis.decr(key)


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0, max_deliveries=2,
       limits=("test:one-at-a-time",))
def single_file(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one, a third of a second at a time, one call in the fleet at once."""
    _in_flight(ctx, 0.3)
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0, max_deliveries=2,
       limits=("test:tokens",), estimate_tokens=600)
def frugal(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Reserve a minute's tokens, use 20 of them."""
    ctx.report_usage(prompt_tokens=15, completion_tokens=5, model="test")
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0,
       limits=("test:held",), limit_wait_max_s=0.5, fallback="skip",
       default_output={"n": -1})
def patient_skip(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one, when the held slot is free; stand in with -1 after half a second."""
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0,
       limits=("test:small",), estimate_tokens=lambda payload: payload["n"])
def sized(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one; a call is expected to use n tokens (a thousand a minute pass)."""
    return {"n": payload["n"] + 1}


one_at_a_time = Workflow("one_at_a_time", [single_file])
frugal_flow = Workflow("frugal_flow", [frugal])
patient = Workflow("patient", [patient_skip])
sized_flow = Workflow("sized_flow", [sized])


def _spend(ctx: StepContext) -> None:
    ctx.redis.incr(EXECUTIONS_KEY.format(run_id=ctx.run_id, agent=ctx.agent))
    book(ctx)
    ctx.report_usage(prompt_tokens=200, completion_tokens=100, model="test")


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0, compensate=undo,
       limits=("test:priced",), estimate_tokens=300)
def draft(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one, for 300 tokens."""
    _spend(ctx)
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0, compensate=undo,
       limits=("test:priced",), estimate_tokens=300)
def polish(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add ten, for 300 tokens."""
    _spend(ctx)
    return {"n": payload["n"] + 10}


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0, compensate=undo,
       limits=("test:priced",), estimate_tokens=300)
def publish(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add a hundred, for 300 tokens."""
    _spend(ctx)
    return {"n": payload["n"] + 100}


budgeted = Workflow("budgeted", [draft, polish, publish], budget=Budget(tokens=10_000))


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0, max_deliveries=2,
       limits=("test:storm",))
def touchy(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one, unless its API is in a storm of 429s."""
    if ctx.redis.decr(STORM_KEY) >= 0:
        raise RateLimited("429 Too Many Requests", retry_after_s=0.2)
    return {"n": payload["n"] + 1}


storm = Workflow("storm", [touchy])


# -- a choreography under a budget: spend.requested -> outline -> spend.next -> expand -----


@agent(input="count@1", output="count@1", on=["spend.requested"], emits="spend.next",
       time_limit_s=5, max_retries=0, compensate=undo, limits=("test:priced",),
       estimate_tokens=300)
def outline(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one, for 300 tokens, when asked."""
    _spend(ctx)
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", on=["spend.next"], emits="spend.done",
       time_limit_s=5, max_retries=0, compensate=undo, limits=("test:priced",),
       estimate_tokens=300)
def expand(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add ten, for 300 tokens, after the outline."""
    _spend(ctx)
    return {"n": payload["n"] + 10}


spending = Choreography("spending", start="spend.requested", terminal=["spend.done"],
                        input="count@1", budget=Budget(tokens=400))
