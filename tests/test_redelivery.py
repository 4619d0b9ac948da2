"""Redelivered and duplicated step messages, on real workers: a step whose key is
sealed is never executed or sealed again, and a step whose worker keeps dying
is failed by the delivery counter instead of looping."""

from __future__ import annotations

import uuid

import pytest
import redis

from pipeline import Pipeline, Run, RunStatus
from pipeline.agent import agents
from pipeline.errors import VersionNotFound
from pipeline.local import WorkerProcess
from tests.agents import CRASH_AFTER_SEAL_KEY, CRASHED_TASK_KEY, EXECUTIONS_KEY
from tests.conftest import Cluster, wait_for


def executions(client: redis.Redis, run_id: str, agent: str) -> int:
    return int(client.get(EXECUTIONS_KEY.format(run_id=run_id, agent=agent)) or 0)


def assert_one_version_per_step(run: Run) -> None:
    history = run.history()
    assert [v.version for v in history] == [0, 1, 2]
    assert [v.step for v in history[1:]] == ["0:increment", "1:double"]
    assert [v.parents for v in history] == [(), (0,), (1,)]


def test_a_step_redelivered_after_it_sealed_is_not_executed_again(
    pipeline: Pipeline, rclient: redis.Redis, shared_worker: WorkerProcess
) -> None:
    key = f"crash-after-seal-{uuid.uuid4()}"
    run_id = Pipeline.run_id_for("counting", key)
    crash_key = CRASH_AFTER_SEAL_KEY.format(run_id=run_id)
    rclient.set(crash_key, "1", ex=120)

    run = pipeline.start("counting", {"n": 4}, idempotency_key=key)
    result = run.wait(30)

    assert run.run_id == run_id
    assert result.status is RunStatus.SUCCEEDED, result.error
    assert result.output == {"n": (4 + 1) * 2} and result.version == 2
    # The pool process died after increment sealed and before the ack; the
    # broker delivered the message again, and that delivery ran to the end.
    assert not rclient.exists(crash_key), "the crash-after-seal hook never fired"
    crashed = str(rclient.get(CRASHED_TASK_KEY.format(run_id=run_id)))
    wait_for(lambda: all(
        shared_worker.logfile.read_text().count(f"agent.increment[{crashed}] {event}") == 2
        for event in ("received", "succeeded")
    ), message="the broker to deliver the crashed step again, and that delivery to end")
    assert executions(rclient, run_id, "increment") == 1
    assert_one_version_per_step(run)
    log = pipeline.store.log(run_id)
    assert [e["step"] for e in log if e["event"] == "step.sealed"] == ["0:increment", "1:double"]
    # The redelivery found the step key sealed before it counted as a delivery.
    opened = [e["step"] for e in log if e["event"] == "step.started"]
    assert opened.count("0:increment") == 1


def test_a_duplicated_step_message_returns_the_sealed_version_and_changes_nothing(
    pipeline: Pipeline, rclient: redis.Redis
) -> None:
    run = pipeline.start("counting", {"n": 1})
    assert run.wait(30).status is RunStatus.SUCCEEDED
    before = run.history()

    duplicate = pipeline.app.send_task(
        "agent.increment",
        args=(0,),
        kwargs={"run_id": run.run_id, "step": "0:increment"},
        queue="agents.increment",
        task_id=str(uuid.uuid4()),
    )

    assert duplicate.get(timeout=20) == 1
    assert executions(rclient, run.run_id, "increment") == 1
    assert run.history() == before
    result = run.result()
    assert (result.status, result.output, result.version) == (RunStatus.SUCCEEDED, {"n": 4}, 2)


def test_a_step_cannot_be_handed_a_version_that_was_never_sealed(
    pipeline: Pipeline, rclient: redis.Redis
) -> None:
    # A run whose input is sealed but whose canvas was never enqueued: nothing
    # has handed version 1 to anyone, and a forged message cannot invent it.
    run_id = f"forged-{uuid.uuid4()}"
    pipeline.store.create_run(run_id, workflow="counting", payload={"n": 1},
                              contract="count@1")

    forged = pipeline.app.send_task(
        "agent.double",
        args=(1,),
        kwargs={"run_id": run_id, "step": "1:double"},
        queue="agents.double",
    )

    with pytest.raises(VersionNotFound, match=f"run {run_id} has no version 1"):
        forged.get(timeout=20)
    assert executions(rclient, run_id, "double") == 0
    assert [v.version for v in pipeline.store.history(run_id)] == [0]
    assert pipeline.store.run_info(run_id).status is RunStatus.RUNNING


def test_a_step_whose_worker_keeps_crashing_fails_the_run_at_the_delivery_limit(
    cluster: Cluster,
) -> None:
    limit = agents.get("increment").max_deliveries
    assert limit == 0 + 1 + 3  # max_retries + the first delivery + the redelivery allowance
    cluster.worker(PIPELINE_CHAOS="increment=crash:1")
    p = cluster.pipeline()

    run = p.start("counting", {"n": 1})
    result = run.wait(60)  # WaitTimeout if the crash loop never stopped

    assert result.status is RunStatus.FAILED
    info = run.info()
    assert info.failed_agent == "increment"
    assert info.error is not None and info.error.startswith("DeliveryLimitExceeded: ")
    assert f"delivered {limit + 1} times, more than the {limit} allowed" in info.error
    log = p.store.log(run.run_id)
    started = [e for e in log if e["event"] == "step.started"]
    assert [e["step"] for e in started] == ["0:increment"] * limit
    exhausted = [e for e in log if e["event"] == "step.exhausted"]
    assert [(e["step"], e["attempt"]) for e in exhausted] == [("0:increment", str(limit + 1))]
    assert [v.version for v in run.history()] == [0]
    assert executions(cluster.redis, run.run_id, "increment") == 0  # it died before executing
