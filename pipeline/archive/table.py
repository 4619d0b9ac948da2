"""The archive's Delta tables under one root (``PIPELINE_ARCHIVE_URI``): a batch of finished
runs written once, whoever writes it and however often, and a run read back from them.

Exactly once, by Delta's application transactions: a batch has a number, and each table's
commit of it records ``(pipeline.archive.<table>, number)`` in the same atomic commit as its
rows. Writing a batch again (an archiver killed after some of its commits, two archivers at
once) skips every table whose recorded number has reached the batch's, and of two writers
committing the same batch at once Delta lets one through (the other's commit fails as a
concurrent transaction, and finds the batch written): no row is written twice. Batches are
numbered in order by whoever hands them out; a number is never reused for other runs.

delta-rs runs its own tokio runtime, which does not survive a fork: a process that forks
workers (Celery's prefork pool) must not touch the archive before it forks.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, RunNotFound
from ..state import Version
from .rows import SCHEMAS, TABLES, RunRows, Snapshot

try:
    import pyarrow as pa
    from deltalake import CommitProperties, DeltaTable, QueryBuilder, Transaction, write_deltalake
    from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
except ImportError as e:
    raise ConfigurationError(
        f"the archive needs deltalake and pyarrow, which are not installed ({e}); "
        "pip install celery-agent-pipeline[archive], or unset PIPELINE_ARCHIVE_URI") from e

__all__ = ["APP_ID", "ArchivedRun", "archived_runs", "as_arrow", "compact", "literal", "query",
           "read_run", "table_uri", "vacuum", "write_batch", "write_tables", "written_batch"]

APP_ID = "pipeline.archive.{table}"
"""The application id of each table's batches in its Delta log."""


def table_uri(root: str, table: str) -> str:
    """Where ``table`` lives under the archive's root (a local path or an object store URL)."""
    return f"{root.rstrip('/')}/{table}"


def written_batch(root: str, table: str) -> int:
    """The newest batch number ``table`` committed (0 before any)."""
    return _batch(root, table, create=False)[1]


def write_batch(root: str, number: int, runs: Sequence[RunRows]) -> list[str]:
    """Append the rows of ``runs`` as batch ``number`` to every table that has not committed
    it yet; the tables written. Each table's rows and its batch number go in one commit."""
    tables, unfit = as_arrow(runs)
    if unfit:
        raise unfit[0][1]
    return write_tables(root, number, tables, len(runs))


def write_tables(root: str, number: int, tables: dict[str, pa.Table], runs: int) -> list[str]:
    """``write_batch`` for rows made into Arrow already (``as_arrow``)."""
    written = []
    for table in TABLES:
        dt, done = _batch(root, table, create=True)
        if dt is None:  # _open makes it, or raises
            raise RuntimeError(f"the archive's {table} table under {root} could not be made")
        if done >= number:
            continue  # committed before: by an archiver that died after, or by another
        try:
            # On the snapshot just checked: a commit of this batch by another writer since
            # then is a conflict Delta refuses (checked again below), never a second copy.
            write_deltalake(
                dt, tables[table], mode="append", partition_by=["workflow", "day"],
                commit_properties=CommitProperties(
                    app_transactions=[Transaction(APP_ID.format(table=table), number)],
                    custom_metadata={"runs": str(runs)}),
            )
        except (CommitFailedError, DeltaError):
            if written_batch(root, table) >= number:
                continue  # another writer committed this batch first: its rows stand
            raise
        written.append(table)
    return written


def as_arrow(runs: Sequence[RunRows]
             ) -> tuple[dict[str, pa.Table], list[tuple[RunRows, Exception]]]:
    """The rows of ``runs`` as one Arrow table each, and the runs a row of which does not
    fit its table (a number past 64 bits, say) with why, left out: made at once, and run by
    run only when that fails, so that one run's rows never fail a whole batch."""
    try:
        return _arrow(runs), []
    except Exception:  # noqa: BLE001 - found below, run by run
        pass
    unfit = []
    for run in runs:
        try:
            _arrow([run])
        except Exception as e:  # noqa: BLE001 - whatever Arrow refuses: this run's
            unfit.append((run, e))
    return _arrow([run for run in runs if all(run is not u for u, _ in unfit)]), unfit


def _arrow(runs: Sequence[RunRows]) -> dict[str, pa.Table]:
    return {table: pa.Table.from_pylist([row for run in runs for row in run.tables[table]],
                                        schema=SCHEMAS[table]) for table in TABLES}


_OPEN: dict[str, DeltaTable] = {}
"""The tables this process opened, by URI: brought up to date by reading only the commits
since (a few ms), not the whole log again (a table's load costs several times that)."""


@atexit.register
def _close() -> None:
    """Let go of the tables kept open while delta-rs and Arrow still run: their objects
    left to the interpreter's teardown have aborted processes ("terminate called without
    an active exception", exit 134) after a clean run."""
    _OPEN.clear()
    gc.collect()


def _batch(root: str, table: str, *, create: bool) -> tuple[DeltaTable | None, int]:
    """``table`` as of its newest commit (made first if ``create``; None if not and there is
    none), and the newest batch it committed. A table kept open whose log went (deleted, or
    made again) is loaded afresh: bringing it up to date does not notice, reading it does."""
    try:
        return _read_batch(root, table, create=create)
    except DeltaError:
        _OPEN.pop(table_uri(root, table), None)
        return _read_batch(root, table, create=create)


