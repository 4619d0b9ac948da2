"""Observation: what happened in a run and in the fleet, read back from what the runner,
the saga and the breakers wrote. ``calls`` (one row per attempt, token usage, the
compensations, the runs index), ``lineage`` (a run's versions as a tree and a graph),
``ledger`` (a choreographed run's events and deliveries), ``metrics`` (the Prometheus
exporter; the ``metrics`` extra) and ``otel`` (OpenTelemetry traces; the ``otel`` extra,
imported only when tracing is on).
"""

from .calls import (
    TROUBLE,
    Call,
    CallReport,
    RunRow,
    Usage,
    calls,
    compensations,
    report,
    runs,
    usage,
    waiting_on,
)

__all__ = ["TROUBLE", "Call", "CallReport", "RunRow", "Usage", "calls", "compensations",
           "report", "runs", "usage", "waiting_on"]
