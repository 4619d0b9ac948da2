"""Overhead: the pipeline against bare Celery on the same canvas, the same workers, one run.

The credit workflow's shape (1 -> 3 parallel -> 1) with agents that do no work
(``bench.noop_agents``), through the pipeline with every pattern on: contracts
checked on both sides of each handoff, the breaker (closed) gating every step,
every output sealed as a version, the run's trace and the step metrics. Against
it, the same canvas of plain Celery tasks: ``chain(task, chord(group(3 tasks),
task))`` on the same queues, sent by the same Celery app (JSON, acks_late,
prefetch 1, the same time limits), served by the same prefork pool. And a second
baseline that shares nothing of the pipeline's settings: bare Celery as a user
configures it by default (``bench.default_app``: its own app and worker, Celery's
default prefetch, acks late), on a pool of the same size, measured in each round
after the other two, their pool stopped. Rounds alternate the order of the kinds.

- throughput: ``--in-flight`` workflows started at once, workflows/s until the last ends;
- latency: end to end (start to result in hand), one workflow at a time.

Usage: python -m bench.overhead [--concurrency 2] [--in-flight 50] [--latency-runs 30]
                                [--rounds 6] [--quick]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

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
    p95,
    release_results,
    save,
    table,
    throughput,
    warm_up,
    worker,
    worker_env,
)
from bench.default_app import QUEUE as DEFAULT_QUEUE
from bench.default_app import DefaultKind
from bench.noop_agents import CREDIT_QUEUES, bare_credit, noop_credit, noop_limited_credit

PAYLOAD = {"n": 0}
LIMITED = "pipeline, limits"
"""The same workflow, every agent drawing on a limit that never binds."""


def measure(url: str, *, concurrency: int, in_flight: int, latency_runs: int,
            rounds: int) -> dict[str, Any]:
    p = client(url)
    pipeline = PipelineKind(p, noop_credit.name, PAYLOAD)
    bare = BareKind(bench_app(p.settings), bare_credit)
    limited = PipelineKind(p, noop_limited_credit.name, PAYLOAD, name=LIMITED)
    defaults = DefaultKind(url)
    kinds: list[Kind] = [pipeline, bare, limited]
    rates: dict[str, list[float]] = {k.name: [] for k in [*kinds, defaults]}
    times: dict[str, list[float]] = {k.name: [] for k in [*kinds, defaults]}

    def measure_round(kinds: list[Kind], r: int) -> None:
        """The throughput, then the latency, of each kind, in alternating order."""
        for kind in in_order(kinds, r):
            rates[kind.name].append(throughput(kind, in_flight))
        for kind in in_order(kinds, r):
            times[kind.name] += latencies_ms(kind, latency_runs)

    queues = [*CREDIT_QUEUES, p.settings.default_queue]
    for r in range(rounds):
        # the pipeline and the bare canvas on the pipeline's pool, then the default-configured
        # baseline on a pool of its own, the other one stopped: each round, so that a machine
        # that drifts weighs on all three alike, and never two pools side by side
        with worker(worker_env(url), concurrency=concurrency, queues=queues):
            warm_up(kinds, concurrency)
            measure_round(kinds, r)
            release_results(p.app)
        with worker(worker_env(url), concurrency=concurrency, queues=[DEFAULT_QUEUE],
                    app="bench.default_app"):
            warm_up([defaults], concurrency)
            measure_round([defaults], r)
    steps = len(noop_credit.agents())
    tp = {name: median(v) for name, v in rates.items()}
    lat = {name: {"median": median(v), "p95": p95(v)} for name, v in times.items()}
    return {
        "workflow": noop_credit.name, "shape": noop_credit.shape(), "steps": steps,
        "concurrency": concurrency, "in_flight": in_flight, "latency_runs": latency_runs,
        "rounds": rounds,
        "throughput_wf_per_s": tp, "throughput_rounds": rates,
        "latency_ms": lat,
        "ratio_throughput": tp["pipeline"] / tp["bare celery"],
        # each round's own ratio: the spread a machine's noise leaves on the median's
        "ratio_throughput_rounds": [a / b for a, b in zip(rates["pipeline"],
                                                          rates["bare celery"], strict=True)],
        "ratio_throughput_defaults_rounds": [
            a / b for a, b in zip(rates["pipeline"], rates[defaults.name], strict=True)],
        "ratio_latency_median": lat["pipeline"]["median"] / lat["bare celery"]["median"],
        "ratio_latency_p95": lat["pipeline"]["p95"] / lat["bare celery"]["p95"],
        "ratio_throughput_defaults": tp["pipeline"] / tp[defaults.name],
        "ratio_latency_median_defaults": lat["pipeline"]["median"] / lat[defaults.name]["median"],
        "ratio_throughput_limits": tp[LIMITED] / tp["pipeline"],
        "ratio_throughput_limits_rounds": [a / b for a, b in zip(rates[LIMITED],
                                                                 rates["pipeline"], strict=True)],
        "ratio_latency_median_limits": lat[LIMITED]["median"] / lat["pipeline"]["median"],
        "added_ms_per_step": (lat["pipeline"]["median"] - lat["bare celery"]["median"]) / steps,
    }


def spread(ratios: Sequence[float]) -> str:
    """The lowest and highest of the rounds' ratios: ``0.97-1.12x``."""
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


def report(r: dict[str, Any]) -> str:
    tp, lat = r["throughput_wf_per_s"], r["latency_ms"]
    rows: list[list[Any]] = [
        [name, f"{tp[name]:.1f}", f"{lat[name]['median']:.1f}", f"{lat[name]['p95']:.1f}"]
        for name in tp
    ]
    rows.append(["pipeline / bare", f"{r['ratio_throughput']:.2f}x "
                 f"({spread(r['ratio_throughput_rounds'])})",
                 f"{r['ratio_latency_median']:.2f}x", f"{r['ratio_latency_p95']:.2f}x"])
    rows.append(["pipeline / bare, defaults", f"{r['ratio_throughput_defaults']:.2f}x "
                 f"({spread(r['ratio_throughput_defaults_rounds'])})",
                 f"{r['ratio_latency_median_defaults']:.2f}x", ""])
    rows.append(["limits (not binding) / without", f"{r['ratio_throughput_limits']:.2f}x "
                 f"({spread(r['ratio_throughput_limits_rounds'])})",
                 f"{r['ratio_latency_median_limits']:.2f}x", ""])
    head = (f"overhead: {r['workflow']} ({r['shape']}), prefork pool of {r['concurrency']}, "
            f"{r['rounds']} alternating rounds of {r['in_flight']} in flight and "
            f"{r['latency_runs']} one at a time")
    return "\n".join([head, table(["", "workflows/s", "latency ms", "p95 ms"], rows),
                      f"the pipeline adds {r['added_ms_per_step']:.2f} ms of latency per step "
                      "(median)"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=2, help="prefork pool processes")
    parser.add_argument("--in-flight", type=int, default=50,
                        help="workflows started at once in a throughput round")
    parser.add_argument("--latency-runs", type=int, default=30,
                        help="workflows run one at a time in a latency round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="a tiny size, for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.in_flight, args.latency_runs, args.rounds = 4, 3, 2
    with bench_redis() as url:
        result = measure(url, concurrency=args.concurrency, in_flight=args.in_flight,
                         latency_runs=args.latency_runs, rounds=args.rounds)
    print(report(result))
    save("overhead", result)


if __name__ == "__main__":
    main()
