"""Steps that draw on named limits, on real workers: a limit that binds throttles a step
(not run, not failed, not counted as an attempt, a retry or a breaker failure) and sends it
again after the wait it computed; tokens reserved at the open are settled at the seal; a
step that waited too long, or can never pass, takes its agent's fallback."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis

import tests.agents  # noqa: F401 - the contracts, the agents and the limits they draw on
from pipeline import (
    BreakerRegistry,
    Budget,
    Limit,
    Limiter,
    Pipeline,
    RateLimited,
    RunStatus,
    agents,
)
from pipeline.keys import limit_keys
from pipeline.limits import LimitState, limit_states
from pipeline.observe import report
from tests.conftest import Cluster, wait_for
from tests.limit_agents import IN_FLIGHT_KEY, STORM_KEY
from tests.quick_agents import EXECUTIONS_KEY, SIDE_EFFECTS_KEY, UNDONE_KEY
from tests.test_cli import invoke

pytestmark = pytest.mark.workers


def executions(client: redis.Redis, run_id: str, agent: str) -> int:
    return int(client.get(EXECUTIONS_KEY.format(run_id=run_id, agent=agent)) or 0)


def throttled_rows(p: Pipeline, run_id: str) -> list[dict[str, str]]:
    return [e for e in p.store.log(run_id) if e["event"] == "step.throttled"]


def breaker_failures(client: redis.Redis, agent: str) -> int:
    """The failures the agent's breaker counted."""
    return BreakerRegistry(client).snapshot(agent, agents.get(agent).breaker).failures


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
    # a call that waited, waited for the 20 tokens the one before used (10 a second), not
    # for the 600 it reserved: no wait is longer than 2 s (a machine slow enough may not wait)
    rows = [r for run in runs for r in throttled_rows(p, run.run_id)]
    assert {r["reason"] for r in rows} <= {"tokens"}
    assert all(int(r["wait_ms"]) <= 2_100 for r in rows), rows
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


# -- budgets ---------------------------------------------------------------------------------


def test_a_run_stops_at_the_step_that_would_cross_its_budget_and_is_compensated(
        cluster: Cluster) -> None:
    """A budget of 700 tokens, three steps of 300: the third would cross it, so it never
    runs; the run fails with BudgetExceeded naming the budget, the spent, the reserved and
    the step, and the saga undoes the two steps that ran."""
    cluster.worker(concurrency=2)
    p = cluster.pipeline()
    run = p.start("budgeted", {"n": 1}, idempotency_key=str(uuid.uuid4()),
                  budget=Budget(tokens=700))
    result = run.wait(30)
    assert result.status is RunStatus.COMPENSATED, result.error
    error = result.error or ""
    assert "BudgetExceeded" in error or "budget of 700 tokens" in error
    assert "600 spent" in error and "2:publish" in error
    client = cluster.redis
    assert executions(client, run.run_id, "publish") == 0
    assert client.hgetall(SIDE_EFFECTS_KEY.format(run_id=run.run_id)) == {}
    assert {"draft", "polish"} <= {a for a in ("draft", "polish")
                                   if client.get(UNDONE_KEY.format(run_id=run.run_id, agent=a))}
    info = run.info()
    assert info.spending is not None
    assert (info.spending.spent_tokens, info.spending.reserved_tokens) == (600, 0)
    exceeded = [e for e in p.store.log(run.run_id) if e["event"] == "budget.exceeded"]
    assert [(e["step"], e["budget"], e["spent"], e["estimate"]) for e in exceeded] \
        == [("2:publish", "tokens", "600", "300")]


def test_a_cost_budget_counts_the_limits_prices_and_the_workflows_budget_applies(
        cluster: Cluster) -> None:
    """The workflow's own budget (10,000 tokens) lets a run through, charged 900 tokens
    and 3 x 0.005 in cost; a start's budget of 0.012 in cost replaces it, and the second
    step (0.005 spent, 0.009 estimated) does not run."""
    cluster.worker(concurrency=2)
    p = cluster.pipeline()
    ok = p.start("budgeted", {"n": 1}, idempotency_key=str(uuid.uuid4()))
    assert ok.wait(30).output == {"n": 112}
    spending = ok.info().spending
    assert spending is not None and spending.budget == Budget(tokens=10_000)
    assert spending.spent_tokens == 900
    assert spending.spent_cost == pytest.approx(0.015)
    stopped = p.start("budgeted", {"n": 1}, idempotency_key=str(uuid.uuid4()),
                      budget=Budget(cost=0.012))
    result = stopped.wait(30)
    assert result.status is RunStatus.COMPENSATED
    assert "1:polish" in (result.error or "")
    spending = stopped.info().spending
    assert spending is not None and spending.budget == Budget(cost=0.012)
    assert spending.spent_cost == pytest.approx(0.005)
    assert executions(cluster.redis, stopped.run_id, "polish") == 0


