"""What a step does when its agent's breaker refuses the call, or, for an agent with
``fallback_on="failure"``, when the call failed for good."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from .. import join
from ..agent import Agent, StepContext
from ..breaker.policy import Fallback
from ..breaker.registry import Permit
from ..choreography import Delivery
from ..contracts import contracts
from ..errors import CircuitOpen, RunNotFound
from ..keys import breaker_cache_key
from ..state import StateStore, Version, input_digest, input_payload
from .joining import after_seal

MIN_RETRY_LATER_S = 1.0


def default_output(agent: Agent, inputs: Sequence[Version], fan_in: bool,
                   ctx: StepContext) -> Any:
    """The ``skip`` fallback's stand-in: the agent's constant, or its function of the input,
    whose output is checked against the output contract here (a constant was checked when
    the workflow was built)."""
    if not callable(agent.default_output):
        return agent.default_output
    output = agent.default_output(input_payload(inputs, fan_in), ctx)
    contracts.get(agent.output).validate(output, side="default output", agent=agent.name,
                                         run_id=ctx.run_id)
    return output


def take_fallback(
    task: Task,
    agent: Agent,
    store: StateStore,
    *,
    run_id: str,
    step: str,
    inputs: Sequence[Version],
    fan_in: bool,
    final: bool,
    worker: str,
    ctx: StepContext,
    permit: Permit | None = None,
    failure: BaseException | None = None,
    delivery: Delivery | None = None,
) -> int:
    """Seal a stand-in, park the run, retry later, or raise.

    With ``permit`` the breaker refused the call (``CircuitOpen`` when there is no
    stand-in); with ``failure`` the call failed for good and the agent falls back on
    failure (``failure`` is raised again when there is no stand-in).
    """
    policy = agent.fallback
    if permit is not None:
        why = permit.refusal(agent.name)
        store.note(run_id, "step.refused", step=step, agent=agent.name,
                   breaker=permit.state.value, fallback=policy.value, reason=why)
    else:
        assert failure is not None
        why = f"agent {agent.name} failed: {type(failure).__name__}: {failure}"[:500]
        store.note(run_id, "step.fallback", step=step, agent=agent.name,
                   fallback=policy.value, error_type=type(failure).__name__, reason=why)

    def seal_degraded(payload: Any, source: str) -> int:
        task_id = str(task.request.id or "")
        sealing = store.seal(run_id, step=step, agent=agent.name, contract=agent.output,
                             payload=payload, parents=[v.version for v in inputs],
                             final=final, degraded=True, worker=worker,
                             extra=[delivery.seal_extra(store, task_id)] if delivery else (),
                             group=join.member_group(task.request))
        if sealing.outcome == "missing":
            raise RunNotFound(f"run {run_id} disappeared while step {step} fell back")
        if sealing.outcome == "aborted":
            raise Ignore()
        store.note(run_id, "step.degraded", step=step, agent=agent.name, source=source,
                   version=int(sealing.version or 0),  # and what a default_output read
                   **(ctx.reads.trace_fields() if ctx.reads is not None else {}))
        if delivery is not None:
            delivery.hand_over_or_retry(task, store, sealing.extra[-1])
        assert sealing.version is not None
        after_seal(task, store, run_id, step, sealing.joined)
        return sealing.version

    if policy is Fallback.SKIP:
        source = "default output" if permit is not None else "default output after failure"
        return seal_degraded(default_output(agent, inputs, fan_in, ctx), source)
    if policy is Fallback.CACHED:
        digest = input_digest(inputs, fan_in)
        cached = store.redis.get(breaker_cache_key(agent.name, agent.output, digest))
        if cached is None and failure is not None:
            raise failure
        if cached is None:
            raise CircuitOpen(f"run {run_id} step {step}: {why}, and no cached output of "
                              f"{agent.name} exists for this input (digest {digest[:12]})")
        payload = json.loads(cached)
        contracts.get(agent.output).validate(payload, side="cached output", agent=agent.name,
                                             run_id=run_id)
        return seal_degraded(payload, f"cached output for input {digest[:12]}")
    if policy is Fallback.PARK:
        store.park(run_id, step=step, agent=agent.name,
                   reason=f"{why}; resume with `pipeline resume {run_id} [--output FILE]`")
        if delivery is not None:  # a resume hands the delivery out again
            delivery.release(store, str(task.request.id or ""))
        raise Ignore()
    if permit is None:  # an agent falls back on failure only with skip, cached or park
        assert failure is not None
        raise failure
    refused = int((task.request.kwargs or {}).get("refused", 0))
    if policy is Fallback.RETRY_LATER and refused < agent.retry_later_max:
        wait = permit.wait_s if permit.wait_s > 0 else agent.breaker.reset_timeout_s
        countdown = max(MIN_RETRY_LATER_S, min(wait, agent.breaker.reset_timeout_s))
        store.note(run_id, "step.retry", step=step, agent=agent.name, error_type="CircuitOpen",
                   error=why, countdown_s=countdown)
        # its own count, in the message: the agent's retries for errors stay its own
        kwargs = {**(task.request.kwargs or {}), "refused": refused + 1}
        raise task.retry(countdown=countdown, kwargs=kwargs,
                         max_retries=task.request.retries + 1)
    tail = (f" after {agent.retry_later_max} retries" if policy is Fallback.RETRY_LATER else "")
    raise CircuitOpen(f"run {run_id} step {step}: {why}; fallback '{policy.value}'{tail}")
