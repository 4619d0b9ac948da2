"""One step's dealings with the limits its agent draws on (``@agent(limits=...)``).

The step asks every limit for admission inside its *open* round trip, reserving the
agent's token estimate, and settles what the call used inside its *seal* round trip,
as the breaker's gate does: limits that do not bind cost no round trip of their own.
An estimate that is a function of the input is the exception: the input is read by the
open, so its admission takes one more round trip, after it.

A step that a limit refuses is not run: the runner gives its delivery back, logs a
``step.throttled`` row and sends it again after the wait the limit computed
(``throttle.lua``). A call the API refused (the agent raises ``RateLimited``) goes the
same way, after the API's Retry-After, and slows its limits down for the whole fleet.
Every admission a step does not use is given back (``cancel``): its request and its
reservation, so a refused or skipped step costs its limits nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.exceptions import Reject, Retry

from ..agent import Agent
from ..context import StepContext
from ..errors import RateLimited, StoreError, Throttled
from ..keys import RunKeys
from ..limits import Admission, Limiter, limits
from ..limits.limiter import MIN_RATE_LIMITED_WAIT_S
from ..lua import Batch, Script, checked
from ..state import StateStore, translate_errors
from ..state.store import Extra

THROTTLE = Script("pipeline.state", "throttle.lua")


@dataclass(frozen=True, slots=True)
class Refusal:
    """The limit that asks the longest wait of a step, and how long."""

    limit: str
    wait_s: float
    reason: str
    never: bool = False


class Draw:
    def __init__(self, store: StateStore, agent: Agent, *, lease: str, lease_s: float) -> None:
        self.store = store
        self.agent = agent
        self.lease = lease
        self.limiters = [Limiter(store.redis, limits.get(name), lease_s=lease_s, url=store.url)
                         for name in agent.limits]
        self.estimate = 0 if callable(agent.estimate_tokens) else agent.estimate_tokens
        self.admissions: list[Admission] = []
        self.ran = False  # the agent was called: its admissions are used, not given back
        self.limited: RateLimited | None = None

    def reserve(self) -> tuple[int, float, float, float]:
        """What the step reserves of its run's budget at the open (its estimate, in tokens
        and cost; 0 for an estimate of the input, not known yet, whose usage is charged at
        the seal), and the prices the seal charges what it used at: the first of the
        agent's limits with prices."""
        priced = next((lim.limit for lim in self.limiters if lim.limit.priced), None)
        prompt = (priced.price_per_1k_prompt or 0.0) if priced else 0.0
        completion = (priced.price_per_1k_completion or 0.0) if priced else 0.0
        return self.estimate, self.estimate * max(prompt, completion) / 1000, prompt, completion

    @property
    def at_open(self) -> bool:
        """Whether admission rides the open round trip (no estimate to compute first)."""
        return bool(self.limiters) and not callable(self.agent.estimate_tokens)

    # -- admission ----------------------------------------------------------------------

    def open_extra(self) -> list[Extra]:
        if not self.at_open:
            return []

        def acquire(limiter: Limiter) -> Extra:
            return lambda batch: limiter.queue_acquire(batch, self.lease, tokens=self.estimate)

        return [acquire(limiter) for limiter in self.limiters]

    def take(self, extra: Sequence[Any]) -> Sequence[Any]:
        """Read the limits' answers from the open round trip; return the other extras."""
        if not self.at_open:
            return extra
        n = len(self.limiters)
        self.admissions = [Limiter.admission(reply) for reply in extra[:n]]
        return extra[n:]

    def acquire_for(self, payload: Any) -> None:
        """Admission for an agent whose estimate is a function of the input: one round
        trip of its own, once the open has read the input."""
        if not self.limiters or self.at_open:
            return
        self.estimate = self.agent.estimate(payload)
        batch = Batch(self.store.redis)
        for limiter in self.limiters:
            limiter.queue_acquire(batch, self.lease, tokens=self.estimate)
        with translate_errors(self.store.url):
            self.admissions = [Limiter.admission(r) for r in batch.execute()]

    @property
    def refusal(self) -> Refusal | None:
        """The limit whose wait is longest (one that can never pass first), or None."""
        refused = [(limiter.limit.name, a) for limiter, a in zip(self.limiters, self.admissions,
                                                                 strict=True) if not a.admitted]
        if not refused:
            return None
        name, worst = max(refused, key=lambda r: (r[1].never, r[1].wait_s))
        return Refusal(name, worst.wait_s, worst.reason, worst.never)

    # -- settlement -----------------------------------------------------------------------

    def seal_extra(self, ctx: StepContext | None) -> list[Extra]:
        """Settle every admission with what the call used, on the seal's round trip."""
        used = self.used(ctx)

        def settle(limiter: Limiter) -> Extra:
            return lambda batch: limiter.queue_settle(batch, self.lease, tokens=used,
                                                      outcome="ok")

        return [settle(limiter) for limiter, a in zip(self.limiters, self.admissions,
                                                       strict=True) if a.admitted]

    def used(self, ctx: StepContext | None) -> int:
        """The tokens the call reported (``ctx.report_usage``), else its estimate."""
        usage = ctx.notes.get("usage") if ctx is not None else None
        if not usage:
            return self.estimate
        return int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))

    def queue_release(self, batch: Batch, ctx: StepContext | None, *, ran: bool,
                      limited: RateLimited | None = None) -> None:
        """Settle the admissions of a call that ended without a seal (it failed: what it
        used, or its estimate; ``limited``, the API refused it: every limit slows down) or
        never ran (``ran`` False: given back whole)."""
        for limiter, a in zip(self.limiters, self.admissions, strict=True):
            if limited is not None:
                limiter.queue_settle(batch, self.lease, tokens=self.used(ctx),
                                     outcome="limited",
                                     retry_after_s=limited.retry_after_s
                                     or MIN_RATE_LIMITED_WAIT_S)
            elif a.admitted:
                limiter.queue_settle(batch, self.lease, tokens=self.used(ctx) if ran else 0,
                                     cancel=not ran)
        self.admissions = []

    def rate_limited(self, exc: RateLimited) -> Refusal:
        """The refusal of a call the API refused: it waits the API's Retry-After
        (``MIN_RATE_LIMITED_WAIT_S`` without one), and then its limits' wait, which the
        refusal grew."""
        self.limited = exc
        return Refusal(self.limiters[0].limit.name if self.limiters else "",
                       exc.retry_after_s or MIN_RATE_LIMITED_WAIT_S, "rate_limited")

    def release(self, ctx: StepContext | None = None, *, ran: bool) -> None:
        """``queue_release`` in a round trip of its own (none when nothing was admitted)."""
        if not any(a.admitted for a in self.admissions):
            self.admissions = []
            return
        batch = Batch(self.store.redis)
        self.queue_release(batch, ctx, ran=ran)
        try:
            with translate_errors(self.store.url):
                batch.execute()
        except StoreError:
            pass  # the leases run out by themselves; the step's own outcome matters more

    # -- a refused step -------------------------------------------------------------------

    def hand_back(self, refusal: Refusal, countdown_s: float, *, run_id: str, step: str,
                  attempt: int, worker: str, task_id: str) -> float:
        """Give the delivery back (the refusal is no attempt), log ``step.throttled`` and
        give back what the other limits admitted, in one round trip; return the seconds
        this step has waited in all, this refusal's ``countdown_s`` included."""
        batch = Batch(self.store.redis)
        batch.script(THROTTLE, RunKeys(run_id).all(), [
            step, self.agent.name, int(round(refusal.wait_s * 1000)), refusal.limit,
            refusal.reason, attempt, worker, task_id, int(round(countdown_s * 1000))])
        self.queue_release(batch, None, ran=self.ran, limited=self.limited)
        with translate_errors(self.store.url):
            return int(checked(batch.execute()[0])) / 1000.0


def wait_again(task: Task, countdown_s: float, refusal: Refusal) -> Retry:
    """Send the step again in ``countdown_s``, as the same attempt: Celery's ``retry``
    would count it as one of the agent's retries (and change its lease)."""
    sig = task.signature_from_request(task.request, None, None, countdown=countdown_s,
                                      retries=task.request.retries)
    try:
        sig.apply_async()
    except Exception as e:  # as Celery's retry does: the sweeper re-drives the run
        raise Reject(e, requeue=False) from e
    return Retry(exc=Throttled(f"limit {refusal.limit}: waiting {countdown_s:.2f} s for "
                               f"{refusal.reason}", wait_s=refusal.wait_s,
                               reason=refusal.reason),
                 when=countdown_s, sig=sig)