def test_a_redelivered_step_reserves_and_is_charged_once(client_only: Pipeline) -> None:
    """The open and the seal as a redelivered message runs them again, on the state's
    scripts in Redis: the second open finds the step's reservation, the second seal finds
    the step sealed; the run is charged once, what the step reported."""
    p = client_only
    store = p.store
    run_id = str(uuid.uuid4())
    store.create_run(run_id, workflow="budgeted", payload={"n": 1}, contract="count@1",
                     budget=Budget(tokens=1_000, cost=1.0))
    reserve = (300, 0.009, 0.01, 0.03)
    for _ in range(2):
        opening = store.open_step(run_id, step="0:draft", agent="draft", inputs=[0],
                                  max_deliveries=5, reserve=reserve)
        assert opening.outcome == "open"
    spending = store.run_info(run_id).spending
    assert spending is not None
    assert (spending.reserved_tokens, spending.reserved_cost) == (300, pytest.approx(0.009))
    for outcome in ("new", "sealed"):
        sealing = store.seal(run_id, step="0:draft", agent="draft", contract="count@1",
                             payload={"n": 2}, parents=[0],
                             trace={"prompt_tokens": 200, "completion_tokens": 100})
        assert sealing.outcome == outcome
    spending = store.run_info(run_id).spending
    assert spending is not None
    assert (spending.spent_tokens, spending.reserved_tokens) == (300, 0)
    assert spending.spent_cost == pytest.approx(0.005)
    assert spending.reserved_cost == pytest.approx(0.0)
    store.delete_run(run_id)


# -- the API's own 429s ----------------------------------------------------------------------


def storm_state(client: redis.Redis) -> LimitState | None:
    """The storm's limit as it stands; None before anything drew on it."""
    return next((s for s in limit_states(client) if s.name == "test:storm"), None)


def test_a_storm_of_429s_slows_the_limit_trips_no_breaker_and_every_run_completes(
        cluster: Cluster) -> None:
    """The API answers 429 (Retry-After 0.2 s) to its next twelve calls: the calls are
    throttled, not failed (no breaker failure, attempt 1 with 2 deliveries allowed), the
    limit's effective rate and concurrency drop, every run completes once the storm ends,
    and the rate recovers as calls succeed."""
    cluster.worker(concurrency=4)
    p = cluster.pipeline()
    client = cluster.redis
    client.set(STORM_KEY, 12)
    runs = [p.start("storm", {"n": n}, idempotency_key=str(uuid.uuid4())) for n in range(8)]
    wait_for(lambda: (s := storm_state(client)) is not None and s.rate_limited > 0, 20,
             "a 429")
    slowed = storm_state(client)
    assert slowed is not None and slowed.factor < 1
    assert slowed.effective_concurrency is not None and slowed.effective_concurrency < 4
    for n, run in enumerate(runs):
        result = run.wait(60)
        assert result.status is RunStatus.SUCCEEDED, result.error
        assert result.output == {"n": n + 1}
    rows = [r for run in runs for r in throttled_rows(p, run.run_id)]
    assert rows and {r["reason"] for r in rows} <= {"rate_limited", "concurrency", "requests"}
    assert any(r["reason"] == "rate_limited" for r in rows)
    assert breaker_failures(client, "touchy") == 0
    assert BreakerRegistry(client).snapshot("touchy", agents.get("touchy").breaker) \
        .state.value == "closed"
    assert int(client.get(STORM_KEY) or 0) < 0  # the storm is over: all twelve were 429s
    lowest = storm_state(client)
    assert lowest is not None
    more = [p.start("storm", {"n": n}, idempotency_key=str(uuid.uuid4())) for n in range(25)]
    for run in more:
        assert run.wait(60).status is RunStatus.SUCCEEDED
    recovered = storm_state(client)
    assert recovered is not None
    assert recovered.factor == 1.0 or recovered.factor >= lowest.factor + 0.05 * 20
    assert recovered.effective_requests_per_minute == 6000


