"""What happened in a run, read back from its log: the calls (one row per attempt), token
usage, the compensations, the runs index (the lineage of its versions is ``lineage``).

Nothing here writes (except dropping expired runs from the index); every figure is derived
from what the runner, the saga and the breaker gate already log in the run's stream, so a
trace can never disagree with the run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from ..keys import RUNS_INDEX, RunKeys
from ..state import RunInfo, RunStatus, Spending, StateStore, translate_errors

__all__ = ["Call", "CallReport", "Usage", "calls", "compensations", "report", "runs", "usage",
           "waiting_on"]

ENDINGS = {
    "step.sealed": "ok",
    "step.failed": "failed",
    "step.retry": "retried",
    "step.refused": "refused",
    "step.skipped": "skipped",
    "step.discarded": "discarded",
    "step.cancelled": "cancelled",
    "step.exhausted": "exhausted",
    "step.throttled": "throttled",
}


@dataclass(slots=True)
class Call:
    """One attempt of one step: what the agent received, produced, took and cost."""

    step: str
    agent: str
    attempt: int
    worker: str = ""
    queue: str = ""
    started_at: int = 0  # ms, the server's clock
    latency_ms: float | None = None
    inputs: list[int] = field(default_factory=list)
    output: int | None = None
    status: str = "running"  # running ok failed retried refused skipped discarded exhausted
    #                          throttled (a limit refused it: not run, sent again after
    #                          ``wait_ms``), lost (the attempt's worker died, or it was
    #                          handed out again)
    error_type: str = ""
    error: str = ""
    breaker: str = ""
    fallback: str = ""
    degraded: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    task_id: str = ""
    read: list[int] = field(default_factory=list)  # earlier versions read via ctx.version...
    limit: str = ""  # the limit that throttled it
    wait_ms: int = 0  # and the wait it asked for

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calls(log: Sequence[dict[str, str]]) -> list[Call]:
    """Every call attempt of a run, in the order they started.

    An attempt still open when its step starts again was ``lost`` (its worker died, or the
    broker handed the message out again). A delivery refused for a crash loop is a row of
    its own (``exhausted``, with the error that failed the run). A version sealed by someone
    other than the attempt that was refused (a person resuming a parked run) is its own row,
    as is a stand-in sealed after an attempt failed for good (``fallback_on="failure"``).
    """
    out: list[Call] = []
    open_calls: dict[str, Call] = {}
    exhausted: dict[str, Call] = {}
    newest: dict[str, Call] = {}  # each step's latest row
    for e in log:
        kind, step = e.get("event", ""), e.get("step", "")
        if kind in ("step.started", "step.exhausted"):
            _lose(open_calls.pop(step, None))
            call = Call(step=step, agent=e.get("agent", ""), attempt=int(e.get("attempt", 1)),
                        worker=e.get("worker", ""), queue=e.get("queue", ""),
                        started_at=int(e["at"]), task_id=e.get("task_id", ""),
                        inputs=[int(v) for v in e.get("inputs", "").split(",") if v])
            out.append(call)
            newest[step] = call
            if kind == "step.started":
                open_calls[step] = call
            else:
                call.status, call.latency_ms = "exhausted", 0.0
                exhausted[step] = call
            continue
        if kind not in ENDINGS and kind != "step.degraded":
            continue
        found = open_calls.get(step)
        if kind == "step.sealed" and found is not None and found.status == "refused" \
                and e.get("worker") != found.worker:
            found = None  # not the refused attempt's fallback: a person's output
        if found is None:
            if kind == "step.failed" and step in exhausted:
                found = exhausted.pop(step)  # why the crash loop failed the run
                found.error_type, found.error = e.get("error_type", ""), e.get("error", "")
                continue
            if kind == "step.degraded" and step in newest:
                found = newest[step]  # the stand-in sealed after the attempt failed for good
            elif kind not in ("step.exhausted", "step.failed", "step.sealed"):
                continue
            else:
                found = Call(step=step, agent=e.get("agent", ""),
                             attempt=int(e.get("attempt", 0)), worker=e.get("worker", ""),
                             started_at=int(e["at"]))
                out.append(found)
                newest[step] = found
        call = found
        if kind == "step.degraded":  # a fallback sealed a stand-in
            call.status, call.degraded = "ok", True
            call.output = int(e.get("version", 0))
            call.fallback = call.fallback or e.get("source", "")
            call.read = [int(v) for v in e["read"].split(",")] if e.get("read") else call.read
            _end(call, e)
            continue
        call.status = ENDINGS[kind]
        call.error_type = e.get("error_type", call.error_type)
        call.error = e.get("error", e.get("reason", call.error))
        call.breaker = e.get("breaker", call.breaker)
        call.prompt_tokens = int(e.get("prompt_tokens", call.prompt_tokens))
        call.completion_tokens = int(e.get("completion_tokens", call.completion_tokens))
        call.model = e.get("model", call.model)
        call.read = [int(v) for v in e["read"].split(",")] if e.get("read") else call.read
        if kind == "step.refused":
            call.fallback = e.get("fallback", "")
        if kind == "step.throttled":
            call.limit, call.wait_ms = e.get("limit", ""), int(e.get("wait_ms", 0))
            call.error = f"limit {call.limit}: {e.get('reason', '')}, wait {call.wait_ms} ms"
        if kind == "step.sealed":
            call.output = int(e["version"])
            call.degraded = e.get("degraded") == "1"
            call.latency_ms = float(e.get("latency_ms", 0.0))
        else:
            _end(call, e)
        if kind != "step.refused":
            open_calls.pop(step, None)
    return out


def _lose(call: Call | None) -> None:
    if call is not None and call.status == "running":
        call.status = "lost"


def _end(call: Call, entry: dict[str, str]) -> None:
    if call.latency_ms is None:
        call.latency_ms = float(int(entry["at"]) - call.started_at)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": self.total,
                "calls": self.calls}


def usage(run_calls: Iterable[Call]) -> tuple[dict[str, Usage], Usage]:
    """Token usage per agent and in total, from the calls that sealed."""
    per: dict[str, Usage] = {}
    total = Usage()
    for c in run_calls:
        if c.status == "throttled":
            continue  # not called: its limit refused it
        u = per.setdefault(c.agent, Usage())
        u.calls += 1
        total.calls += 1
        for target in (u, total):
            target.prompt_tokens += c.prompt_tokens
            target.completion_tokens += c.completion_tokens
    return per, total


@dataclass(slots=True)
class CallReport:
    """A run's record, its log, its calls and what they cost: what trace and inspect show."""

    info: RunInfo
    log: list[dict[str, str]]
    calls: list[Call]
    by_agent: dict[str, Usage]
    total: Usage

    @property
    def start(self) -> int:
        """When the run's log begins (ms): the origin of every ``+ms``."""
        return int(self.log[0]["at"]) if self.log else 0

    def tokens(self) -> dict[str, Any]:
        return {"total": self.total.to_dict(),
                "by_agent": {a: u.to_dict() for a, u in sorted(self.by_agent.items())}}


