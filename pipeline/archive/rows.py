"""A finished run as the archive's rows: its versions, its calls, its events (a
choreography's) and the run itself, read from Redis (two round trips for a batch of runs)
and shaped for four Delta tables.

Every table is partitioned by workflow and day (the day the run was created, UTC), so a
query of one workflow over a week reads a week's files. A version keeps its payload as the
canonical JSON text it was sealed as, beside its digest: reading it back checks one against
the other, as reading it from Redis does. A run keeps its record and the rest of its Redis
keys (its log, steps, saga, ledger...) as JSON, each as Redis gave it, so that a run read
back is restored to Redis exactly and every command explains it as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from ..errors import ConfigurationError
from ..keys import RunKeys
from ..observe.calls import calls, usage
from ..observe.ledger import event_views
from ..state import RunInfo, StateStore, Version, translate_errors

try:
    import pyarrow as pa
except ImportError as e:
    raise ConfigurationError(
        f"the archive needs pyarrow and deltalake, which are not installed ({e}); "
        "pip install celery-agent-pipeline[archive], or unset PIPELINE_ARCHIVE_URI") from e

__all__ = ["SCHEMAS", "TABLES", "RunRows", "day_of", "flat", "key_names", "run_rows", "snapshots"]

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
    "events": pa.schema([
        pa.field("run_id", pa.string()), pa.field("event_id", pa.string()),
        pa.field("type", pa.string()), pa.field("cause", pa.string()),
        pa.field("publisher", pa.string()), pa.field("version", pa.int64()),
        pa.field("at", pa.int64()), pa.field("deliveries", pa.string()), *_PARTITION]),
    "runs": pa.schema([
        pa.field("run_id", pa.string()), pa.field("status", pa.string()),
        pa.field("created_at", pa.int64()), pa.field("finished_at", pa.int64()),
        pa.field("duration_ms", pa.float64()), pa.field("error", pa.string()),
        pa.field("failed_agent", pa.string()), pa.field("idempotency_key", pa.string()),
        pa.field("tokens", pa.int64()), pa.field("degraded", pa.bool_()),
        pa.field("compensation", pa.string()), pa.field("batch", pa.int64()),
        pa.field("record", pa.string()), pa.field("keys", pa.string()), *_PARTITION]),
}
"""The archive's tables: one row a version, a call (an attempt), an event, a run."""

TABLES = tuple(SCHEMAS)
"""In the order a batch commits them: ``runs`` last, so that a run found in ``runs`` has
every row of its in the other tables."""

COMPENSATION_OUTCOMES = {"run.compensated": "compensated", "run.cancelled": "cancelled",
                         "run.compensation_failed": "failed"}

Snapshot = dict[str, list[Any]]
"""A run's Redis keys by name (``log``, ``steps``...): ``[type, data]``, as Redis gave them
(a hash or a stream entry as a flat list of fields and values, in Redis's order)."""


@dataclass
class RunRows:
    """One finished run's rows, table by table."""

    run_id: str
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return str(self.tables["runs"][0]["status"])


def key_names(run_id: str) -> dict[str, str]:
    """Every key of the run by its name: ``states`` -> ``pipeline:{<run>}:states``..."""
    return {key.rsplit(":", 1)[1]: key for key in RunKeys(run_id).all()}


