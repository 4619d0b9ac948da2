"""Prometheus metrics read from Redis, served by ``pipeline exporter`` (being built)."""

from __future__ import annotations


def install_hooks() -> None:
    """Register the step hooks that record what the exporter reports (idempotent)."""
