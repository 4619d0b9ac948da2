"""The Python client against real Redis and real workers: bad input is refused before
anything is written or enqueued, idempotency keys, waiting for a decision."""

from __future__ import annotations

import copy
import json
import math
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from pipeline import Pipeline
from pipeline.errors import (
    ContractViolation,
    IdempotencyConflict,
    PayloadTooLarge,
    RunNotFound,
    StoreUnavailable,
    UnknownWorkflow,
    WaitTimeout,
)
from pipeline.keys import LIVE, RUNS_INDEX, SAGAS, STALLED, UNENQUEUED
from pipeline.state import RunStatus
from tasks import SAMPLES
from tests.conftest import Cluster, settings_for

WORKFLOW = "credit_decision"
FIRST_QUEUE = "agents.credit_score"
GOOD = json.loads((SAMPLES / "good.json").read_text())
INVALID = json.loads((SAMPLES / "invalid.json").read_text())


def good(**changes: Any) -> dict[str, Any]:
    """A deep copy of the good application with top-level sections changed."""
    return {**copy.deepcopy(GOOD), **changes}


def footprint(p: Pipeline) -> tuple[set[str], dict[str, int]]:
    """What a start can leave behind: the pipeline's keys and every broker queue's length."""
    r = p.store.redis
    queues = sorted(q.name for q in p.app.conf.task_queues)
    # the fleet-wide sorted sets, as one pseudo key per run they hold
    indexed = {f"pipeline:{{{run_id}}}:in:{name}" for name in (RUNS_INDEX, UNENQUEUED, SAGAS, LIVE)
               for run_id in r.zrange(name, 0, -1)}
    indexed |= {f"pipeline:{{{run_id}}}:in:{STALLED}" for run_id in r.hkeys(STALLED)}
    keys = set(r.scan_iter("pipeline:*")) - {RUNS_INDEX, UNENQUEUED, SAGAS, LIVE,
                                             STALLED} | indexed
    return keys, {q: r.llen(q) for q in queues}


@contextmanager
def writes_nothing(p: Pipeline) -> Iterator[None]:
    before = footprint(p)
    # The control run's first step is waiting: a message enqueued would show up here.
    assert before[1][FIRST_QUEUE] == 1
    yield
    assert footprint(p) == before


@pytest.fixture
def idle(cluster: Cluster) -> Pipeline:
    """A client on a private database with no worker and one valid run already waiting."""
    p = cluster.pipeline()
    p.start(WORKFLOW, GOOD)
    return p


# -- bad input: one clear error, nothing written or enqueued ------------------------


def test_an_unknown_workflow_is_refused_with_the_registered_names(idle: Pipeline) -> None:
    with writes_nothing(idle), pytest.raises(UnknownWorkflow) as e:
        idle.start("credit_decisoin", GOOD)
    assert "'credit_decisoin'" in str(e.value) and WORKFLOW in str(e.value)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(good(tags={"vip", "new"}), id="set"),
        pytest.param(good(loan={**GOOD["loan"], "amount": math.nan}), id="nan"),
    ],
)
def test_a_payload_that_is_not_json_is_refused(idle: Pipeline, payload: dict[str, Any]) -> None:
    with writes_nothing(idle), pytest.raises(ContractViolation, match="not JSON"):
        idle.start(WORKFLOW, payload)


def test_a_payload_breaking_the_input_contract_names_every_failing_field(idle: Pipeline) -> None:
    with writes_nothing(idle), pytest.raises(ContractViolation) as e:
        idle.start(WORKFLOW, INVALID)
    paths = ["applicant.country", "applicant.email", "credit_history.on_time_payment_ratio",
             "income.annual", "loan.amount"]
    assert e.value.field_paths == paths
    assert e.value.contract == "credit_application@1"
    assert all(path in str(e.value) for path in paths)


def test_a_payload_over_the_size_limit_is_refused(cluster: Cluster, idle: Pipeline) -> None:
    small = cluster.pipeline(max_payload_bytes=2048)
    big = good(income={**GOOD["income"], "documents": ["x" * 4000]})
    with writes_nothing(idle), pytest.raises(PayloadTooLarge) as e:
        small.start(WORKFLOW, big)
    assert "2,048 bytes" in str(e.value)


def test_an_unknown_run_id_is_reported_as_no_run(idle: Pipeline) -> None:
    missing = str(uuid.uuid4())
    with writes_nothing(idle):
        with pytest.raises(RunNotFound, match=f"no run '{missing}'"):
            idle.run(missing)
        with pytest.raises(RunNotFound, match="no run"):
            idle.store.run_info(missing)
        with pytest.raises(RunNotFound, match="no run"):
            idle.store.history(missing)
        with pytest.raises(RunNotFound, match="no run"):
            idle.store.log(missing)


def test_an_unreachable_redis_is_named_without_its_password() -> None:
    settings = settings_for("redis://:hunter2@127.0.0.1:1/0")
    p = Pipeline(settings=settings)
    with pytest.raises(StoreUnavailable) as e:
        p.start(WORKFLOW, GOOD)
    assert "127.0.0.1:1" in str(e.value)
    assert "hunter2" not in str(e.value)


# -- idempotency ---------------------------------------------------------------------


