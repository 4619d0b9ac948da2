"""The archive: how fast finished runs go into the Delta tables, what a finished run leaves
in Redis once archived, and what archiving costs the pipeline while it runs.

- throughput: ``--runs`` finished runs of the credit shape (``bench.noop_agents``) archived
  by one archiver, in one pass of batches of ``PIPELINE_ARCHIVE_BATCH``: runs per second
  (rows read from Redis, four Delta commits a batch, the runs marked);
- Redis bytes per finished run once archived: the same runs archived with
  ``PIPELINE_ARCHIVED_RETENTION_S=1``, their keys expired, what is left (the runs index's
  entry, the archiver's bookkeeping, Celery's result keys), against bare Celery's result
  keys for the same canvas;
- overhead: the pipeline's throughput with an archiver running beside it (a process of its
  own, a pass every 2 s, the cursor on the clock, the runs of the round before
  archived first) against without (the archiver stopped: SIGSTOP), in alternating rounds
  on the same pool.

Usage: python -m bench.archive [--runs 500] [--in-flight 200] [--rounds 6] [--quick]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis

from bench.common import (
    ROOT,
    BareKind,
    PipelineKind,
    bench_app,
    bench_redis,
    client,
    median,
    memory_usage,
    release_results,
    save,
    table,
    throughput,
    warm_up,
    worker,
    worker_env,
)
from bench.noop_agents import CREDIT_QUEUES, bare_credit, noop_credit
from pipeline.archive.archiver import Archiver
from pipeline.archive.backlog import backlog
from pipeline.keys import ARCHIVE, RUNS_INDEX, RunKeys

PAYLOAD = {"n": 0}
BESIDE = "pipeline, archiver beside"
EVERY_S = 2.0
"""The archiver beside makes a pass this often (beat's sweep, which archives in a fleet,
runs every PIPELINE_SWEEP_INTERVAL_S, 15 s by default)."""

ARCHIVER = """
import sys, time
from pipeline.archive.archiver import Archiver
from pipeline.archive.backlog import backlog
from pipeline.state import StateStore, connect
archiver = Archiver(StateStore(connect(sys.argv[1])), sys.argv[2], settle_s=0, lag_s=0)
while True:
    archiver.run_once()
    time.sleep(float(sys.argv[3]))
"""


@contextmanager
def archiver_beside(url: str, root: str) -> Iterator[subprocess.Popen[bytes]]:
    """An archiver in a process of its own, a pass every ``EVERY_S``, until the block ends
    (stopped with SIGSTOP between the rounds it is not measured in)."""
    proc = subprocess.Popen([sys.executable, "-c", ARCHIVER, url, root, str(EVERY_S)],
                            cwd=ROOT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(30)


def caught_up(p: Any, timeout_s: float = 30.0) -> None:
    """Wait until the archiver beside has archived every run that ended."""
    deadline = time.monotonic() + timeout_s
    while backlog(p.store)["backlog"] and time.monotonic() < deadline:
        time.sleep(0.1)


def footprint(r: redis.Redis) -> int:
    """Bytes of what outlives a finished run's own keys: the index, the archiver's keys,
    Celery's results."""
    keys = [RUNS_INDEX, ARCHIVE.cursor, ARCHIVE.waiting, ARCHIVE.seq, ARCHIVE.stats,
            *r.scan_iter("celery-task-meta-*", count=1000)]
    return memory_usage(r, [k for k in keys if r.exists(k)])


