"""Circuit breakers: one per agent, in Redis, gating every dispatch ."""

from .guard import Breaker
from .policy import BreakerPolicy, BreakerState, Fallback, FallbackOn
from .registry import BreakerRegistry, Permit, Recorded, Snapshot

__all__ = [
    "Breaker",
    "BreakerPolicy",
    "BreakerRegistry",
    "BreakerState",
    "Fallback",
    "FallbackOn",
    "Permit",
    "Recorded",
    "Snapshot",
]
