"""Circuit breakers: one per agent, in Redis, gating every dispatch (DESIGN section 8)."""

from .policy import BreakerPolicy, BreakerState, Fallback
from .registry import BreakerRegistry, Permit, Recorded, Snapshot

__all__ = [
    "BreakerPolicy",
    "BreakerRegistry",
    "BreakerState",
    "Fallback",
    "Permit",
    "Recorded",
    "Snapshot",
]