def test_the_same_idempotency_key_starts_one_run_and_enqueues_it_once(cluster: Cluster) -> None:
    p = cluster.pipeline()
    first = p.start(WORKFLOW, GOOD, idempotency_key="order-42")
    # The same payload with its keys in another order is the same input.
    reordered = dict(reversed(list(GOOD.items())))
    again = p.start(WORKFLOW, reordered, idempotency_key="order-42")
    assert again.run_id == first.run_id
    keys, queues = footprint(p)
    assert {k.split("{")[1].split("}")[0] for k in keys} == {first.run_id}
    assert queues[FIRST_QUEUE] == 1
    assert sum(queues.values()) == 1
    assert [v.version for v in first.history()] == [0]


def test_reusing_an_idempotency_key_with_another_payload_is_a_conflict(cluster: Cluster) -> None:
    p = cluster.pipeline()
    run = p.start(WORKFLOW, GOOD, idempotency_key="order-43")
    before = footprint(p)
    with pytest.raises(IdempotencyConflict) as e:
        p.start(WORKFLOW, good(loan={**GOOD["loan"], "amount": 30000}),
                idempotency_key="order-43")
    assert "'order-43'" in str(e.value) and run.run_id in str(e.value)
    assert footprint(p) == before
    assert run.history()[0].payload == GOOD


def test_restarting_a_finished_run_with_its_key_returns_the_same_result(
    pipeline: Pipeline,
) -> None:
    key = f"order-{uuid.uuid4()}"
    first = pipeline.start(WORKFLOW, GOOD, idempotency_key=key).wait(30)
    again = pipeline.start(WORKFLOW, GOOD, idempotency_key=key)
    assert again.run_id == first.run_id
    assert again.wait(30) == first
    assert [v.version for v in again.history()] == [0, 1, 2, 3, 4, 5]


# -- waiting -------------------------------------------------------------------------


def test_wait_returns_the_decision_sealed_as_the_last_version(pipeline: Pipeline) -> None:
    run = pipeline.start(WORKFLOW, GOOD)
    result = run.wait(30)
    assert (result.status, result.version, result.run_id, result.error) == (
        RunStatus.SUCCEEDED, 5, run.run_id, None)
    decision = result.output
    assert decision["application_id"] == "app-1001"
    assert decision["decision"] == "approved"
    assert decision["approved_amount"] == 25000.0
    assert decision["credit_score"] == 759
    assert decision["risk_rating"] == "low"
    last = run.history()[-1]
    assert (last.version, last.agent, last.payload) == (5, "final_approval", decision)


def test_wait_gives_up_with_wait_timeout_when_no_worker_serves_the_run(cluster: Cluster) -> None:
    p = cluster.pipeline()
    run = p.start(WORKFLOW, GOOD)
    with pytest.raises(WaitTimeout) as e:
        run.wait(0.2)
    assert run.run_id in str(e.value) and "running" in str(e.value)
    assert run.status() is RunStatus.RUNNING
    assert footprint(p)[1][FIRST_QUEUE] == 1


def test_a_start_that_died_before_enqueuing_is_completed_by_a_retry_with_its_key(
    pipeline: Pipeline,
) -> None:
    """The first start created the run and died before enqueuing it: a retry with
    the same key, once the first start's grace has passed, enqueues the run."""
    key = f"died-{uuid.uuid4()}"
    run_id = Pipeline.run_id_for("credit_decision", key)
    good = json.loads((SAMPLES / "good.json").read_text())
    pipeline.store.create_run(run_id, workflow="credit_decision", payload=good,
                              contract="credit_application@1", idempotency_key=key)
    pipeline.store.redis.hset(f"pipeline:{{{run_id}}}:run", "created_at", "1")  # long ago
    result = pipeline.start("credit_decision", good, idempotency_key=key).wait(30)
    assert result.status is RunStatus.SUCCEEDED and result.output["decision"] == "approved"
    assert pipeline.store.redis.hget(f"pipeline:{{{run_id}}}:run", "enqueued") == "1"


def test_a_retry_while_the_first_start_may_still_enqueue_does_not_enqueue_again(
    cluster: Cluster,
) -> None:
    p = cluster.pipeline()
    key = f"racing-{uuid.uuid4()}"
    run_id = Pipeline.run_id_for("credit_decision", key)
    good = json.loads((SAMPLES / "good.json").read_text())
    p.store.create_run(run_id, workflow="credit_decision", payload=good,
                       contract="credit_application@1", idempotency_key=key)
    assert p.start("credit_decision", good, idempotency_key=key).run_id == run_id
    assert cluster.redis.llen("agents.credit_score") == 0  # left to the first start


def test_neither_the_client_nor_the_workers_keep_a_subscription_per_run(
    pipeline: Pipeline, rclient: redis.Redis,
) -> None:
    """Sending a chord, or continuing a chain into one, subscribes the sender to its
    members' result channels (celery/celery#4824); nothing here reads them (the client
    waits on the run's log), so client and workers let go of them."""
    before = len(rclient.pubsub_channels("celery-task-meta-*"))
    runs = [pipeline.start(WORKFLOW, GOOD) for _ in range(10)]
    assert all(r.wait(30).status.value == "succeeded" for r in runs)
    assert len(rclient.pubsub_channels("celery-task-meta-*")) <= before
