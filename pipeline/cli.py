"""The ``pipeline`` command. Every read command takes ``--json``.

Exit codes: 0 done, 1 the run itself failed, 2 bad input or an error of the
pipeline's (unknown workflow or run, contract violation, Redis unreachable).
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click

from .errors import InputError, PipelineError, WaitTimeout

F = TypeVar("F", bound=Callable[..., Any])

EXIT_RUN_FAILED = 1
EXIT_USAGE = 2


class PipelineGroup(click.Group):
    """Turns every ``PipelineError`` into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(EXIT_USAGE)


@click.group(cls=PipelineGroup)
def main() -> None:
    """Run and inspect multi-agent workflows on Celery."""
    # Agent modules are found from the working directory, as `celery -A` does.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def wait_options(what: str) -> Callable[[F], F]:
    """``--wait/--no-wait`` (for ``what`` to end) and ``--timeout`` seconds."""
    def decorate(f: F) -> F:
        f = click.option("--timeout", type=float, default=60.0, show_default=True,
                         help="Seconds to wait.")(f)
        return click.option("--wait/--no-wait", default=False,
                            help=f"Wait for {what} to end.")(f)
    return decorate


def _pipeline(agents_required: bool = False) -> Any:
    """The client. Commands that start or continue runs need the agent modules
    (``agents_required``); the others read, cancel and compensate without them."""
    from .client import Pipeline

    return Pipeline.from_env(agents_required=agents_required)


