"""What the workers count for the exporter (``metrics.py`` reads it at scrape time).

A step's latency rides its seal round trip (three ``HINCRBY`` queued on the seal's
batch, never inside the run's Lua script: on a cluster the counters live in another
slot); a step that fails for good, and a compensation once recorded, cost one
``HINCRBY`` of their own, off the happy path. Every counter is a hash under
``pipeline:{metrics}`` (one hash tag: one slot).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis

from .agent import Agent
from .errors import BudgetExceeded
from .hooks import StepHooks, add_hook
from .keys import METRICS_PREFIX
from .lua import Batch
from .state import StateStore
from .state.store import Extra

__all__ = ["BUDGET_EXCEEDED", "COMPENSATIONS", "FAILURES", "LATENCY", "LATENCY_BUCKETS_MS",
           "MetricsHooks", "count_compensation", "install_hooks", "latency_extra"]

log = logging.getLogger(__name__)

LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000,
                      60_000, 120_000, 300_000)
"""Upper bounds of the step latency histogram (an agent may call a model for minutes)."""

LATENCY = f"{METRICS_PREFIX}:latency"
"""Hash ``<agent>:<bound ms>`` / ``<agent>:inf`` -> steps whose latency fell in that bucket
(not cumulative), ``<agent>:count`` -> steps, ``<agent>:sum_us`` -> their total latency (µs)."""
FAILURES = f"{METRICS_PREFIX}:failures"
"""Hash agent -> steps of the agent that failed for good (not retried)."""
BUDGET_EXCEEDED = f"{METRICS_PREFIX}:budget_exceeded"
"""Hash agent -> steps of the agent that did not run because their run's budget was spent
(each stopped its run)."""
COMPENSATIONS = f"{METRICS_PREFIX}:compensations"
"""Hash ``<agent>:done`` / ``<agent>:dead`` -> compensations recorded with that outcome."""


def _hincrby(key: str, field: str, amount: int) -> Extra:
    def queue(batch: Batch) -> int:
        return batch.command("HINCRBY", key, field, amount)

    return queue


def latency_extra(agent: str, latency_ms: float) -> list[Extra]:
    """The three ``HINCRBY`` that observe one step's latency, to queue on its seal."""
    bucket = next((str(b) for b in LATENCY_BUCKETS_MS if latency_ms <= b), "inf")
    return [_hincrby(LATENCY, f"{agent}:{bucket}", 1), _hincrby(LATENCY, f"{agent}:count", 1),
            _hincrby(LATENCY, f"{agent}:sum_us", round(latency_ms * 1000))]


def _bump(client: redis.Redis, key: str, field: str) -> None:
    """One counter, best effort: a metric never fails the work it counts."""
    try:
        client.hincrby(key, field, 1)
    except redis.RedisError as e:
        log.warning("could not count %s %s: %s", key, field, e)


def count_compensation(client: redis.Redis, agent: str, outcome: str) -> None:
    """Count a compensation recorded ``done`` or ``dead`` (the saga calls it once each)."""
    _bump(client, COMPENSATIONS, f"{agent}:{outcome}")


class MetricsHooks(StepHooks):
    """Count each step's latency on its seal round trip, and its failures for good."""

    def seal_extra(self, agent: Agent, *, ok: bool, latency_ms: float) -> Sequence[Extra]:
        return latency_extra(agent.name, latency_ms)

    def on_failure(self, agent: Agent, store: StateStore, run_id: str, step: str,
                   exc: BaseException) -> None:
        _bump(store.redis, BUDGET_EXCEEDED if isinstance(exc, BudgetExceeded) else FAILURES,
              agent.name)


def install_hooks(app: object) -> None:
    """Give ``app``'s steps the hook that records what the exporter reports (once)."""
    add_hook(app, MetricsHooks())
