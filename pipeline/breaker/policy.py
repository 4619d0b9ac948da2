"""What a breaker does for one agent: thresholds, timers, and the fallback when it refuses."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..errors import ConfigurationError, DefinitionError, UnknownContract, UnknownLimit

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_WINDOW = 20
DEFAULT_MIN_CALLS = 10
DEFAULT_FAILURE_RATE = 0.5
DEFAULT_RESET_TIMEOUT_S = 60.0
DEFAULT_HALF_OPEN_MAX_CALLS = 1
DEFAULT_RETRY_LATER_MAX = 5
CONFIGURATION_FAULTS: tuple[type[BaseException], ...] = (ConfigurationError, UnknownContract,
                                                        UnknownLimit)
"""Failures of the pipeline's configuration (a setting, a contract no module of this worker
registers), not of the agent: they would fail every call of every agent alike, so no breaker
counts them."""


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Fallback(StrEnum):
    """What a step does when its agent's breaker refuses the call."""

    FAIL = "fail"  # the step fails with CircuitOpen; the run fails (the saga compensates)
    SKIP = "skip"  # seal the agent's declared default output, marked degraded
    CACHED = "cached"  # seal the last good output for the same input, degraded; else fail
    PARK = "park"  # the run waits for a person: `pipeline resume RUN [--output FILE]`
    RETRY_LATER = "retry_later"  # retry when the breaker may half-open, a bounded number of times


class FallbackOn(StrEnum):
    """When a step takes its agent's fallback."""

    REFUSAL = "refusal"  # only when the breaker refuses the call
    FAILURE = "failure"  # also when the agent's call fails for good (counted by the breaker)


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    """One agent's breaker settings; the state lives in Redis, shared by the fleet.

    Closed -> open after ``failure_threshold`` consecutive failures, or when more
    than ``failure_rate`` of the last ``window`` calls failed (once ``min_calls``
    are in the window). A success slower than ``slow_call_s`` counts as a
    failure. Open -> half-open after ``reset_timeout_s``; half-open admits
    ``half_open_max_calls`` probes, each holding a lease of ``probe_lease_s``
    (default: the agent's hard time limit) so a probe whose worker died frees
    its slot. Exceptions in ``excluded`` (a business rejection) never count.
    """

    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    window: int = DEFAULT_WINDOW
    min_calls: int = DEFAULT_MIN_CALLS
    failure_rate: float = DEFAULT_FAILURE_RATE
    slow_call_s: float | None = None
    reset_timeout_s: float = DEFAULT_RESET_TIMEOUT_S
    half_open_max_calls: int = DEFAULT_HALF_OPEN_MAX_CALLS
    probe_lease_s: float | None = None
    excluded: tuple[type[BaseException], ...] = ()
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.window < 1 or self.half_open_max_calls < 1:
            raise DefinitionError("failure_threshold, window and half_open_max_calls must be >= 1")
        if not 0.0 <= self.failure_rate <= 1.0:
            raise DefinitionError(f"failure_rate {self.failure_rate} must be between 0 and 1")
        if self.min_calls < 1 or self.min_calls > self.window:
            raise DefinitionError(f"min_calls {self.min_calls} must be between 1 and window")
        if self.reset_timeout_s <= 0:
            raise DefinitionError("reset_timeout_s must be positive")
