"""What the benchmark scripts share: a Redis to measure against, workers serving the
no-op agents, the two kinds of workflow measured side by side, counting round trips,
tables, and results on disk."""

from __future__ import annotations

import gc
import itertools
import json
import os
import platform
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import redis

from pipeline.embedded import EmbeddedRedis, answers

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("PIPELINE_BENCH_RESULTS",
                              Path(__file__).parent / "results.json"))
BENCH_DB = int(os.environ.get("BENCH_REDIS_DB", "15"))
AGENT_MODULES = "bench.noop_agents"
WAIT_S = 120.0
"""Longest wait for one workflow: a bench that stalls fails instead of hanging."""


@contextmanager
def bench_redis() -> Iterator[str]:
    """PIPELINE_BENCH_REDIS_URL, else the local Redis, else an embedded one; db BENCH_DB.

    The local database is flushed before and after; a URL given is the caller's
    and is left as it is.
    """
    url = os.environ.get("PIPELINE_BENCH_REDIS_URL")
    if url:
        with settled():
            yield url
        return
    local = f"redis://127.0.0.1:6379/{BENCH_DB}"
    if answers(local):
        redis.Redis.from_url(local).flushdb()
        try:
            with settled():
                yield local
        finally:
            redis.Redis.from_url(local).flushdb()
        return
    with EmbeddedRedis() as server, settled():
        yield server.url


@contextmanager
def settled() -> Iterator[None]:
    """Collect Celery's AsyncResult objects while Redis still answers: each one
    unsubscribes from its result channel when it goes, and would otherwise try at
    interpreter exit."""
    try:
        yield
    finally:
        gc.collect()


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "system": platform.system()}


