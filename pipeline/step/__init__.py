"""A step, inside a worker: open, check, execute, check, seal; the breaker's gate on its
two round trips, and the fallbacks when the breaker refuses or the agent fails for good."""

from .runner import HARD_TIME_LIMIT_GRACE_S, STORE_RETRY_BACKOFF_MAX_S, run_step

__all__ = ["HARD_TIME_LIMIT_GRACE_S", "STORE_RETRY_BACKOFF_MAX_S", "run_step"]
