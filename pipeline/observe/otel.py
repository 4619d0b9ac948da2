"""OpenTelemetry: one span per step, the W3C trace context in Celery message headers.

``PIPELINE_OTEL=1`` (the ``otel`` extra) makes :func:`~pipeline.app.create_app` call
:func:`install`. Every message the app publishes then carries the publisher's trace
context (``traceparent``, ``tracestate``), and every task of the app runs in a span
named after it (``agent.research``, ``compensate.research``,
``pipeline.compensate_run``) whose parent is the span that published the message:
the client's ``pipeline.start <workflow>`` span (:func:`run_span`), the step before
it in a chain, the last member of a chord, or the delivery that published an event.
All steps of a run form one trace, across workers and hosts. A retried attempt is a
sibling of the one before it, under the same parent.

The library uses the OpenTelemetry API only: the application (each worker included)
configures a ``TracerProvider`` and its exporter; without one, spans are not recorded
but the trace context still travels. Tracing never fails a step: an error in a
handler is logged.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import Token
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery.signals import (
    before_task_publish,
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
)

from ..errors import ConfigurationError
from ..names import (
    AGENT_TASK_PREFIX,
    COMPENSATE_RUN_TASK,
    COMPENSATE_TASK_PREFIX,
    FINISH_TASK,
    agent_of_task,
)

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import Getter
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from opentelemetry.util.types import AttributeValue
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ConfigurationError(
        f"PIPELINE_OTEL=1 needs OpenTelemetry, which is not installed ({e}); "
        "pip install celery-agent-pipeline[otel], or unset PIPELINE_OTEL"
    ) from e

__all__ = ["install", "run_span"]

log = logging.getLogger(__name__)

TRACER_NAME = "pipeline"
SUCCESS = "SUCCESS"
POSITIONAL = {
    COMPENSATE_RUN_TASK: ("pipeline.run_id",),
    FINISH_TASK: ("pipeline.run_id", "pipeline.step", "pipeline.agent"),
}
"""What the positional arguments of the pipeline's own tasks are (``compensate.*``: run, step)."""

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER = trace.get_tracer(TRACER_NAME)
_apps: weakref.WeakSet[Celery] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class _Running:
    """A task's span while it runs: the span, its attach token, the context it came in."""

    span: Span
    token: Token[Context]
    parent: Context


_running: dict[str, _Running] = {}


