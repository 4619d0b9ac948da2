"""A fleet-wide breaker around any call, outside a pipeline step.

A step already pays for its breaker inside the two round trips it makes anyway
(the gate in ``gate.py``). Code that is not a step (a tool an agent calls, a
plain Celery task, a web handler) guards its calls with ``Breaker``::

    payments = Breaker(registry, "payments", BreakerPolicy(failure_threshold=3))
    receipt = payments.call(charge, order)      # or @payments on the function

While the breaker is closed a call costs **one** round trip: the outcome is
recorded by the ``record`` script and its reply says whether the breaker is
still closed, which admits the next call without asking again. The price of
that, stated plainly: a breaker opened by another process is seen by this one
at its next reply, so each process may let through the calls it already had in
flight plus one more, and never acts on a "closed" older than ``fresh_s``.
Those calls are counted and never judged (the record script ignores an outcome
that was admitted before the breaker opened). Any other state (open, half-open,
forced, or news older than ``fresh_s``) goes through ``acquire`` first, with the
same probe leases as a step, so half-open still admits only its probes.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from ..errors import CircuitOpen, StoreError
from .policy import CONFIGURATION_FAULTS, BreakerPolicy, BreakerState
from .registry import DEFAULT_PROBE_LEASE_S, BreakerRegistry

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_FRESH_S = 1.0


class Breaker:
    """Guards calls with one agent's shared breaker; raises ``CircuitOpen`` when refused."""

    def __init__(self, registry: BreakerRegistry, agent: str, policy: BreakerPolicy, *,
                 fresh_s: float = DEFAULT_FRESH_S,
                 probe_lease_s: float = DEFAULT_PROBE_LEASE_S) -> None:
        self.registry = registry
        self.agent = agent
        self.policy = policy
        self.fresh_s = fresh_s
        self.probe_lease_s = probe_lease_s
        self._closed_until = 0.0  # monotonic time until which the last "closed" holds

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        lease = ""
        if time.monotonic() >= self._closed_until:
            permit = self.registry.acquire(self.agent, self.policy, uuid.uuid4().hex,
                                           self.probe_lease_s)
            if not permit.allowed:
                self._closed_until = 0.0
                raise CircuitOpen(permit.refusal(self.agent))
            lease = permit.lease
        start = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            ignored = self.policy.excluded + CONFIGURATION_FAULTS
            outcome = "ignore" if isinstance(exc, ignored) else "failure"
            self._record(outcome, lease, f"{type(exc).__name__}: {exc}")
            raise
        elapsed_s = time.perf_counter() - start
        slow = self.policy.slow_call_s is not None and elapsed_s > self.policy.slow_call_s
        self._record("failure" if slow else "success", lease,
                     f"slow call: {elapsed_s * 1000:.0f} ms" if slow else "")
        return result

    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]:
        """Use the breaker as a decorator: every call of ``fn`` is guarded."""

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            return self.call(fn, *args, **kwargs)

        return guarded

    def _record(self, outcome: str, lease: str, reason: str) -> None:
        """Tell the breaker how the call went; its reply admits the next call or not."""
        try:
            state = self.registry.record(self.agent, self.policy, outcome, lease, reason).state
        except StoreError:
            # The call itself has happened: its result (or its own error) is what the
            # caller needs. The next call asks first, and meets Redis being down there.
            self._closed_until = 0.0
            return
        closed = state is BreakerState.CLOSED
        self._closed_until = time.monotonic() + self.fresh_s if closed else 0.0
