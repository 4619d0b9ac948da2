"""Each fallback policy end to end, on real workers: a breaker tripped by
PIPELINE_CHAOS (or opened by hand in another process) refuses the call, and
the agent's fallback decides what the run does; with ``fallback_on="failure"``
the agent's own failure takes the fallback too."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from pipeline import Pipeline, RunStatus
from pipeline.breaker import BreakerState
from pipeline.errors import BrokerUnavailable, RunNotParked
from pipeline.invariants import verify
from pipeline.observe import report
from tests.agents import DEFAULT_COUNT, EXECUTIONS_KEY, HOLD_KEY, QUICK_BREAKER, guarded_park
from tests.conftest import Cluster, settings_for, wait_for
from tests.quick_agents import SIDE_EFFECTS_KEY, UNDONE_KEY


def events(run: object, name: str) -> list[dict[str, str]]:
    return [e for e in run.store.log(run.run_id) if e["event"] == name]  # type: ignore[attr-defined]


def executions(cluster: Cluster, run_id: str, agent: str) -> int:
    return int(cluster.redis.get(EXECUTIONS_KEY.format(run_id=run_id, agent=agent)) or 0)


def test_fail_trips_on_chaos_then_fails_fast_with_circuit_open(cluster: Cluster) -> None:
    cluster.worker(PIPELINE_CHAOS="guarded_fail=error:1")
    p = cluster.pipeline()
    first = [p.start("w_guarded_fail", {"n": i}).wait(20) for i in range(2)]
    assert [r.error.split(":")[0] for r in first if r.error] == ["ChaosError", "ChaosError"]
    assert p.breakers.snapshot("guarded_fail", QUICK_BREAKER).state is BreakerState.OPEN

    run = p.start("w_guarded_fail", {"n": 9})
    result = run.wait(20)
    assert result.status is RunStatus.FAILED and result.error is not None
    assert result.error.startswith("CircuitOpen") and "fallback 'fail'" in result.error
    assert executions(cluster, run.run_id, "guarded_fail") == 0  # never called
    refused = events(run, "step.refused")
    assert [(e["breaker"], e["fallback"]) for e in refused] == [("open", "fail")]


def test_the_run_that_trips_the_breaker_shows_the_transition_in_its_trace(
    cluster: Cluster,
) -> None:
    cluster.worker(PIPELINE_CHAOS="guarded_fail=error:1")
    p = cluster.pipeline()
    runs = [p.start("w_guarded_fail", {"n": i}) for i in range(2)]
    for run in runs:
        run.wait(20)
    moved = [e for run in runs for e in events(run, "breaker.transition")]
    assert [(e["agent"], e["from"], e["to"]) for e in moved] == [
        ("guarded_fail", "closed", "open")]


def test_skip_seals_the_default_output_marked_degraded(cluster: Cluster) -> None:
    cluster.worker(PIPELINE_CHAOS="guarded_skip=error:1")
    p = cluster.pipeline()
    for i in range(2):
        assert p.start("w_guarded_skip", {"n": i}).wait(20).status is RunStatus.FAILED
    run = p.start("w_guarded_skip", {"n": 5})
    result = run.wait(20)
    assert result.status is RunStatus.SUCCEEDED and result.degraded
    assert result.output == DEFAULT_COUNT
    last = run.history()[-1]
    assert last.degraded and last.agent == "guarded_skip" and last.parents == (0,)
    assert executions(cluster, run.run_id, "guarded_skip") == 0


def trip(cluster: Cluster, agent: str) -> None:
    """Open ``agent``'s breaker the way production does: a pool whose calls fail."""
    worker = cluster.worker(PIPELINE_CHAOS=f"{agent}=error:1")
    p = cluster.pipeline()
    for i in range(QUICK_BREAKER.failure_threshold):
        assert p.start(f"w_{agent}", {"n": 100 + i}).wait(20).status is RunStatus.FAILED
    worker.stop()
    assert p.breakers.snapshot(agent, QUICK_BREAKER).state is BreakerState.OPEN


def test_cached_seals_the_last_good_output_for_the_same_input(cluster: Cluster) -> None:
    healthy = cluster.worker()
    p = cluster.pipeline()
    good = p.start("w_guarded_cached", {"n": 4}).wait(20)
    assert good.status is RunStatus.SUCCEEDED and good.output == {"n": 40}
    assert not good.degraded
    healthy.stop()
    trip(cluster, "guarded_cached")
    cluster.worker()

    same = p.start("w_guarded_cached", {"n": 4})
    result = same.wait(20)
    assert result.status is RunStatus.SUCCEEDED and result.degraded
    assert result.output == {"n": 40}
    assert executions(cluster, same.run_id, "guarded_cached") == 0
    assert events(same, "step.degraded")[0]["source"].startswith("cached output")

    other = p.start("w_guarded_cached", {"n": 5}).wait(20)  # never seen: nothing cached
    assert other.status is RunStatus.FAILED and other.error is not None
    assert "no cached output" in other.error


