"""The step lifecycle, run inside a worker for every agent.

open (one round trip) -> check input -> execute -> check output -> seal (one
round trip). A step whose key is sealed already returns that version and does
nothing else, so a redelivered or duplicated message is harmless.

Every step runs its app's step hooks (``hooks.py``): more Redis calls on the
same two round trips, a refusal once opened, and every failure that is not retried.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from .. import chaos, join
from ..agent import Agent, StepContext
from ..breaker.policy import CONFIGURATION_FAULTS, Fallback, FallbackOn
from ..choreography import Delivery
from ..contracts import contracts
from ..errors import (
    ContractViolation,
    DeliveryLimitExceeded,
    LimitError,
    RateLimited,
    RunNotFound,
    StepCancelled,
    StepTimeLimitExceeded,
    StoreUnavailable,
    VersionNotFound,
)
from ..hooks import StepHooks, hooks_of
from ..reads import LineageReads
from ..state import StateStore, Version, input_digest, input_payload
from ..state.version import sealable
from .draw import Refusal
from .fallback import take_fallback
from .gate import Gate, outcome_of
from .joining import after_seal, join_again
from .throttle import over_budget, throttle
from .trace import ctx_fields, failure_fields, note
from .undo import compensate_self

__all__ = ["run_step"]

log = logging.getLogger(__name__)

STORE_RETRIES = 8
"""Retries of a step that could not reach Redis (1, 2, 4 ... 30 s apart: about 2 minutes)."""
STORE_RETRY_BACKOFF_MAX_S = 30.0
HARD_TIME_LIMIT_GRACE_S = 5.0
"""Seconds between an agent's soft time limit (the step fails cleanly) and the hard kill."""


