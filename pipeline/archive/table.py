"""The archive's Delta tables under one root (``PIPELINE_ARCHIVE_URI``): a batch of finished
runs written once, whoever writes it and however often, and a run read back from them.

Exactly once, by Delta's application transactions: a batch has a number, and each table's
commit of it records ``(pipeline.archive.<table>, number)`` in the same atomic commit as its
rows. Writing a batch again (an archiver killed after some of its commits, two archivers at
once) skips every table whose recorded number has reached the batch's: no row is written
twice. Batches are numbered in order by whoever hands them out; a number is never reused
for other runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import TableNotFoundError

from ..errors import RunNotFound
from ..state import RunInfo, Version
from .rows import SCHEMAS, TABLES, RunRows

__all__ = ["APP_ID", "ArchivedRun", "read_run", "table_uri", "write_batch", "written_batch"]

APP_ID = "pipeline.archive.{table}"
"""The application id of each table's batches in its Delta log."""


def table_uri(root: str, table: str) -> str:
    """Where ``table`` lives under the archive's root (a local path or an object store URL)."""
    return f"{root.rstrip('/')}/{table}"


def written_batch(root: str, table: str) -> int:
    """The newest batch number ``table`` committed (0 before any)."""
    try:
        dt = DeltaTable(table_uri(root, table))
    except TableNotFoundError:
        return 0
    return int(dt.transaction_version(APP_ID.format(table=table)) or 0)


def write_batch(root: str, number: int, runs: Sequence[RunRows]) -> list[str]:
    """Append the rows of ``runs`` as batch ``number`` to every table that has not committed
    it yet; the tables written. Each table's rows and its batch number go in one commit."""
    written = []
    for table in TABLES:
        if written_batch(root, table) >= number:
            continue  # committed before: by an archiver that died after, or by another
        rows = [row for run in runs for row in run.tables.get(table, [])]
        data = pa.Table.from_pylist(rows, schema=SCHEMAS[table])
        write_deltalake(
            table_uri(root, table), data, mode="append", partition_by=["workflow", "day"],
            commit_properties=CommitProperties(
                app_transactions=[Transaction(APP_ID.format(table=table), number)],
                custom_metadata={"runs": str(len(runs))}),
        )
        written.append(table)
    return written


class ArchivedRun:
    """A run read back from the archive: its versions (each digest checked), its record
    and its log, as the state store gives them for a run still in Redis."""

    def __init__(self, run_id: str, versions: list[Version], record: dict[str, str],
                 log: list[dict[str, str]]) -> None:
        self.run_id = run_id
        self.versions = versions
        self.record = record
        self.log = log

    @property
    def info(self) -> RunInfo:
        return RunInfo.from_hash(self.run_id, self.record)


def read_run(root: str, run_id: str) -> ArchivedRun:
    """Run ``run_id`` from the archive; ``RunNotFound`` when it holds no such run,
    ``IntegrityError`` when a version's payload does not match its digest."""
    runs = _rows(root, "runs", run_id)
    if not runs:
        raise RunNotFound(f"no run {run_id!r} in the archive at {root}")
    run = runs[0]
    versions = [Version.from_entry(run_id, {
        "version": str(v["version"]), "parents": v["parents"], "agent": v["agent"],
        "contract": v["contract"], "payload": v["payload"], "digest": v["digest"],
        "created_at": str(v["created_at"]), "step": v["step"],
        "degraded": "1" if v["degraded"] else "0"})
        for v in sorted(_rows(root, "versions", run_id), key=lambda v: v["version"])]
    return ArchivedRun(run_id, versions, json.loads(run["record"]), json.loads(run["log"]))


def _rows(root: str, table: str, run_id: str) -> list[dict[str, Any]]:
    try:
        dt = DeltaTable(table_uri(root, table))
    except TableNotFoundError:
        return []
    dataset = dt.to_pyarrow_dataset()
    found: list[dict[str, Any]] = dataset.to_table(filter=ds.field("run_id") == run_id) \
        .to_pylist()
    return found