def test_park_waits_for_a_person_and_resume_reruns_the_step(cluster: Cluster) -> None:
    p = cluster.pipeline()
    worker = cluster.worker(PIPELINE_CHAOS="guarded_park=error:1")
    for i in range(QUICK_BREAKER.failure_threshold):  # increment sealed: compensated
        assert p.start("w_guarded_park", {"n": i}).wait(20).status is RunStatus.COMPENSATED
    worker.stop()
    cluster.worker()
    p.breakers.force_open("guarded_park")  # and keep it open while we look
    run = p.start("w_guarded_park", {"n": 2})
    wait_for(lambda: run.status() is RunStatus.WAITING_FOR_HUMAN, message="the run to park")
    parked = events(run, "run.parked")
    assert parked[0]["agent"] == "guarded_park" and "pipeline resume" in parked[0]["alert"]
    assert run.info().parked_step == "1:guarded_park"
    assert [v.agent for v in run.history()] == ["", "increment"]

    p.breakers.reset("guarded_park")
    result = p.resume(run.run_id).wait(20)
    assert result.status is RunStatus.SUCCEEDED and not result.degraded
    assert result.output == {"n": (2 + 1) * 10 * 2}
    assert [v.agent for v in run.history()] == ["", "increment", "guarded_park", "double"]


def test_resume_with_an_output_seals_it_and_goes_on(cluster: Cluster) -> None:
    cluster.worker()
    p = cluster.pipeline()
    p.breakers.force_open("guarded_park")  # stays open: the person supplies the output
    run = p.start("w_guarded_park", {"n": 2})
    wait_for(lambda: run.status() is RunStatus.WAITING_FOR_HUMAN, message="the run to park")
    result = p.resume(run.run_id, {"n": 7}).wait(20)
    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 14}
    history = run.history()
    assert [(v.agent, v.parents, v.payload) for v in history[2:]] == [
        ("guarded_park", (1,), {"n": 7}), ("double", (2,), {"n": 14})]
    assert executions(cluster, run.run_id, "guarded_park") == 0


def test_retry_later_waits_for_half_open_and_the_probe_closes_the_breaker(
    cluster: Cluster,
) -> None:
    p = cluster.pipeline()
    trip(cluster, "guarded_retry")  # open for 5 s
    cluster.worker()
    half_open_in = p.breakers.snapshot("guarded_retry", QUICK_BREAKER).half_open_in_s
    assert half_open_in is not None and half_open_in > 0.5, "the worker swap took too long"
    run = p.start("w_guarded_retry", {"n": 3})
    result = run.wait(30)
    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 30}
    assert not result.degraded
    assert events(run, "step.refused") and events(run, "step.retry")
    snap = p.breakers.snapshot("guarded_retry", QUICK_BREAKER)
    assert snap.state is BreakerState.CLOSED
    assert snap.last_transition is not None and snap.last_transition["reason"] == \
        "probe succeeded"


def test_resume_waits_for_siblings_still_running_so_none_runs_twice(cluster: Cluster) -> None:
    cluster.worker()
    p = cluster.pipeline()
    p.breakers.force_open("guarded_park")
    key = f"pair-{uuid.uuid4()}"
    run_id = Pipeline.run_id_for("w_parked_pair", key)
    cluster.redis.set(HOLD_KEY.format(run_id=run_id), "1", ex=60)
    run = p.start("w_parked_pair", {"n": 1}, idempotency_key=key)
    wait_for(lambda: run.status() is RunStatus.WAITING_FOR_HUMAN, message="the run to park")
    p.breakers.reset("guarded_park")
    with pytest.raises(RunNotParked, match="steps 1.1:pause beside the parked one are still"):
        p.resume(run_id)
    cluster.redis.delete(HOLD_KEY.format(run_id=run_id))
    wait_for(lambda: "pause" in {v.agent for v in run.history()}, message="the sibling to seal")
    result = p.resume(run_id).wait(20)
    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 2 * 10 + 3}
    assert executions(cluster, run_id, "pause") == 1


def test_a_run_parked_and_resumed_many_times_is_not_taken_for_a_crash_loop(
    cluster: Cluster,
) -> None:
    cluster.worker()
    p = cluster.pipeline()
    p.breakers.force_open("guarded_park")
    run = p.start("w_guarded_park", {"n": 1})
    for _ in range(guarded_park.max_deliveries + 1):
        wait_for(lambda: run.status() is RunStatus.WAITING_FOR_HUMAN, message="a park")
        p.resume(run.run_id)  # the breaker is still open: it parks again
    wait_for(lambda: run.status() is RunStatus.WAITING_FOR_HUMAN, message="the last park")
    assert not [e for e in run.store.log(run.run_id) if e["event"] == "step.exhausted"]


