"""The benchmark scripts run (at a tiny size) and write their results.

Speed itself is never asserted here: machines are shared and noisy, so the
figures live in the closing notes and bench/results.json, not in tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

KINDS = {"registry", "in step", "bare step", "pybreaker"}


def test_the_breaker_benchmark_runs_and_reports_every_kind(second_redis_url: str,
                                                            tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.breakers", "--calls", "20", "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PIPELINE_BENCH_REDIS_URL": second_redis_url,
             "PIPELINE_BENCH_RESULTS": str(results)},
    )
    assert done.returncode == 0, done.stderr
    assert all(kind in done.stdout for kind in KINDS)
    breakers = json.loads(results.read_text())["breakers"]
    assert breakers["calls_per_round"] == 20 and set(breakers["calls_per_s"]) == KINDS
    assert breakers["ratio_registry_vs_pybreaker"] > 0