def report(store: StateStore, run_id: str) -> CallReport:
    """Read a run's record and log, and derive its calls and token usage."""
    info = store.run_info(run_id)
    log = store.log(run_id)
    run_calls = calls(log)
    by_agent, total = usage(run_calls)
    return CallReport(info, log, run_calls, by_agent, total)


def compensations(log: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The saga's entries (and steps that undid themselves), in order."""
    kinds = ("run.compensating", "compensation.", "step.self_compensat", "run.compensated",
             "run.cancelled", "run.compensation_failed", "step.discarded", "step.cancelled")
    return [e for e in log if e.get("event", "").startswith(kinds)]


TROUBLE = ("message.returned", "saga.error", "run.redrive_failed", "run.enqueue_failed")
"""Log entries that say the pipeline's own work for a run failed or waits."""
STILL = TROUBLE + ("saga.nudged",)
"""Entries that are not progress: a run whose log ends in these has not moved since."""


def waiting_on(info: RunInfo, log: Sequence[dict[str, str]]) -> str | None:
    """Why a live run is not moving, when its log says so: the newest entry of ``TROUBLE``
    with nothing but such entries after it (a step's message a worker gave back, a saga
    planner or a re-drive that failed). None for a finished run or one that moved since."""
    if info.status.is_final:
        return None
    for entry in reversed(log):
        if entry.get("event") not in STILL:
            return None
        if entry.get("event") in TROUBLE:
            where = entry.get("step") or entry.get("task") or ""
            return f"{entry['event']} {where}: {entry.get('reason') or entry.get('error', '')}"
    return None


# -- the runs index ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunRow:
    run_id: str
    workflow: str
    status: str
    created_at: float
    finished_at: float | None
    head: int
    error: str
    degraded: bool
    budget: dict[str, Any] | None = None  # Spending.to_dict(): spent against the budget
    throttled_ms: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELDS = ("workflow", "status", "created_at", "finished_at", "head", "error", "degraded",
          "budget_tokens", "budget_cost", "spent_tokens", "spent_cost", "reserved_tokens",
          "reserved_cost", "throttled_ms")


INDEX_GRACE_MS = 60_000
"""A run missing from Redis is dropped from the index only once its entry is this old: on
a cluster the index entry may land before the run's own keys."""


def runs(store: StateStore, *, status: str | None = None, workflow: str | None = None,
         limit: int = 20, page: int = 200) -> list[RunRow]:
    """The newest runs in the index, filtered; runs that expired are dropped from it."""
    if status is not None:
        RunStatus(status)  # ValueError names the status
    found: list[RunRow] = []
    # Paged by score (creation time), not by rank: entries dropped or added by someone
    # else between two pages shift ranks, never scores.
    max_score: str | float = "+inf"
    at_max: set[str] = set()  # members already read at the current lowest score
    with translate_errors(store.url):
        while len(found) < limit:
            want = page + len(at_max)
            scored = cast(list[tuple[str, float]], store.redis.zrevrangebyscore(
                RUNS_INDEX, max_score, "-inf", start=0, num=want, withscores=True))
            fresh = [(run_id, score) for run_id, score in scored if run_id not in at_max]
            if not fresh:
                break
            ids = [run_id for run_id, _ in fresh]
            old_enough = {run_id for run_id, score in fresh
                          if score < time.time() * 1000 - INDEX_GRACE_MS}
            pipe = store.redis.pipeline(transaction=False)
            for run_id in ids:
                pipe.hmget(RunKeys(run_id).run, FIELDS)
            gone = []
            for run_id, values in zip(ids, pipe.execute(), strict=True):
                h = dict(zip(FIELDS, values, strict=True))
                if h["status"] is None:
                    if run_id in old_enough:
                        gone.append(run_id)
                    continue
                if (status and h["status"] != status) or (workflow and h["workflow"] != workflow):
                    continue
                found.append(RunRow(
                    run_id=run_id, workflow=h["workflow"] or "", status=h["status"],
                    created_at=int(h["created_at"] or 0) / 1000.0,
                    finished_at=int(h["finished_at"]) / 1000.0 if h["finished_at"] else None,
                    head=int(h["head"] or 0), error=h["error"] or "",
                    degraded=h["degraded"] == "1",
                    budget=spending.to_dict() if (spending := Spending.from_hash(
                        {k: v for k, v in h.items() if v is not None})) else None,
                    throttled_ms=int(h["throttled_ms"] or 0)))
            if gone:
                store.redis.zrem(RUNS_INDEX, *gone)
            lowest = fresh[-1][1]
            at_max = {run_id for run_id, score in scored if score == lowest} | (
                at_max if lowest == max_score else set())
            max_score = lowest
            if len(scored) < want:
                break
    return found[:limit]