def _user() -> str:
    """Who runs this command, as the operating system knows them ('' if it does not)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def read_json_input(source: str) -> Any:
    """Parse JSON from a file path or ``-`` (stdin); ``InputError`` says where it broke."""
    name = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read input {name}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"input {name} is not UTF-8 text: {e}") from None
    except ValueError as e:  # a path holding a NUL byte
        raise InputError(f"cannot read input {name!r}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"input {name} is not JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except ValueError as e:  # an integer too long to convert, for one
        raise InputError(f"input {name} is not usable JSON: {e}") from None
    except RecursionError:
        raise InputError(f"input {name} is nested too deeply to be a payload") from None


@main.command()
@click.argument("workflow")
@click.option("--input", "source", required=True, help="JSON payload file, or - for stdin.")
@wait_options("the run")
@click.option("--idempotency-key", default=None, help="Same key, same run.")
@click.option("--batch", is_flag=True,
              help="The input is a JSON list: start one run per payload, wait for all with a "
                   "progress bar, and print a summary.")
@json_option
def run(
    workflow: str, source: str, wait: bool, timeout: float, idempotency_key: str | None,
    batch: bool, as_json: bool,
) -> None:
    """Start WORKFLOW on a JSON payload (or, with --batch, on each of a list)."""
    payload = read_json_input(source)
    p = _pipeline(agents_required=True)
    if batch:
        _run_batch(p, workflow, payload, idempotency_key, timeout, as_json)
        return
    handle = p.start(workflow, payload, idempotency_key=idempotency_key)
    try:
        result = handle.wait(timeout) if wait else handle.result()
    except WaitTimeout as e:  # not bad input: report where the run is, and exit 1
        result = replace(handle.result(), error=str(e))
    echo_result(workflow, result, as_json)
    if wait and result.status.value != "succeeded":
        sys.exit(EXIT_RUN_FAILED)


def echo_result(workflow: str, result: Any, as_json: bool) -> None:
    """Print a run's result as ``run`` does: run id, workflow, status, version, error and
    output; with ``as_json``, ``{"workflow", **result.to_dict()}``."""
    if as_json:
        _echo_json({"workflow": workflow, **result.to_dict()})
        return
    click.echo(f"run {result.run_id} of {workflow}: {result.status.value} "
               f"(version {result.version})")
    if result.error:
        click.echo(f"error: {result.error}")
    if result.output is not None:
        click.echo(json.dumps(result.output, indent=2, ensure_ascii=False))


def _run_batch(p: Any, workflow: str, payloads: Any, key: str | None, timeout: float,
               as_json: bool) -> None:
    if not isinstance(payloads, list) or not payloads:
        raise InputError("--batch needs a non-empty JSON list of payloads")
    from .client import check_idempotency_key
    from .state.version import sealable

    wf = p.workflow(workflow)
    if key:
        check_idempotency_key(f"{key}:{len(payloads) - 1}")  # the longest of the batch's keys
    for i, payload in enumerate(payloads):  # every payload checked before any run starts
        try:
            sealable(payload, p.store.max_payload_bytes, f"input of workflow {wf.name}")
            wf.input_contract.validate(payload, side="input", agent=wf.entry_agent)
        except PipelineError as e:
            raise InputError(f"payload {i} of the batch: {e}") from None
    handles = [p.start(wf, payload, idempotency_key=f"{key}:{i}" if key else None)
               for i, payload in enumerate(payloads)]
    results = wait_all(handles, timeout, f"{len(handles)} runs of {workflow}")
    if as_json:
        _echo_json([{"workflow": workflow, **r.to_dict()} for r in results])
    else:
        click.echo(summarize(handles, results))
    if any(r.status.value != "succeeded" for r in results):
        sys.exit(EXIT_RUN_FAILED)


def wait_all(handles: Sequence[Any], timeout: float, label: str) -> list[Any]:
    """Wait for every run, with a progress bar on a terminal; a run still going after
    ``timeout`` seconds in all is reported as it stands."""
    deadline = time.monotonic() + timeout
    results = []
    with click.progressbar(length=len(handles), label=label, file=sys.stderr) as bar:
        for handle in handles:
            try:
                results.append(handle.wait(max(0.001, deadline - time.monotonic())))
            except WaitTimeout as e:
                results.append(replace(handle.result(), error=str(e)))
            bar.update(1)
    return results


def summarize(handles: Sequence[Any], results: Sequence[Any]) -> str:
    """How a batch went: counts by status, latency percentiles, and the runs that failed."""
    counts: dict[str, int] = {}
    took = []
    for handle, result in zip(handles, results, strict=True):
        counts[result.status.value] = counts.get(result.status.value, 0) + 1
        info = handle.info()
        if info.finished_at:
            took.append((info.finished_at - info.created_at) * 1000)
    took.sort()
    rows = [("status", "runs")] + [(k, str(v)) for k, v in sorted(counts.items())]
    lines = [table(rows)]
    if took:
        p50, p95 = took[len(took) // 2], took[min(len(took) - 1, int(len(took) * 0.95))]
        lines.append(f"latency: median {p50:.0f} ms, p95 {p95:.0f} ms, max {took[-1]:.0f} ms "
                     f"({len(took)} finished)")
    failed = [(h, r) for h, r in zip(handles, results, strict=True)
              if r.status.value != "succeeded"]
    for h, r in failed[:10]:
        lines.append(f"  {h.run_id}: {r.status.value}: {(r.error or '')[:100]}")
    if len(failed) > 10:
        lines.append(f"  ... and {len(failed) - 10} more (pipeline runs --status ...)")
    return "\n".join(lines)


@main.command()
@click.argument("run_id")
@json_option
def status(run_id: str, as_json: bool) -> None:
    """Show a run's status and head version."""
    info = _pipeline().store.run_info(run_id)
    if as_json:
        _echo_json(info.to_dict())
        return
    click.echo(f"run       {info.run_id}")
    click.echo(f"workflow  {info.workflow}")
    click.echo(f"status    {info.status.value}")
    click.echo(f"head      version {info.head}")
    click.echo(f"created   {_time(info.created_at)}")
    if info.finished_at:
        click.echo(f"finished  {_time(info.finished_at)} "
                   f"({(info.finished_at - info.created_at) * 1000:.0f} ms)")
    if info.error:
        click.echo(f"error     {info.failed_agent}: {info.error}")


@main.command()
@click.argument("run_id")
@json_option
def history(run_id: str, as_json: bool) -> None:
    """List every sealed version of a run, digests checked."""
    versions = _pipeline().store.history(run_id)
    if as_json:
        _echo_json([v.to_dict() for v in versions])
        return
    click.echo(format_history(versions))


def format_history(versions: Sequence[Any]) -> str:
    from .lineage import NO_AGENT

    rows = [("version", "parents", "agent", "contract", "digest", "sealed at")]
    for v in versions:
        rows.append((
            str(v.version),
            ",".join(map(str, v.parents)) or "-",
            v.agent or NO_AGENT,
            v.contract,
            v.digest[:12] + (" degraded" if v.degraded else ""),
            _time(v.created_at),
        ))
    return table(rows)


@main.command()
@click.argument("run_id")
@click.option("--from-version", "version", type=click.IntRange(0), required=True,
              help="The sealed version the new run starts from (its version 0).")
