"""Redis faults: a restart in the middle of runs (append-only persistence) loses none of
them, and a client that cannot reach Redis is told so and enqueues nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import redis

from pipeline import Pipeline, RunStatus
from pipeline.app import create_app
from pipeline.embedded import EmbeddedRedis
from pipeline.errors import StoreUnavailable
from pipeline.invariants import verify
from pipeline.local import BeatProcess, WorkerProcess
from tests.conftest import ROOT, Cluster, settings_for, wait_for, worker_env

LEASE_S = 2


@pytest.fixture
def aof_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(appendonly=True) as server:
        yield server


@pytest.mark.workers
def test_a_redis_restart_in_the_middle_of_runs_loses_none_of_them(
        aof_redis: EmbeddedRedis) -> None:
    """State, broker and results on one append-only Redis, restarted while steps run,
    sit in queues and wait to be sealed: every run still ends, each step sealed once.

    As in a deployment, beat runs the sweeper: a message popped around the restart can be
    lost to kombu's Redis transport (it records a popped message unacked in a second
    command), and only the sweeper's re-drive brings its run back (without beat, the test
    once waited 120 s for a run at version 0, on a loaded machine)."""
    url = aof_redis.url
    settings = settings_for(url, lease_s=LEASE_S)
    p = Pipeline(settings=settings, app=create_app(settings, fail_fast=True))
    env = worker_env(url, PIPELINE_LEASE_S=str(LEASE_S), PIPELINE_SWEEP_INTERVAL_S="1")
    with WorkerProcess(env=env, concurrency=2, cwd=str(ROOT)) as worker, \
            BeatProcess(env=env, cwd=str(ROOT)):
        runs = [p.start("slow_counting", {"n": i, "sleep_s": 0.3}) for i in range(12)]
        runs += [p.start("counting", {"n": i}) for i in range(12)]
        wait_for(lambda: any(r.info().status is RunStatus.SUCCEEDED for r in runs),
                 timeout_s=30, message="the first run to finish")
        before = sum(r.info().status is RunStatus.SUCCEEDED for r in runs)
        assert before < len(runs), "every run finished before the restart: nothing tested"
        aof_redis.restart()
        results = {r.run_id: r.wait(timeout=120) for r in runs}
        log = worker.tail(200_000)
    failed = {run_id: (r.status.value, r.error) for run_id, r in results.items()
              if r.status is not RunStatus.SUCCEEDED}
    assert not failed, (failed, [p.store.log(run_id) for run_id in failed], log[-3000:])
    assert [results[r.run_id].output for r in runs[:12]] == [{"n": i + 1} for i in range(12)]
    assert [results[r.run_id].output for r in runs[12:]] == [{"n": (i + 1) * 2}
                                                            for i in range(12)]
    verdict = verify(p.store, [r.run_id for r in runs])
    assert verdict.ok, verdict.violations
    assert verdict.runs == 24 and verdict.by_status == {"succeeded": 24}


def test_a_client_that_cannot_reach_redis_is_told_and_enqueues_nothing(
        cluster: Cluster) -> None:
    """The state Redis is down, the broker up: nothing reaches the broker."""
    settings = settings_for(cluster.url)
    down = "redis://:s3cret@127.0.0.1:1/0"
    p = Pipeline(settings=dataclasses.replace(settings, redis_url=down))
    with pytest.raises(StoreUnavailable) as e:
        p.start("counting", {"n": 1})
    message = str(e.value)
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in message
    assert "s3cret" not in message
    broker = redis.Redis.from_url(cluster.url)
    assert [k for k in broker.keys("*") if not k.startswith(b"_kombu")] == []