def save(section: str, data: dict[str, Any]) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[section] = {**data, "machine": machine(),
                        "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def p95(values: Sequence[float]) -> float:
    if len(values) < 2:
        return max(values)
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned: the first to the left, the others to the right."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                        strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


# -- workers and clients ------------------------------------------------------------------


def worker_env(state_url: str, broker_url: str | None = None, **extra: str) -> dict[str, str]:
    """A bench worker's environment: the no-op agents, no chaos, no OpenTelemetry."""
    broker = broker_url or state_url
    return {"PIPELINE_REDIS_URL": state_url, "CELERY_BROKER_URL": broker,
            "CELERY_RESULT_BACKEND": broker, "PIPELINE_AGENT_MODULES": AGENT_MODULES,
            "PIPELINE_CHAOS": "", "PIPELINE_OTEL": "", **extra}


def worker(env: Mapping[str, str], *, concurrency: int, queues: Sequence[str] = (),
           app: str = "config") -> Any:
    """A real ``celery -A <app> worker`` (prefork): by default the pipeline's, serving the
    no-op agents and bare tasks."""
    from pipeline.local import WorkerProcess

    return WorkerProcess(app=app, env=env, concurrency=concurrency, queues=queues,
                         cwd=str(ROOT), name=f"bench{uuid.uuid4().hex[:6]}")


def client(state_url: str, broker_url: str | None = None) -> Any:
    """A ``Pipeline`` on the no-op agents."""
    from pipeline import Pipeline

    settings = bench_settings(state_url, broker_url)
    return Pipeline(settings=settings, app=bench_app(settings))


def bench_settings(state_url: str, broker_url: str | None = None) -> Any:
    from pipeline import Settings

    broker = broker_url or state_url
    return Settings(redis_url=state_url, broker_url=broker, result_backend=broker,
                    agent_modules=(AGENT_MODULES,))


def bench_app(settings: Any) -> Any:
    """A Celery app as the pipeline configures it (``create_app``): the bare canvases
    are sent by one of their own, so that each kind's result consumer serves it alone."""
    from pipeline.app import create_app

    return create_app(settings)


def release_results(app: Any) -> None:
    """Stop waiting for results nobody will ask for, while Redis still answers.

    Sending a canvas subscribes the sender to the result channel of every task whose
    result is stored (a chord's members). The pipeline's client never reads them (it
    waits on the run's log), so they stay pending in the app until drained or dropped.
    """
    for mapping in app.backend._pending_results:
        for waiters in list(mapping.values()):
            for result in list(waiters.values()):
                app.backend.remove_pending_result(result)


# -- the two kinds of workflow, measured the same way ---------------------------------------


class Kind(Protocol):
    """One way of running a workflow: through the pipeline, or as a bare canvas."""

    name: str
    run_ids: list[str]

    def start(self) -> Any: ...

    def wait(self, handle: Any) -> None: ...


class PipelineKind:
    """``Pipeline.start`` and ``Run.wait``, as application code does."""

    name = "pipeline"

    def __init__(self, pipeline: Any, workflow: str, payload: Any, *, name: str = "") -> None:
        self.name = name or self.name
        self.pipeline = pipeline
        self.workflow = workflow
        self.payload = payload
        self.run_ids: list[str] = []

    def start(self) -> Any:
        run = self.pipeline.start(self.workflow, self.payload)
        self.run_ids.append(run.run_id)
        return run

    def wait(self, handle: Any) -> None:
        result = handle.wait(timeout=WAIT_S)
        if result.status.value != "succeeded":
            raise RuntimeError(f"run {handle.run_id} of {self.workflow} ended "
                               f"{result.status.value}: {result.error}")


class BareKind:
    """The same canvas of plain Celery tasks: ``apply_async`` and ``AsyncResult.get``."""

    name = "bare celery"

    def __init__(self, app: Any, canvas: Callable[[Any, str], Any]) -> None:
        self.app = app
        self.canvas = canvas
        self.run_ids: list[str] = []

    def start(self) -> Any:
        run_id = uuid.uuid4().hex
        self.run_ids.append(run_id)
        return self.canvas(self.app, run_id).apply_async()

    def wait(self, handle: Any) -> None:
        handle.get(timeout=WAIT_S)


FINAL_STATUSES = frozenset({"succeeded", "compensated", "compensation_failed", "failed"})


def run_statuses(client: Any, run_ids: Sequence[str]) -> list[str]:
    """Each run's status in one round trip; ``missing`` for a run that is gone (expired)."""
    from pipeline.keys import RunKeys

    pipe = client.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hget(RunKeys(run_id).run, "status")
    return [s or "missing" for s in pipe.execute()]


def throughput(kind: Kind, n: int) -> float:
    """Workflows per second with ``n`` started at once, until the last one ends."""
    start = time.perf_counter()
    handles = [kind.start() for _ in range(n)]
    for handle in handles:
        kind.wait(handle)
    return n / (time.perf_counter() - start)


def latencies_ms(kind: Kind, n: int) -> list[float]:
    """End-to-end latency of ``n`` workflows run one at a time, milliseconds."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        kind.wait(kind.start())
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def in_order(kinds: Sequence[Kind], round_: int) -> list[Kind]:
    """The kinds in an order that changes each round so that, over as many rounds as there
    are orders, each kind runs in each place as often (A B, then B A; for three kinds, all
    six orders): a machine that drifts (another process waking up), or a place that costs
    more (the first after the warm-up, the last before the results are released), weighs
    on every kind alike."""
    orders = list(itertools.permutations(kinds))
    return list(orders[round_ % len(orders)])


def warm_up(kinds: Sequence[Kind], concurrency: int) -> None:
    """Scripts loaded, connections open, every pool process has run each task."""
    for kind in kinds:
        for _ in range(2):
            throughput(kind, 2 * concurrency)


def memory_usage(client: redis.Redis, keys: Sequence[str]) -> int:
    """Bytes that ``keys`` take in Redis (``MEMORY USAGE ... SAMPLES 0``: every element)."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    return sum(int(n or 0) for n in pipe.execute())


# -- counting round trips -----------------------------------------------------------------

COUNT_DIR_ENV = "BENCH_COUNT_DIR"
COUNT_PORTS_ENV = "BENCH_COUNT_PORTS"
UPKEEP = frozenset({"AUTH", "CLIENT", "HELLO", "PING", "READONLY", "SELECT"})
"""Commands a connection sends for itself (handshake, health check), not for a step."""


class CommandCounter:
    """The round trips and commands this process sends to some Redis servers.

    redis-py writes each round trip with one ``send_packed_command`` call: a single
    command, or a whole pipeline (a step's open or seal batch). Counted per server
    (by port, labelled), with the names of the commands each carried; a round trip
    that carried only connection upkeep (handshake, health-check PING) is counted
    apart. Installed process-wide, inherited by forked pool processes.
    """

    def __init__(self, ports: Mapping[int, str]) -> None:
        self.ports = dict(ports)
        self.round_trips: Counter[str] = Counter()
        self.upkeep: Counter[str] = Counter()
        self.commands: dict[str, Counter[str]] = {label: Counter() for label in ports.values()}
        self._pending: dict[int, list[str]] = {}

    def install(self) -> CommandCounter:
        from redis.connection import AbstractConnection as Conn

        counter = self
        send_command = Conn.send_command
        pack_commands = Conn.pack_commands
        send_packed = Conn.send_packed_command

        def counted_send_command(conn: Any, *args: Any, **kwargs: Any) -> Any:
            counter._pending[id(conn)] = [_name(args[0])] if args else []
            return send_command(conn, *args, **kwargs)  # type: ignore[no-untyped-call]

        def counted_pack_commands(conn: Any, commands: Any) -> Any:
            counter._pending[id(conn)] = [_name(c[0]) for c in commands]
            return pack_commands(conn, commands)  # type: ignore[no-untyped-call]

        def counted_send_packed(conn: Any, command: Any, check_health: bool = True) -> Any:
            counter._count(conn, counter._pending.pop(id(conn), []))
            return send_packed(conn, command, check_health)  # type: ignore[no-untyped-call]

        Conn.send_command = counted_send_command  # type: ignore[method-assign,assignment]
        Conn.pack_commands = counted_pack_commands  # type: ignore[method-assign]
        Conn.send_packed_command = counted_send_packed  # type: ignore[method-assign]
        return self

    def _count(self, conn: Any, names: list[str]) -> None:
        label = self.ports.get(getattr(conn, "port", None))  # type: ignore[arg-type]
        if label is None:
            return
        if names and all(n in UPKEEP for n in names):
            self.upkeep[label] += 1
        else:
            self.round_trips[label] += 1
        self.commands[label].update(names)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {label: {"round_trips": self.round_trips[label], "upkeep": self.upkeep[label],
                        "commands": dict(self.commands[label])}
                for label in self.ports.values()}

    def since(self, before: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """What was sent after ``before`` (a snapshot), per server label."""
        now = self.snapshot()
        out = {}
        for label, after in now.items():
            was = before[label]
            commands = Counter(after["commands"])
            commands.subtract(was["commands"])
            out[label] = {"round_trips": after["round_trips"] - was["round_trips"],
                          "upkeep": after["upkeep"] - was["upkeep"],
                          "commands": {k: v for k, v in commands.items() if v}}
        return out


def _name(arg: Any) -> str:
    return (arg.decode() if isinstance(arg, bytes) else str(arg)).split(" ")[0].upper()


def count_ports(ports: Mapping[str, int]) -> str:
    """``BENCH_COUNT_PORTS`` for servers labelled ``{"state": 6380, ...}``."""
    return ",".join(f"{label}={port}" for label, port in ports.items())


def install_task_counter() -> None:
    """In a bench worker: count each task's round trips, one JSON line per task.

    Reads ``BENCH_COUNT_DIR`` and ``BENCH_COUNT_PORTS``; a task with a ``run_id``
    keyword appends ``{"task", "run_id", "step", <label>: {round_trips, upkeep,
    commands}}`` to ``<dir>/<pid>.jsonl`` after it ran (its result stored, the next
    task of its chain sent).
    """
    from celery.signals import task_postrun, task_prerun

    directory = Path(os.environ[COUNT_DIR_ENV])
    ports = {int(port): label for label, port in
             (part.split("=") for part in os.environ[COUNT_PORTS_ENV].split(","))}
    counter = CommandCounter(ports).install()
    started: dict[str, dict[str, dict[str, Any]]] = {}

    def before(task_id: str, **_: Any) -> None:
        started[task_id] = counter.snapshot()

    def after(task_id: str, task: Any, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
        was = started.pop(task_id, None)
        run_id = (kwargs or {}).get("run_id")
        if was is None or not run_id:
            return
        line = {"task": task.name, "run_id": run_id, "step": kwargs.get("step", "") if kwargs
                else "", **counter.since(was)}
        with open(directory / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    task_prerun.connect(before, weak=False)
    task_postrun.connect(after, weak=False)


def counted_tasks(directory: Path) -> list[dict[str, Any]]:
    """Every line the bench workers wrote to ``directory``."""
    out = []
    for path in sorted(directory.glob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line]
    return out