@click.option("--edit", "source", default=None,
              help="JSON file (or - for stdin): a person's edit of version N, checked against "
                   "its contract and sealed as the new run's version 1.")
@click.option("--author", default=None,
              help="Who made the edit (default: the user running the command).")
@wait_options("the new run")
@json_option
def replay(run_id: str, version: int, source: str | None, author: str | None, wait: bool,
           timeout: float, as_json: bool) -> None:
    """Start a new run from sealed version N of RUN: a fork that runs only what came after
    (with --edit, from a person's correction of version N)."""
    edit = None if source is None else read_json_input(source)
    if source is not None and edit is None:
        raise InputError(f"--edit {source}: the edit is JSON null; give the corrected payload")
    handle = _pipeline(agents_required=True).replay(
        run_id, version, edit=edit, author=author if author is not None else _user())
    if not as_json:
        click.echo(f"run {handle.run_id} replays {run_id} from version {version}")
    _report(handle, wait, timeout, as_json, ok=("succeeded",))


@main.command()
@click.argument("run_id")
@click.argument("event_id")
def redeliver(run_id: str, event_id: str) -> None:
    """Send EVENT_ID of RUN to its subscribers again; a handled delivery records a duplicate."""
    subs = _pipeline().redeliver(run_id, event_id)
    click.echo(f"{event_id} sent again to {', '.join(subs) or 'nobody (it had no subscriber)'}")


@main.group(invoke_without_command=True)
@json_option
@click.pass_context
def breakers(ctx: click.Context, as_json: bool) -> None:
    """List every agent's circuit breaker; `reset` or `open` one by hand."""
    if ctx.invoked_subcommand is not None:
        return
    p = _pipeline()
    snapshots = p.breakers.snapshots((c.name, c.policy) for c in _known_agents(p).values())
    if as_json:
        _echo_json([s.to_dict() for s in snapshots])
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


def _known_agents(p: Any) -> dict[str, Any]:
    """Every agent this process imports or a worker of the fleet published (its card)."""
    from .agent import agents
    from .catalog import known_agents

    return known_agents(p.store.redis, agents)


def _breaker_agent(p: Any, name: str) -> str:
    """``name``, if this process or the fleet knows such an agent (else ``UnknownAgent``)."""
    from .errors import UnknownAgent

    known = _known_agents(p)
    if name not in known:
        raise UnknownAgent(f"unknown agent {name!r} (known here and to the fleet's workers: "
                           f"{', '.join(known) or 'none'})")
    return name


@breakers.command("reset")
@click.argument("agent")
def breakers_reset(agent: str) -> None:
    """Close AGENT's breaker and clear its counters."""
    p = _pipeline()
    p.breakers.reset(_breaker_agent(p, agent))
    click.echo(f"breaker of {agent}: closed")


@breakers.command("open")
@click.argument("agent")
def breakers_open(agent: str) -> None:
    """Force AGENT's breaker open until it is reset."""
    p = _pipeline()
    p.breakers.force_open(_breaker_agent(p, agent))
    click.echo(f"breaker of {agent}: open until `pipeline breakers reset {agent}`")


@main.command()
@click.argument("run_id")
@click.option("--output", "source", default=None,
              help="JSON output to seal for the parked step (file, or - for stdin).")
@click.option("--step", default=None, help="The parked step --output is for (when several).")
@wait_options("the run")
@json_option
def resume(run_id: str, source: str | None, step: str | None, wait: bool, timeout: float,
           as_json: bool) -> None:
    """Continue RUN, parked for a person: run the parked step again, or seal --output."""
    output = read_json_input(source) if source is not None else None
    _report(_pipeline(agents_required=True).resume(run_id, output, step=step), wait, timeout,
            as_json,
            ok=("succeeded",))


