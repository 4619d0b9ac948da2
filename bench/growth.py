"""Growth: how the pipeline's cost grows with pool size, fan-out width, history, runs kept.

- processes: throughput of the credit shape with a prefork pool of 1 and of 2
  processes (Celery's "worker processes", ``--concurrency``), pipeline and bare
  Celery in alternating rounds on the same pool;
- fan-out: latency of ``parallel(N no-op agents)`` then a join, for each width,
  against ``chord(group(N tasks), task)`` of plain Celery tasks, one at a time;
- history: reading version 1 (``StateStore.get``) of a run with 10 versions and of
  one with 10,000 (sealed directly with the store, no workers);
- memory: what a finished run of the credit shape leaves in Redis (``MEMORY
  USAGE`` of every key it left: the run's own keys, its entry in the runs index,
  Celery's stored results), against the same canvas of bare Celery tasks.

Usage: python -m bench.growth [--processes 1,2] [--concurrency 2] [--in-flight 50]
       [--widths 2,8,32,128] [--versions 10,10000] [--memory-runs 20] [--rounds 4] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis

from bench.common import (
    BareKind,
    Kind,
    PipelineKind,
    bench_app,
    bench_redis,
    client,
    in_order,
    latencies_ms,
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
from bench.noop_agents import (
    CREDIT_QUEUES,
    FANOUT_WIDTHS,
    bare_credit,
    bare_fanout,
    fanouts,
    noop_credit,
)
from pipeline.keys import RUNS_INDEX, RunKeys
from pipeline.state import StateStore, connect

PAYLOAD = {"n": 0}
BARE = "bare celery"
MEMORY_PARTS = ("run_keys", "runs_index", "celery_results")


def by_processes(url: str, processes: Sequence[int], *, in_flight: int,
                 rounds: int) -> dict[str, Any]:
    """Workflows/s of each kind with each pool size."""
    out: dict[str, Any] = {}
    for n in processes:
        p = client(url)
        kinds: list[Kind] = [PipelineKind(p, noop_credit.name, PAYLOAD),
                             BareKind(bench_app(p.settings), bare_credit)]
        rates: dict[str, list[float]] = {k.name: [] for k in kinds}
        with worker(worker_env(url), concurrency=n,
                    queues=[*CREDIT_QUEUES, p.settings.default_queue]):
            warm_up(kinds, n)
            for r in range(rounds):
                for kind in in_order(kinds, r):
                    rates[kind.name].append(throughput(kind, in_flight))
            release_results(p.app)
        tp = {name: median(v) for name, v in rates.items()}
        out[str(n)] = {"throughput_wf_per_s": tp, "ratio": tp["pipeline"] / tp[BARE]}
    first = out[str(processes[0])]["throughput_wf_per_s"]
    for n in processes:
        tp = out[str(n)]["throughput_wf_per_s"]
        out[str(n)]["scaling"] = {name: tp[name] / first[name] for name in tp}
    return out


def fan_out(p: Any, bare_app: Any, widths: Sequence[int], *, runs: int,
            rounds: int) -> dict[str, Any]:
    """Median end-to-end latency of each width, one workflow at a time."""
    out: dict[str, Any] = {}
    for width in widths:
        kinds: list[Kind] = [
            PipelineKind(p, fanouts[width].name, PAYLOAD),
            BareKind(bare_app, functools.partial(bare_fanout, width=width)),
        ]
        times: dict[str, list[float]] = {k.name: [] for k in kinds}
        for kind in kinds:
            latencies_ms(kind, 1)  # warm: this width's scripts, tasks and queues
        for r in range(rounds):
            for kind in in_order(kinds, r):
                times[kind.name] += latencies_ms(kind, runs)
        ms = {name: median(v) for name, v in times.items()}
        out[str(width)] = {"latency_ms": ms,
                           "ms_per_member": {name: v / width for name, v in ms.items()},
                           "ratio": ms["pipeline"] / ms[BARE]}
    return out


def memory(p: Any, bare_app: Any, url: str, *, runs: int) -> dict[str, Any]:
    """Bytes a finished run leaves in Redis, by where they are, for each kind."""
    r = redis.Redis.from_url(url, decode_responses=True)
    pipeline = PipelineKind(p, noop_credit.name, PAYLOAD)
    bare = BareKind(bare_app, bare_credit)
    out: dict[str, Any] = {}
    for kind in (pipeline, bare):
        before_keys, before_index = _celery_keys(r), memory_usage(r, [RUNS_INDEX])
        latencies_ms(kind, runs)
        celery = _celery_keys(r) - before_keys
        out[kind.name] = {"celery_results": memory_usage(r, sorted(celery)) / runs,
                          "celery_keys": len(celery) / runs}
        if kind is pipeline:
            sizes = [[memory_usage(r, [key]) for key in RunKeys(run_id).all()]
                     for run_id in pipeline.run_ids]
            names = [key.rsplit(":", 1)[1] for key in RunKeys("run").all()]
            out[kind.name]["run_keys"] = median([sum(run) for run in sizes])
            out[kind.name]["run_keys_by_key"] = {
                name: median([run[i] for run in sizes]) for i, name in enumerate(names)
                if any(run[i] for run in sizes)}
            out[kind.name]["runs_index"] = (memory_usage(r, [RUNS_INDEX]) - before_index) / runs
    for entry in out.values():
        entry["total"] = sum(entry.get(part, 0) for part in MEMORY_PARTS)
    out["ratio"] = out["pipeline"]["total"] / out[BARE]["total"]
    r.close()
    return out


def _celery_keys(r: redis.Redis) -> set[str]:
    return set(r.scan_iter("celery-task-meta-*", count=1000))


def history(url: str, sizes: Sequence[int], *, reads: int, rounds: int) -> dict[str, Any]:
    """Microseconds to read version 1 of a run with each number of versions."""
    store = StateStore(connect(url))
    runs: dict[int, str] = {}
    try:
        for n in sizes:
            run_id = runs[n] = f"bench-history-{n}-{uuid.uuid4().hex[:8]}"
            store.create_run(run_id, workflow=noop_credit.name, payload=PAYLOAD,
                             contract="bench_noop@1")
            for v in range(1, n):
                store.seal(run_id, step=f"s{v}", agent="noop_score", contract="bench_noop@1",
                           payload={"n": v}, parents=[v - 1])
        us: dict[int, list[float]] = {n: [] for n in sizes}
        for n in sizes:
            store.get(runs[n], 1)  # warm
        for r in range(rounds):
            for n in (sizes if r % 2 == 0 else list(reversed(sizes))):
                start = time.perf_counter()
                for _ in range(reads):
                    store.get(runs[n], 1)
                us[n].append((time.perf_counter() - start) / reads * 1e6)
    finally:
        for run_id in runs.values():  # live runs never expire: remove them
            store.delete_run(run_id)
    read = {str(n): median(v) for n, v in us.items()}
    return {"read_v1_us": read, "ratio": read[str(sizes[-1])] / read[str(sizes[0])]}


def report(g: dict[str, Any]) -> str:
    lines = [f"growth: prefork pools of {', '.join(g['processes'])} processes; fan-out and "
             f"memory on a pool of {g['concurrency']}; {g['rounds']} alternating rounds"]
    rows = []
    for n, e in g["processes"].items():
        tp = e["throughput_wf_per_s"]
        rows.append([f"{n} process{'es' if n != '1' else ''}", f"{tp['pipeline']:.1f}",
                     f"{tp[BARE]:.1f}", f"{e['ratio']:.2f}x",
                     f"{e['scaling']['pipeline']:.2f}x / {e['scaling'][BARE]:.2f}x"])
    lines.append(table(["throughput (workflows/s)", "pipeline", BARE, "ratio",
                        "scaling p / b"], rows))
    rows = []
    for w, e in g["fan_out"].items():
        ms, per = e["latency_ms"], e["ms_per_member"]
        rows.append([f"width {w}", f"{ms['pipeline']:.1f}", f"{ms[BARE]:.1f}", f"{e['ratio']:.2f}x",
                     f"{per['pipeline']:.2f} / {per[BARE]:.2f}"])
    lines.append(table(["fan-out latency (ms)", "pipeline", BARE, "ratio", "ms/member p / b"],
                       rows))
    h = g["history"]["read_v1_us"]
    rows = [[f"{n} versions", f"{us:.0f}"] for n, us in h.items()]
    rows.append(["largest / smallest", f"{g['history']['ratio']:.2f}x"])
    lines.append(table(["read version 1 (us)", "pipeline"], rows))
    m = g["memory"]
    rows = [[part, f"{m['pipeline'].get(part, 0):,.0f}", f"{m[BARE].get(part, 0):,.0f}"]
            for part in (*MEMORY_PARTS, "total")]
    rows.append(["pipeline / bare", f"{m['ratio']:.1f}x", ""])
    lines.append(table(["bytes per finished run", "pipeline", BARE], rows))
    lines.append("the run's keys: " + ", ".join(
        f"{name} {n:,.0f}" for name, n in m["pipeline"]["run_keys_by_key"].items()))
    return "\n\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=_ints, default=[1, 2],
                        help="prefork pool sizes to compare")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="pool size for the fan-out and memory runs")
    parser.add_argument("--in-flight", type=int, default=50)
    parser.add_argument("--widths", type=_ints, default=[2, 8, 32, 128],
                        help=f"fan-out widths, among {FANOUT_WIDTHS}")
    parser.add_argument("--fan-out-runs", type=int, default=5,
                        help="workflows of each width and kind a round, one at a time")
    parser.add_argument("--versions", type=_ints, default=[10, 10_000])
    parser.add_argument("--reads", type=int, default=2000, help="reads of version 1 a round")
    parser.add_argument("--memory-runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a tiny size, for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.in_flight, args.widths, args.fan_out_runs, args.versions = 4, [2, 4], 1, [10, 100]
        args.reads, args.memory_runs, args.rounds = 20, 2, 2
    unknown = set(args.widths) - set(FANOUT_WIDTHS)
    if unknown:
        parser.error(f"no fan-out of width {sorted(unknown)} in bench.noop_agents; "
                     f"widths: {FANOUT_WIDTHS}")
    with bench_redis() as url:
        result: dict[str, Any] = {
            "concurrency": args.concurrency, "in_flight": args.in_flight, "rounds": args.rounds,
            "history": history(url, args.versions, reads=args.reads, rounds=args.rounds),
            "processes": by_processes(url, args.processes, in_flight=args.in_flight,
                                      rounds=args.rounds),
        }
        p = client(url)
        bare_app = bench_app(p.settings)
        with worker(worker_env(url), concurrency=args.concurrency):
            result["fan_out"] = fan_out(p, bare_app, args.widths, runs=args.fan_out_runs,
                                        rounds=args.rounds)
            result["memory"] = memory(p, bare_app, url, runs=args.memory_runs)
            result["memory"]["runs"] = args.memory_runs
            release_results(p.app)
    print(report(result))
    save("growth", result)


if __name__ == "__main__":
    main()
