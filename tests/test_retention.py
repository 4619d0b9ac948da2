"""Retention: a finished run's keys expire after PIPELINE_RETENTION_S; a live run keeps
every key, without a time to live, however long it runs."""

from __future__ import annotations

import pytest

from pipeline import RunStatus
from pipeline.keys import RunKeys
from tests.conftest import Cluster, wait_for
from tests.quick_agents import HOLD_KEY

pytestmark = pytest.mark.workers

RETENTION_S = 2


def keys_of(cluster: Cluster, run_id: str) -> list[str]:
    return sorted(cluster.redis.scan_iter(f"pipeline:{{{run_id}}}:*"))


def test_finished_runs_expire_after_their_retention_and_live_ones_stay(
        cluster: Cluster) -> None:
    cluster.worker(PIPELINE_RETENTION_S=str(RETENTION_S),
                   PIPELINE_CHAOS="tripwire=error:1")
    p = cluster.pipeline(retention_s=RETENTION_S)
    # held before it starts, or its pause could pass before the test holds it
    cluster.redis.set(HOLD_KEY.format(run_id=p.run_id_for("pausing", "live")), "1")
    live = p.start("pausing", {"n": 1}, idempotency_key="live")
    succeeded = [p.start("counting", {"n": i}) for i in range(3)]
    compensated = p.start("saga_fickle", {"n": 1})  # tripwire fails: booked, fickle undone
    finished = [*succeeded, compensated]
    assert [r.wait(timeout=30).status for r in finished] == [RunStatus.SUCCEEDED] * 3 + [
        RunStatus.COMPENSATED]
    for run in finished:
        ttls = [cluster.redis.ttl(k) for k in keys_of(cluster, run.run_id)]
        assert ttls and all(0 < t <= RETENTION_S for t in ttls), (run.run_id, ttls)

    wait_for(lambda: not any(keys_of(cluster, r.run_id) for r in finished), timeout_s=15,
             message="the finished runs to expire")
    held = keys_of(cluster, live.run_id)
    assert RunKeys(live.run_id).run in held and RunKeys(live.run_id).states in held
    assert all(cluster.redis.ttl(k) == -1 for k in held)  # no time to live while it runs
    assert live.info().status is RunStatus.RUNNING

    cluster.redis.delete(HOLD_KEY.format(run_id=live.run_id))
    assert live.wait(timeout=30).status is RunStatus.SUCCEEDED
    wait_for(lambda: not keys_of(cluster, live.run_id), timeout_s=15,
             message="the last run to expire once finished")
