"""``pipeline demo``: everything a first look needs, started and stopped in one command.

Uses the Redis at PIPELINE_REDIS_URL (which must answer), else the one at the
default address if it answers, else an embedded one. Starts a real Celery
worker pool, runs the deployment's sample batch, prints the decisions and the
lineage of one run, and stops what it started. The deployment names what to
run with a ``DEMO`` mapping in one of its agent modules (``tasks.DEMO``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import click

from ..agent import agents, import_agent_modules
from ..client import Pipeline, Run
from ..embedded import EmbeddedRedis, answers, free_port
from ..errors import ConfigurationError, PipelineError, StoreUnavailable
from ..flow import Flow
from ..limits import limit_states
from ..local import FlowerProcess, WorkerProcess
from ..observe import report
from ..observe.ledger import events, explain
from ..observe.lineage import named
from ..settings import DEFAULT_REDIS_URL, Settings, redact_url
from ..state import Budget
from .archive import show_archive
from .group import read_json_input, wait_all
from .output import calls_table, format_events, format_history, format_limits, table

RESET_REASON = "reset by pipeline demo"


@contextmanager
def demo_redis(settings: Settings) -> Iterator[str]:
    """The Redis URL to use, starting an embedded server only when none answers."""
    configured = os.environ.get("PIPELINE_REDIS_URL")
    if configured:
        if not answers(configured, 2.0):
            raise StoreUnavailable(
                f"PIPELINE_REDIS_URL={redact_url(configured)} does not answer; start that Redis "
                "or unset PIPELINE_REDIS_URL to use an embedded one"
            )
        yield configured
    elif answers(DEFAULT_REDIS_URL):
        yield DEFAULT_REDIS_URL
    else:
        with EmbeddedRedis() as server:
            click.echo(f"no Redis at {DEFAULT_REDIS_URL}: started an embedded one at {server.url}")
            yield server.url


def demo_spec(settings: Settings) -> dict[str, Any]:
    import_agent_modules(settings.agent_modules)
    for name in settings.agent_modules:
        spec = getattr(importlib.import_module(name), "DEMO", None)
        if spec:
            return dict(spec)
    raise ConfigurationError(
        f"none of the agent modules ({', '.join(settings.agent_modules)}) defines DEMO"
    )


def run_demo(*, source: str | None, concurrency: int, timeout_s: float, flower: bool = False,
             hold_s: float | None = None) -> None:
    settings = Settings.from_env()
    spec = demo_spec(settings)
    batch = read_json_input(source or spec["input"])
    if not isinstance(batch, list) or not batch:
        raise ConfigurationError("the demo input must be a non-empty JSON list of payloads")
    with demo_redis(settings) as url:
        settings = replace(
            settings,
            redis_url=url,
            broker_url=os.environ.get("CELERY_BROKER_URL") or url,
            result_backend=os.environ.get("CELERY_RESULT_BACKEND") or url,
        )
        env = {
            "PIPELINE_REDIS_URL": settings.redis_url,
            "CELERY_BROKER_URL": settings.broker_url,
            "CELERY_RESULT_BACKEND": settings.result_backend,
        }
        p = Pipeline(settings=settings)
        workflow = p.workflow(spec["workflow"])
        _reset_breakers(p, workflow)
        with contextlib.ExitStack() as stack:
            if flower:
                stack.callback(_flower(env).stop)
            _demo_body(p, spec, workflow, batch, env, concurrency, timeout_s, url)
            if flower:
                _hold(hold_s)


def _flower(env: dict[str, str]) -> FlowerProcess:
    """Flower with basic auth: the credentials in FLOWER_BASIC_AUTH, else made up now."""
    given = os.environ.get("FLOWER_BASIC_AUTH")
    credentials = given or f"demo:{secrets.token_urlsafe(12)}"
    fl = FlowerProcess(env=env, credentials=credentials, port=free_port(), cwd=os.getcwd())
    fl.start()  # the caller's exit stack stops it
    user, password = credentials.split(",")[0].split(":", 1)
    shown = "from FLOWER_BASIC_AUTH" if given else password
    click.echo(f"flower: {fl.url} (user {user}, password {shown}); every agent task shows "
               "there as agent.<name>")
    return fl


def _hold(hold_s: float | None) -> None:
    """Keep Flower up for a look: until Enter on a terminal, else ``hold_s`` seconds."""
    if hold_s is None and sys.stdin.isatty():
        click.prompt("flower stays up: press Enter to stop it", default="",
                     show_default=False)
    elif hold_s:
        click.echo(f"flower stays up for {hold_s:g}s")
        time.sleep(hold_s)


def _demo_body(p: Pipeline, spec: dict[str, Any], workflow: Flow, batch: list[Any],
               env: dict[str, str], concurrency: int, timeout_s: float, url: str) -> None:
    click.echo(f"redis {redact_url(url)}; starting a worker pool of {concurrency} processes")
    with WorkerProcess(env=env, concurrency=concurrency, cwd=os.getcwd()):
        click.echo(f"\nworkflow {workflow.name}: {workflow.shape()}")
        runs, elapsed = _run_batch(p, workflow, batch, timeout_s)
        shown = runs[0]
        click.echo(_decisions(spec, runs))
        ok = sum(r.status().value == "succeeded" for r in runs)
        click.echo(f"{ok}/{len(runs)} runs succeeded in {elapsed:.2f}s "
                   f"({len(runs) / elapsed:.1f} runs/s)")
        _show_lineage(runs)
        _show_refusal(p, workflow, spec.get("rejected"))
        if spec.get("choreography"):
            _show_choreography(p, spec["choreography"], timeout_s)
        if spec.get("limits"):
            _show_limits(p, spec["limits"], timeout_s)
    if spec.get("chaos"):
        chaos = spec["chaos"]
        click.echo(f"\nthe same batch again with PIPELINE_CHAOS={chaos!r} "
                   "(a new worker pool):")
        with WorkerProcess(env={**env, "PIPELINE_CHAOS": chaos}, concurrency=concurrency,
                           cwd=os.getcwd()):
            runs, _ = _run_batch(p, workflow, batch, timeout_s)
            click.echo(_decisions(spec, runs))
            _show_compensation(runs)
            click.echo("\nbreakers:")
            for snap in p.breakers.snapshots((a.name, a.breaker) for a in workflow.agents()):
                last = snap.last_transition
                if last and last["reason"] != RESET_REASON:
                    click.echo(f"  {snap.agent}: {snap.state.value} ({last['reason']}); "
                               f"{snap.failures} failed, {snap.rejected} refused")
        _reset_breakers(p, workflow)
        click.echo("breakers reset")
    click.echo("worker pool stopped")
    show_archive(p, shown)


def _reset_breakers(p: Pipeline, workflow: Flow) -> None:
    for a in workflow.agents():
        p.breakers.reset(a.name, reason=RESET_REASON)


def _run_batch(p: Pipeline, workflow: Flow, batch: list[Any],
               timeout_s: float) -> tuple[list[Run], float]:
    started = time.monotonic()
    runs = [p.start(workflow, payload) for payload in batch]
    wait_all(runs, timeout_s, f"{len(runs)} runs of {workflow.name}")
    return runs, time.monotonic() - started


def _decisions(spec: dict[str, Any], runs: list[Run]) -> str:
    columns: list[tuple[str, str]] = [(c[0], c[1]) for c in spec["columns"]]
    rows = [tuple(title for title, _ in columns) + ("status", "versions", "ms", "note")]
    for run in runs:
        res, info = run.result(), run.info()
        out = res.output if isinstance(res.output, dict) else {}
        if not out:  # a failed run: show what it was asked, where the input says
            out = run.store.get(run.run_id, 0).payload
        took = ((info.finished_at or info.updated_at) - info.created_at) * 1000
        note = "degraded: " + ", ".join(
            v.agent for v in run.history() if v.degraded) if res.degraded else ""
        if res.error:
            note = f"{info.failed_agent}: {res.error.split(':')[0]}"
        rows.append(tuple(_cell(out.get(field)) for _, field in columns)
                    + (res.status.value, str(info.head + 1), f"{took:.0f}", note))
    return table(rows)


def _show_lineage(runs: list[Run]) -> None:
    shown = next((r for r in runs if r.result().output), runs[0])
    history = shown.history()
    click.echo(f"\nlineage of run {shown.run_id} (sealed versions, digests checked):")
    click.echo(format_history(history))
    last = history[-1]
    click.echo(f"version {last.version} was made from versions "
               f"{', '.join(map(str, last.parents))}:")
    for v in shown.lineage(last.version)[1:]:
        click.echo(f"  {named(v)} <- {list(v.parents) or 'the request'}")


def _show_compensation(runs: list[Run]) -> None:
    """The saga's trail for the first run that did not succeed."""
    failed = next((r for r in runs if r.status().value != "succeeded"), None)
    if failed is None:
        return
    entries = failed.store.log(failed.run_id)
    start = next(i for i, e in enumerate(entries) if e["event"] == "run.compensating")
    click.echo(f"\ncompensation of run {failed.run_id} ({failed.status().value}), newest first:")
    t0 = int(entries[start]["at"])
    for e in entries[start:]:
        what = e.get("step") or e.get("reason", "")
        click.echo(f"  +{int(e['at']) - t0:>4} ms  {e['event']:<22} {what}"[:110])