class _RequestGetter(Getter[Any]):
    """Reads the trace context from a task request: Celery makes message headers
    attributes of ``task.request``."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        value = getattr(carrier, key, None)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Any) -> list[str]:
        return []


_GETTER = _RequestGetter()


def install(app: Celery) -> None:
    """Trace every task of ``app`` and carry the trace context in its messages.

    Idempotent: the signal handlers are connected once per process, and each
    call adds one app to those they serve.
    """
    _apps.add(app)
    before_task_publish.connect(_inject, weak=False, dispatch_uid="pipeline.otel.inject")
    task_prerun.connect(_start, weak=False, dispatch_uid="pipeline.otel.start")
    task_retry.connect(_retried, weak=False, dispatch_uid="pipeline.otel.retry")
    task_failure.connect(_failed, weak=False, dispatch_uid="pipeline.otel.failure")
    task_postrun.connect(_end, weak=False, dispatch_uid="pipeline.otel.end")


@contextmanager
def run_span(workflow: str, run_id: str) -> Iterator[Span]:
    """The client's span of a run, current while it is enqueued: its steps' parent.

    A root span when no span is current, else a child of the caller's span.
    """
    with _TRACER.start_as_current_span(
        f"pipeline.start {workflow}", kind=SpanKind.PRODUCER,
        attributes={"pipeline.run_id": run_id, "pipeline.workflow": workflow},
    ) as span:
        yield span


# -- signal handlers: each logs its own errors, never raises -----------------------------------


def _inject(sender: str | None = None, headers: dict[str, Any] | None = None,
            **_: Any) -> None:
    """before_task_publish: put the current trace context in the message headers."""
    try:
        if headers is None or not any(sender in app.tasks for app in _apps):
            return
        running = _running.get(str(headers.get("id", "")))
        # A task retrying itself: the next attempt gets this attempt's parent.
        _PROPAGATOR.inject(headers, context=running.parent if running is not None else None)
    except Exception:
        log.exception("OpenTelemetry: could not put the trace context in a %s message", sender)


def _start(sender: Task | None = None, task_id: str | None = None,
           args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
           **_: Any) -> None:
    """task_prerun: start the task's span, child of the context its message carried."""
    try:
        if sender is None or task_id is None or sender.app not in _apps:
            return
        request = sender.request
        parent = _PROPAGATOR.extract(request, getter=_GETTER)
        span = _TRACER.start_span(
            sender.name, context=parent, kind=SpanKind.CONSUMER,
            attributes=_attributes(sender.name, task_id, int(request.retries or 0),
                                   args or (), kwargs or {}),
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        _running[task_id] = _Running(span, token, parent)
    except Exception:
        log.exception("OpenTelemetry: could not start the span of task %s", task_id)


def _retried(sender: Task | None = None, request: Any = None, reason: Any = None,
             **_: Any) -> None:
    """task_retry: this attempt failed and another is queued."""
    running = _running.get(str(getattr(request, "id", "")))
    if running is None:
        return
    exc = getattr(reason, "exc", None) or reason
    _record_error(running.span, exc if isinstance(exc, BaseException) else None,
                  f"retried: {exc}")


def _failed(sender: Task | None = None, task_id: str | None = None,
            exception: BaseException | None = None, **_: Any) -> None:
    """task_failure: the task failed for good."""
    running = _running.get(str(task_id))
    if running is None:
        return
    _record_error(running.span, exception, f"{type(exception).__name__}: {exception}")


def _end(sender: Task | None = None, task_id: str | None = None, retval: Any = None,
         state: str | None = None, **_: Any) -> None:
    """task_postrun (after every task, whatever its outcome): end the span, detach it."""
    running = _running.pop(str(task_id), None)
    if running is None:
        return
    try:
        if state:
            running.span.set_attribute("celery.state", state)
        name = getattr(sender, "name", "")
        if (state == SUCCESS and name.startswith(AGENT_TASK_PREFIX)
                and isinstance(retval, int) and not isinstance(retval, bool)):
            running.span.set_attribute("pipeline.output_version", retval)
    except Exception:
        log.exception("OpenTelemetry: could not annotate the span of task %s", task_id)
    finally:
        try:
            running.span.end()
        finally:
            otel_context.detach(running.token)


def _record_error(span: Span, exc: BaseException | None, description: str) -> None:
    try:
        if exc is not None:
            span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, description[:500]))
    except Exception:
        log.exception("OpenTelemetry: could not record a task's failure on its span")


def _attributes(name: str, task_id: str, retries: int, args: Sequence[Any],
                kwargs: Mapping[str, Any]) -> dict[str, AttributeValue]:
    """The span's attributes: what run, step, agent and versions the task is about."""
    attrs: dict[str, AttributeValue] = {"celery.task_id": task_id, "celery.retries": retries}
    if name.startswith(AGENT_TASK_PREFIX):
        attrs["pipeline.agent"] = agent_of_task(name)
        if args:
            upstream = args[0]
            attrs["pipeline.input_versions"] = (
                [int(v) for v in upstream] if isinstance(upstream, list | tuple)
                else [int(upstream)])
        for key in ("run_id", "step", "event", "event_type"):
            if kwargs.get(key):
                attrs[f"pipeline.{key}"] = str(kwargs[key])
        return attrs
    if name.startswith(COMPENSATE_TASK_PREFIX):
        attrs["pipeline.agent"] = agent_of_task(name)
        positional: Sequence[str] = ("pipeline.run_id", "pipeline.step")
    else:
        positional = POSITIONAL.get(name, ())
    for key, value in zip(positional, args, strict=False):
        attrs[key] = str(value)
    if kwargs.get("run_id"):
        attrs["pipeline.run_id"] = str(kwargs["run_id"])
    return attrs
