"""The saga on real workers: a failed run leaves the world as it was before it.

Every sealed step (and every step whose output broke its contract) is
compensated exactly once, newest stage first; a step that never sealed is not;
a parallel sibling that finishes late undoes itself; a failing compensation is
retried, dead-lettered and re-driven by hand; one failure reported many times
starts one saga; and a worker killed mid-step or mid-compensation leaves no run
stuck.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from pipeline import Pipeline, RunStatus
from pipeline.cli import main
from pipeline.keys import DEAD_LETTERS
from tasks import SAMPLES
from tasks.credit import CUSTOMER_KEY, ledger
from tests.agents import COMP_FAIL_KEY
from tests.conftest import AGENT_MODULES, Cluster, wait_for
from tests.quick_agents import (
    COMP_HOLD_KEY,
    COMP_TRIES_KEY,
    EXECUTIONS_KEY,
    HOLD_KEY,
    QUICK_VISIBILITY_TIMEOUT_S,
    SIDE_EFFECTS_KEY,
    UNDONE_KEY,
)

GOOD = json.loads((SAMPLES / "good.json").read_text())
APPLICANT = GOOD["applicant"]["id"]
CUSTOMER_BEFORE = {"score": "612", "band": "fair", "run_id": "legacy-crm"}
PARALLEL = ("income_verification", "risk_assessment", "fraud_detection")
STEP_ENDS = {"step.sealed", "step.skipped", "step.failed", "step.self_compensated"}
"""How a step ends for good; a discarded step ends when it has compensated itself."""


# -- reading a run's log --------------------------------------------------------------


def log_of(p: Pipeline, run_id: str) -> list[dict[str, str]]:
    return p.store.log(run_id)


def steps_with(log: list[dict[str, str]], event: str) -> list[str]:
    """The step keys of the entries of one kind, in log order."""
    return [e["step"] for e in log if e["event"] == event]


def count(log: list[dict[str, str]], event: str) -> int:
    return sum(1 for e in log if e["event"] == event)


def stage(step_key: str) -> int:
    """'1.2:fraud_detection' -> 1, '0:credit_score' -> 0."""
    match = re.match(r"\d+", step_key)
    assert match is not None, step_key
    return int(match.group())


def assert_compensated_once_newest_first(log: list[dict[str, str]],
                                         broken: tuple[str, ...] = ()) -> list[str]:
    """Every sealed step and every contract-broken one compensated exactly once, no
    other step, and no compensation of an earlier stage before one of a later stage."""
    done = steps_with(log, "compensation.done")
    owed = set(steps_with(log, "step.sealed")) | set(broken)
    assert sorted(done) == sorted(owed), f"compensated {done}, owed {sorted(owed)}"
    stages = [stage(s) for s in done]
    assert stages == sorted(stages, reverse=True), f"not newest stage first: {done}"
    assert count(log, "compensation.dead") == 0
    return done


def counter(client: redis.Redis, key: str, run_id: str, agent: str) -> int:
    return int(client.get(key.format(run_id=run_id, agent=agent)) or 0)


def side_effects(client: redis.Redis, run_id: str) -> dict[str, str]:
    return client.hgetall(SIDE_EFFECTS_KEY.format(run_id=run_id))


def wait_until_ended(p: Pipeline, run_id: str, steps: set[str], timeout_s: float = 20) -> None:
    """Wait for each of these step keys to seal, fail, be refused or undo itself."""
    def ended() -> bool:
        return steps <= {e.get("step") for e in log_of(p, run_id) if e["event"] in STEP_ENDS}

    wait_for(ended, timeout_s, f"steps {sorted(steps)} to end")


def invoke_cli(url: str, *args: str) -> Any:
    env: dict[str, str | None] = {
        "PIPELINE_REDIS_URL": url, "PIPELINE_AGENT_MODULES": AGENT_MODULES,
        "CELERY_BROKER_URL": None, "CELERY_RESULT_BACKEND": None, "PIPELINE_CHAOS": None,
    }
    return CliRunner().invoke(main, list(args), env=env)


# -- 1. chaos in each credit agent ------------------------------------------------------

CHAOS_CASES = [
    # An error before credit_score executed: no side effect, nothing to undo.
    ("credit_score", "error", RunStatus.FAILED),
    ("income_verification", "error", RunStatus.COMPENSATED),
    ("risk_assessment", "error", RunStatus.COMPENSATED),
    ("fraud_detection", "error", RunStatus.COMPENSATED),
    ("final_approval", "error", RunStatus.COMPENSATED),
    # bad_output executes the agent (side effects happen), then breaks the contract.
    ("credit_score", "bad_output", RunStatus.COMPENSATED),
    ("fraud_detection", "bad_output", RunStatus.COMPENSATED),
    ("final_approval", "bad_output", RunStatus.COMPENSATED),
    # Every delivery kills the pool process; the delivery limit (7) fails the step.
    ("final_approval", "crash", RunStatus.COMPENSATED),
]


@pytest.mark.parametrize(("agent", "mode", "status"), CHAOS_CASES,
                         ids=[f"{m}-in-{a}" for a, m, _ in CHAOS_CASES])
def test_chaos_in_any_credit_agent_leaves_the_ledger_and_customer_record_as_before(
    cluster: Cluster, agent: str, mode: str, status: RunStatus
) -> None:
    r = cluster.redis
    record_key = CUSTOMER_KEY.format(applicant_id=APPLICANT)
    r.hset(record_key, mapping=CUSTOMER_BEFORE)
    cluster.worker(concurrency=3, PIPELINE_CHAOS=f"{agent}={mode}:1")
    p = cluster.pipeline()

    run = p.start("credit_decision", GOOD)
    result = run.wait(90 if mode == "crash" else 30)

    assert result.status is status, result.error
    assert run.info().failed_agent == agent
    expected_error = {"error": "ChaosError", "bad_output": "ContractViolation",
                      "crash": "DeliveryLimitExceeded"}[mode]
    assert (result.error or "").startswith(f"{expected_error}: ")
    if agent in PARALLEL:  # the siblings seal, or undo themselves, or are refused
        wait_until_ended(p, run.run_id, {f"1.{i}:{a}" for i, a in enumerate(PARALLEL)})
    log = log_of(p, run.run_id)
    broken = tuple(e["step"] for e in log
                   if e["event"] == "step.failed" and e.get("side") == "output")
    assert len(broken) == (mode == "bad_output")
    done = assert_compensated_once_newest_first(log, broken)
    assert ledger(r, run.run_id) == {} and not r.exists(f"credit:ledger:{run.run_id}")
    assert r.hgetall(record_key) == CUSTOMER_BEFORE
    assert count(log, "run.compensating") == 1
    if status is RunStatus.FAILED:
        assert done == [] and count(log, "compensation.planned") == 0
        assert [v.version for v in run.history()] == [0]
    else:
        assert "0:credit_score" in done and done[-1] == "0:credit_score"
        if agent == "final_approval":  # everything before it sealed
            assert done[:len(broken)] == ["2:final_approval"] * len(broken)
            assert sorted(done[len(broken):-1]) == [f"1.{i}:{a}"
                                                    for i, a in enumerate(PARALLEL)]
    # A sibling that finished after the failure undid its own side effect.
    for step in steps_with(log, "step.discarded"):
        assert step not in done and step in steps_with(log, "step.self_compensated")


def test_a_step_past_its_time_limit_has_the_steps_before_it_compensated(
    cluster: Cluster,
) -> None:
    cluster.worker(PIPELINE_CHAOS="slowpoke=slow:1")
    p = cluster.pipeline()
    r = cluster.redis

    run = p.start("saga_slow", {"n": 1})
    result = run.wait(20)  # slow sleeps 6 s; the 1 s soft limit stops it first

    assert result.status is RunStatus.COMPENSATED
    info = run.info()
    assert info.failed_agent == "slowpoke"
    assert (info.error or "").startswith("StepTimeLimitExceeded: ")
    log = log_of(p, run.run_id)
    assert assert_compensated_once_newest_first(log) == ["0:booked"]
    assert side_effects(r, run.run_id) == {}
    assert counter(r, UNDONE_KEY, run.run_id, "booked") == 1
    assert counter(r, COMP_TRIES_KEY, run.run_id, "slowpoke") == 0  # it never sealed


# -- 2. a parallel sibling that finishes after the failure --------------------------------


def test_a_parallel_sibling_finishing_after_the_failure_compensates_itself_and_is_not_sealed(
    cluster: Cluster,
) -> None:
    r = cluster.redis
    p = cluster.pipeline()
    key = str(uuid.uuid4())
    run_id = Pipeline.run_id_for("saga_late", key)
    r.set(HOLD_KEY.format(run_id=run_id), "1", ex=120)
    # lagger is at work before tripwire can fail: tripwire's queue has no worker yet.
    cluster.worker(queues=("pipeline", "agents.booked", "agents.lagger", "agents.lag_join"))

    run = p.start("saga_late", {"n": 1}, idempotency_key=key)
    wait_for(lambda: counter(r, EXECUTIONS_KEY, run_id, "lagger") == 1, 20, "lagger to start")
    cluster.worker(queues=("agents.tripwire",), PIPELINE_CHAOS="tripwire=error:1")
    wait_for(lambda: run.status() is not RunStatus.RUNNING, 20, "the run to stop running")
    r.delete(HOLD_KEY.format(run_id=run_id))
    result = run.wait(20)
    wait_until_ended(p, run_id, {"1.1:lagger"})

    assert result.status is RunStatus.COMPENSATED
    assert run.info().failed_agent == "tripwire"
    log = log_of(p, run_id)
    lagger_events = [e["event"] for e in log if e.get("step") == "1.1:lagger"]
    assert lagger_events == ["step.started", "step.discarded", "step.self_compensated"]
    assert "1.1:lagger" not in {v.step for v in run.history()}
    assert assert_compensated_once_newest_first(log) == ["0:booked"]
    assert counter(r, COMP_TRIES_KEY, run_id, "lagger") == 1
    assert counter(r, UNDONE_KEY, run_id, "lagger") == 1
    assert counter(r, UNDONE_KEY, run_id, "booked") == 1
    assert counter(r, COMP_TRIES_KEY, run_id, "tripwire") == 0  # it never executed
    assert side_effects(r, run_id) == {}


def test_a_step_whose_output_breaks_its_contract_after_the_saga_began_is_compensated_once(
    cluster: Cluster,
) -> None:
    """It compensates itself (the run is no longer live); the planner, which runs only
    later, still finds it in the log and must not compensate it a second time."""
    r = cluster.redis
    p = cluster.pipeline()
    key = str(uuid.uuid4())
    run_id = Pipeline.run_id_for("saga_late", key)
    r.set(HOLD_KEY.format(run_id=run_id), "1", ex=120)
    # No worker serves the `pipeline` queue yet: the saga begins, its planner waits.
    cluster.worker(queues=("agents.booked", "agents.lagger"),
                   PIPELINE_CHAOS="lagger=bad_output:1")

    run = p.start("saga_late", {"n": 1}, idempotency_key=key)
    wait_for(lambda: counter(r, EXECUTIONS_KEY, run_id, "lagger") == 1, 20, "lagger to start")
    cluster.worker(queues=("agents.tripwire",), PIPELINE_CHAOS="tripwire=error:1")
    wait_for(lambda: run.status() is RunStatus.COMPENSATING, 20, "the saga to begin")
    r.delete(HOLD_KEY.format(run_id=run_id))
    wait_until_ended(p, run_id, {"1.1:lagger"})
    cluster.worker(queues=("pipeline",))
    result = run.wait(20)

    assert result.status is RunStatus.COMPENSATED
    log = log_of(p, run_id)
    assert steps_with(log, "step.self_compensated") == ["1.1:lagger"]
    assert assert_compensated_once_newest_first(log, ("1.1:lagger",)) == [
        "1.1:lagger", "0:booked"]
    assert counter(r, UNDONE_KEY, run_id, "lagger") == 1
    assert counter(r, COMP_TRIES_KEY, run_id, "lagger") == 1
    assert side_effects(r, run_id) == {}


# -- 3. compensations that fail ----------------------------------------------------------


def start_fickle(cluster: Cluster, failures: int) -> tuple[Pipeline, Any]:
    """saga_fickle (booked -> fickle -> tripwire) with tripwire failing, and fickle's
    compensation failing ``failures`` times."""
    cluster.worker(PIPELINE_CHAOS="tripwire=error:1")
    p = cluster.pipeline()
    key = str(uuid.uuid4())
    run_id = Pipeline.run_id_for("saga_fickle", key)
    cluster.redis.set(COMP_FAIL_KEY.format(run_id=run_id), failures, ex=300)
    return p, p.start("saga_fickle", {"n": 1}, idempotency_key=key)


def test_a_compensation_that_fails_twice_then_succeeds_ends_the_run_compensated(
    cluster: Cluster,
) -> None:
    p, run = start_fickle(cluster, failures=2)
    r = cluster.redis

    result = run.wait(30)

    assert result.status is RunStatus.COMPENSATED
    log = log_of(p, run.run_id)
    retries = [e for e in log if e["event"] == "compensation.retry"]
    assert [(e["step"], e["attempt"], e["error_type"]) for e in retries] == [
        ("1:fickle", "1", "RuntimeError"), ("1:fickle", "2", "RuntimeError")]
    assert [float(e["countdown_s"]) for e in retries] == [0.1, 0.2]  # exponential backoff
    assert assert_compensated_once_newest_first(log) == ["1:fickle", "0:booked"]
    assert counter(r, COMP_TRIES_KEY, run.run_id, "fickle") == 3
    assert counter(r, UNDONE_KEY, run.run_id, "fickle") == 1
    assert counter(r, UNDONE_KEY, run.run_id, "booked") == 1
    assert side_effects(r, run.run_id) == {}
    assert [f for _, f in r.xrange(DEAD_LETTERS) if f["run_id"] == run.run_id] == []


def test_a_compensation_that_always_fails_is_dead_lettered_and_pipeline_compensate_finishes_it(
    cluster: Cluster,
) -> None:
    p, run = start_fickle(cluster, failures=1000)
    r = cluster.redis

    result = run.wait(30)

    # The saga went on past the dead compensation, and says the run needs a person.
    assert result.status is RunStatus.COMPENSATION_FAILED
    log = log_of(p, run.run_id)
    assert steps_with(log, "compensation.retry") == ["1:fickle"] * 3
    assert steps_with(log, "compensation.dead") == ["1:fickle"]
    assert steps_with(log, "compensation.done") == ["0:booked"]
    assert side_effects(r, run.run_id) == {"fickle": "1"}
    fickle_version = {v.step: v.version for v in run.history()}["1:fickle"]
    [dead] = [f for _, f in r.xrange(DEAD_LETTERS) if f["run_id"] == run.run_id]
    assert {k: dead[k] for k in ("run_id", "step", "agent", "version")} == {
        "run_id": run.run_id, "step": "1:fickle", "agent": "fickle",
        "version": str(fickle_version)}
    assert dead["error"].startswith("RuntimeError: ") and "on purpose" in dead["error"]
    assert counter(r, COMP_TRIES_KEY, run.run_id, "fickle") == 4  # 1 + 3 retries

    r.delete(COMP_FAIL_KEY.format(run_id=run.run_id))  # the fault is removed
    redriven = invoke_cli(cluster.url, "compensate", run.run_id)
    assert redriven.exit_code == 0, redriven.output
    result = run.wait(30)

    assert result.status is RunStatus.COMPENSATED
    log = log_of(p, run.run_id)
    assert steps_with(log, "compensation.done") == ["0:booked", "1:fickle"]
    assert count(log, "run.compensating") == 2  # the failure, then the re-drive
    assert counter(r, UNDONE_KEY, run.run_id, "booked") == 1  # not compensated again
    assert counter(r, UNDONE_KEY, run.run_id, "fickle") == 1
    assert counter(r, COMP_TRIES_KEY, run.run_id, "fickle") == 5
    assert side_effects(r, run.run_id) == {}


# -- 4. one failure reported many times ----------------------------------------------------


def test_many_errback_calls_for_one_run_start_exactly_one_compensation(
    cluster: Cluster,
) -> None:
    # Two failed chord members (one errback each, task_allow_error_cb_on_chord_header)
    # and the chord body's ChordError (record_failure): several errback calls, one run.
    cluster.worker(concurrency=3, PIPELINE_CHAOS="tripwire=error:1,snag=error:1")
    p = cluster.pipeline()
    r = cluster.redis

    run = p.start("saga_snag", {"n": 1})
    result = run.wait(30)
    wait_until_ended(p, run.run_id, {"1.0:tripwire", "1.1:snag"})

    assert result.status is RunStatus.COMPENSATED
    log = log_of(p, run.run_id)
    # Each member fails, unless the other's failure began the saga before it opened (a
    # loaded machine): then it is skipped, and the chord's ChordError is the second call.
    ends = {e["step"]: e["event"] for e in log if e["event"] in ("step.failed", "step.skipped")}
    assert set(ends) == {"1.0:tripwire", "1.1:snag"}
    assert "step.failed" in ends.values()
    assert count(log, "run.compensating") == 1
    assert count(log, "compensation.planned") == 1
    assert assert_compensated_once_newest_first(log) == ["0:booked"]
    assert counter(r, COMP_TRIES_KEY, run.run_id, "booked") == 1
    assert counter(r, UNDONE_KEY, run.run_id, "booked") == 1
    assert side_effects(r, run.run_id) == {}


# -- 5. cancelling by hand ----------------------------------------------------------------


def test_pipeline_cancel_stops_a_held_run_and_compensates_what_it_sealed(
    cluster: Cluster,
) -> None:
    r = cluster.redis
    p = cluster.pipeline()
    key = str(uuid.uuid4())
    run_id = Pipeline.run_id_for("saga_held", key)
    r.set(HOLD_KEY.format(run_id=run_id), "1", ex=120)
    cluster.worker()

    run = p.start("saga_held", {"n": 1}, idempotency_key=key)
    wait_for(lambda: counter(r, EXECUTIONS_KEY, run_id, "lagger") == 1, 20, "lagger to start")
    cancelled = invoke_cli(cluster.url, "cancel", run_id, "--wait", "--json")

    assert cancelled.exit_code == 0, cancelled.output
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    r.delete(HOLD_KEY.format(run_id=run_id))
    wait_until_ended(p, run_id, {"1:lagger"})
    log = log_of(p, run_id)
    [began] = [e for e in log if e["event"] == "run.compensating"]
    assert began["reason"] == "cancelled by hand"
    assert assert_compensated_once_newest_first(log) == ["0:booked"]
    assert [e["event"] for e in log if e.get("step") == "1:lagger"] == [
        "step.started", "step.discarded", "step.self_compensated"]
    assert [v.step for v in run.history()[1:]] == ["0:booked"]
    assert counter(r, UNDONE_KEY, run_id, "booked") == 1
    assert counter(r, UNDONE_KEY, run_id, "lagger") == 1
    assert side_effects(r, run_id) == {}
    again = invoke_cli(cluster.url, "cancel", run_id)
    assert again.exit_code == 2 and "nothing to cancel" in again.stderr


# -- 6. a worker killed with SIGKILL ------------------------------------------------------------


def test_a_worker_killed_mid_step_and_mid_compensation_leaves_neither_run_stuck(
    cluster: Cluster,
) -> None:
    """One kill for both cases: a run held inside its step, another held inside a
    compensation. The broker hands their messages out again only after the
    visibility timeout, the bound on recovery: 76 s, the least that create_app
    accepts for these agents (2 x (3 s limit + 5 s grace + 30 s store backoff)).
    Measured: about 78 s for both. The client only publishes (the timeout is a
    consumer's setting), so it keeps the default, which every agent allows."""
    env = {"PIPELINE_AGENT_MODULES": "tests.quick_agents",
           "PIPELINE_VISIBILITY_TIMEOUT_S": str(QUICK_VISIBILITY_TIMEOUT_S),
           "PIPELINE_CHAOS": "quick_trip=error:1"}
    r = cluster.redis
    p = cluster.pipeline()
    step_key, comp_key = str(uuid.uuid4()), str(uuid.uuid4())
    step_run_id = Pipeline.run_id_for("quick_held", step_key)
    comp_run_id = Pipeline.run_id_for("quick_undone", comp_key)
    r.set(HOLD_KEY.format(run_id=step_run_id), "1", ex=600)
    r.set(COMP_HOLD_KEY.format(run_id=comp_run_id), "1", ex=600)
    doomed = cluster.worker(concurrency=3, **env)

    comp_run = p.start("quick_undone", {"n": 1}, idempotency_key=comp_key)
    wait_for(lambda: counter(r, COMP_TRIES_KEY, comp_run_id, "quick_booked") == 1, 20,
             "the compensation to start")
    step_run = p.start("quick_held", {"n": 1}, idempotency_key=step_key)
    wait_for(lambda: counter(r, EXECUTIONS_KEY, step_run_id, "quick_hold") == 1, 20,
             "the step to start")
    doomed.kill()
    killed_at = time.monotonic()
    cluster.worker(concurrency=3, **env)
    r.delete(HOLD_KEY.format(run_id=step_run_id), COMP_HOLD_KEY.format(run_id=comp_run_id))

    step_result = step_run.wait(QUICK_VISIBILITY_TIMEOUT_S + 40)
    step_recovery_s = time.monotonic() - killed_at
    comp_result = comp_run.wait(QUICK_VISIBILITY_TIMEOUT_S + 40)
    comp_recovery_s = time.monotonic() - killed_at
    print(f"\nrecovery after SIGKILL (visibility timeout {QUICK_VISIBILITY_TIMEOUT_S} s): "
          f"mid-step {step_recovery_s:.1f} s, mid-compensation {comp_recovery_s:.1f} s")

    # The timeout bounds recovery, not kombu's sweep for lost messages (100 s by default).
    assert max(step_recovery_s, comp_recovery_s) < QUICK_VISIBILITY_TIMEOUT_S * 1.1 + 5
    assert step_result.status is RunStatus.SUCCEEDED, step_result.error
    assert step_result.output == {"n": 2}
    assert counter(r, EXECUTIONS_KEY, step_run_id, "quick_hold") == 2  # run again, sealed once
    assert [v.step for v in step_run.history()[1:]] == ["0:quick_hold"]

    assert comp_result.status is RunStatus.COMPENSATED
    log = log_of(p, comp_run_id)
    assert assert_compensated_once_newest_first(log) == ["0:quick_booked"]
    assert counter(r, COMP_TRIES_KEY, comp_run_id, "quick_booked") == 2  # killed, then again
    assert counter(r, UNDONE_KEY, comp_run_id, "quick_booked") == 1
    assert side_effects(r, comp_run_id) == {}