def measure(url: str, *, runs: int, in_flight: int, rounds: int, concurrency: int = 2
            ) -> dict[str, Any]:
    p = client(url)
    r = redis.Redis.from_url(url, decode_responses=True)
    pipeline = PipelineKind(p, noop_credit.name, PAYLOAD)
    bare = BareKind(bench_app(p.settings), bare_credit)
    out: dict[str, Any] = {"runs": runs, "in_flight": in_flight, "rounds": rounds,
                           "concurrency": concurrency}
    with tempfile.TemporaryDirectory() as tmp, \
            worker(worker_env(url), concurrency=concurrency,
                   queues=[*CREDIT_QUEUES, p.settings.default_queue]):
        warm_up([pipeline, bare], concurrency)
        # what is there before: the warm-up's runs, archived and gone, in the baseline
        Archiver(p.store, f"{tmp}/warm", settle_s=0, lag_s=0, archived_retention_s=1).run_once()
        _expired(r, pipeline.run_ids)
        before = footprint(r)
        pipeline.run_ids.clear()
        throughput(pipeline, runs)
        archiver = Archiver(p.store, f"{tmp}/archive", batch=p.settings.archive_batch,
                            settle_s=0, lag_s=0, archived_retention_s=1)
        started = time.perf_counter()
        report = archiver.run_once()
        elapsed = time.perf_counter() - started
        if report.runs != runs or report.error:
            raise RuntimeError(f"archived {report.runs} of {runs}: {report.summary()}")
        out["archive_runs_per_s"] = runs / elapsed
        out["batches"] = len(report.batches)
        _expired(r, pipeline.run_ids)
        out["bytes_per_run"] = (footprint(r) - before) / runs
        bare_before = footprint(r)
        throughput(bare, runs)
        out["bare_bytes_per_run"] = (footprint(r) - bare_before) / runs
        release_results(p.app)

        rates: dict[str, list[float]] = {"pipeline": [], BESIDE: []}
        with archiver_beside(url, f"{tmp}/beside") as beside_proc:
            caught_up(p)  # started, imported, and every run before archived
            for n in range(rounds):
                for beside in ([False, True] if n % 2 == 0 else [True, False]):
                    if beside:  # it archives the runs of the round as they end
                        beside_proc.send_signal(signal.SIGCONT)
                        caught_up(p)  # and what the round without it left
                        rates[BESIDE].append(throughput(pipeline, in_flight))
                    else:
                        beside_proc.send_signal(signal.SIGSTOP)
                        rates["pipeline"].append(throughput(pipeline, in_flight))
    r.close()
    out["throughput_wf_per_s"] = {k: median(v) for k, v in rates.items()}
    out["ratio_throughput_rounds"] = [a / b for a, b in zip(rates[BESIDE], rates["pipeline"],
                                                            strict=True)]
    out["ratio_throughput"] = out["throughput_wf_per_s"][BESIDE] / \
        out["throughput_wf_per_s"]["pipeline"]
    out["bytes_ratio"] = out["bytes_per_run"] / out["bare_bytes_per_run"]
    return out


def _expired(r: redis.Redis, run_ids: Sequence[str], timeout_s: float = 30.0) -> None:
    """Wait until every key of ``run_ids`` is gone (reading a key expires it at once)."""
    deadline = time.monotonic() + timeout_s
    keys = [key for run_id in run_ids for key in RunKeys(run_id).all()]
    while keys and time.monotonic() < deadline:
        keys = [key for key in keys if r.exists(key)]
        time.sleep(0.2)
    if keys:
        raise RuntimeError(f"{len(keys)} keys of archived runs still in Redis")


def report(a: dict[str, Any]) -> str:
    tp = a["throughput_wf_per_s"]
    return table(["figure", "ours", "baseline", "ratio"], [
        [f"archive throughput, one archiver ({a['runs']} runs, {a['batches']} "
         f"batch{'es' * (a['batches'] != 1)})",
         f"{a['archive_runs_per_s']:,.0f} runs/s", "", ""],
        ["Redis bytes per finished run, archived and expired", f"{a['bytes_per_run']:,.0f}",
         f"{a['bare_bytes_per_run']:,.0f} (bare Celery's results)", f"{a['bytes_ratio']:.2f}x"],
        [f"throughput with an archiver beside ({a['in_flight']} in flight, wf/s)",
         f"{tp[BESIDE]:.1f}", f"{tp['pipeline']:.1f} (without)",
         f"{a['ratio_throughput']:.2f}x"],
    ])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="a tiny size, for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.in_flight, args.rounds = 20, 4, 2
    with bench_redis() as url:
        results = measure(url, runs=args.runs, in_flight=args.in_flight, rounds=args.rounds)
    save("archive", results)
    print(report(results))


if __name__ == "__main__":
    main()