def run_step(
    task: Task,
    agent: Agent,
    store: StateStore,
    upstream: int | Sequence[int],
    *,
    run_id: str,
    step: str,
    final: bool = False,
    event: str = "",
    event_type: str = "",
    chaos_spec: str = "",
) -> int:
    """Run one step of one run; return the version it sealed (or had sealed).

    With ``event`` the step is the delivery of that event (choreography): it
    claims the delivery when it opens, and the round trip that seals it also
    ends the delivery and publishes what the agent emits.

    Every failure between open and seal goes through one path: it is logged
    in the run's trace and shown to the hooks, then retried (a transient
    agent error, or Redis unreachable) or raised so the canvas's errback fails
    the run. Only ``Ignore`` (the run is over) and ``Retry`` pass untouched.
    """
    started = time.monotonic()
    hooks = hooks_of(task.app)
    fan_in = not isinstance(upstream, int)
    inputs = [int(v) for v in upstream] if isinstance(upstream, Sequence) else [int(upstream)]
    worker = str(task.request.hostname or os.uname().nodename)
    gate = Gate(store, agent, run_id=run_id, step=step,
                lease=f"{task.request.id}:{task.request.retries}",
                lease_s=agent.time_limit_s + HARD_TIME_LIMIT_GRACE_S)
    delivery = Delivery(agent, run_id=run_id, step=step, event=event) if event else None
    task_id = str(task.request.id or "")
    attempt = 0
    ctx: StepContext | None = None
    executed = False  # the agent was called: a failure from here on may fall back

    def fail(exc: BaseException) -> int | None:
        """Log a failure for good; the version its fallback sealed instead, or None."""
        _fail(agent, run_id, step, exc, store, attempt=attempt, gate=gate, ctx=ctx, hooks=hooks)
        if not (executed and ctx is not None and falls_back_on(agent, exc)):
            return None
        if isinstance(exc, ContractViolation) and exc.side == "output":
            # its side effects happened and no saga will undo them: the run goes on
            compensate_self(agent, store, run_id, step, opening.inputs, output, attempt,
                             claim=True)
        try:
            return take_fallback(task, agent, store, run_id=run_id, step=step,
                                 inputs=opening.inputs, fan_in=fan_in, final=final,
                                 worker=worker, ctx=ctx, failure=exc, delivery=delivery)
        except (Ignore, Retry):
            raise
        except Exception as e:
            if e is not exc:
                note(store, run_id, "step.failed", **failure_fields(agent.name, step, e, attempt))
            raise

    try:
        opening = store.open_step(
            run_id,
            step=step,
            agent=agent.name,
            inputs=inputs,
            max_deliveries=agent.max_deliveries,
            worker=worker,
            task_id=task_id,
            claim=delivery is not None,
            queue=agent.queue,
            extra=gate.open_extra() + [e for h in hooks for e in h.open_extra(agent)],
            reserve=gate.draw.reserve(),
        )
        hook_extra = gate.take_permit(opening.extra)
        attempt = opening.deliveries
        if opening.outcome not in ("open", "exhausted"):
            gate.release()  # a probe lease this step will not use (a crash loop counts)
        if opening.outcome == "sealed":
            assert opening.sealed_version is not None
            if delivery is not None and opening.handover:
                delivery.hand_over_again(task, store, task_id)
            join_again(task, store, run_id, step)  # a chord's body may never have gone
            return opening.sealed_version
        if opening.outcome == "duplicate":  # recorded by the open script
            raise Ignore()
        if opening.outcome == "unknown":
            store.note(run_id, "delivery.unknown", step=step, agent=agent.name,
                       task_id=task_id, reason="no such event delivery was published")
            raise Ignore()
        if opening.outcome in ("aborted", "missing"):
            # The run ended (failed, compensating) or expired: stop quietly,
            # without failing the task, so no errback fires for a finished run.
            store.note(run_id, "step.skipped", step=step, agent=agent.name,
                       reason=f"run is {opening.status or 'gone'}")
            raise Ignore()
        if opening.outcome == "exhausted":
            raise DeliveryLimitExceeded(
                f"run {run_id} step {step} (agent {agent.name}) was delivered "
                f"{opening.deliveries} times, more than the {agent.max_deliveries} allowed: "
                "the worker running it keeps dying; the run is failed instead of looping"
            )
        if opening.outcome == "noversion":
            raise VersionNotFound(f"run {run_id} has no version {opening.missing_version}")
        if opening.outcome == "over_budget":
            raise over_budget(run_id, step, agent.name, opening.over_budget)
        for h in hooks:
            h.after_open(agent, opening, hook_extra)
        ctx = StepContext(
            run_id=run_id,
            step=step,
            agent=agent.name,
            attempt=attempt,
            input_versions=tuple(v.version for v in opening.inputs),
            redis=store.redis,
            worker=worker,
            event=event,
            event_type=event_type,
            reads=LineageReads(partial(store.get, run_id), run_id=run_id, step=step,
                               inputs=opening.inputs),
        )
        if gate.refused:
            assert gate.permit is not None
            gate.draw.release(ran=False)
            return take_fallback(task, agent, store, run_id=run_id, step=step,
                                 inputs=opening.inputs, fan_in=fan_in, final=final,
                                 worker=worker, ctx=ctx, permit=gate.permit, delivery=delivery)

        def wait(refusal: Refusal) -> int:
            assert ctx is not None
            return throttle(task, agent, store, gate, refusal, ctx=ctx, inputs=opening.inputs,
                            fan_in=fan_in, final=final, delivery=delivery,
                            longest_wait_s=max(agent.retry_backoff_max_s,
                                               STORE_RETRY_BACKOFF_MAX_S))

        payload = input_payload(opening.inputs, fan_in)
        gate.draw.acquire_for(payload)  # an estimate of the input: admitted now
        if (refusal := gate.draw.refusal) is not None:
            return wait(refusal)
        if needs_input_check(agent, opening.inputs, fan_in):
            contracts.get(agent.input).validate(
                payload, side="input", agent=agent.name, run_id=run_id,
                version=None if fan_in else opening.inputs[0].version,
            )
        executed = gate.draw.ran = True
        try:
            output = _execute(agent, payload, ctx, chaos_spec, store)
        except RateLimited as e:  # the API refused it: waited, not failed
            return wait(gate.draw.rate_limited(e))
        contracts.get(agent.output).validate(
            output, side="output", agent=agent.name, run_id=run_id
        )
        latency_ms = (time.monotonic() - started) * 1000.0
        form = sealable(output, store.max_payload_bytes, f"run {run_id} agent {agent.name} output")
        cache = None
        if agent.fallback is Fallback.CACHED:
            cache = (input_digest(opening.inputs, fan_in), form.text)
        sealing = store.seal(
            run_id,
            step=step,
            agent=agent.name,
            contract=agent.output,
            payload=output,
            parents=inputs,
            final=final,
            worker=worker,
            latency_ms=latency_ms,
            extra=gate.seal_extra(latency_ms=latency_ms, cache=cache, ctx=ctx)
            + [e for h in hooks for e in h.seal_extra(agent, ok=True, latency_ms=latency_ms)]
            + ([delivery.seal_extra(store, task_id)] if delivery is not None else []),
            form=form,
            trace={**ctx_fields(ctx), **gate.trace_fields()},
            group=join.member_group(task.request),
        )
        gate.after_seal(sealing.extra)
    except (Ignore, Retry, Reject):
        raise
    except SoftTimeLimitExceeded:
        exc = StepTimeLimitExceeded(
            f"run {run_id} step {step}: agent {agent.name} ran past its time limit of "
            f"{agent.time_limit_s:g}s"
        )
        if (fallen := fail(exc)) is not None:
            return fallen
        raise exc from None
    except StoreUnavailable as e:
        # Redis went away mid-step. A seal is one atomic script: either nothing
        # was sealed, or the step was and its reply was lost; running the step
        # again opens it as sealed (and a delivery finishes its handover).
        if task.request.retries < STORE_RETRIES:
            raise task.retry(exc=e, countdown=_store_countdown_s(task.request.retries),
                             max_retries=STORE_RETRIES) from e
        _fail(agent, run_id, step, e, store, attempt=attempt, gate=gate, ctx=ctx,
              hooks=hooks)
        raise
    except ContractViolation as e:  # never retried: the same input breaks it again
        if (fallen := fail(e)) is not None:
            return fallen
        if e.side == "output" and not store.run_info(run_id).status.is_live:
            # Its side effects happened, and the saga may have planned without
            # it; when the planner did find it, only one of the two undoes it.
            compensate_self(agent, store, run_id, step, opening.inputs, output, attempt,
                             claim=True)
        raise
    except StepCancelled as e:
        if ctx is None or not ctx.cancelled:  # raised while the run is live: the agent's bug
            if (fallen := fail(e)) is not None:
                return fallen
            raise
        gate.release(ctx=ctx)  # the run stopped, the agent did not fail: no breaker counts it
        note(store, run_id, "step.cancelled", step=step, agent=agent.name, attempt=attempt,
              reason=str(e)[:2000], **ctx_fields(ctx))
        raise Ignore() from None
    except CONFIGURATION_FAULTS as e:  # never retried: the same configuration fails again
        _fail(agent, run_id, step, e, store, attempt=attempt, gate=gate, ctx=ctx,
              hooks=hooks)
        raise
    except LimitError as e:  # a budget spent, a limit waited out: no retry_on retries them
        if (fallen := fail(e)) is not None:
            return fallen
        raise
    except agent.retry_on as e:
        if task.request.retries < agent.max_retries:
            countdown = agent.retry_countdown_s(task.request.retries)
            note(store, run_id, "step.retry", step=step, agent=agent.name, attempt=attempt,
                  **ctx_fields(ctx),
                  error_type=type(e).__name__, error=str(e)[:500], countdown_s=countdown)
            gate.record_failure(e, ctx)  # every failed call counts, retried or not
            raise task.retry(exc=e, countdown=countdown, max_retries=agent.max_retries) from e
        if (fallen := fail(e)) is not None:
            return fallen
        raise
    except Exception as e:
        if (fallen := fail(e)) is not None:
            return fallen
        raise

    if sealing.outcome == "missing":
        raise RunNotFound(f"run {run_id} disappeared while step {step} ran")
    if sealing.outcome == "aborted":
        # The run stopped while this step ran: nothing is sealed, and the saga
        # planned without it, so the step undoes its own side effects.
        note(store, run_id, "step.discarded", step=step, agent=agent.name,
              reason=f"run is {sealing.status}")
        compensate_self(agent, store, run_id, step, opening.inputs, output, attempt)
        raise Ignore()
    assert sealing.version is not None
    after_seal(task, store, run_id, step, sealing.joined)  # a chord's body goes after it
    if delivery is not None:
        delivery.hand_over_or_retry(task, store, sealing.extra[-1])
    return sealing.version