def run_rows(store: StateStore, run_id: str, batch: int,
             snap: Snapshot | None = None) -> RunRows | None:
    """The rows of finished run ``run_id`` as batch ``batch`` archives it, read from Redis
    (or from ``snap``, its keys read already), every digest checked: a version changed in
    Redis is never archived; None when Redis no longer has it."""
    snap = dict(snapshots(store, [run_id])[run_id] if snap is None else snap)
    if "run" not in snap:
        return None
    record = _pairs(snap.pop("run")[1])
    info = RunInfo.from_hash(run_id, record)
    where = {"workflow": info.workflow, "day": day_of(info.created_at)}
    versions = []
    for _, flat in snap.pop("states", ["stream", []])[1]:
        fields = _pairs(flat)
        Version.from_entry(run_id, fields)
        versions.append({
            "run_id": run_id, "version": int(fields["version"]), "parents": fields["parents"],
            "agent": fields["agent"], "contract": fields["contract"], "digest": fields["digest"],
            "payload": fields["payload"], "step": fields["step"],
            "degraded": fields.get("degraded") == "1", "created_at": int(fields["created_at"]),
            **where})
    log = [{"id": sid, **_pairs(flat)} for sid, flat in snap.get("log", ["stream", []])[1]]
    run_calls = calls(log)
    _, total = usage(run_calls)
    call_rows = [{
        "run_id": run_id, "step": c.step, "agent": c.agent, "attempt": c.attempt,
        "worker": c.worker, "status": c.status, "started_at": c.started_at,
        "latency_ms": c.latency_ms, "error_type": c.error_type, "error": c.error,
        "breaker": c.breaker, "fallback": c.fallback, "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens, "model": c.model, "output": c.output,
        **where} for c in run_calls]
    ledger = _pairs(snap["ledger"][1]) if "ledger" in snap else {}
    event_rows = [{
        "run_id": run_id, "event_id": v.event_id, "type": v.type, "cause": v.cause,
        "publisher": v.publisher, "version": v.version, "at": v.at,
        "deliveries": json.dumps([asdict(d) for d in v.deliveries]),
        **where} for v in event_views(log, ledger, info.parked_steps)]
    ended = next((COMPENSATION_OUTCOMES[e["event"]] for e in reversed(log)
                  if e.get("event") in COMPENSATION_OUTCOMES), "")
    finished = info.finished_at or info.updated_at
    run = {
        "run_id": run_id, "status": info.status.value,
        "created_at": round(info.created_at * 1000),
        "finished_at": round(info.finished_at * 1000) if info.finished_at else None,
        "duration_ms": (finished - info.created_at) * 1000, "error": info.error or "",
        "failed_agent": info.failed_agent or "", "idempotency_key": info.idempotency_key or "",
        "tokens": total.total, "degraded": info.degraded, "compensation": ended,
        "batch": batch, "record": json.dumps(list(record.items())),
        "keys": json.dumps(snap), **where}
    return RunRows(run_id, {"versions": versions, "calls": call_rows,
                                           "events": event_rows, "runs": [run]})


STREAMS = frozenset({"states", "log"})
"""The run's keys that are streams; every other key of a run is a hash."""


def snapshots(store: StateStore, run_ids: Sequence[str]) -> dict[str, Snapshot]:
    """Every key each run has in Redis, read whole, in one round trip for them all (a key
    Redis does not have reads empty, and is left out)."""
    names = {run_id: key_names(run_id) for run_id in run_ids}
    with translate_errors(store.url):
        pipe = store.redis.pipeline(transaction=False)
        for keys in names.values():
            for name, key in keys.items():
                if name in STREAMS:
                    pipe.xrange(key)
                else:
                    pipe.hgetall(key)
        replies = iter(pipe.execute())
    out: dict[str, Snapshot] = {}
    for run_id, keys in names.items():
        snap: Snapshot = out.setdefault(run_id, {})
        for name in keys:
            reply = next(replies)
            if not reply:
                continue
            if name in STREAMS:
                snap[name] = ["stream", [[sid, flat(fields.items())] for sid, fields in reply]]
            else:
                snap[name] = ["hash", flat(cast(dict[str, str], reply).items())]
    return out


def flat(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """Fields and values as Redis takes and the snapshot keeps them: one flat list."""
    return [x for pair in pairs for x in pair]


def _pairs(values: list[str]) -> dict[str, str]:
    return dict(zip(values[::2], values[1::2], strict=True))


def day_of(at_s: float) -> str:
    """The partition a run's rows go to: the UTC day it was created."""
    return datetime.fromtimestamp(at_s, UTC).strftime("%Y-%m-%d")
