"""The ``pipeline`` commands that explain runs: trace, inspect, graph, runs, events, explain."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..errors import InputError
from ..observe import compensations, report, waiting_on
from ..observe import runs as recent_runs
from ..observe.ledger import events as read_events
from ..observe.ledger import explain as explain_agent
from ..observe.lineage import lineage_dot, lineage_tree, named, reached, render_svg
from ..state import RunStatus
from . import group
from .archive import echo_archived
from .group import fleet_agents, json_option, main
from .output import (
    calls_table,
    echo_json,
    format_events,
    run_header,
    table,
    timestamp,
    tokens_line,
)


@main.command()
@click.argument("run_id")
@json_option
def trace(run_id: str, as_json: bool) -> None:
    """Every call of a run, one row per attempt, with its tokens; then the run's log."""
    r = report(group.client(runs=[run_id]).store, run_id)
    if as_json:
        echo_json({"run_id": run_id, "workflow": r.info.workflow,
                   "status": r.info.status.value, "calls": [c.to_dict() for c in r.calls],
                   "tokens": r.tokens(), "throttled_ms": r.info.throttled_ms,
                   "budget": r.info.spending.to_dict() if r.info.spending else None,
                   "log": r.log})
        return
    click.echo(f"run {run_id} of {r.info.workflow}: {r.info.status.value}")
    click.echo(calls_table(r.calls, r.start))
    click.echo(tokens_line(r.by_agent, r.total))
    if r.info.spending is not None:
        click.echo(f"budget: {r.info.spending.describe()}")
    click.echo("\nlog:")
    for e in r.log:
        rest = {k: v for k, v in e.items() if k not in ("id", "at", "event")}
        detail = " ".join(f"{k}={v}" for k, v in rest.items())
        click.echo(f"+{int(e['at']) - r.start:>6} ms  {e['event']:<16} {detail}")


@main.command()
@click.argument("run_id")
@json_option
def inspect(run_id: str, as_json: bool) -> None:
    """One page on a run: header, lineage tree, calls, compensations."""
    p = group.client(runs=[run_id])
    r = report(p.store, run_id)
    info = r.info
    history = p.store.history(run_id)
    undone = compensations(r.log)
    waiting = waiting_on(info, r.log)
    if as_json:
        echo_json({
            "run": {**info.to_dict(), "tokens": r.total.to_dict(), "waiting": waiting},
            "versions": [v.to_dict() for v in history],
            "calls": [c.to_dict() for c in r.calls],
            "tokens_by_agent": r.tokens()["by_agent"],
            "compensations": undone,
        })
        return
    for line in run_header(info, r.total):
        click.echo(line)
    if waiting:
        click.echo(f"waiting: {waiting}")
    click.echo("\nlineage (newest first; each version above what it was made from):")
    for line in lineage_tree(history, info.output_version):
        click.echo(f"  {line}")
    others = [v for v in history if v.version not in reached(history, info.output_version)]
    if info.output_version is not None and others:
        click.echo("  not in the output's lineage: " + ", ".join(
            named(v) for v in others))
    click.echo("\ncalls:")
    click.echo(calls_table(r.calls, r.start))
    click.echo(tokens_line(r.by_agent, r.total))
    if undone:
        click.echo("\ncompensation:")
        for e in undone:
            what = e.get("step") or e.get("reason", "")
            click.echo(f"  +{int(e['at']) - r.start:>6} ms  {e['event']:<24} {what}"[:120])


GRAPH_SUFFIXES = {".dot": "dot", ".gv": "dot", ".svg": "svg"}
"""The file names whose format ``graph`` knows: the written format always matches them."""


@main.command()
@click.argument("run_id")
@click.option("--output", "-o", "target", default=None,
              help="Write here (.dot or .gv: DOT; .svg: SVG, which needs Graphviz's `dot`); "
                   "default stdout.")
@click.option("--format", "fmt", type=click.Choice(["dot", "svg"]), default=None,
              help="Default: from the file name, else dot. A file named .dot, .gv or .svg "
                   "is never written in the other format.")
def graph(run_id: str, target: str | None, fmt: str | None) -> None:
    """Write a run's lineage as Graphviz DOT, or SVG when `dot` is installed.

    The format follows the file name: `-o run.svg` renders SVG with Graphviz (exit 2,
    and nothing written, without it: write `-o run.dot` and render it elsewhere),
    `-o run.dot` writes DOT. A --format that contradicts the file name is refused.
    """
    fmt = _graph_format(target, fmt)
    p = group.client(runs=[run_id])
    dot = lineage_dot(p.store.run_info(run_id), p.store.history(run_id))
    data: bytes = dot.encode()
    if fmt == "svg":
        svg = render_svg(dot)
        if svg is None:
            instead = (f"-o {Path(target).with_suffix('.dot')}" if target
                       else "--format dot")
            raise InputError("SVG needs Graphviz's `dot` on PATH (apt install graphviz), "
                             f"and it is not there; write DOT instead ({instead}) and render "
                             "it where Graphviz is installed (dot -Tsvg)")
        data = svg
    if target is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        Path(target).write_bytes(data)
    except OSError as e:
        raise InputError(f"cannot write {target}: {e.strerror or e}") from None
    click.echo(f"wrote {target} ({len(data):,} bytes, {fmt})", err=True)


