"""The invariant checker (``pipeline verify``) finds what it must, on runs written for
real and then broken by hand: a checker that cannot fail proves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline import RunStatus
from pipeline.invariants import verify
from pipeline.keys import RunKeys
from tests.conftest import ROOT, Cluster, worker_env

pytestmark = pytest.mark.workers


def rules(cluster: Cluster, run_id: str) -> list[tuple[str, str]]:
    verdict = verify(cluster.pipeline().store, [run_id])
    return [(v.rule, v.detail) for v in verdict.violations]


def test_finished_runs_hold_every_invariant_and_broken_ones_are_named(cluster: Cluster) -> None:
    cluster.worker(PIPELINE_CHAOS="tripwire=error:1")
    p = cluster.pipeline()
    ok = p.start("counting", {"n": 1})
    undone = p.start("saga_fickle", {"n": 1})
    assert ok.wait(30).status is RunStatus.SUCCEEDED
    assert undone.wait(30).status is RunStatus.COMPENSATED
    verdict = verify(p.store, [ok.run_id, undone.run_id])
    assert verdict.ok and verdict.runs == 2 and verdict.compensations == 2
    assert verdict.by_status == {"succeeded": 1, "compensated": 1}

    r = cluster.redis
    # a payload changed behind the pipeline's back (the stream written anew, entry by
    # entry, one payload altered): the digest no longer matches
    states = RunKeys(ok.run_id).states
    entries = r.xrange(states)
    r.delete(states)
    for sid, fields in entries:
        r.xadd(states, {**fields, "payload": '{"n":999}'} if sid == "1-1" else fields, id=sid)
    assert rules(cluster, ok.run_id) == [
        ("versions", "version 1 (agent increment): digest does not match its payload")]

    # a compensation recorded twice
    r.xadd(RunKeys(undone.run_id).log, {"event": "compensation.done", "step": "0:booked"})
    assert rules(cluster, undone.run_id) == [
        ("compensation", "step 0:booked compensated 2 time(s) (dead 0 time(s)); "
                         "expected exactly once")]

    # a run left running, with a gap in its versions
    stuck = p.start("pausing", {"n": 1})
    stuck.wait(30)
    r.hset(RunKeys(stuck.run_id).run, "status", "running")
    r.xdel(RunKeys(stuck.run_id).states, "2-1")
    found = rules(cluster, stuck.run_id)
    assert ("finished", "still running") in found
    assert ("versions", "version 3 is stream entry 3-1, expected 2-1: not contiguous from 0") \
        in found


def test_pipeline_verify_exits_1_and_names_the_run_when_an_invariant_breaks(
        cluster: Cluster) -> None:
    cluster.worker()
    p = cluster.pipeline()
    run = p.start("counting", {"n": 1})
    assert run.wait(30).status is RunStatus.SUCCEEDED
    env = worker_env(cluster.url)

    def verify_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", *args],
                              cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=60)

    done = verify_cli("--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["ok"] is True
    cluster.redis.xadd(RunKeys(run.run_id).log, {"event": "compensation.done", "step": "x"})
    done = verify_cli(run.run_id)
    assert done.returncode == 1
    assert f"run {run.run_id}: compensation: a succeeded run has compensations" in done.stdout
    assert done.stdout.startswith("1 run(s) (1 succeeded), 3 version(s), 1 compensation(s): "
                                  "1 violation(s)")
