"""One step's dealings with its agent's breaker, and with its limits (``draw.py``).

The step asks for permission inside its *open* round trip and reports the
outcome inside its *seal* round trip, so a closed breaker (and a limit that does not
bind) costs no extra round trip. Only failures, refusals and transitions cost one of
their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..agent import Agent
from ..breaker.policy import CONFIGURATION_FAULTS, Fallback
from ..breaker.registry import BreakerRegistry, Permit
from ..context import StepContext
from ..errors import CircuitOpen, ContractViolation, LimitError, StepCancelled, StoreError
from ..keys import breaker_cache_key
from ..lua import Batch
from ..state import StateStore
from ..state.store import Extra
from .draw import Draw

CACHE_TTL_S = 7 * 24 * 3600
"""How long an agent's last good output for an input stays usable by the ``cached`` fallback."""


def outcome_of(agent: Agent, exc: BaseException) -> str:
    """How a failure counts: 'failure', or 'ignore' (it says nothing of the agent's health)."""
    if isinstance(exc, CircuitOpen | StoreError | StepCancelled | LimitError):
        return "ignore"  # the call never ran (a breaker, a limit), Redis failed, or the run
        #                  stopped: not the agent
    if isinstance(exc, CONFIGURATION_FAULTS):
        return "ignore"  # the pipeline's configuration, not the agent
    if isinstance(exc, ContractViolation) and exc.side == "input":
        return "ignore"  # the upstream's fault
    if isinstance(exc, agent.breaker.excluded):
        return "ignore"  # a business answer, not a broken agent
    return "failure"


class Gate:
    def __init__(self, store: StateStore, agent: Agent, *, run_id: str, step: str, lease: str,
                 lease_s: float) -> None:
        self.store = store
        self.agent = agent
        self.run_id = run_id
        self.step = step
        self.lease = lease
        self.lease_s = lease_s
        self.registry = BreakerRegistry(store.redis, url=store.url) if agent.breaker.enabled \
            else None
        self.permit: Permit | None = None
        self.draw = Draw(store, agent, lease=lease, lease_s=lease_s)

    # -- the open round trip ------------------------------------------------------

    def open_extra(self) -> list[Extra]:
        if self.registry is None:
            return self.draw.open_extra()
        registry = self.registry

        def acquire(batch: Batch) -> int:
            return registry.queue_acquire(batch, self.agent.name, self.agent.breaker,
                                          self.lease, self.lease_s)

        return [acquire, *self.draw.open_extra()]

    def take_permit(self, extra: Sequence[Any]) -> Sequence[Any]:
        """Read the breaker's and the limits' answers from the open round trip; return the
        other extras."""
        if self.registry is not None:
            self.permit = self.registry.permit(extra[0], self.lease)
            self._log_transition(self.permit.transition)
            extra = extra[1:]
        return self.draw.take(extra)

    @property
    def refused(self) -> bool:
        return self.permit is not None and not self.permit.allowed

    # -- the seal round trip ------------------------------------------------------

    def seal_extra(self, *, latency_ms: float, cache: tuple[str, str] | None,
                   ctx: StepContext | None = None) -> list[Extra]:
        """Record a success (or a slow call), settle the limits and, for ``cached`` agents,
        keep the output. The breaker's record comes first (``after_seal`` reads it)."""
        extras: list[Extra] = []
        if self.registry is not None and self.permit is not None:
            registry, policy = self.registry, self.agent.breaker
            slow = policy.slow_call_s is not None and latency_ms > policy.slow_call_s * 1000
            outcome = "failure" if slow else "success"
            reason = f"slow call: {latency_ms:.0f} ms" if slow else ""

            def record(batch: Batch) -> int:
                return registry.queue_record(batch, self.agent.name, policy, outcome,
                                             self.permit.lease if self.permit else "", reason)

            extras.append(record)
        if cache is not None and self.agent.fallback is Fallback.CACHED:
            digest, canonical = cache

            def keep(batch: Batch) -> int:
                return batch.command(
                    "SET", breaker_cache_key(self.agent.name, self.agent.output, digest),
                    canonical, "EX", CACHE_TTL_S,
                )

            extras.append(keep)
        return extras + self.draw.seal_extra(ctx)

    def trace_fields(self) -> dict[str, str]:
        """The breaker's state when it let the call through, for the step's trace entry."""
        if self.permit is None:
            return {}
        return {"breaker": self.permit.state.value}

    def after_seal(self, extra: Sequence[Any]) -> None:
        if self.registry is not None and self.permit is not None and extra:
            self._log_transition(self.registry.recorded(extra[0]).transition)

    # -- failures ---------------------------------------------------------------------

    def record_failure(self, exc: BaseException, ctx: StepContext | None = None) -> None:
        """Tell the breaker about a failed call and settle its limits (a round trip each,
        off the happy path)."""
        self.release(outcome_of(self.agent, exc), f"{type(exc).__name__}: {exc}", ctx=ctx)

    def release(self, outcome: str = "ignore", reason: str = "", *,
                ctx: StepContext | None = None) -> None:
        """Report a call that ends without a seal (or a probe lease the step will not use);
        settle its limits with what it used, or give them back when it never ran."""
        self.draw.release(ctx, ran=self.draw.ran)
        if self.registry is None or self.permit is None or not self.permit.allowed:
            return
        if outcome == "ignore" and not self.permit.lease:
            return  # nothing to tell: no lease to free, no count to change
        try:
            recorded = self.registry.record(self.agent.name, self.agent.breaker, outcome,
                                            self.permit.lease, reason)
        except StoreError:
            return  # the lease expires by itself; the run's failure matters more
        self.permit = None
        self._log_transition(recorded.transition)

    def _log_transition(self, transition: str) -> None:
        if transition:
            before, after = transition.split(">")
            try:
                self.store.note(self.run_id, "breaker.transition", step=self.step,
                                agent=self.agent.name, **{"from": before, "to": after})
            except StoreError:
                pass
