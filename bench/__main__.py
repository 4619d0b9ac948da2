"""Every benchmark, then one table: ``python -m bench [--quick] [--only overhead,growth]``.

Each script runs in a process of its own, prints its own table and writes its
section of bench/results.json (PIPELINE_BENCH_RESULTS); a script that fails is
reported and the others still run. The table is read back from the results
file, so it shows only what was measured in this run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.archive import BESIDE
from bench.common import RESULTS, ROOT, table
from bench.overhead import LIMITED, spread

SCRIPTS = ("overhead", "roundtrips", "growth", "breakers", "limiters", "archive")
QUICK = {"breakers": ["--calls", "20", "--rounds", "1", "--duration", "0.1"]}
"""How to run each script at a tiny size (the others take ``--quick``)."""
BARE = "bare celery"
DEFAULTS = "bare celery, defaults"
"""Bare Celery as a user configures it by default (``bench.default_app``)."""

Row = list[str]


def overhead_rows(r: dict[str, Any]) -> list[Row]:
    tp, lat = r["throughput_wf_per_s"], r["latency_ms"]
    shape = f"{r['steps']}-step credit shape, pool of {r['concurrency']}"
    return [
        [f"throughput, {r['in_flight']} in flight (wf/s)", f"{tp['pipeline']:.1f}",
         f"{tp[BARE]:.1f}", f"{r['ratio_throughput']:.2f}x", ">= 1.05x"],
        [f"  the {r['rounds']} rounds' ratios", "", "", spread(r["ratio_throughput_rounds"]),
         ""],
        ["latency median (ms), one at a time", f"{lat['pipeline']['median']:.1f}",
         f"{lat[BARE]['median']:.1f}", f"{r['ratio_latency_median']:.2f}x", "<= 1.00x"],
        ["latency p95 (ms)", f"{lat['pipeline']['p95']:.1f}", f"{lat[BARE]['p95']:.1f}",
         f"{r['ratio_latency_p95']:.2f}x", ""],
        ["  vs bare Celery with its defaults: throughput", f"{tp['pipeline']:.1f}",
         f"{tp[DEFAULTS]:.1f}", f"{r['ratio_throughput_defaults']:.2f}x",
         spread(r["ratio_throughput_defaults_rounds"])],
        ["  vs bare Celery with its defaults: latency median",
         f"{lat['pipeline']['median']:.1f}", f"{lat[DEFAULTS]['median']:.1f}",
         f"{r['ratio_latency_median_defaults']:.2f}x", ""],
        ["  every agent on a limit that never binds: throughput",
         f"{tp[LIMITED]:.1f}", f"{tp['pipeline']:.1f} (without)",
         f"{r['ratio_throughput_limits']:.2f}x "
         f"({spread(r['ratio_throughput_limits_rounds'])})", ">= 0.97x"],
        [f"  ({shape}, {r['rounds']} alternating rounds)", "", "", "", ""],
    ]


def roundtrips_rows(r: dict[str, Any]) -> list[Row]:
    ours, s = r["pipeline"], r["state_server"]
    state = ours["state"]
    every = state["round_trips"] + ours["broker"]["round_trips"]
    return [
        ["state round trips per step (most)",
         f"{state['round_trips']:.2f} ({state['max_round_trips']})", "0", "",
         f"<= {r['budget_round_trips_per_step']}"],
        ["  EVALSHA / commands per step", f"{s['evalsha_per_step']:.2f} / "
         f"{state['commands']:.2f}", "", "", ""],
        ["all Redis round trips per step", f"{every:.2f}",
         f"{r[BARE]['broker']['round_trips']:.2f}", f"{r['extra_round_trips_per_step']:+.2f}",
         "<= 4.0"],
        ["  every agent on a limit (not binding): more round trips per step",
         f"{r['extra_round_trips_per_step_limits']:+.2f}", "", "", "+0.00"],
    ]


def growth_rows(g: dict[str, Any]) -> list[Row]:
    rows = []
    for n, e in g["processes"].items():
        tp = e["throughput_wf_per_s"]
        rows.append([f"throughput, pool of {n} (wf/s)", f"{tp['pipeline']:.1f}",
                     f"{tp[BARE]:.1f}", f"{e['ratio']:.2f}x", ""])
    for w, e in g["fan_out"].items():
        ms = e["latency_ms"]
        rows.append([f"fan-out of {w}, latency (ms)", f"{ms['pipeline']:.1f}",
                     f"{ms[BARE]:.1f}", f"{e['ratio']:.2f}x", "linear"])
    read = g["history"]["read_v1_us"]
    sizes = list(read)
    for n in sizes:
        rows.append([f"read version 1 of {n} versions (us)", f"{read[n]:.0f}", "", "", ""])
    rows.append([f"  {sizes[-1]} versions / {sizes[0]}", "", "", f"{g['history']['ratio']:.2f}x",
                 "<= 2x"])
    m = g["memory"]
    rows.append(["bytes per finished run", f"{m['pipeline']['total']:,.0f}",
                 f"{m[BARE]['total']:,.0f}", f"{m['ratio']:.1f}x", ""])
    return rows


def breakers_rows(b: dict[str, Any]) -> list[Row]:
    rates, many = b["calls_per_s"], b["concurrent"]
    return [
        ["breaker guarded calls/s, one caller, no-op", f"{rates['guard']:,.0f}",
         f"{rates['pybreaker']:,.0f}", f"{b['ratio_guard_vs_pybreaker']:.2f}x", ">= 2x"],
        [f"  {many['threads']} callers, {many['call_ms']:g} ms call (at most "
         f"{many['ceiling']:,.0f})", f"{many['calls_per_s']['guard']:,.0f}",
         f"{many['calls_per_s']['pybreaker']:,.0f}", f"{many['ratio_guard_vs_pybreaker']:.2f}x",
         ">= 2x"],
        ["  in a step: added cost per call (us)", f"{b['in_step_added_us']:.0f}",
         f"{b['pybreaker_us_per_call']:.0f}", f"{1 / b['in_step_cost_ratio']:.2f}x", ""],
    ]


def limiters_rows(r: dict[str, Any]) -> list[Row]:
    c, g = r["calls_per_second"], r["global_rate"]
    rates = c["calls_per_s"]
    return [
        ["limiter calls/s, one caller: acquire", f"{rates['acquire']:,.0f}",
         f"{rates['limits moving window']:,.0f} (limits)", f"{c['ratio_acquire_vs_limits']:.2f}x",
         ""],
        ["  acquire + settle (concurrency, tokens)", f"{rates['acquire + settle']:,.0f}",
         f"{rates['limits moving window']:,.0f} (limits)", f"{c['ratio_call_vs_limits']:.2f}x",
         ""],
        [f"one global rate of {g['intended_per_s']}/s, 2 workers: busiest second",
         f"{g['ours']['peak_per_s']}", f"{g['celery']['peak_per_s']} (rate_limit)",
         f"{g['ours']['over_intended']:.2f}x / {g['celery']['over_intended']:.2f}x",
         "1.00x"],
        ["  mean calls/s over the batch", f"{g['ours']['per_s']:.1f}",
         f"{g['celery']['per_s']:.1f} (rate_limit)",
         f"{g['ours']['mean_of_intended']:.2f}x / {g['celery']['mean_of_intended']:.2f}x", ""],
    ]


def archive_rows(a: dict[str, Any]) -> list[Row]:
    tp = a["throughput_wf_per_s"]
    return [
        [f"archive throughput, one archiver ({a['runs']} runs)",
         f"{a['archive_runs_per_s']:,.0f} runs/s", "", "", ""],
        ["Redis bytes per finished run, archived and expired", f"{a['bytes_per_run']:,.0f}",
         f"{a['bare_bytes_per_run']:,.0f} (results)", f"{a['bytes_ratio']:.2f}x", "< 1,000"],
        ["throughput with an archiver beside (wf/s)", f"{tp[BESIDE]:.1f}",
         f"{tp['pipeline']:.1f} (without)",
         f"{a['ratio_throughput']:.2f}x ({spread(a['ratio_throughput_rounds'])})", ">= 0.97x"],
    ]


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "overhead": overhead_rows, "roundtrips": roundtrips_rows, "growth": growth_rows,
    "breakers": breakers_rows, "limiters": limiters_rows, "archive": archive_rows,
}


def summary(results: dict[str, Any], scripts: Sequence[str]) -> str:
    rows: list[Row] = []
    for name in scripts:
        if name in results:
            rows += ROWS[name](results[name])
        else:
            rows.append([f"{name}: not measured (the script failed)", "", "", "", ""])
    machine: dict[str, Any] = next((r["machine"] for r in results.values() if "machine" in r), {})
    head = (f"bench: python {machine.get('python', '?')}, {machine.get('cpus', '?')} cpus; "
            "baseline = the same canvas of plain Celery tasks on the same pool, in the same "
            "run (pybreaker for the breaker)")
    return head + "\n" + table(["figure", "pipeline", "baseline", "ratio", "goal"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every script at a tiny size")
    parser.add_argument("--only", type=lambda s: [x for x in s.split(",") if x],
                        default=list(SCRIPTS), help=f"some of {','.join(SCRIPTS)}")
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(SCRIPTS)
    if unknown:
        parser.error(f"no benchmark {', '.join(sorted(unknown))}; there are {', '.join(SCRIPTS)}")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in args.only:  # a failed script must not show an older run's figures
        results.pop(name, None)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    failed = []
    started = time.monotonic()
    for name in args.only:
        extra = (QUICK.get(name, ["--quick"]) if args.quick else [])
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", f"bench.{name}", *extra], cwd=ROOT)
        print(f"   ({time.monotonic() - t0:.0f} s)\n", flush=True)
        if done.returncode != 0:
            failed.append(name)
    results = json.loads(RESULTS.read_text())
    print(summary(results, args.only))
    print(f"\n{len(args.only)} benchmarks in {time.monotonic() - started:.0f} s; "
          f"results in {RESULTS}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
