"""OpenTelemetry: one span per step, the trace context in Celery headers (being built)."""

from __future__ import annotations

from celery import Celery


def install(app: Celery) -> None:
    """Trace every step of ``app``'s tasks."""
