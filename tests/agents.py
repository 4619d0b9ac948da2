"""Agents used only by the tests, loaded by the test workers via PIPELINE_AGENT_MODULES."""

from __future__ import annotations

import os
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_postrun
from marshmallow import Schema, fields

from pipeline import (
    StepCancelled,
    StepContext,
    TransientAgentError,
    Workflow,
    agent,
    contract,
    parallel,
)
from pipeline.breaker import BreakerPolicy
from pipeline.choreography import Choreography
from pipeline.errors import ConfigurationError
from pipeline.saga import CompensationContext
from tests.quick_agents import (
    COMP_TRIES_KEY,
    EXECUTIONS_KEY,
    HOLD_KEY,
    SIDE_EFFECTS_KEY,
    book,
    finish_undo,
    hold,
    undo,
)

CRASH_AFTER_SEAL_KEY = "test:crash-after-seal:{run_id}"
CRASHED_TASK_KEY = "test:crashed-task:{run_id}"


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
    once per run whose test asked for it: the broker then delivers the step again.

    task_postrun comes after Celery stored the task's result, and Celery >= 5.7
    acks (does not redeliver) a message whose task stored SUCCESS before its
    worker was lost. So the result is forgotten first: the worker dies as if
    between sealing and storing the result. The task id is left at
    CRASHED_TASK_KEY; its result reads SUCCESS again once the redelivery ran.
    """
    run_id = (kwargs or {}).get("run_id")
    if not run_id or task.name != "agent.increment":
        return
    from pipeline.app import store_for

    client = store_for(task.app).redis
    if client.delete(CRASH_AFTER_SEAL_KEY.format(run_id=run_id)):
        task.backend.forget(task_id)
        client.set(CRASHED_TASK_KEY.format(run_id=run_id), task_id, ex=3600)
        os._exit(1)


@agent(input="count@1", output="count@1", time_limit_s=1, max_retries=0)
def sleepy(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Return the count unchanged; a one-second time limit for the `slow` chaos mode."""
    _count(ctx)
    return {"n": payload["n"]}


sleeping = Workflow("sleeping", [sleepy])

