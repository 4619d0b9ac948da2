"""The benchmark scripts run (at a tiny size) and write their results.

Speed itself is never asserted here: machines are shared and noisy, so the
figures live in the closing notes and bench/results.json, not in tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import ROOT

KINDS = {"guard", "registry", "in step", "bare step", "pybreaker"}


def test_the_breaker_benchmark_runs_and_reports_every_kind(second_redis_url: str,
                                                            tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.breakers", "--calls", "20", "--rounds", "1",
         "--threads", "3", "--call-ms", "1", "--duration", "0.1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PIPELINE_BENCH_REDIS_URL": second_redis_url,
             "PIPELINE_BENCH_RESULTS": str(results)},
    )
    assert done.returncode == 0, done.stderr
    assert all(kind in done.stdout for kind in KINDS)
    breakers = json.loads(results.read_text())["breakers"]
    assert breakers["calls_per_round"] == 20 and set(breakers["calls_per_s"]) == KINDS
    assert breakers["ratio_guard_vs_pybreaker"] > 0 and breakers["ratio_registry_vs_pybreaker"] > 0
    many = breakers["concurrent"]
    assert (many["threads"], many["call_ms"], set(many["calls_per_s"])) == (
        3, 1.0, {"guard", "pybreaker"})
    assert all(rate > 0 for rate in many["calls_per_s"].values())


# -- every benchmark at a tiny size, in one run (`python -m bench --quick`) ----------------

MEASURED = ("overhead", "roundtrips", "growth", "archive")
BARE = "bare celery"
DEFAULTS = "bare celery, defaults"


@dataclass(frozen=True)
class QuickBench:
    returncode: int
    stdout: str
    stderr: str
    results: dict[str, Any]

    def section(self, name: str) -> dict[str, Any]:
        assert name in self.results, f"{name} wrote no results:\n{self.stdout}\n{self.stderr}"
        return self.results[name]


@pytest.fixture(scope="module")
def quick_bench(second_redis_url: str, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[QuickBench]:
    """`python -m bench --quick` on the tests' second database, with real worker pools."""
    results = tmp_path_factory.mktemp("bench") / "results.json"
    client = redis.Redis.from_url(second_redis_url)
    client.flushdb()
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", ",".join(MEASURED)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PIPELINE_BENCH_REDIS_URL": second_redis_url,
             "PIPELINE_BENCH_RESULTS": str(results)},
    )
    yield QuickBench(done.returncode, done.stdout, done.stderr,
                     json.loads(results.read_text()) if results.exists() else {})
    client.flushdb()
    client.close()


@pytest.mark.workers
def test_every_benchmark_runs_at_a_tiny_size_and_prints_one_table(quick_bench: QuickBench
                                                                   ) -> None:
    assert quick_bench.returncode == 0, quick_bench.stderr[-3000:]
    assert set(MEASURED) <= set(quick_bench.results)
    table = quick_bench.stdout.split("figure", 1)[1]
    for row in ("throughput, 4 in flight", "latency median", "latency p95",
                "state round trips per step", "all Redis round trips per step",
                "throughput, pool of 1", "throughput, pool of 2", "fan-out of 2",
                "fan-out of 4", "read version 1 of 10 versions",
                "read version 1 of 100 versions", "bytes per finished run",
                "vs bare Celery with its defaults: throughput",
                "archive throughput, one archiver", "archived and expired",
                "throughput with an archiver beside"):
        assert row in table, f"no row {row!r} in:\n{table}"
    assert "not measured" not in table


@pytest.mark.workers
def test_the_overhead_benchmark_reports_throughput_latency_and_their_ratios(
        quick_bench: QuickBench) -> None:
    overhead = quick_bench.section("overhead")
    assert overhead["steps"] == 5 and overhead["in_flight"] == 4
    # the second baseline: bare Celery as a user configures it by default, on its own pool
    for kind in ("pipeline", BARE, DEFAULTS):
        assert overhead["throughput_wf_per_s"][kind] > 0
        assert len(overhead["throughput_rounds"][kind]) == overhead["rounds"]
        assert 0 < overhead["latency_ms"][kind]["median"] <= overhead["latency_ms"][kind]["p95"]
    for ratio in ("ratio_throughput", "ratio_latency_median", "ratio_latency_p95",
                  "ratio_throughput_defaults", "ratio_latency_median_defaults",
                  "ratio_throughput_limits", "ratio_latency_median_limits"):
        assert overhead[ratio] > 0
    assert len(overhead["ratio_throughput_limits_rounds"]) == overhead["rounds"]


@pytest.mark.workers
def test_the_growth_benchmark_reports_pools_fan_out_history_and_memory(
        quick_bench: QuickBench) -> None:
    growth = quick_bench.section("growth")
    assert set(growth["processes"]) == {"1", "2"}
    assert set(growth["fan_out"]) == {"2", "4"}
    for figures in [*growth["processes"].values(), *growth["fan_out"].values()]:
        assert figures["ratio"] > 0
    assert set(growth["history"]["read_v1_us"]) == {"10", "100"}
    assert growth["history"]["ratio"] > 0
    memory = growth["memory"]
    assert memory["pipeline"]["run_keys"] > 0 and memory[BARE]["celery_results"] > 0
    assert memory["ratio"] > 0


