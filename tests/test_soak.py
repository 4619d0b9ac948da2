"""The chaos soak and the load run, at a small size: every run finished, no invariant
broken, whole workers killed and their steps handed out again (the full sizes are
`make soak` and `make load`; their figures are in the closing notes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, Cluster

pytestmark = pytest.mark.workers


@pytest.mark.timeout(480)
def test_a_short_chaos_soak_keeps_every_invariant(cluster: Cluster) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--runs", "150", "--kill-every", "2",
         "--lease", "3", "--timeout", "300", "--seed", "7", "--json",
         "--chaos", "credit_score=error:0.05,income_verification=crash:0.05,"
                    "risk_assessment=bad_output:0.05,fraud_detection=error:0.05"],
        cwd=ROOT, capture_output=True, text=True, timeout=420,
        env={**os.environ, "PIPELINE_BENCH_REDIS_URL": cluster.url},
    )
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert done.returncode == 0, (report["invariants"]["violations"], done.stderr[-3000:])
    assert report["unfinished"] == 0 and sum(report["by_status"].values()) == 150
    assert report["invariants"]["violations"] == [] and report["invariants"]["runs"] == 150
    assert report["workers_killed"] >= 1
    assert set(report["by_status"]) <= {"succeeded", "compensated", "failed",
                                        "compensation_failed"}
    assert report["by_status"].get("succeeded", 0) > 0
    # archived as it went (its archiver killed too): every run once in the tables, and read
    # back from them by the checker once Redis let it go
    archive = report["archive"]
    assert (archive["archived"], archive["not_once"], archive["versions_not_once"]) \
        == (150, [], [])
    assert archive["recalled"] == 150


def test_a_load_of_runs_started_at_once_all_finish_and_expire(cluster: Cluster) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.load", "--runs", "150", "--retention", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIPELINE_BENCH_REDIS_URL": cluster.url},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "by status: {'succeeded': 150}; invariants: 0 violation(s) over 150 runs" \
        in done.stdout
    assert re.search(r"every finished run's keys gone \d+s after the last finished; the live "
                     r"run kept its \d+ keys, without a time to live", done.stdout)