def _show_choreography(p: Pipeline, spec: dict[str, Any], timeout_s: float) -> None:
    """Run the event-driven flow on each sample: its ledger, and why an agent did not react."""
    flow = p.workflow(spec["workflow"])
    _reset_breakers(p, flow)
    click.echo(f"\nchoreography {flow.name}: {flow.shape()}")
    for source in spec["inputs"]:
        payload = read_json_input(source)
        run = p.start(flow, payload)
        result = run.wait(timeout_s)
        info = run.info()
        took = ((info.finished_at or info.updated_at) - info.created_at) * 1000
        click.echo(f"\n{json.dumps(payload)}: {result.status.value} in {took:.0f} ms "
                   f"(run {run.run_id})")
        click.echo(format_events(events(p.store, run.run_id)))
        if result.output:
            click.echo(str(result.output.get("body", "")))
        tokens = [e for e in p.store.log(run.run_id) if e["event"] == "step.sealed"]
        used = sum(int(e.get("prompt_tokens", 0)) + int(e.get("completion_tokens", 0))
                   for e in tokens)
        click.echo(f"token usage reported by the agents: {used}")
        if result.error:
            agent = info.failed_agent or spec["explain"]
            why = explain(p.store, run.run_id, agent, agents.get(agent))
            click.echo(f"pipeline explain {run.run_id} {agent}:\n  {why.summary}")
            undone = [e["step"] for e in p.store.log(run.run_id)
                      if e["event"] == "compensation.done"]
            click.echo(f"compensated, newest first: {', '.join(undone) or 'nothing'}")