def falls_back_on(agent: Agent, exc: BaseException) -> bool:
    """Whether a call that failed for good takes the agent's fallback: with
    ``fallback_on="failure"``, for every failure its breaker counts (an input that broke
    the contract, a configuration error or a business answer in ``excluded`` is no
    failure of the agent: the step fails as it would without the fallback)."""
    return agent.fallback_on is FallbackOn.FAILURE and outcome_of(agent, exc) == "failure"


def needs_input_check(agent: Agent, inputs: Sequence[Version], fan_in: bool) -> bool:
    """Whether the step must check its input against the agent's input contract.

    Every version was checked against the contract it is sealed under before it was
    sealed (a step's output, a run's input, a person's output, a fallback's stand-in), and
    its digest is checked on every read: when that contract is the agent's input contract,
    checking again proves nothing new. A different contract (a consumer's own rules, like
    a minimum confidence) or a fan-in mapping is always checked.
    """
    return fan_in or inputs[0].contract != agent.input


def _store_countdown_s(retries: int) -> float:
    return float(min(2**retries, STORE_RETRY_BACKOFF_MAX_S))


def _execute(agent: Agent, payload: Any, ctx: StepContext, chaos_spec: str,
             store: StateStore) -> Any:
    mode = chaos.draw(chaos_spec, agent.name) if chaos_spec else None
    if mode is not None:  # in the trace, so that an injected fault is never taken for a bug
        note(store, ctx.run_id, "chaos", step=ctx.step, agent=agent.name, mode=mode.value,
              attempt=ctx.attempt)
    if mode is chaos.ChaosMode.CRASH:
        os._exit(chaos.CRASH_EXIT_CODE)
    if mode is chaos.ChaosMode.ERROR:
        raise chaos.ChaosError(f"PIPELINE_CHAOS: agent {agent.name} fails on purpose")
    if mode is chaos.ChaosMode.SLOW:
        time.sleep(agent.time_limit_s + 5.0)
    output = agent.execute(payload, ctx)
    if mode is chaos.ChaosMode.BAD_OUTPUT:
        return dict(chaos.BAD_OUTPUT)
    return output


def _fail(
    agent: Agent, run_id: str, step: str, exc: BaseException, store: StateStore, *,
    attempt: int, gate: Gate, ctx: StepContext | None = None, hooks: Sequence[StepHooks] = (),
) -> None:
    fields = failure_fields(agent.name, step, exc, attempt)
    fields.update(gate.trace_fields())
    fields.update(ctx_fields(ctx))
    note(store, run_id, "step.failed", **fields)
    gate.record_failure(exc, ctx)
    for h in hooks:
        h.on_failure(agent, store, run_id, step, exc)
