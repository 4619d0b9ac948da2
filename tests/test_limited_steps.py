"""Steps that draw on named limits, on real workers: a limit that binds throttles a step
(not run, not failed, not counted as an attempt, a retry or a breaker failure) and sends it
again after the wait it computed; tokens reserved at the open are settled at the seal; a
step that waited too long, or can never pass, takes its agent's fallback."""

from __future__ import annotations

import uuid

import pytest
import redis

import tests.agents  # noqa: F401 - the contracts, the agents and the limits they draw on
from pipeline import BreakerRegistry, Limiter, Pipeline, RunStatus, agents
from pipeline.limits import limit_states
from pipeline.observe import report
from tests.conftest import Cluster
from tests.limit_agents import IN_FLIGHT_KEY

pytestmark = pytest.mark.workers


def throttled_rows(p: Pipeline, run_id: str) -> list[dict[str, str]]:
    return [e for e in p.store.log(run_id) if e["event"] == "step.throttled"]


def breaker_failures(client: redis.Redis, agent: str) -> int:
    """The failures the agent's breaker counted."""
    return agents.get(agent).breaker and BreakerRegistry(client).snapshot(
        agent, agents.get(agent).breaker).failures


def test_a_concurrency_limit_runs_one_call_at_a_time_and_throttles_the_rest(
        cluster: Cluster) -> None:
    """Five runs at once on four pool processes, on a limit of one call in the fleet: at
    most one call ever runs; the others are throttled (rows with the limit and its wait),
    sent again, and all five succeed at attempt 1 though the agent allows 2 deliveries."""
    cluster.worker(concurrency=4)
    p = cluster.pipeline()
    runs = [p.start("one_at_a_time", {"n": n}, idempotency_key=str(uuid.uuid4()))
            for n in range(5)]
    for n, run in enumerate(runs):
        result = run.wait(60)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert result.output == {"n": n + 1}
    client = cluster.redis
    assert int(client.get(IN_FLIGHT_KEY.format(agent="single_file") + ":max") or 0) == 1
    rows = [r for run in runs for r in throttled_rows(p, run.run_id)]
    assert rows, "five calls on one slot, and none waited"
    assert {r["limit"] for r in rows} == {"test:one-at-a-time"}
    assert {r["reason"] for r in rows} == {"concurrency"}
    assert all(0 < int(r["wait_ms"]) <= 1000 for r in rows)
    for run in runs:
        r = report(p.store, run.run_id)
        ok = [c for c in r.calls if c.status == "ok"]
        assert [c.attempt for c in ok] == [1]
        throttled = [c for c in r.calls if c.status == "throttled"]
        assert r.info.throttled_ms == sum(c.wait_ms for c in throttled)
        assert r.total.calls == 1  # a throttled row is no call
    assert breaker_failures(client, "single_file") == 0
    state = next(s for s in limit_states(client) if s.name == "test:one-at-a-time")
    assert state.in_flight == 0  # every seal gave its slot back
    assert state.throttled == len(rows)


def test_tokens_reserved_at_the_open_are_settled_at_the_seal(cluster: Cluster) -> None:
    """An estimate of a whole minute's tokens, a use of 20: each seal gives back what its
    call did not use, so the next call waits about 2 s, not a minute; nothing stays
    reserved. One pool process: a call admitted while another's estimate still stands
    would be told to wait out that estimate (the limit cannot know it will be refunded)."""
    cluster.worker(concurrency=1)
    p = cluster.pipeline()
    runs = [p.start("frugal_flow", {"n": n}, idempotency_key=str(uuid.uuid4()))
            for n in range(3)]
    for run in runs:
        result = run.wait(30)
        assert result.status is RunStatus.SUCCEEDED, result.error
    rows = [r for run in runs for r in throttled_rows(p, run.run_id)]
    assert rows and {r["reason"] for r in rows} == {"tokens"}
    assert max(int(r["wait_ms"]) for r in rows) <= 2_100  # 20 tokens at 10 a second
    state = next(s for s in limit_states(cluster.redis) if s.name == "test:tokens")
    assert state.tokens_reserved == 0
    assert state.in_flight == 0
    for run in runs:
        assert report(p.store, run.run_id).total.total == 20


def test_a_step_that_waits_past_its_limit_wait_max_takes_its_fallback(
        cluster: Cluster) -> None:
    """The limit's one slot is held outside the fleet: the step waits half a second, then
    seals its agent's stand-in (degraded), and the breaker counts nothing."""
    cluster.worker(concurrency=1)
    p = cluster.pipeline()
    holder = Limiter(cluster.redis, "test:held")
    assert holder.acquire("held-by-the-test").admitted
    run = p.start("patient", {"n": 1}, idempotency_key=str(uuid.uuid4()))
    result = run.wait(30)
    assert result.status is RunStatus.SUCCEEDED, result.error
    assert result.output == {"n": -1}
    assert result.degraded
    rows = throttled_rows(p, run.run_id)
    assert len(rows) >= 1
    assert sum(int(r["wait_ms"]) for r in rows) > 500
    fallback = [e for e in p.store.log(run.run_id) if e["event"] == "step.fallback"]
    assert fallback and "limit_wait_max_s=0.5" in fallback[0]["reason"]
    assert breaker_failures(cluster.redis, "patient_skip") == 0
    assert holder.settle("held-by-the-test")


def test_an_estimate_of_the_input_admits_small_calls_and_fails_one_that_can_never_pass(
        cluster: Cluster) -> None:
    """``estimate_tokens`` as a function of the payload: 10 tokens pass a limit of 1,000 a
    minute; 5,000 never can, and the run fails at once with Throttled, not a breaker
    failure."""
    cluster.worker(concurrency=1)
    p = cluster.pipeline()
    small = p.start("sized_flow", {"n": 10}, idempotency_key=str(uuid.uuid4())).wait(30)
    assert small.status is RunStatus.SUCCEEDED, small.error
    big = p.start("sized_flow", {"n": 5000}, idempotency_key=str(uuid.uuid4()))
    result = big.wait(30)
    assert result.status is RunStatus.FAILED
    assert "Throttled" in (result.error or "") or "never pass" in (result.error or "")
    failed = [e for e in p.store.log(big.run_id) if e["event"] == "step.failed"]
    assert failed and failed[0]["error_type"] == "Throttled"
    assert "test:small" in failed[0]["error"]
    assert breaker_failures(cluster.redis, "sized") == 0
