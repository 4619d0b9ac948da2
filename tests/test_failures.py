"""Failures on real workers, made with PIPELINE_CHAOS: an agent that raises, breaks
its output contract or runs past its time limit fails the run, names what broke,
and keeps every version sealed before it; a transient error is retried instead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from pipeline import Pipeline, RunStatus
from tests.agents import EXECUTIONS_KEY, FLAKY_FAILURES
from tests.conftest import Cluster, wait_for

SAMPLES = Path(__file__).parent.parent / "tasks" / "samples"
GOOD = json.loads((SAMPLES / "good.json").read_text())
SIBLINGS = {"income_verification", "fraud_detection"}
STEP_ENDS = {"step.sealed", "step.discarded", "step.skipped"}


def events(p: Pipeline, run_id: str, event: str) -> list[dict[str, str]]:
    return [e for e in p.store.log(run_id) if e["event"] == event]


def executions(client: redis.Redis, run_id: str, agent: str) -> int:
    return int(client.get(EXECUTIONS_KEY.format(run_id=run_id, agent=agent)) or 0)


def test_an_agent_error_fails_the_run_naming_that_agent_and_keeps_what_was_sealed(
    cluster: Cluster,
) -> None:
    cluster.worker(PIPELINE_CHAOS="risk_assessment=error:1")
    p = cluster.pipeline()

    run = p.start("credit_decision", GOOD)
    result = run.wait(30)

    assert result.status is RunStatus.COMPENSATED  # credit_score (at least) had sealed
    info = run.info()
    assert info.failed_agent == "risk_assessment"
    assert info.error is not None and info.error.startswith("ChaosError: ")
    assert "agent risk_assessment fails on purpose" in info.error
    [failed] = events(p, run.run_id, "step.failed")
    assert (failed["agent"], failed["error_type"]) == ("risk_assessment", "ChaosError")

    # Each sibling either sealed before the run failed or was refused after it.
    def siblings_ended() -> bool:
        ended = {e["agent"] for e in p.store.log(run.run_id) if e["event"] in STEP_ENDS}
        return SIBLINGS <= ended

    wait_for(siblings_ended, 20, "the parallel siblings to seal or be refused")
    log = p.store.log(run.run_id)
    sealed = {e["agent"]: int(e["version"]) for e in log if e["event"] == "step.sealed"}
    history = run.history()
    assert {v.agent: v.version for v in history[1:]} == sealed
    assert [v.version for v in history] == list(range(len(history)))
    assert history[1].agent == "credit_score" and history[1].parents == (0,)
    assert set(sealed) - {"credit_score"} <= SIBLINGS
    assert all(v.parents == (1,) for v in history[2:])
    assert "final_approval" not in {e.get("agent") for e in log}
    assert run.status() is RunStatus.COMPENSATED


def test_output_that_breaks_its_contract_fails_the_run_before_anything_is_sealed(
    cluster: Cluster,
) -> None:
    cluster.worker(PIPELINE_CHAOS="credit_score=bad_output:1")
    p = cluster.pipeline()

    run = p.start("credit_decision", GOOD)
    result = run.wait(30)

    # nothing sealed, but the step ran: its side effects are compensated
    assert result.status is RunStatus.COMPENSATED
    info = run.info()
    assert info.failed_agent == "credit_score"
    assert info.error is not None and info.error.startswith("ContractViolation: ")
    [failed] = events(p, run.run_id, "step.failed")
    assert failed["agent"] == "credit_score" and failed["error_type"] == "ContractViolation"
    assert (failed["contract"], failed["side"]) == ("credit_score@1", "output")
    # The chaos output {"chaos": ...} lacks every required field and adds an unknown one.
    assert {"score", "band", "chaos"} <= set(failed["fields"].split(","))
    assert [v.version for v in run.history()] == [0]
    assert events(p, run.run_id, "step.sealed") == []


def test_an_agent_past_its_time_limit_fails_the_run_within_seconds(cluster: Cluster) -> None:
    cluster.worker(PIPELINE_CHAOS="sleepy=slow:1")
    p = cluster.pipeline()

    run = p.start("sleeping", {"n": 1})
    result = run.wait(10)  # slow sleeps 6 s; the 1 s soft limit stops it first

    assert result.status is RunStatus.FAILED
    info = run.info()
    assert info.failed_agent == "sleepy"
    assert info.error is not None and info.error.startswith("StepTimeLimitExceeded: ")
    assert "ran past its time limit of 1s" in info.error
    assert info.finished_at is not None and info.finished_at - info.created_at < 5.0
    [failed] = events(p, run.run_id, "step.failed")
    assert (failed["agent"], failed["error_type"]) == ("sleepy", "StepTimeLimitExceeded")
    assert [v.version for v in run.history()] == [0]


def test_a_transient_error_is_retried_with_backoff_and_then_succeeds(
    pipeline: Pipeline, rclient: redis.Redis
) -> None:
    run = pipeline.start("flaking", {"n": 1})
    result = run.wait(30)

    assert result.status is RunStatus.SUCCEEDED, result.error
    assert result.output == {"n": 2}
    assert executions(rclient, run.run_id, "flaky") == FLAKY_FAILURES + 1
    retries: list[dict[str, Any]] = events(pipeline, run.run_id, "step.retry")
    assert [(e["agent"], e["error_type"]) for e in retries] == [
        ("flaky", "TransientAgentError")
    ] * FLAKY_FAILURES
    assert [float(e["countdown_s"]) for e in retries] == [0.1, 0.2]  # exponential backoff
    assert events(pipeline, run.run_id, "step.failed") == []
    assert [v.version for v in run.history()] == [0, 1]
