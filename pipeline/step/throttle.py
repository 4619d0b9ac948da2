"""A step its limits refused: not run, not failed, sent again after the limit's wait; and
one its run's budget refused: not run, failed."""

from __future__ import annotations

from collections.abc import Sequence

from celery import Task

from ..agent import Agent, StepContext
from ..choreography import Delivery
from ..errors import BudgetExceeded, Throttled
from ..state import StateStore, Version
from .draw import Refusal, wait_again
from .fallback import take_fallback
from .gate import Gate

__all__ = ["over_budget", "throttle"]


def throttle(task: Task, agent: Agent, store: StateStore, gate: Gate, refusal: Refusal, *,
             ctx: StepContext, inputs: Sequence[Version], fan_in: bool, final: bool,
             delivery: Delivery | None, longest_wait_s: float) -> int:
    """Send the refused step again after the limit's wait, or, once it has waited its
    agent's ``limit_wait_max_s`` in all (or can never pass), apply its fallback: the step
    fails with ``Throttled`` under ``"fail"``.

    The wait of one message is bounded as every countdown of the agent is
    (``longest_wait_s``, checked against the broker's visibility timeout when the app binds
    the agent): a longer wait is waited in several.
    """
    run_id, step = ctx.run_id, ctx.step
    countdown_s = min(refusal.wait_s, longest_wait_s)
    waited_s = gate.draw.hand_back(refusal, countdown_s, run_id=run_id, step=step,
                                   attempt=ctx.attempt, worker=ctx.worker,
                                   task_id=str(task.request.id or ""))
    gate.release()  # a breaker's probe lease this attempt will not use
    if refusal.never or waited_s > agent.limit_wait_max_s:
        why = (f"a call can never pass it (it asks more {refusal.reason} than the limit "
               "admits in a minute)" if refusal.never else
               f"the step waited {waited_s:.1f} s for it, past limit_wait_max_s="
               f"{agent.limit_wait_max_s:g}")
        exc = Throttled(f"run {run_id} step {step}: agent {agent.name} is throttled by limit "
                        f"{refusal.limit} ({refusal.reason}): {why}",
                        wait_s=refusal.wait_s, reason=refusal.reason)
        return take_fallback(task, agent, store, run_id=run_id, step=step,
                             inputs=inputs, fan_in=fan_in, final=final,
                             worker=ctx.worker, ctx=ctx, failure=exc,
                             delivery=delivery)
    raise wait_again(task, countdown_s, refusal)


def over_budget(run_id: str, step: str, agent: str, why: Sequence[str]) -> BudgetExceeded:
    """The error of a step whose estimate would cross its run's budget (the open's answer:
    kind, budget, spent, reserved, estimate)."""
    kind, budget, spent, reserved, estimate = why
    unit = "tokens" if kind == "tokens" else "in cost"
    return BudgetExceeded(
        f"run {run_id} step {step} (agent {agent}) would cross the run's budget of "
        f"{_n(budget)} {unit}: {_n(spent)} spent, {_n(reserved)} reserved by steps running, "
        f"and this step's estimate is {_n(estimate)}; the step did not run")


def _n(text: str) -> str:
    value = float(text)
    return f"{int(value):,}" if value == int(value) else f"{value:.6g}"