@main.command()
@click.argument("run_id")
@wait_options("the compensation")
@json_option
def cancel(run_id: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Stop RUN and compensate every step it sealed, newest first."""
    _report(_pipeline().cancel(run_id), wait, timeout, as_json, ok=("cancelled",))


@main.command()
@click.argument("run_id")
@wait_options("the compensation")
@json_option
def compensate(run_id: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Re-drive a compensation_failed RUN: compensate only what it still owes (it ends
    compensated, or cancelled if it was cancelled)."""
    _report(_pipeline().compensate(run_id), wait, timeout, as_json,
            ok=("compensated", "cancelled"))


@main.command()
@click.option("--every", "every_s", type=click.FloatRange(min=0.1), default=None,
              help="Sweep again every so many seconds, until interrupted (no beat needed).")
@json_option
def sweep(every_s: float | None, as_json: bool) -> None:
    """Hand out again the steps of dead workers, enqueue forgotten runs, nudge stuck sagas.

    What `celery -A config beat` runs every PIPELINE_SWEEP_INTERVAL_S seconds. A step
    is handed out again once no heartbeat came for PIPELINE_LEASE_S seconds.
    """
    from .sweeper import sweep as sweep_once

    p = _pipeline()
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
            _echo_json(report.to_dict())
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
    from .invariants import verify as check

    verdict = check(_pipeline().store, run_ids or None)
    if as_json:
        _echo_json(verdict.to_dict())
    else:
        statuses = ", ".join(f"{n} {s}" for s, n in sorted(verdict.by_status.items()))
        click.echo(f"{verdict.runs} run(s) ({statuses or 'none'}), {verdict.versions} "
                   f"version(s), {verdict.compensations} compensation(s): "
                   f"{len(verdict.violations)} violation(s)")
        for violation in verdict.violations:
            click.echo(f"  {violation}")
    if not verdict.ok:
        sys.exit(1)


def _report(handle: Any, wait: bool, timeout: float, as_json: bool, *,
            ok: Sequence[str]) -> None:
    """What ``replay``, ``resume``, ``cancel`` and ``compensate`` print: what ``run`` prints
    for the run they started or continued; exit 1 if, waited for, it did not end ``ok``."""
    try:
        result = handle.wait(timeout) if wait else handle.result()
    except WaitTimeout as e:
        result = replace(handle.result(), error=str(e))
    echo_result(handle.info().workflow, result, as_json)
    if wait and result.status.value not in ok:
        sys.exit(EXIT_RUN_FAILED)


@main.command()
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Where to listen (0.0.0.0 to let Prometheus in from other hosts).")
@click.option("--port", type=click.IntRange(1, 65535), default=9808, show_default=True)
def exporter(address: str, port: int) -> None:
    """Serve Prometheus metrics read from Redis (breakers, runs, latency, compensations)."""
    from .metrics import serve
    from .settings import Settings

    click.echo(f"serving metrics on http://{address}:{port}/metrics", err=True)
    serve(Settings.from_env(), address, port)


@main.command()
@json_option
def contracts(as_json: bool) -> None:
    """List the registered data contracts: each field's type, whether it is required or may
    be null (allow_none), its validators, and each schema's @validates_schema rules."""
    from .agent import import_agent_modules
    from .contracts import contracts as registry
    from .settings import Settings

    import_agent_modules(Settings.from_env().agent_modules)
    described = [c.describe() for c in registry]
    if as_json:
        _echo_json(described)
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
    from .agent import import_agent_modules
    from .flow import workflows as registry
    from .settings import Settings

    import_agent_modules(Settings.from_env().agent_modules)
    described = [w.describe() for w in registry]
    if as_json:
        _echo_json(described)
        return
    for w in described:
        click.echo(f"{w['workflow']}: {w['shape']}  ({w['input_contract']} -> "
                   f"{w['output_contract']})")


@main.command()
@click.option("--input", "source", default=None, help="JSON list of payloads (default: the "
              "deployment's sample batch).")
@click.option("--concurrency", default=2, show_default=True, help="Worker pool processes.")
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.option("--flower", is_flag=True, help="Also start Flower (basic auth) and print its URL "
              "and credentials.")
@click.option("--hold", "hold_s", type=float, default=None,
              help="With --flower: keep Flower up this many seconds at the end (default: "
                   "until Enter on a terminal).")
def demo(source: str | None, concurrency: int, timeout: float, flower: bool,
         hold_s: float | None) -> None:
    """Start Redis (if needed) and a worker pool, run a batch, show the results."""
    from .demo import run_demo

    run_demo(source=source, concurrency=concurrency, timeout_s=timeout, flower=flower,
             hold_s=hold_s)


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


# The commands of cli_observe (trace, inspect, graph, runs, events...) and cli_process
# (worker, flower) register themselves on `main`.
from . import cli_observe, cli_process  # noqa: E402,F401,I001

if __name__ == "__main__":
    # `python -m pipeline.cli`: this file runs as __main__, while cli_observe registers its
    # commands on the module `pipeline.cli`; run that module's group, which has them all.
    from pipeline.cli import main as pipeline_main

    pipeline_main()
