"""The ``pipeline`` commands that look after the fleet rather than one run: breakers (and
``reset``/``open``), limits, sweep, verify, exporter, contracts, workflows."""

from __future__ import annotations

import sys
import time
from typing import Any
from urllib.parse import urlsplit

import click

from ..agent import import_agent_modules
from ..client import Pipeline
from ..contracts import contracts as contract_registry
from ..errors import UnknownAgent
from ..flow import workflows as workflow_registry
from ..invariants import verify as check_invariants
from ..limits import limit_states
from ..observe.metrics import serve
from ..settings import Settings
from ..sweeper import sweep as sweep_once
from . import group
from .group import fleet_agents, json_option, main
from .output import echo_json, format_limits, table


@main.group(invoke_without_command=True)
@json_option
@click.pass_context
def breakers(ctx: click.Context, as_json: bool) -> None:
    """List every agent's circuit breaker; `reset` or `open` one by hand."""
    if ctx.invoked_subcommand is not None:
        return
    p = group.client()
    snapshots = p.breakers.snapshots((c.name, c.policy) for c in fleet_agents(p).values())
    if as_json:
        echo_json([s.to_dict() for s in snapshots])
        return
    rows = [("agent", "state", "in a row", "window", "ok", "failed", "refused",
             "half-open in", "last transition")]
    for snap in snapshots:
        d = snap.to_dict()
        last = d["last_transition"]
        rows.append((
            snap.agent,
            snap.state.value + (" (forced)" if snap.forced else ""),
            str(snap.consecutive_failures),
            f"{d['window']['failures']}/{d['window']['calls']} failed",
            str(snap.successes), str(snap.failures), str(snap.rejected),
            "-" if snap.half_open_in_s is None else f"{snap.half_open_in_s:.0f}s",
            f"{last['from']} -> {last['to']}: {last['reason']}" if last else "-",
        ))
    click.echo(table(rows))


@main.command("limits")
@json_option
def limits_command(as_json: bool) -> None:
    """List every limit the fleet drew on lately: its rates, the current minute's use,
    calls in flight, tokens reserved, debt, and how often and how long it held calls back."""
    p = group.client()
    states = limit_states(p.store.redis, url=p.store.url)
    if as_json:
        echo_json([s.to_dict() for s in states])
        return
    if not states:
        click.echo("no limit was drawn on in the last two minutes")
        return
    click.echo(format_limits(states))


def _breaker_agent(p: Pipeline, name: str) -> str:
    """``name``, if this process or the fleet knows such an agent (else ``UnknownAgent``)."""
    known = fleet_agents(p)
    if name not in known:
        raise UnknownAgent(f"unknown agent {name!r} (known here and to the fleet's workers: "
                           f"{', '.join(known) or 'none'})")
    return name


@breakers.command("reset")
@click.argument("agent")
def breakers_reset(agent: str) -> None:
    """Close AGENT's breaker and clear its counters."""
    p = group.client()
    p.breakers.reset(_breaker_agent(p, agent))
    click.echo(f"breaker of {agent}: closed")


@breakers.command("open")
@click.argument("agent")
def breakers_open(agent: str) -> None:
    """Force AGENT's breaker open until it is reset."""
    p = group.client()
    p.breakers.force_open(_breaker_agent(p, agent))
    click.echo(f"breaker of {agent}: open until `pipeline breakers reset {agent}`")


@main.command()
@click.option("--every", "every_s", type=click.FloatRange(min=0.1), default=None,
              help="Sweep again every so many seconds, until interrupted (no beat needed).")
