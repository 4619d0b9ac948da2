"""A finished run as the archive's rows: its versions, its calls, the run itself and, for a
choreography, its events, read from Redis and shaped for four Delta tables.

Every table is partitioned by workflow and day (the day the run was created, UTC), so a
query of one workflow over a week reads a week's files. A version keeps its payload as the
canonical JSON text it was sealed as, beside its digest: reading it back checks one against
the other, as reading it from Redis does. A run keeps its record and its log as JSON too,
so that every command that explains a run reads back from the table what it read from
Redis.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import pyarrow as pa

from ..keys import RunKeys
from ..observe import report
from ..observe.ledger import events
from ..state import StateStore, Version, translate_errors

__all__ = ["SCHEMAS", "TABLES", "RunRows", "run_rows"]

HISTORY_PAGE = 1000

_PARTITION = [pa.field("workflow", pa.string()), pa.field("day", pa.string())]

SCHEMAS: dict[str, pa.Schema] = {
    "versions": pa.schema([
        pa.field("run_id", pa.string()), pa.field("version", pa.int64()),
        pa.field("parents", pa.string()), pa.field("agent", pa.string()),
        pa.field("contract", pa.string()), pa.field("digest", pa.string()),
        pa.field("payload", pa.string()), pa.field("step", pa.string()),
        pa.field("degraded", pa.bool_()), pa.field("created_at", pa.int64()), *_PARTITION]),
    "calls": pa.schema([
        pa.field("run_id", pa.string()), pa.field("step", pa.string()),
        pa.field("agent", pa.string()), pa.field("attempt", pa.int64()),
        pa.field("worker", pa.string()), pa.field("status", pa.string()),
        pa.field("started_at", pa.int64()), pa.field("latency_ms", pa.float64()),
        pa.field("error_type", pa.string()), pa.field("error", pa.string()),
        pa.field("breaker", pa.string()), pa.field("fallback", pa.string()),
        pa.field("prompt_tokens", pa.int64()), pa.field("completion_tokens", pa.int64()),
        pa.field("model", pa.string()), pa.field("output", pa.int64()), *_PARTITION]),
    "runs": pa.schema([
        pa.field("run_id", pa.string()), pa.field("status", pa.string()),
        pa.field("created_at", pa.int64()), pa.field("finished_at", pa.int64()),
        pa.field("duration_ms", pa.float64()), pa.field("error", pa.string()),
        pa.field("failed_agent", pa.string()), pa.field("idempotency_key", pa.string()),
        pa.field("tokens", pa.int64()), pa.field("degraded", pa.bool_()),
        pa.field("compensation", pa.string()), pa.field("record", pa.string()),
        pa.field("log", pa.string()), *_PARTITION]),
    "events": pa.schema([
        pa.field("run_id", pa.string()), pa.field("event_id", pa.string()),
        pa.field("type", pa.string()), pa.field("cause", pa.string()),
        pa.field("publisher", pa.string()), pa.field("version", pa.int64()),
        pa.field("at", pa.int64()), pa.field("deliveries", pa.string()), *_PARTITION]),
}
"""The archive's tables: one row a version, a call (an attempt), a run, an event."""

TABLES = tuple(SCHEMAS)

COMPENSATION_OUTCOMES = {"run.compensated": "compensated", "run.cancelled": "cancelled",
                         "run.compensation_failed": "failed"}


@dataclass
class RunRows:
    """One finished run's rows, table by table."""

    run_id: str
    workflow: str
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def run_rows(store: StateStore, run_id: str) -> RunRows:
    """The rows of finished run ``run_id``, read from Redis (every digest checked)."""
    r = report(store, run_id)
    info = r.info
    where = {"workflow": info.workflow, "day": day_of(info.created_at)}
    versions = []
    for fields in _raw_versions(store, run_id):
        Version.from_entry(run_id, fields)  # an entry changed in Redis is never archived
        versions.append({
            "run_id": run_id, "version": int(fields["version"]), "parents": fields["parents"],
            "agent": fields["agent"], "contract": fields["contract"], "digest": fields["digest"],
            "payload": fields["payload"], "step": fields["step"],
            "degraded": fields.get("degraded") == "1", "created_at": int(fields["created_at"]),
            **where})
    calls = [{
        "run_id": run_id, "step": c.step, "agent": c.agent, "attempt": c.attempt,
        "worker": c.worker, "status": c.status, "started_at": c.started_at,
        "latency_ms": c.latency_ms, "error_type": c.error_type, "error": c.error,
        "breaker": c.breaker, "fallback": c.fallback, "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens, "model": c.model, "output": c.output,
        **where} for c in r.calls]
    with translate_errors(store.url):
        record = cast(dict[str, str], store.redis.hgetall(RunKeys(run_id).run))
    ended = next((COMPENSATION_OUTCOMES[e["event"]] for e in reversed(r.log)
                  if e.get("event") in COMPENSATION_OUTCOMES), "")
    finished = info.finished_at or info.updated_at
    run = {
        "run_id": run_id, "status": info.status.value,
        "created_at": round(info.created_at * 1000),
        "finished_at": round(info.finished_at * 1000) if info.finished_at else None,
        "duration_ms": (finished - info.created_at) * 1000, "error": info.error or "",
        "failed_agent": info.failed_agent or "", "idempotency_key": info.idempotency_key or "",
        "tokens": r.total.total, "degraded": info.degraded, "compensation": ended,
        "record": json.dumps(record, sort_keys=True), "log": json.dumps(r.log), **where}
    views = events(store, run_id)
    event_rows = [{
        "run_id": run_id, "event_id": v.event_id, "type": v.type, "cause": v.cause,
        "publisher": v.publisher, "version": v.version, "at": v.at,
        "deliveries": json.dumps([asdict(d) for d in v.deliveries]),
        **where} for v in views]
    return RunRows(run_id, info.workflow, {"versions": versions, "calls": calls,
                                           "runs": [run], "events": event_rows})


def day_of(at_s: float) -> str:
    """The partition a run's rows go to: the UTC day it was created."""
    return datetime.fromtimestamp(at_s, UTC).strftime("%Y-%m-%d")


def _raw_versions(store: StateStore, run_id: str) -> list[dict[str, str]]:
    """Every sealed version's stream fields, oldest first, as sealed (the payload's text)."""
    key = RunKeys(run_id).states
    out: list[dict[str, str]] = []
    start = "-"
    with translate_errors(store.url):
        while True:
            page = cast(list[tuple[str, dict[str, str]]],
                        store.redis.xrange(key, start, "+", count=HISTORY_PAGE))
            out += [fields for _, fields in page]
            if len(page) < HISTORY_PAGE:
                return out
            start = "(" + page[-1][0]