def test_resume_that_cannot_enqueue_parks_the_run_again(cluster: Cluster) -> None:
    cluster.worker()
    p = cluster.pipeline()
    p.breakers.force_open("guarded_park")
    run = p.start("w_guarded_park", {"n": 1})
    wait_for(lambda: run.status() is RunStatus.WAITING_FOR_HUMAN, message="the run to park")
    settings = dataclasses.replace(settings_for(cluster.url), broker_url="redis://127.0.0.1:1/0")
    with pytest.raises(BrokerUnavailable, match="parked again"):
        Pipeline(settings=settings).resume(run.run_id)
    assert run.status() is RunStatus.WAITING_FOR_HUMAN
    assert run.info().parked_steps == ("1:guarded_park",)


# -- fallback_on="failure": the agent's own failure seals the stand-in ---------------------


def test_skip_on_failure_seals_the_default_output_when_the_agent_fails(cluster: Cluster) -> None:
    cluster.worker(PIPELINE_CHAOS="enrich=error:1")
    p = cluster.pipeline()
    run = p.start("w_enrich", {"n": 1})
    result = run.wait(20)
    assert result.status is RunStatus.SUCCEEDED and result.degraded
    assert result.output == {"n": DEFAULT_COUNT["n"] * 2}  # the run went on past the stand-in
    stand_in = run.history()[2]
    assert (stand_in.agent, stand_in.degraded, stand_in.payload) == ("enrich", True,
                                                                     DEFAULT_COUNT)
    failed, fell_back = events(run, "step.failed"), events(run, "step.fallback")
    assert [(e["agent"], e["error_type"]) for e in failed] == [("enrich", "ChaosError")]
    assert [(e["fallback"], e["error_type"]) for e in fell_back] == [("skip", "ChaosError")]
    assert events(run, "step.degraded")[0]["source"] == "default output after failure"
    snap = p.breakers.snapshot("enrich", QUICK_BREAKER)
    assert (snap.state, snap.consecutive_failures, snap.failures) == (BreakerState.CLOSED, 1, 1)
    assert verify(p.store, [run.run_id]).ok


def test_skip_on_failure_computes_the_default_output_from_the_input(cluster: Cluster) -> None:
    cluster.worker(PIPELINE_CHAOS="enrich_derived=error:1")
    p = cluster.pipeline()
    result = p.start("w_enrich_derived", {"n": 7}).wait(20)
    assert result.status is RunStatus.SUCCEEDED and result.degraded
    assert result.output == {"n": -14}
    # what the stand-in read is in the trace, as an agent's reads are
    [row] = [c for c in report(p.store, result.run_id).calls if c.status == "ok"]
    assert (row.degraded, row.read) == (True, [0])


def test_a_computed_default_output_that_breaks_the_contract_fails_the_step(
    cluster: Cluster,
) -> None:
    cluster.worker(PIPELINE_CHAOS="enrich_broken=error:1")
    p = cluster.pipeline()
    run = p.start("w_enrich_broken", {"n": 7})
    result = run.wait(20)
    assert result.status is RunStatus.FAILED and result.error is not None  # nothing sealed
    assert result.error.startswith("ContractViolation") and "default output" in result.error
    sides = [e.get("side", "") for e in events(run, "step.failed")]
    assert sides == ["", "default output"]


def test_an_output_that_breaks_its_contract_is_undone_before_the_stand_in_is_sealed(
    cluster: Cluster,
) -> None:
    cluster.worker(PIPELINE_CHAOS="enrich=bad_output:1")
    p = cluster.pipeline()
    run = p.start("w_enrich", {"n": 1})
    result = run.wait(20)
    assert result.status is RunStatus.SUCCEEDED and result.degraded
    assert executions(cluster, run.run_id, "enrich") == 1
    assert not cluster.redis.hexists(SIDE_EFFECTS_KEY.format(run_id=run.run_id), "enrich")
    assert cluster.redis.get(UNDONE_KEY.format(run_id=run.run_id, agent="enrich")) == "1"
    assert [e["event"] for e in run.store.log(run.run_id)
            if e["event"] in ("step.failed", "step.self_compensated", "step.degraded")] == [
        "step.failed", "step.self_compensated", "step.degraded"]
    verdict = verify(p.store, [run.run_id])  # undone once, by itself: the invariants hold
    assert verdict.ok, verdict.violations


def test_fallback_on_refusal_leaves_the_agents_own_failure_failing_the_run(
    cluster: Cluster,
) -> None:
    cluster.worker(PIPELINE_CHAOS="guarded_skip=error:1")
    p = cluster.pipeline()
    run = p.start("w_guarded_skip", {"n": 1})
    result = run.wait(20)
    assert result.status is RunStatus.FAILED and result.error is not None
    assert result.error.startswith("ChaosError") and not result.degraded
    assert not events(run, "step.fallback") and not events(run, "step.degraded")
