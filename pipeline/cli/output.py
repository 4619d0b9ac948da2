"""What the ``pipeline`` commands print: tables, JSON, times, and the text shared by several
commands (a run's result, its versions, its calls and tokens, a choreography's events)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click

from ..limits import LimitState
from ..observe import Call, Usage
from ..observe.ledger import EventView
from ..observe.lineage import NO_AGENT
from ..state import RunInfo


def table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` (the first one the header) in aligned columns, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON, non-ASCII text as it is."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def timestamp(ts: float) -> str:
    """A Unix time as UTC, to the millisecond."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def echo_result(workflow: str, result: Any, as_json: bool) -> None:
    """Print a run's result as ``run`` does: run id, workflow, status, version, error and
    output; with ``as_json``, ``{"workflow", **result.to_dict()}``."""
    if as_json:
        echo_json({"workflow": workflow, **result.to_dict()})
        return
    click.echo(f"run {result.run_id} of {workflow}: {result.status.value} "
               f"(version {result.version})")
    if result.error:
        click.echo(f"error: {result.error}")
    if result.output is not None:
        click.echo(json.dumps(result.output, indent=2, ensure_ascii=False))


def format_history(versions: Sequence[Any]) -> str:
    """A run's sealed versions as a table: parents, agent, contract, digest, time."""
    rows = [("version", "parents", "agent", "contract", "digest", "sealed at")]
    for v in versions:
        rows.append((
            str(v.version),
            ",".join(map(str, v.parents)) or "-",
            v.agent or NO_AGENT,
            v.contract,
            v.digest[:12] + (" degraded" if v.degraded else ""),
            timestamp(v.created_at),
        ))
    return table(rows)


def calls_table(run_calls: Sequence[Call], start: int) -> str:
    """A run's calls, one row per attempt, times in milliseconds after ``start``."""
    rows: list[tuple[str, ...]] = [("+ms", "step", "agent", "try", "worker", "queue", "status",
                                    "latency", "in", "read", "out", "breaker", "fallback",
                                    "tokens", "error")]
    for c in run_calls:
        rows.append((
            str(c.started_at - start), c.step, c.agent, str(c.attempt), c.worker, c.queue,
            c.status + (" (degraded)" if c.degraded and c.status == "ok" else ""),
            "" if c.latency_ms is None else f"{c.latency_ms:.0f} ms",
            ",".join(map(str, c.inputs)), ",".join(map(str, c.read)),
            "" if c.output is None else str(c.output),
            c.breaker, c.fallback,
            str(c.prompt_tokens + c.completion_tokens) if c.prompt_tokens or c.completion_tokens
            else "",
            f"{c.error_type}: {c.error}"[:80] if c.error_type else c.error[:80],
        ))
    return table(rows)


def tokens_line(per: dict[str, Usage], total: Usage) -> str:
    """A run's token usage in one line: the total, then each agent's."""
    parts = [f"{agent} {u.total:,}" for agent, u in sorted(per.items()) if u.total]
    return (f"tokens: {total.total:,} (prompt {total.prompt_tokens:,}, completion "
            f"{total.completion_tokens:,})" + (f"; by agent: {', '.join(parts)}" if parts else ""))


def run_header(info: RunInfo, total: Usage) -> list[str]:
    """The head of a page on a run: id, workflow, status, times, tokens, replays, error."""
    took = ((info.finished_at or info.updated_at) - info.created_at) * 1000
    lines = [f"run       {info.run_id}",
             f"workflow  {info.workflow}",
             f"status    {info.status.value}" + (" (degraded)" if info.degraded else ""),
             f"created   {timestamp(info.created_at)}",
             f"duration  {took:.0f} ms" + ("" if info.finished_at else " so far"),
             f"tokens    {total.total:,} (prompt {total.prompt_tokens:,}, completion "
             f"{total.completion_tokens:,}) in {total.calls} calls"]
    if info.spending is not None:
        lines.append(f"budget    {info.spending.describe()}")
    if info.throttled_ms:
        lines.append(f"throttled {info.throttled_ms:,} ms waiting for limits")
    if info.replay_of:
        lines.append(f"replay of {info.replay_of}")
    if info.replays:
        lines.append(f"replayed  as {', '.join(info.replays)}")
    if info.error:
        lines.append(f"error     {info.failed_agent}: {info.error}")
    return lines


def format_events(views: Sequence[EventView]) -> str:
    """The ledger as a table: one row per delivery, under the event it delivers."""
    start = views[0].at if views else 0
    rows: list[tuple[str, ...]] = [("event", "type", "cause", "by", "version", "+ms", "delivery",
                                    "state", "attempts", "latency", "detail")]
    for v in views:
        head = (v.event_id, v.type + (" (terminal)" if v.terminal else "")
                + (" (failure)" if v.failure else ""), v.cause or "-", v.publisher,
                str(v.version) if v.version >= 0 else "-", str(v.at - start))
        if v.failure:
            rows.append(head + ("-", "saga", "", "", "handed to the saga"))
        elif not v.deliveries:  # a terminal event no agent subscribes to: the run's end
            rows.append(head + ("-", "", "", "", "no subscriber"))
        for i, d in enumerate(v.deliveries):
            detail = (f"v{d.version}" if d.version is not None else "") or d.error[:60]
            rows.append((head if i == 0 else ("",) * 6) + (
                d.agent, d.state, str(d.attempts or ""),
                "" if d.latency_ms is None else f"{d.latency_ms:.0f} ms", detail))
    return table(rows)


def format_limits(states: Sequence[LimitState]) -> str:
    """``pipeline limits``: one row a limit (effective rates shown against configured ones)."""
    rows = [("limit", "requests/min", "tokens/min", "concurrency", "requests now",
             "tokens now", "in flight", "reserved", "debt", "throttled", "429s")]
    for st in states:
        rows.append((
            st.name,
            _rate(st.requests_per_minute, st.effective_requests_per_minute),
            _rate(st.tokens_per_minute, st.effective_tokens_per_minute),
            _rate(st.concurrency, st.effective_concurrency),
            f"{st.requests_in_window:.0f}", f"{st.tokens_in_window:.0f}",
            str(st.in_flight), str(st.tokens_reserved), f"{st.debt_s:.1f}s",
            f"{st.throttled} ({st.throttled_s:.1f}s)",
            f"{st.rate_limited}" + (f" (held {st.blocked_s:.1f}s)" if st.blocked_s else ""),
        ))
    out = table(rows)
    if any(st.factor < 1 for st in states):
        out += ("\na rate shown as 'now <- configured' was slowed down by the API's 429s; it "
                "recovers as calls succeed")
    return out


def _rate(configured: float | None, effective: float | None) -> str:
    if configured is None or effective is None:
        return "-"
    return f"{configured:g}" if effective == configured else f"{effective:g} <- {configured:g}"