def _show_limits(p: Pipeline, spec: dict[str, Any], timeout_s: float) -> None:
    """A batch at once on a tight shared limit (its waits in the trace), then a run stopped
    by its budget (compensated)."""
    flow = p.workflow(spec["workflow"])
    _reset_breakers(p, flow)
    batch = read_json_input(spec["input"])
    click.echo(f"\nlimits: {flow.name}: {flow.shape()}; {flow.description}")
    runs, elapsed = _run_batch(p, flow, batch, timeout_s)
    rows = [("run", "status", "ms", "throttled", "waited ms", "spent")]
    for run in runs:
        info = run.info()
        throttled = [c for c in report(p.store, run.run_id).calls if c.status == "throttled"]
        took = ((info.finished_at or info.updated_at) - info.created_at) * 1000
        rows.append((run.run_id, info.status.value, f"{took:.0f}", str(len(throttled)),
                     str(info.throttled_ms),
                     info.spending.describe() if info.spending else "-"))
    click.echo(table(rows))
    click.echo(f"{len(runs)} runs at once in {elapsed:.2f}s, each call admitted by the limit")
    waited = max(runs, key=lambda r: r.info().throttled_ms)
    r = report(p.store, waited.run_id)
    click.echo(f"\npipeline trace {waited.run_id} (a throttled row: not run, sent again "
               "after the limit's wait):")
    click.echo(calls_table(r.calls, r.start))
    names = {name for a in flow.agents() for name in a.limits}
    click.echo("\npipeline limits:")
    click.echo(format_limits([st for st in limit_states(p.store.redis, url=p.store.url)
                              if st.name in names]))
    tight = Budget(tokens=spec["tight_budget"])
    run = p.start(flow, batch[0], budget=tight)
    result = run.wait(timeout_s)
    info = run.info()
    click.echo(f"\nthe first question again with start(..., budget=Budget(tokens="
               f"{tight.tokens:,})): {result.status.value} (run {run.run_id})")
    click.echo(f"  {info.failed_agent}: {result.error}")
    undone = [e["step"] for e in p.store.log(run.run_id) if e["event"] == "compensation.done"]
    click.echo(f"  compensated, newest first: {', '.join(undone) or 'nothing'}")
    if info.spending is not None:
        click.echo(f"  budget: {info.spending.describe()}")


def _show_refusal(p: Pipeline, workflow: Flow, rejected: str | None) -> None:
    if rejected:
        shown = os.path.relpath(rejected) if rejected.startswith(os.getcwd() + os.sep) \
            else rejected
        click.echo(f"\nbad input is refused before anything is enqueued ({shown}):")
        try:
            p.start(workflow, read_json_input(rejected))
        except PipelineError as e:
            click.echo(f"  {type(e).__name__}: {e}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.2f}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)