FLAKY_FAILURES = 2


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=3, retry_backoff_s=0.1)
def flaky(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Fail with a transient error on the first two executions of a run, then add one."""
    executions = ctx.redis.incr(EXECUTIONS_KEY.format(run_id=ctx.run_id, agent=ctx.agent))
    if int(executions) <= FLAKY_FAILURES:
        raise TransientAgentError(
            f"run {ctx.run_id}: agent flaky fails on purpose (execution {executions} of "
            f"{FLAKY_FAILURES} that fail)"
        )
    return {"n": payload["n"] + 1}


flaking = Workflow("flaking", [flaky])


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=2, retry_backoff_s=6.0,
       retry_backoff_max_s=6.0)
def deferred(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Fail with a transient error the first time (retried 6 s later), then add one."""
    executions = ctx.redis.incr(EXECUTIONS_KEY.format(run_id=ctx.run_id, agent=ctx.agent))
    if int(executions) == 1:
        raise TransientAgentError(f"run {ctx.run_id}: agent deferred fails once on purpose")
    return {"n": payload["n"] + 1}


deferring = Workflow("deferring", [deferred])


@contract("pair", 1)
class Pair(Schema):
    """The fan-in of ``double`` and ``bloat``."""

    double = fields.Nested(Count, required=True)
    bloat = fields.Nested(Count, required=True)


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0)
def bloat(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Return a number with 80 digits: over a small PIPELINE_MAX_PAYLOAD_BYTES."""
    return {"n": 10**80 + payload["n"]}


@agent(input="pair@1", output="count@1", time_limit_s=5, max_retries=0)
def join(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add the two branches."""
    return {"n": payload["double"]["n"] + payload["bloat"]["n"]}


fanning = Workflow("fanning", [parallel(double, bloat), join])


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0)
def recall(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Read the run's input twice, mutating the first copy, and ``increment``'s version:
    ``{"n": input * 100 + increment}``."""
    first = ctx.run_input
    first["n"] = -1  # a copy: the second read still sees the input
    return {"n": ctx.run_input["n"] * 100 + ctx.upstream("increment").payload["n"]}


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0)
def snoop(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Read the version after its input: a parallel sibling's or a later one (refused)."""
    return {"n": ctx.version(ctx.input_versions[0] + 1).payload["n"]}


@contract("recall_pair", 1)
class RecallPair(Schema):
    """The fan-in of ``recall`` and ``double``."""

    recall = fields.Nested(Count, required=True)
    double = fields.Nested(Count, required=True)


@contract("snoop_pair", 1)
class SnoopPair(Schema):
    """The fan-in of ``snoop`` and ``double``."""

    snoop = fields.Nested(Count, required=True)
    double = fields.Nested(Count, required=True)


@agent(input="recall_pair@1", output="count@1", time_limit_s=5, max_retries=0)
def recall_join(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """``recall``'s number, plus ``double``'s read back from its version, plus the input."""
    return {"n": payload["recall"]["n"] + ctx.upstream("double").payload["n"]
            + ctx.run_input["n"]}


@agent(input="snoop_pair@1", output="count@1", time_limit_s=5, max_retries=0)
def snoop_join(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Never runs: ``snoop`` fails the run."""
    return {"n": payload["snoop"]["n"]}


recalling = Workflow("recalling", [increment, parallel(recall, double), recall_join])
snooping = Workflow("snooping", [increment, parallel(snoop, double), snoop_join])


@agent(input="count@1", output="count@1", time_limit_s=1, max_retries=0)
def stubborn(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Ignore the soft time limit, so only the hard limit (in the main process) stops it."""
    try:
        time.sleep(30)
    except SoftTimeLimitExceeded:
        time.sleep(30)
    return payload


stubborning = Workflow("stubborning", [stubborn])


@contract("timed_count", 1)
class TimedCount(Schema):
    n = fields.Integer(required=True)
    sleep_s = fields.Float(required=True)


@agent(input="timed_count@1", output="count@1", time_limit_s=10, max_retries=0)
def slow_increment(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Take a while (the workload, not a wait) and add one, counting executions."""
    _count(ctx)
    time.sleep(payload["sleep_s"])
    return {"n": payload["n"] + 1}


slow_counting = Workflow("slow_counting", [slow_increment])


# -- breakers: one agent per fallback, with a small threshold and a short reset timeout --

QUICK_BREAKER = BreakerPolicy(failure_threshold=2, window=4, min_calls=4, reset_timeout_s=5.0)
DEFAULT_COUNT = {"n": -1}


def _guarded(name: str, fallback: str, **policy: Any) -> Any:
    def execute(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        _count(ctx)
        return {"n": payload["n"] * 10}

    execute.__name__ = execute.__qualname__ = name
    return agent(name, input="count@1", output="count@1", time_limit_s=5, max_retries=0,
                 breaker=QUICK_BREAKER, fallback=fallback, **policy)(execute)


guarded_fail = _guarded("guarded_fail", "fail")
guarded_skip = _guarded("guarded_skip", "skip", default_output=DEFAULT_COUNT)
guarded_cached = _guarded("guarded_cached", "cached")
guarded_park = _guarded("guarded_park", "park")
guarded_retry = _guarded("guarded_retry", "retry_later", retry_later_max=5)

for _a in (guarded_fail, guarded_skip, guarded_cached, guarded_retry):
    Workflow(f"w_{_a.name}", [_a])
parked_flow = Workflow("w_guarded_park", [increment, guarded_park, double])

# -- fallback on failure: optional enrichments whose own failure seals a stand-in -----------


def _enrich(name: str, default_output: Any) -> Any:
    def execute(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        _count(ctx)
        book(ctx)
        return {"n": payload["n"] * 10}

    execute.__name__ = execute.__qualname__ = name
    return agent(name, input="count@1", output="count@1", time_limit_s=5, max_retries=0,
                 breaker=QUICK_BREAKER, fallback="skip", fallback_on="failure",
                 default_output=default_output, compensate=undo)(execute)


def negated(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """A stand-in computed from the input, and from the run's input read through ctx."""
    return {"n": -payload["n"] - ctx.run_input["n"]}


def uncountable(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """A stand-in that breaks the output contract."""
    return {"n": "many"}


enrich = _enrich("enrich", DEFAULT_COUNT)
enrich_derived = _enrich("enrich_derived", negated)
enrich_broken = _enrich("enrich_broken", uncountable)
Workflow("w_enrich", [increment, enrich, double])
for _a in (enrich_derived, enrich_broken):
    Workflow(f"w_{_a.name}", [_a])


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=2, retry_backoff_s=0.1,
       retry_on=(Exception,), breaker=QUICK_BREAKER)
def misconfigured(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Fail as an agent whose own setting is missing does: with a ConfigurationError, which
    says nothing of its health (never retried, never counted on its breaker)."""
    _count(ctx)
    raise ConfigurationError("TEST_MISCONFIGURED_API_KEY is not set; set it to the key of the "
                             "service this agent calls")


misconfiguring = Workflow("misconfiguring", [increment, misconfigured])


@agent(input="count@1", output="count@1", time_limit_s=10, max_retries=0)
def pause(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Hold while the test keeps HOLD_KEY for the run (a sibling still at work)."""
    _count(ctx)
    while ctx.redis.exists(HOLD_KEY.format(run_id=ctx.run_id)):
        time.sleep(0.02)
    return {"n": payload["n"] + 1}


@contract("park_pair", 1)
class ParkPair(Schema):
    guarded_park = fields.Nested(Count, required=True)
    pause = fields.Nested(Count, required=True)


@agent(input="park_pair@1", output="count@1", time_limit_s=5, max_retries=0)
def park_join(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add the two branches."""
    return {"n": payload["guarded_park"]["n"] + payload["pause"]["n"]}


parked_pair = Workflow("w_parked_pair", [increment, parallel(guarded_park, pause), park_join])
pausing = Workflow("pausing", [increment, pause, double])


@agent(input="count@1", output="count@1", time_limit_s=40, max_retries=0)
def holder(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Hold a pool process while the test keeps HOLD_KEY for the run (up to 40 s)."""
    _count(ctx)
    while ctx.redis.exists(HOLD_KEY.format(run_id=ctx.run_id)):
        time.sleep(0.02)
    return {"n": payload["n"] + 1}


blocking = Workflow("blocking", [holder])


# -- saga: steps with side effects that their compensations undo --------------------

COMP_FAIL_KEY = "test:comp-fail:{run_id}"
"""While it holds a positive count, fickle's compensation fails (one DECR per try)."""
SAGA = {"time_limit_s": 5, "max_retries": 0, "compensate": undo}


@agent(input="count@1", output="count@1", **SAGA)
def booked(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one, leaving a side effect that its compensation undoes."""
    book(ctx)
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", **SAGA)
def tripwire(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one, leaving a side effect; the tests fail it with PIPELINE_CHAOS."""
    book(ctx)
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", **SAGA)
def snag(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Like tripwire: a second agent to fail in the same parallel group."""
    book(ctx)
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", queue="agents.shared", **SAGA)
def shared_booked(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Like booked, on a queue it names itself: the run's route carries it."""
    book(ctx)
    return {"n": payload["n"] + 1}


sharing = Workflow("sharing", [shared_booked, tripwire])


@agent(input="count@1", output="count@1", time_limit_s=10, max_retries=0, compensate=undo)
def lagger(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Wait while the test holds the run, then add one, leaving a side effect."""
    hold(ctx)
    book(ctx)
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", time_limit_s=1, max_retries=0, compensate=undo)
def slowpoke(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one, leaving a side effect; a one-second limit for the `slow` chaos mode."""
    book(ctx)
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0, retry_backoff_s=0.1,
       retry_backoff_max_s=1.0, compensation_retries=3)
def fickle(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one, leaving a side effect whose compensation fails while COMP_FAIL_KEY says so."""
    book(ctx)
    return {"n": payload["n"] + 1}


@fickle.compensator
def undo_fickle(ctx: CompensationContext) -> None:
    ctx.redis.incr(COMP_TRIES_KEY.format(run_id=ctx.run_id, agent=ctx.agent))
    if int(ctx.redis.decr(COMP_FAIL_KEY.format(run_id=ctx.run_id))) >= 0:
        raise RuntimeError(f"run {ctx.run_id}: fickle's compensation fails on purpose")
    finish_undo(ctx)


@contract("lag_pair", 1)
class LagPair(Schema):
    tripwire = fields.Nested(Count, required=True)
    lagger = fields.Nested(Count, required=True)


@contract("snag_pair", 1)
class SnagPair(Schema):
    tripwire = fields.Nested(Count, required=True)
    snag = fields.Nested(Count, required=True)


@agent(input="lag_pair@1", output="count@1", **SAGA)
def lag_join(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add the two branches."""
    book(ctx)
    return {"n": payload["tripwire"]["n"] + payload["lagger"]["n"]}


@agent(input="snag_pair@1", output="count@1", **SAGA)
def snag_join(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add the two branches."""
    book(ctx)
    return {"n": payload["tripwire"]["n"] + payload["snag"]["n"]}


WATCH_SLICES_KEY = "test:watch-slices:{run_id}"
"""How many 20 ms slices of work watcher did."""


@agent(input="count@1", output="count@1", time_limit_s=40, max_retries=0, compensate=undo)
def watcher(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Leave a side effect, then work in 20 ms slices until the run stops (at most 30 s):
    then undo its own side effect and stop as cancelled, as a cooperative agent does."""
    return _watch(payload, ctx)


@agent(input="count@1", output="count@1", on=["watch.requested"], emits="watch.done",
       time_limit_s=40, max_retries=0, compensate=undo)
def event_watcher(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """watcher, as a choreography's delivery."""
    return _watch(payload, ctx)


watching = Choreography("watching", start="watch.requested", terminal=["watch.done"],
                        input="count@1")


def _watch(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    book(ctx)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if ctx.sleep(0.02):
            ctx.redis.hdel(SIDE_EFFECTS_KEY.format(run_id=ctx.run_id), ctx.agent)
            ctx.raise_if_cancelled()
        ctx.redis.incr(WATCH_SLICES_KEY.format(run_id=ctx.run_id))
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", time_limit_s=5, max_retries=0)
def pretender(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Raise StepCancelled while its run is live: a bug of the agent's, not a cancel."""
    raise StepCancelled(f"run {ctx.run_id}: pretender says it was cancelled")


saga_watched = Workflow("saga_watched", [booked, watcher])
saga_fickle_watched = Workflow("saga_fickle_watched", [fickle, watcher])
saga_pretend = Workflow("saga_pretend", [booked, pretender])
saga_slow = Workflow("saga_slow", [booked, slowpoke])
saga_late = Workflow("saga_late", [booked, parallel(tripwire, lagger), lag_join])
saga_snag = Workflow("saga_snag", [booked, parallel(tripwire, snag), snag_join])
saga_fickle = Workflow("saga_fickle", [booked, fickle, tripwire])
saga_held = Workflow("saga_held", [booked, lagger])


# -- choreography: tick.requested -> ticker -> tick.ticked -> tocker -> tick.tocked ----------

TICK_HOLD_KEY = "test:tick-hold:{run_id}"
"""The ticker waits while this key exists (its delivery stays in flight)."""
CRASH_BEFORE_DISPATCH_KEY = "test:crash-before-dispatch:{run_id}"
"""The pool process dies once after a delivery sealed and before it dispatched what it
published, for a run whose test set this key."""


@agent(input="count@1", output="count@1", on=["tick.requested"], emits="tick.ticked",
       time_limit_s=10, max_retries=0, compensate=undo)
def ticker(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Count one; hold while the test asks."""
    _count(ctx)
    book(ctx)
    deadline = time.monotonic() + 8
    while ctx.redis.exists(TICK_HOLD_KEY.format(run_id=ctx.run_id)) and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    return {"n": payload["n"] + 1}


@agent(input="count@1", output="count@1", on=["tick.ticked"], emits="tick.tocked",
       time_limit_s=5, max_retries=0, compensate=undo)
def tocker(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Double it."""
    _count(ctx)
    book(ctx)
    return {"n": payload["n"] * 2}


ticking = Choreography("ticking", start="tick.requested", terminal=["tick.tocked"],
                       input="count@1")


# -- choreography with an event nobody subscribes to: stray.noticed ---------------------------

@agent(input="count@1", output="count@1", on=["stray.requested"], emits="stray.done",
       time_limit_s=5, max_retries=0)
def stray_main(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Pass it on."""
    return {"n": payload["n"]}


@agent(input="count@1", output="count@1", on=["stray.requested"], emits="stray.noticed",
       time_limit_s=5, max_retries=0)
def stray_side(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Publish an event no agent listens to."""
    return {"n": payload["n"]}


straying = Choreography("straying", start="stray.requested", terminal=["stray.done"],
                        input="count@1")


def _crash_before_dispatch() -> None:
    """Wrap the dispatch of published events: die once, for a run whose test asked, after
    the delivery sealed and published and before its tasks reached the broker."""
    import pipeline.choreography.publishing as publishing

    real = publishing.dispatch

    def dispatch(app: Any, run_id: str, handover: Any, *args: Any, **kwargs: Any) -> None:
        if handover.event != "e1" and os.environ.get("PIPELINE_TEST_CRASH_BEFORE_DISPATCH"):
            from pipeline.app import store_for

            if store_for(app).redis.delete(CRASH_BEFORE_DISPATCH_KEY.format(run_id=run_id)):
                os._exit(1)
        real(app, run_id, handover, *args, **kwargs)

    publishing.dispatch = dispatch  # type: ignore[assignment]


_crash_before_dispatch()


# -- a flow whose second agent is deployed only where the client runs (tests.late_subscriber) --

@agent(input="count@1", output="count@1", on=["dangle.requested"], emits="dangle.next",
       time_limit_s=5, max_retries=0, compensate=undo)
def dangle_first(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Pass it on to whoever subscribes."""
    book(ctx)
    return {"n": payload["n"] + 1}


# -- choreography with a breaker that parks: guard.requested -> guard_park -> guard.done -----

guard_park = _guarded("guard_park", "park", on=["guard.requested"], emits="guard.done")
guarding = Choreography("guarding", start="guard.requested", terminal=["guard.done"],
                        input="count@1")

# -- every test worker loads these too: a stage of three joined in the seal, and the hooks
# at the join's edges (test_join.py); agents that draw on named limits (test_limited_steps)

from tests import join_agents, limit_agents  # noqa: E402, F401