def test_limiter_call_waits_out_a_429_and_the_limit_recovers(rclient: redis.Redis) -> None:
    """Outside a step: a call refused twice by its API is made again after its
    Retry-After; the two refusals within a second halve the limit once, and the call that
    succeeded gives a step back."""
    name = f"test:call-429-{uuid.uuid4().hex[:8]}"
    limiter = Limiter(rclient, Limit(name=name, requests_per_minute=600))
    answers = [RateLimited(retry_after_s=0.05), RateLimited(retry_after_s=0.05), "ok"]

    def api() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert limiter.call(api) == "ok"
    assert answers == []
    state = next(s for s in limit_states(rclient) if s.name == name)
    assert state.rate_limited == 1
    assert state.factor == pytest.approx(0.55)
    assert state.effective_requests_per_minute == pytest.approx(330)
    rclient.delete(*limit_keys(name))


def test_a_run_that_stops_drops_the_reservations_its_steps_held(
        client_only: Pipeline) -> None:
    """A step reserved its estimate and the run failed before it sealed: the run no longer
    holds anything reserved, and shows only what it spent."""
    store = client_only.store
    run_id = str(uuid.uuid4())
    store.create_run(run_id, workflow="budgeted", payload={"n": 1}, contract="count@1",
                     budget=Budget(tokens=1_000))
    assert store.open_step(run_id, step="0:draft", agent="draft", inputs=[0], max_deliveries=5,
                           reserve=(300, 0, 0, 0)).outcome == "open"
    held = store.run_info(run_id).spending
    assert held is not None and held.reserved_tokens == 300
    assert store.finish(run_id, RunStatus.FAILED, error="it broke")
    spending = store.run_info(run_id).spending
    assert spending is not None
    assert (spending.spent_tokens, spending.reserved_tokens) == (0, 0)
    assert not [f for f in store.redis.hkeys(f"pipeline:{{{run_id}}}:run")
                if f.startswith("reserve:")]
    store.delete_run(run_id)


def test_pipeline_run_takes_a_budget_for_its_run_and_refuses_a_bad_one(
        pipeline: Pipeline, redis_url: str, tmp_path: Path) -> None:
    """``pipeline run --budget-tokens``: the run stops at the step that would cross it (exit
    1, the error names the budget); a negative budget is bad input (exit 2, nothing
    started)."""
    payload = tmp_path / "count.json"
    payload.write_text('{"n": 1}')
    result = invoke(redis_url, "run", "budgeted", "--input", str(payload), "--wait", "--json",
                    "--budget-tokens", "700")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "compensated"
    assert "budget of 700 tokens" in data["error"] and "2:publish" in data["error"]
    spending = pipeline.run(data["run_id"]).info().spending
    assert spending is not None and spending.budget == Budget(tokens=700)
    refused = invoke(redis_url, "run", "budgeted", "--input", str(payload),
                     "--budget-tokens", "-1")
    assert refused.exit_code == 2
    assert "--budget-tokens" in refused.output


def test_a_choreographed_run_is_bounded_by_its_budget_the_same_way(cluster: Cluster) -> None:
    """A choreography's budget of 400 tokens, two reactions of 300: the second does not run,
    the run is compensated (the first reaction undone), charged only the first."""
    cluster.worker(concurrency=2)
    p = cluster.pipeline()
    run = p.start("spending", {"n": 1})
    result = run.wait(30)
    assert result.status is RunStatus.COMPENSATED, result.error
    assert "budget of 400 tokens" in (result.error or "") and "expand" in (result.error or "")
    client = cluster.redis
    assert executions(client, run.run_id, "outline") == 1
    assert executions(client, run.run_id, "expand") == 0
    assert client.hgetall(SIDE_EFFECTS_KEY.format(run_id=run.run_id)) == {}
    spending = run.info().spending
    assert spending is not None
    assert (spending.spent_tokens, spending.reserved_tokens) == (300, 0)
