"""Where a worker's time goes: the pipeline's step against a bare Celery task.

Runs the overhead benchmark's two kinds of workflow (the credit shape with
no-op agents, and the same canvas of plain Celery tasks), each on a worker of
its own whose pool process runs under ``cProfile`` from its start to its
shutdown (``BENCH_PROFILE_DIR``). Prints the pool process's CPU time per task
of each kind, and the pipeline's step broken down: its own functions, the
Redis round trips, the contracts, sealing, Celery's share. Then the Redis
side: time the server spent per workflow on each command and each of the
pipeline's Lua scripts (from its slow log at threshold 0, which is why the
profile always runs on an embedded Redis of its own).

Not part of ``make bench`` (a profiler slows what it measures): run it when
the hot path changes, and read the shares, not the absolute times.

Usage: python -m bench.profile [--workflows N] [--top K] [--workflow noop_limited_credit]
"""

from __future__ import annotations

import argparse
import pstats
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import redis

import pipeline.app  # noqa: F401 - every module of the pipeline, and so every script
from bench.common import (
    BareKind,
    Kind,
    PipelineKind,
    bench_app,
    client,
    release_results,
    throughput,
    worker,
    worker_env,
)
from bench.noop_agents import CREDIT_QUEUES, bare_credit, noop_credit, noop_limited_credit
from pipeline.embedded import EmbeddedRedis
from pipeline.lua import Script

PROFILE_DIR_ENV = "BENCH_PROFILE_DIR"
STEPS = 5

# What a pipeline step's time is spent on, by the function that owns it (cumulative).
PARTS = (
    ("the step, all told (run_step)", "pipeline/step/runner.py", "run_step"),
    ("  open round trip (StateStore.open_step)", "pipeline/state/store.py", "open_step"),
    ("  seal round trip (StateStore.seal)", "pipeline/state/store.py", "seal"),
    ("  decoding the input versions", "pipeline/state/version.py", "from_entry"),
    ("  contracts (input when needed, output)", "pipeline/contracts.py", "validate"),
    ("  canonical JSON and digest of the output", "pipeline/state/version.py", "sealable"),
    ("  socket reads (every Redis reply)", "~", "<method 'recv_into' of '_socket.socket' objects>"),
    ("  socket writes", "~", "<method 'sendall' of '_socket.socket' objects>"),
    ("the task in Celery (trace_task)", "celery/app/trace.py", "trace_task"),
    ("  storing the result (and a chord's count)", "celery/backends/base.py", "mark_as_done"),
    ("  sending the next task", "celery/app/trace.py", "_dispatch_callbacks_and_chain"),
)


def install_process_profiler() -> None:
    """In a bench worker's pool process: profile from its start to its shutdown."""
    import cProfile
    import os

    from celery.signals import worker_process_init, worker_process_shutdown

    directory = Path(os.environ[PROFILE_DIR_ENV])
    profiler = cProfile.Profile()

    def start(**_: Any) -> None:
        profiler.enable()

    def stop(**_: Any) -> None:
        profiler.disable()
        profiler.dump_stats(directory / f"{os.getpid()}.prof")

    worker_process_init.connect(start, weak=False)
    worker_process_shutdown.connect(stop, weak=False)


def profiled(url: str, kind: Kind, workflows: int, directory: Path, queues: list[str]) -> Any:
    directory.mkdir()
    env = worker_env(url, **{PROFILE_DIR_ENV: str(directory)})
    with worker(env, concurrency=1, queues=queues):
        for _ in range(0, workflows, 20):
            throughput(kind, 20)
    files = [str(p) for p in directory.glob("*.prof")]
    if not files:
        raise SystemExit(f"no profile was written to {directory}: did the pool process exit?")
    return pstats.Stats(*files)