@json_option
def sweep(every_s: float | None, as_json: bool) -> None:
    """Hand out again the steps of dead workers, enqueue forgotten runs, nudge stuck sagas.

    What `celery -A config beat` runs every PIPELINE_SWEEP_INTERVAL_S seconds. A step
    is handed out again once no heartbeat came for PIPELINE_LEASE_S seconds.
    """
    p = group.client()
    while True:
        try:
            report = sweep_once(p.app, p.store)
        except Exception as e:
            if every_s is None:
                raise
            # a sweeper process outlives a Redis or broker outage: it tries again
            message = str(e)
            for url in (p.settings.redis_url, p.settings.broker_url, p.settings.result_backend):
                if password := urlsplit(url).password:
                    message = message.replace(password, "***")
            click.echo(f"sweep failed: {type(e).__name__}: {message}", err=True)
            time.sleep(every_s)
            continue
        if as_json:
            echo_json(report.to_dict())
        else:
            click.echo(report.summary())
        if every_s is None:
            return
        time.sleep(every_s)


@main.command()
@click.argument("run_ids", nargs=-1)
@json_option
def verify(run_ids: tuple[str, ...], as_json: bool) -> None:
    """Check that runs hold the pipeline's invariants (default: every run in the index).

    Finished, versions contiguous with valid digests and parents, each sealed step of a
    failed run compensated exactly once and none of a succeeded run. Exits 1 on any
    violation. Run it when the fleet is quiet: a run still at work is not finished.
    """
    verdict = check_invariants(group.client(runs=run_ids).store, run_ids or None)
    if as_json:
        echo_json(verdict.to_dict())
    else:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(verdict.by_status.items()))
        click.echo(f"{verdict.runs} run(s) ({statuses or 'none'}), {verdict.versions} "
                   f"version(s), {verdict.compensations} compensation(s): "
                   f"{len(verdict.violations)} violation(s)")
        for violation in verdict.violations:
            click.echo(f"  {violation}")
    if not verdict.ok:
        sys.exit(1)


@main.command()
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Where to listen (0.0.0.0 to let Prometheus in from other hosts).")
@click.option("--port", type=click.IntRange(1, 65535), default=9808, show_default=True)
def exporter(address: str, port: int) -> None:
    """Serve Prometheus metrics read from Redis (breakers, runs, latency, compensations)."""
    # `serve` loads prometheus-client (the `metrics` extra) only now, and says how to
    # install it when it is missing.
    click.echo(f"serving metrics on http://{address}:{port}/metrics", err=True)
    serve(Settings.from_env(), address, port)


@main.command()
@json_option
def contracts(as_json: bool) -> None:
    """List the registered data contracts: each field's type, whether it is required or may
    be null (allow_none), its validators, and each schema's @validates_schema rules."""
    import_agent_modules(Settings.from_env().agent_modules)
    described = [c.describe() for c in contract_registry]
    if as_json:
        echo_json(described)
        return
    for i, c in enumerate(described):
        rules = c["schema_validators"]
        click.echo(("\n" if i else "") + c["contract"]
                   + (f"  (schema validators: {', '.join(rules)})" if rules else ""))
        rows = [("field", "type", "required", "allow_none", "validators"),
                *_field_rows(c["fields"], "")]
        click.echo(table(rows))


def _field_rows(fields: dict[str, Any], indent: str) -> list[tuple[str, ...]]:
    """One row per field, a nested schema's fields indented under it."""
    rows: list[tuple[str, ...]] = []
    for name, f in fields.items():
        rules = list(f["validators"])
        if f.get("schema_validators"):
            rules.append(f"schema: {', '.join(f['schema_validators'])}")
        rows.append((indent + name, f["type"], "yes" if f["required"] else "no",
                     "yes" if f["allow_none"] else "no", "; ".join(rules) or "-"))
        if "fields" in f:
            rows += _field_rows(f["fields"], indent + "  ")
    return rows


@main.command()
@json_option
def workflows(as_json: bool) -> None:
    """List the registered workflows."""
    import_agent_modules(Settings.from_env().agent_modules)
    described = [w.describe() for w in workflow_registry]
    if as_json:
        echo_json(described)
        return
    for w in described:
        click.echo(f"{w['workflow']}: {w['shape']}  ({w['input_contract']} -> "
                   f"{w['output_contract']})")