@pytest.mark.workers
def test_a_pipeline_step_costs_at_most_two_state_round_trips(quick_bench: QuickBench) -> None:
    """Counted in the task processes, step by step: no machine is too slow for it."""
    trips = quick_bench.section("roundtrips")
    steps = trips["workflows"] * trips["steps_per_workflow"]
    ours = trips["pipeline"]
    assert ours["tasks"] == steps and trips[BARE]["tasks"] == steps
    assert ours["state"]["max_round_trips"] <= 2, ours["state"]
    assert ours["state"]["round_trips"] <= 2
    assert trips["within_budget"]
    # what the workers counted is what the state server executed
    assert trips["state_server"]["agrees"], trips["state_server"]
    assert trips[BARE]["state"]["round_trips"] == 0


@pytest.mark.workers
def test_all_redis_round_trips_of_a_step_average_at_most_four(quick_bench: QuickBench) -> None:
    """Every server, counted in the task processes: a step's open and seal, and what it
    sends on. The chord joins in the seal: a member that does not join sends nothing more,
    the one that joins sends the body, and no step stores a Celery result."""
    ours = quick_bench.section("roundtrips")["pipeline"]
    assert ours["state"]["round_trips"] + ours["broker"]["round_trips"] <= 4.0, ours
    by_step = ours["by_step"]
    assert set(by_step) == {"0:noop_score", "1.0", "1.1", "1.2", "2:noop_approval"}
    assert by_step["1.0"] == by_step["1.1"] == 2  # open, seal
    assert by_step["1.2"] == 3  # open, seal, the body (its message and event in one)
    assert by_step["0:noop_score"] == 5  # open, seal, the three members
    assert by_step["2:noop_approval"] == 2  # the last step sends nothing


@pytest.mark.workers
def test_limits_that_do_not_bind_add_no_round_trip_to_a_step(quick_bench: QuickBench) -> None:
    """Every agent of the same workflow draws on a limit that never binds: its admission
    rides the open round trip and its settlement the seal's, step by step."""
    trips = quick_bench.section("roundtrips")
    plain, limited = trips["pipeline"], trips["pipeline, limits"]
    assert limited["tasks"] == plain["tasks"]
    assert limited["state"]["max_round_trips"] == plain["state"]["max_round_trips"] == 2
    assert {k.replace("lim_", "noop_"): v for k, v in limited["by_step"].items()} \
        == plain["by_step"]
    assert trips["extra_round_trips_per_step_limits"] == pytest.approx(0, abs=1e-9)


def test_the_limiter_benchmark_compares_with_limits_and_celerys_rate_limit(
        second_redis_url: str, tmp_path: Path) -> None:
    """At a tiny size: every kind of limiter call measured, and one global rate reached by
    two real workers each way (the figures themselves are the closing notes')."""
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.limiters", "--quick"], cwd=ROOT, capture_output=True,
        text=True, timeout=300,
        env={**os.environ, "PIPELINE_BENCH_REDIS_URL": second_redis_url,
             "PIPELINE_BENCH_RESULTS": str(results)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(results.read_text())["limiters"]
    assert set(found["calls_per_second"]["calls_per_s"]) == {
        "acquire", "acquire + settle", "in step", "bare step", "limits moving window"}
    rate = found["global_rate"]
    assert rate["tasks"] == 10 and rate["ours"]["per_s"] > 0 and rate["celery"]["per_s"] > 0
    assert "one global rate of 20/s" in done.stdout


@pytest.mark.workers
def test_the_profile_breaks_a_step_down_on_both_sides_of_the_wire() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.profile", "--workflows", "20", "--top", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "100 tasks of each kind" in done.stdout
    for line in ("pipeline ", "bare celery ", "open round trip", "seal round trip",
                 "sending the next task", "open_step.lua", "seal.lua"):
        assert line in done.stdout, f"no {line!r} in:\n{done.stdout}"
    step = next(line for line in done.stdout.splitlines() if line.startswith("the step, all"))
    spent = re.search(r"\)\s+(\d+)\s+\(", step)
    assert spent is not None and int(spent.group(1)) > 0, step  # us a task in run_step


@pytest.mark.workers
def test_the_archive_benchmark_archives_every_run_and_measures_what_is_left(
        quick_bench: QuickBench) -> None:
    archive = quick_bench.section("archive")
    assert archive["archive_runs_per_s"] > 0 and archive["batches"] >= 1
    # an archived run, once expired, leaves its index entry and little else in Redis
    assert 0 < archive["bytes_per_run"] < 1000 < archive["bare_bytes_per_run"]
    assert len(archive["ratio_throughput_rounds"]) == archive["rounds"]