def _graph_format(target: str | None, fmt: str | None) -> str:
    """The format to write: ``fmt``, else the file name's, else dot. ``InputError`` when
    ``fmt`` contradicts the file name (DOT text in ``run.svg``, SVG in ``run.dot``)."""
    by_name = GRAPH_SUFFIXES.get(Path(target).suffix.lower()) if target else None
    if fmt and by_name and fmt != by_name:
        right = Path(target or "").with_suffix(".dot" if fmt == "dot" else ".svg")
        raise InputError(f"--format {fmt} would write {fmt.upper()} into {target}, a file "
                         f"named for {by_name.upper()}; name the file {right}, or drop --format")
    return fmt or by_name or "dot"


@main.command()
@click.option("--status", default=None, help="Only runs with this status.")
@click.option("--workflow", default=None, help="Only runs of this workflow.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--archived", is_flag=True,
              help="From the archive's runs table (PIPELINE_ARCHIVE_URI), not from Redis.")
@json_option
def runs(status: str | None, workflow: str | None, limit: int, archived: bool,
         as_json: bool) -> None:
    """List recent runs, newest first, from the index kept in Redis (or the archive)."""
    if status is not None and status not in {s.value for s in RunStatus}:
        raise InputError(f"--status {status!r} is not a run status (one of "
                         f"{', '.join(s.value for s in RunStatus)})")
    if archived:
        echo_archived(status, workflow, limit, as_json)
        return
    rows = recent_runs(group.client().store, status=status, workflow=workflow, limit=limit)
    if as_json:
        echo_json([r.to_dict() for r in rows])
        return
    out = [("run", "workflow", "status", "created", "ms", "versions", "spent", "error")]
    for r in rows:
        took = "" if r.finished_at is None else f"{(r.finished_at - r.created_at) * 1000:.0f}"
        out.append((r.run_id, r.workflow, r.status + (" (degraded)" if r.degraded else ""),
                    timestamp(r.created_at), took, str(r.head + 1), spent(r.budget),
                    r.error[:60]))
    click.echo(table(out))


def spent(budget: dict[str, Any] | None) -> str:
    """A run's spending against its budget, in a column: ``600/700 tok``, ``0.005/0.012``."""
    if not budget:
        return ""
    parts = ([f"{budget['spent_tokens']:,}/{budget['tokens']:,} tok"]
             if budget["tokens"] is not None else []) \
        + ([f"{budget['spent_cost']:.4g}/{budget['cost']:g}"] if budget["cost"] is not None
           else [])
    return " ".join(parts)


@main.command()
@click.argument("run_id")
@json_option
def events(run_id: str, as_json: bool) -> None:
    """Show a choreographed run's events: cause, subscribers, and each delivery's state."""
    p = group.client(runs=[run_id])
    views = read_events(p.store, run_id)
    if as_json:
        echo_json([v.to_dict() for v in views])
        return
    info = p.store.run_info(run_id)
    click.echo(f"run {run_id} of {info.workflow}: {info.status.value}")
    if not views:
        click.echo("no events: this run is not a choreography")
        return
    click.echo(format_events(views))
    for v in views:
        if v.unrouted:
            click.echo(f"warning: {v.event_id} {v.type} from {v.publisher} is unrouted: no "
                       "agent subscribes to it", err=True)


@main.command()
@click.argument("run_id")
@click.argument("agent")
@json_option
def explain(run_id: str, agent: str, as_json: bool) -> None:
    """Why AGENT did or did not react in RUN: its subscriptions, the events, each delivery."""
    p = group.client(runs=[run_id])
    why = explain_agent(p.store, run_id, agent, fleet_agents(p).get(agent))
    if as_json:
        echo_json(why.to_dict())
        return
    click.echo(f"agent {why.agent}: on {', '.join(why.on) or '(nothing)'}; emits "
               f"{why.emits or '(nothing)'}; input {why.input_contract or '?'}")
    for row in why.events:
        click.echo(f"  {row['event_id']:<4} {row['type']:<24} {row['why']}")
    click.echo(why.summary)
