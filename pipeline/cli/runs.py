"""The ``pipeline`` commands that start, continue and stop runs: run (one payload, or a
batch), status, history, replay, resume, cancel, compensate, redeliver."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import click

from ..client import check_idempotency_key
from ..errors import InputError, PipelineError, WaitTimeout
from ..state import Budget
from ..state.version import sealable
from . import group
from .group import (
    EXIT_RUN_FAILED,
    current_user,
    json_option,
    main,
    read_json_input,
    report_run,
    wait_all,
    wait_options,
)
from .output import echo_json, echo_result, format_history, table, timestamp


@main.command()
@click.argument("workflow")
@click.option("--input", "source", required=True, help="JSON payload file, or - for stdin.")
@wait_options("the run")
@click.option("--idempotency-key", default=None, help="Same key, same run.")
@click.option("--batch", is_flag=True,
              help="The input is a JSON list: start one run per payload, wait for all with a "
                   "progress bar, and print a summary.")
@click.option("--budget-tokens", type=click.IntRange(0), default=None,
              help="At most this many tokens for each run (instead of the workflow's budget).")
@click.option("--budget-cost", type=click.FloatRange(0), default=None,
              help="At most this cost for each run, at its limits' prices.")
@json_option
def run(
    workflow: str, source: str, wait: bool, timeout: float, idempotency_key: str | None,
    batch: bool, budget_tokens: int | None, budget_cost: float | None, as_json: bool,
) -> None:
    """Start WORKFLOW on a JSON payload (or, with --batch, on each of a list)."""
    payload = read_json_input(source)
    p = group.client(agents_required=True)
    budget = None if budget_tokens is None and budget_cost is None \
        else Budget(tokens=budget_tokens, cost=budget_cost)
    if batch:
        _run_batch(p, workflow, payload, idempotency_key, timeout, as_json, budget)
        return
    handle = p.start(workflow, payload, idempotency_key=idempotency_key, budget=budget)
    try:
        result = handle.wait(timeout) if wait else handle.result()
    except WaitTimeout as e:  # not bad input: report where the run is, and exit 1
        result = replace(handle.result(), error=str(e))
    echo_result(workflow, result, as_json)
    if wait and result.status.value != "succeeded":
        sys.exit(EXIT_RUN_FAILED)


def _run_batch(p: Any, workflow: str, payloads: Any, key: str | None, timeout: float,
               as_json: bool, budget: Budget | None) -> None:
    if not isinstance(payloads, list) or not payloads:
        raise InputError("--batch needs a non-empty JSON list of payloads")
    wf = p.workflow(workflow)
    if key:
        check_idempotency_key(f"{key}:{len(payloads) - 1}")  # the longest of the batch's keys
    for i, payload in enumerate(payloads):  # every payload checked before any run starts
        try:
            sealable(payload, p.store.max_payload_bytes, f"input of workflow {wf.name}")
            wf.input_contract.validate(payload, side="input", agent=wf.entry_agent)
        except PipelineError as e:
            raise InputError(f"payload {i} of the batch: {e}") from None
    handles = [p.start(wf, payload, idempotency_key=f"{key}:{i}" if key else None,
                       budget=budget) for i, payload in enumerate(payloads)]
    results = wait_all(handles, timeout, f"{len(handles)} runs of {workflow}")
    if as_json:
        echo_json([{"workflow": workflow, **r.to_dict()} for r in results])
    else:
        click.echo(summarize(handles, results))
    if any(r.status.value != "succeeded" for r in results):
        sys.exit(EXIT_RUN_FAILED)


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
    info = group.client(runs=[run_id]).store.run_info(run_id)
    if as_json:
        echo_json(info.to_dict())
        return
    click.echo(f"run       {info.run_id}")
    click.echo(f"workflow  {info.workflow}")
    click.echo(f"status    {info.status.value}")
    click.echo(f"head      version {info.head}")
    click.echo(f"created   {timestamp(info.created_at)}")
    if info.finished_at:
        click.echo(f"finished  {timestamp(info.finished_at)} "
                   f"({(info.finished_at - info.created_at) * 1000:.0f} ms)")
    if info.error:
        click.echo(f"error     {info.failed_agent}: {info.error}")


@main.command()
@click.argument("run_id")
@json_option
def history(run_id: str, as_json: bool) -> None:
    """List every sealed version of a run, digests checked."""
    versions = group.client(runs=[run_id]).store.history(run_id)
    if as_json:
        echo_json([v.to_dict() for v in versions])
        return
    click.echo(format_history(versions))


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
    handle = group.client(agents_required=True, runs=[run_id]).replay(
        run_id, version, edit=edit, author=author if author is not None else current_user())
    if not as_json:
        click.echo(f"run {handle.run_id} replays {run_id} from version {version}")
    report_run(handle, wait, timeout, as_json, ok=("succeeded",))


@main.command()
@click.argument("run_id")
@click.argument("event_id")
def redeliver(run_id: str, event_id: str) -> None:
    """Send EVENT_ID of RUN to its subscribers again; a handled delivery records a duplicate."""
    subs = group.client().redeliver(run_id, event_id)
    click.echo(f"{event_id} sent again to {', '.join(subs) or 'nobody (it had no subscriber)'}")


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
    report_run(group.client(agents_required=True).resume(run_id, output, step=step), wait,
               timeout, as_json, ok=("succeeded",))


@main.command()
@click.argument("run_id")
@wait_options("the compensation")
@json_option
def cancel(run_id: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Stop RUN and compensate every step it sealed, newest first."""
    report_run(group.client().cancel(run_id), wait, timeout, as_json, ok=("cancelled",))


@main.command()
@click.argument("run_id")
@wait_options("the compensation")
@json_option
def compensate(run_id: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Re-drive a compensation_failed RUN: compensate only what it still owes (it ends
    compensated, or cancelled if it was cancelled)."""
    report_run(group.client().compensate(run_id), wait, timeout, as_json,
               ok=("compensated", "cancelled"))
