"""``pipeline archive``: finished runs into the archive's Delta tables (what beat's sweep
does after each pass when ``PIPELINE_ARCHIVE_URI`` is set), its backlog, and the tables'
upkeep; ``pipeline runs --archived`` lists the archive's runs."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from typing import Any

import click

from ..archive.backlog import backlog
from ..client import Pipeline, Run
from ..errors import ConfigurationError, InputError
from ..keys import ARCHIVE
from ..settings import Settings, redact_url
from . import group
from .group import EXIT_USAGE, json_option, main
from .output import echo_json, table, timestamp

__all__ = ["archive", "echo_archived", "show_archive"]

UPKEEP_S = 3600.0
"""The longest an optimize or a vacuum holds the archivers' lock."""
LOCK_WAIT_S = 120.0
"""How long it waits for an archiver's pass to end."""


def archive_root(settings: Settings) -> str:
    if not settings.archive_uri:
        raise InputError("no archive: set PIPELINE_ARCHIVE_URI to the root of its Delta tables "
                         "(a directory, or an object store URL such as s3://bucket/archive)")
    return settings.archive_uri


@main.command()
@click.option("--once", is_flag=True, help="One pass, then exit (default: a pass every "
              "PIPELINE_SWEEP_INTERVAL_S seconds, until interrupted).")
@click.option("--after", "settle_s", type=click.FloatRange(min=0), default=10.0,
              show_default=True, help="Archive a run only once it ended so many seconds ago.")
@click.option("--status", "show_status", is_flag=True,
              help="Show the backlog and what the archiver did, and exit.")
@click.option("--optimize", is_flag=True, help="Compact the tables' small files, and exit.")
@click.option("--vacuum", "vacuum_hours", type=click.IntRange(min=0), default=None,
              help="Delete files no table version of the last HOURS reads (Delta's vacuum; "
                   "168 is Delta's default; a reader of an older version then fails), and "
                   "exit.")
@json_option
def archive(once: bool, settle_s: float, show_status: bool, optimize: bool,
            vacuum_hours: int | None, as_json: bool) -> None:
    """Archive finished runs into Delta tables, each exactly once; then they leave Redis
    after PIPELINE_ARCHIVED_RETENTION_S (1 hour) and are read back from the archive.

    A run is archived once it ended; a batch is written to every table before any of its
    runs is marked archived, and a batch written again writes nothing twice. While the
    tables cannot be written, nothing is expired: the runs waiting are kept in Redis.
    """
    p = group.client()
    root = archive_root(p.settings)
    if show_status:
        state = backlog(p.store)
        if as_json:
            echo_json({"uri": redact_url(root), **state})
        else:
            click.echo(f"archive   {redact_url(root)}")
            click.echo(f"backlog   {state['backlog']} run(s) not archived yet")
            click.echo(f"archived  {state.get('runs', 0)} run(s) in {state.get('batches', 0)} "
                       f"batch(es); {state.get('failures', 0)} failed write(s)")
            if "last_ok_at" in state:
                click.echo(f"last ok   {timestamp(int(state['last_ok_at']) / 1000)}")
            if state.get("last_error"):
                click.echo(f"last error {state['last_error']}")
        return
    from ..archive import table as tables  # the archive extra

    if optimize or vacuum_hours is not None:
        done: dict[str, Any] = {}
        # the archivers' lock, held throughout: no batch is being written meanwhile (a
        # vacuum would delete the files of a commit not made yet)
        with p.store.redis.lock(ARCHIVE.lock, timeout=UPKEEP_S, blocking_timeout=LOCK_WAIT_S):
            if optimize:
                done["optimize"] = tables.compact(root)
            if vacuum_hours is not None:
                done["vacuum"] = tables.vacuum(root, vacuum_hours)
        if as_json:
            echo_json(done)
        else:
            for table_name, metrics in done.get("optimize", {}).items():
                click.echo(f"optimize {table_name}: {metrics.get('numFilesRemoved', 0)} "
                           f"files compacted into {metrics.get('numFilesAdded', 0)}")
            for table_name, removed in done.get("vacuum", {}).items():
                click.echo(f"vacuum {table_name}: {removed} files deleted")
        return
    from ..archive.archiver import Archiver

    archiver = Archiver.from_settings(p.store, p.settings, settle_s=settle_s)
    while True:
        try:
            report = archiver.run_once()
        except Exception as e:
            if once:
                raise
            # an archiver process outlives a Redis outage: it tries again
            click.echo(f"archive pass failed: {type(e).__name__}: {e}", err=True)
            time.sleep(p.settings.sweep_interval_s)
            continue
        if as_json:
            echo_json(report.to_dict())
        else:
            click.echo(report.summary())
        if once:
            if report.error:
                sys.exit(EXIT_USAGE)
            return
        time.sleep(p.settings.sweep_interval_s)


def echo_archived(status: str | None, workflow: str | None, limit: int, as_json: bool) -> None:
    """``pipeline runs --archived``: the newest runs of the archive's runs table."""
    from ..archive.table import archived_runs  # the archive extra

    rows = archived_runs(archive_root(Settings.from_env()), status=status, workflow=workflow,
                         limit=limit)
    if as_json:
        echo_json(rows)
        return
    out = [("run", "workflow", "status", "created", "ms", "tokens", "batch", "error")]
    for r in rows:
        out.append((r["run_id"], r["workflow"],
                    r["status"] + (" (degraded)" if r["degraded"] else ""),
                    timestamp(r["created_at"] / 1000), f"{r['duration_ms']:.0f}",
                    str(r["tokens"]), str(r["batch"]), (r["error"] or "")[:60]))
    click.echo(table(out))


def show_archive(p: Pipeline, shown: Run) -> None:
    """The demo's archive: every finished run into the tables under the data directory
    (their time in Redis left as it was), run ``shown`` deleted from Redis and read back,
    and what the tables answer."""
    root = p.settings.archive_uri or os.path.join(p.settings.data_dir, "archive")
    try:
        from ..archive.archiver import Archiver
        from ..archive.query import approvals, p95_latency
    except ConfigurationError as e:
        click.echo(f"\narchive: skipped: {e}")
        return
    report = Archiver(p.store, root, batch=p.settings.archive_batch,
                      archived_retention_s=p.store.retention_s, settle_s=0, lag_s=0).run_once()
    click.echo(f"\narchive {redact_url(root)}: {report.summary()}")
    before = [v.to_dict() for v in shown.history()]
    p.store.delete_run(shown.run_id)  # as its retention would, once archived
    reader = Pipeline(settings=replace(p.settings, archive_uri=root), app=p.app, store=p.store)
    after = [v.to_dict() for v in reader.run(shown.run_id).history()]
    click.echo(f"run {shown.run_id} deleted from Redis, then read back from the archive: "
               f"{len(after)} versions, digests checked, "
               f"{'as Redis had them' if after == before else 'NOT as Redis had them'}")
    click.echo("approvals by risk rating (the versions table, with pyarrow):")
    click.echo(table([("risk", "decision", "runs"), *approvals(root)]))
    click.echo("the agents' p95 latency per day (the calls table):")
    click.echo(table([("day", "agent", "calls", "p95 ms"), *p95_latency(root)]))