def cumulative(stats: Any, path: str, name: str) -> tuple[float, int]:
    """(cumulative seconds, primitive calls) of the functions matching ``path`` and ``name``."""
    seconds, calls = 0.0, 0
    for (filename, _, function), (cc, _, _, ct, _) in stats.stats.items():
        if function == name and filename.endswith(path):
            seconds, calls = seconds + ct, calls + cc
    return seconds, calls


def script_names() -> dict[str, str]:
    """SHA1 -> file name of every Lua script the pipeline ships (as loaded: with the files
    it includes)."""
    return {v.sha: v.name for module in list(sys.modules.values())
            if module is not None and module.__name__.startswith("pipeline")
            for v in vars(module).values() if isinstance(v, Script)}


def server_time(url: str, kind: Kind, workflows: int, queues: list[str]
                ) -> dict[str, tuple[float, float]]:
    """Per command (each pipeline script by name): (calls, server us) per workflow."""
    server = redis.Redis.from_url(url)
    names = script_names()
    with worker(worker_env(url), concurrency=2, queues=queues):
        throughput(kind, 20)  # warm up
        server.config_set("slowlog-max-len", 1_000_000)
        server.config_set("slowlog-log-slower-than", 0)
        server.slowlog_reset()
        for _ in range(0, workflows, 20):
            throughput(kind, 20)
        entries = server.slowlog_get(1_000_000)
        server.config_set("slowlog-log-slower-than", 10_000)
    done = workflows // 20 * 20
    spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for entry in entries:
        words = entry["command"].decode(errors="replace").split()
        if not words or words[0].upper() == "SLOWLOG":
            continue
        name = words[0].upper()
        if name == "EVALSHA" and len(words) > 1:
            name = names.get(words[1], "EVALSHA (Celery, kombu)")
        spent[name][0] += 1
        spent[name][1] += entry["duration"]
    return {name: (calls / done, us / done) for name, (calls, us) in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=200)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--workflow", default=noop_credit.name,
                        choices=[noop_credit.name, noop_limited_credit.name],
                        help="the pipeline's workflow (noop_limited_credit: every agent on a "
                             "limit that never binds)")
    args = parser.parse_args()
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as tmp:
        url = server.url
        p = client(url)
        queues = [*CREDIT_QUEUES, p.settings.default_queue]
        pipeline = PipelineKind(p, args.workflow, {"n": 0})
        bare = BareKind(bench_app(p.settings), bare_credit)
        ours = profiled(url, pipeline, args.workflows, Path(tmp) / "pipeline", queues)
        theirs = profiled(url, bare, args.workflows, Path(tmp) / "bare", queues)
        on_server = {kind.name: server_time(url, kind, args.workflows, queues)
                     for kind in (pipeline, bare)}
        release_results(bare.app)
        release_results(p.app)
    tasks = args.workflows // 20 * 20 * STEPS
    print(f"{tasks} tasks of each kind, one pool process each, under cProfile\n")
    for label, stats in (("pipeline", ours), ("bare celery", theirs)):
        seconds, _ = cumulative(stats, "celery/app/trace.py", "trace_task")
        print(f"{label:<12} {seconds / tasks * 1e6:8.0f} us a task in trace_task")
    print("\nthe pipeline's step, us a task (cumulative, the profiler's overhead included)")
    for label, path, name in PARTS:
        seconds, calls = cumulative(ours, path, name)
        print(f"{label:<48} {seconds / tasks * 1e6:8.0f}   ({calls / tasks:.1f} calls a task)")
    print("\nRedis server time per workflow (us), by command and by the pipeline's script")
    for name, spent in on_server.items():
        total = sum(us for _, us in spent.values())
        print(f"{name}: {total:,.0f} us a workflow")
        for command, (calls, us) in sorted(spent.items(), key=lambda kv: -kv[1][1])[:10]:
            print(f"  {command:<26} {calls:6.2f} calls {us:8.0f} us  ({us / calls:.1f} us a call)")
    print(f"\ntop {args.top} functions of the pipeline's pool process by own time")
    ours.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
