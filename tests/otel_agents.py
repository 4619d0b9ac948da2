"""Test only: a worker's finished spans, as JSON, on a Redis list the test reads back.

Loaded by test workers via PIPELINE_AGENT_MODULES. Each pool process installs, when it
starts, a TracerProvider whose span processor pushes every finished span to
``SPANS_KEY`` in the worker's database (PIPELINE_REDIS_URL). Importing this module
elsewhere (the test process, for :func:`record`) installs nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import redis
from celery.signals import worker_process_init
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

SPANS_KEY = "test:otel:spans"


def record(span: ReadableSpan) -> dict[str, Any]:
    """What the tests compare, from a span of this process or of a worker."""
    assert span.context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
        "attributes": {k: list(v) if isinstance(v, tuple) else v
                       for k, v in (span.attributes or {}).items()},
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "events": [{"name": e.name, **dict(e.attributes or {})} for e in span.events],
        "pid": os.getpid(),
    }


class RedisListExporter(SpanExporter):
    """Pushes each finished span's :func:`record` to a Redis list."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if spans:
            self.client.rpush(SPANS_KEY, *(json.dumps(record(s)) for s in spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.client.close()


@worker_process_init.connect
def _install_provider(**_: Any) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "pipeline-test-worker"}))
    provider.add_span_processor(
        SimpleSpanProcessor(RedisListExporter(os.environ["PIPELINE_REDIS_URL"])))
    trace.set_tracer_provider(provider)