def _read_batch(root: str, table: str, *, create: bool) -> tuple[DeltaTable | None, int]:
    dt = _open(root, table) if create else _loaded(table_uri(root, table))
    return (None, 0) if dt is None \
        else (dt, int(dt.transaction_version(APP_ID.format(table=table)) or 0))


def _loaded(uri: str) -> DeltaTable | None:
    """The table at ``uri`` as of its newest commit; None when there is none."""
    dt = _OPEN.pop(uri, None)
    if dt is not None:
        try:
            dt.update_incremental()
            _OPEN[uri] = dt
            return dt
        except Exception:  # noqa: BLE001 - its log is gone or shorter (a table made again):
            pass           # loaded afresh below
    try:
        dt = _OPEN[uri] = DeltaTable(uri)
    except TableNotFoundError:
        return None
    return dt


def _open(root: str, table: str) -> DeltaTable:
    """``table``, created empty first if need be. Never created by a batch's own commit:
    Delta checks two creating commits for conflicts less than two appends, and both
    writers' rows could land (seen with delta-rs 1.6)."""
    uri = table_uri(root, table)
    dt = _loaded(uri)
    if dt is not None:
        return dt
    with contextlib.suppress(CommitFailedError):  # another writer created it first
        DeltaTable.create(uri, SCHEMAS[table], mode="ignore", partition_by=["workflow", "day"])
    return _loaded(uri) or DeltaTable(uri)


@dataclass
class ArchivedRun:
    """A run read back from the archive: its versions (each digest checked), its record
    and the rest of its Redis keys, as Redis had them when its batch was written."""

    run_id: str
    batch: int
    versions: list[Version]
    entries: list[dict[str, str]]  # each version's stream fields
    record: list[tuple[str, str]]  # the record's fields, in Redis's order
    keys: Snapshot



def read_run(root: str, run_id: str) -> ArchivedRun:
    """Run ``run_id`` from the archive; ``RunNotFound`` when it holds no such run,
    ``IntegrityError`` when a version's payload does not match its digest."""
    runs = _rows(root, "runs", run_id)
    if not runs:
        raise RunNotFound(f"no run {run_id!r} in Redis or in the archive at {root}")
    run = max(runs, key=lambda row: row["batch"])
    entries = [{  # the stream entry's fields, in the order the seal writes them
        "version": str(v["version"]), "parents": v["parents"], "agent": v["agent"],
        "contract": v["contract"], "payload": v["payload"], "digest": v["digest"],
        "created_at": str(v["created_at"]), "step": v["step"],
        "degraded": "1" if v["degraded"] else "0"}
        for v in {v["version"]: v for v in _rows(root, "versions", run_id)}.values()]
    entries.sort(key=lambda e: int(e["version"]))
    versions = [Version.from_entry(run_id, entry) for entry in entries]
    return ArchivedRun(run_id, int(run["batch"]), versions, entries,
                       [(k, v) for k, v in json.loads(run["record"])],
                       json.loads(run["keys"]))


def archived_runs(root: str, *, status: str | None = None, workflow: str | None = None,
                  limit: int = 20) -> list[dict[str, Any]]:
    """The newest runs in the archive (their ``runs`` rows, without record and keys)."""
    wanted = [f"{name} = {literal(value)}" for name, value in
              (("status", status), ("workflow", workflow)) if value is not None]
    columns = ", ".join(f.name for f in SCHEMAS["runs"] if f.name not in ("record", "keys"))
    found = query(root, f"SELECT {columns} FROM runs"
                        f"{' WHERE ' + ' AND '.join(wanted) if wanted else ''}"
                        f" ORDER BY created_at DESC LIMIT {int(limit)}", "runs")
    return [] if found is None else found.to_pylist()


def query(root: str, sql: str, *tables: str) -> pa.Table | None:
    """``sql`` (DataFusion's SQL) over the archive's ``tables`` under ``root``, read by
    delta-rs itself; None when one of the tables does not exist yet.

    Not through a pyarrow dataset: its readers call back into Python, and one left at
    the interpreter's teardown aborts the process (exit 134) after a clean run."""
    builder = QueryBuilder()
    for table in tables:
        dt = _loaded(table_uri(root, table))
        if dt is None:
            return None
        builder = builder.register(table, dt)
    return pa.table(builder.execute(sql).read_all())


def literal(value: str) -> str:
    """``value`` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def compact(root: str) -> dict[str, Any]:
    """Compact each table's small files (Delta's optimize); what each did."""
    return {table: dt.optimize.compact() for table, dt in _tables(root)}


def vacuum(root: str, retention_hours: int) -> dict[str, int]:
    """Delete the files no table version newer than ``retention_hours`` reads; how many.
    Delta's own floor (a week) is not enforced: the hours are the caller's to choose."""
    return {table: len(dt.vacuum(retention_hours, dry_run=False,
                                 enforce_retention_duration=False))
            for table, dt in _tables(root)}


def _tables(root: str) -> list[tuple[str, DeltaTable]]:
    return [(table, dt) for table in TABLES
            if (dt := _loaded(table_uri(root, table))) is not None]


def _rows(root: str, table: str, run_id: str) -> list[dict[str, Any]]:
    found = query(root, f"SELECT * FROM {table} WHERE run_id = {literal(run_id)}", table)
    return [] if found is None else found.to_pylist()
