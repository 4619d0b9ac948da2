"""A parallel stage's chord joins in the seal, on real workers: the member whose seal
completes the stage joins it exactly once and the body runs once, whoever dies where.

Workflow ``trio``: ``seed`` -> ``left`` (+1), ``middle`` (+10), ``right`` (+100) side by
side -> ``gather`` (their sum). For an input n the output is 3n + 111.
"""

from __future__ import annotations

import uuid

import pytest
import redis

import tests.agents  # noqa: F401 - its contracts first: the join agents use them
from pipeline import Pipeline, RunStatus
from pipeline.app import create_app
from pipeline.canvas import compile_route, redrive, send
from pipeline.flow import route_of
from pipeline.join import joins_in_seal
from pipeline.keys import RunKeys
from tests.conftest import Cluster, settings_for, wait_for
from tests.join_agents import (
    BODY_STEP,
    CRASH_AFTER_BODY_KEY,
    CRASH_BEFORE_BODY_KEY,
    DROP_BODY_KEY,
    ENDED_KEY,
    FAIL_N,
    HOLD_KEY,
)
from tests.quick_agents import EXECUTIONS_KEY

MEMBERS = ("1.0:left", "1.1:middle", "1.2:right")

pytestmark = pytest.mark.workers


def executions(client: redis.Redis, run_id: str, agent: str) -> int:
    return int(client.get(EXECUTIONS_KEY.format(run_id=run_id, agent=agent)) or 0)


def joins(p: Pipeline, run_id: str) -> list[dict[str, str]]:
    """The log entries that joined the stage: a seal that completed it, or a rejoin."""
    return [e for e in p.store.log(run_id)
            if e.get("joined") and e["event"] in ("step.sealed", "stage.rejoined")]


def assert_joined_once(p: Pipeline, run_id: str, n: int, *, rejoined: int = 0) -> None:
    """The run succeeded with the sum of the three branches; one seal joined the stage,
    with the members' versions in stage order, and the body ran on exactly them."""
    result = p.run(run_id).wait(30)
    assert result.status is RunStatus.SUCCEEDED, result.error
    assert result.output == {"n": 3 * n + 111}
    history = p.run(run_id).history()
    by_step = {v.step: v.version for v in history}
    members = [by_step[k] for k in MEMBERS]
    sealed = [e for e in joins(p, run_id) if e["event"] == "step.sealed"]
    assert len(sealed) == 1, sealed
    assert sealed[0]["joined"] == ",".join(map(str, members))
    record = p.store.redis.hget(RunKeys(run_id).run, "join:1") or ""
    assert record.split("|")[1] in MEMBERS
    assert [e["joined"] for e in joins(p, run_id) if e["event"] == "stage.rejoined"] \
        == [sealed[0]["joined"]] * rejoined
    body = next(v for v in history if v.step == BODY_STEP)
    assert body.parents == tuple(members)
    assert executions(p.store.redis, run_id, "gather") == 1


def test_members_sealing_at_once_join_the_stage_once(cluster: Cluster) -> None:
    """Three members held until all have started, then let go together, on four pool
    processes, twelve runs at once: each stage joins once, each body runs once."""
    cluster.worker(concurrency=4)
    p = cluster.pipeline()
    client = cluster.redis
    runs = []
    for n in range(12):
        key = f"concurrent-{uuid.uuid4()}"
        run_id = Pipeline.run_id_for("trio", key)
        client.set(HOLD_KEY.format(run_id=run_id), "1", ex=60)
        runs.append((p.start("trio", {"n": n}, idempotency_key=key).run_id, n))
    for run_id, _ in runs[:4]:  # four runs' members all at work at once, then let go
        wait_for(lambda r=run_id: sum(executions(client, r, a)
                                      for a in ("left", "middle", "right")) == 3,
                 message=f"run {run_id}'s three members to start")
        client.delete(HOLD_KEY.format(run_id=run_id))
    for run_id, _ in runs[4:]:
        client.delete(HOLD_KEY.format(run_id=run_id))
    for run_id, n in runs:
        assert_joined_once(p, run_id, n)


def test_a_member_delivered_again_after_the_join_sends_no_second_body(
        pipeline: Pipeline) -> None:
    """The member that joined dies once its body was opened, before its ack: delivered
    again, it opens sealed and sends nothing (the next stage was delivered)."""
    key = f"after-body-{uuid.uuid4()}"
    run_id = Pipeline.run_id_for("trio", key)
    client = pipeline.store.redis
    client.set(CRASH_AFTER_BODY_KEY.format(run_id=run_id), "1", ex=120)
    pipeline.start("trio", {"n": 2}, idempotency_key=key)
    assert_joined_once(pipeline, run_id, 2)
    assert not client.exists(CRASH_AFTER_BODY_KEY.format(run_id=run_id)), "it never died"
    # the joiner's message came back: it ended twice (once dying), and opened once
    joiner = client.hget(RunKeys(run_id).run, "join:1").split("|")[1]  # type: ignore[union-attr]
    ended = ENDED_KEY.format(run_id=run_id)
    wait_for(lambda: client.hget(ended, joiner) == "2",
             message="the joiner's message to be delivered again, and that delivery to end")
    assert client.hget(RunKeys(run_id).deliveries, joiner) == "1"
    others = [k for k in (*MEMBERS, BODY_STEP) if k != joiner]
    assert {k: client.hget(ended, k) for k in others} == dict.fromkeys(others, "1")
    assert executions(client, run_id, "gather") == 1


def test_a_member_failing_fails_the_run_and_nothing_joins(pipeline: Pipeline) -> None:
    run = pipeline.start("trio", {"n": FAIL_N})
    result = run.wait(30)
    assert result.status is RunStatus.COMPENSATED, result
    assert "right fails on" in (result.error or "")
    assert executions(pipeline.store.redis, run.run_id, "gather") == 0
    assert joins(pipeline, run.run_id) == []
    assert pipeline.store.redis.hget(RunKeys(run.run_id).run, "join:1") is None
    assert BODY_STEP not in {v.step for v in run.history()}


def test_the_worker_killed_between_the_join_and_the_body_sends_it_when_delivered_again(
        pipeline: Pipeline) -> None:
    """The joiner's seal joined the stage, and its pool process died before the body went
    out: its message comes back, opens sealed, and sends the body (once)."""
    key = f"before-body-{uuid.uuid4()}"
    run_id = Pipeline.run_id_for("trio", key)
    client = pipeline.store.redis
    client.set(CRASH_BEFORE_BODY_KEY.format(run_id=run_id), "1", ex=120)
    pipeline.start("trio", {"n": 5}, idempotency_key=key)
    assert_joined_once(pipeline, run_id, 5, rejoined=1)
    assert not client.exists(CRASH_BEFORE_BODY_KEY.format(run_id=run_id)), "it never died"
    rejoined = next(e for e in joins(pipeline, run_id) if e["event"] == "stage.rejoined")
    assert rejoined["step"] == client.hget(RunKeys(run_id).run, "join:1").split("|")[1]  # type: ignore[union-attr]


def lose_the_body(p: Pipeline, n: int) -> str:
    """Start a run whose body's message is lost after the join; once the run has stalled
    with its stage complete, its id."""
    key = f"lost-body-{uuid.uuid4()}"
    run_id = Pipeline.run_id_for("trio", key)
    client = p.store.redis
    client.set(DROP_BODY_KEY.format(run_id=run_id), "1", ex=120)
    p.start("trio", {"n": n}, idempotency_key=key)
    wait_for(lambda: not client.exists(DROP_BODY_KEY.format(run_id=run_id))
             and client.hget(RunKeys(run_id).run, "join:1"),
             message="the stage to join, and the body to be lost")
    assert p.store.run_info(run_id).status is RunStatus.RUNNING
    assert not client.hexists(RunKeys(run_id).deliveries, BODY_STEP)
    return run_id


def test_the_sweepers_redrive_of_a_complete_stage_sends_the_body_alone(
        pipeline: Pipeline) -> None:
    run_id = lose_the_body(pipeline, 7)
    route = route_of(pipeline.store.run_info(run_id))
    assert redrive(pipeline.app, pipeline.store, route, run_id) == [BODY_STEP]
    assert_joined_once(pipeline, run_id, 7)
    # the whole run is sealed now: a re-drive finds nothing owed and sends nothing
    assert redrive(pipeline.app, pipeline.store, route, run_id) == []


def test_a_complete_stage_sent_again_as_a_chord_joins_once_more(pipeline: Pipeline) -> None:
    """As a resume does: every member opens sealed, the first of them joins the stage
    again (no step of the next stage was delivered) and the others do not."""
    run_id = lose_the_body(pipeline, 8)
    route = route_of(pipeline.store.run_info(run_id))
    seed = int(pipeline.store.redis.hget(RunKeys(run_id).steps, "0:seed"))  # type: ignore[arg-type]
    send(pipeline.app, compile_route(pipeline.app, route, run_id, start=1, upstream=seed))
    assert_joined_once(pipeline, run_id, 8, rejoined=1)


def test_a_run_that_recorded_no_route_joins_by_its_workflows_route(pipeline: Pipeline) -> None:
    """A run created by a client from before routes were recorded: the seal cannot tell
    the stage, so the member that completes it joins by the route its worker knows."""
    run_id = str(uuid.uuid4())
    pipeline.store.create_run(run_id, workflow="trio", payload={"n": 3}, contract="count@1")
    assert pipeline.store.redis.hget(RunKeys(run_id).run, "route") is None
    pipeline.workflow("trio").enqueue(pipeline.app, pipeline.store, run_id)
    pipeline.store.mark_enqueued(run_id)
    result = pipeline.run(run_id).wait(30)
    assert result.status is RunStatus.SUCCEEDED, result.error
    assert result.output == {"n": 3 * 3 + 111}
    joined = [e for e in pipeline.store.log(run_id) if e.get("joined")]
    assert [e["event"] for e in joined] == ["stage.joined"]
    by_step = {v.step: v.version for v in pipeline.run(run_id).history()}
    assert joined[0]["joined"] == ",".join(str(by_step[k]) for k in MEMBERS)  # stage order
    assert executions(pipeline.store.redis, run_id, "gather") == 1


def test_a_chord_sent_by_a_client_that_leaves_the_join_to_celery_joins_once(
        redis_url: str, pipeline: Pipeline) -> None:
    """A client of an older version (Celery's own Redis backend): it sizes the chord and its
    members store their results. The workers join the stage in the seal all the same, and
    the body runs once; Celery's count never completes, so it sends no second body."""
    settings = settings_for(redis_url)
    app = create_app(settings)
    app.backend_cls = "celery.backends.redis:RedisBackend"
    assert not joins_in_seal(app)
    older = Pipeline(settings=settings, app=app)
    key = f"older-client-{uuid.uuid4()}"
    run_id = Pipeline.run_id_for("trio", key)
    older.start("trio", {"n": 4}, idempotency_key=key)
    assert_joined_once(pipeline, run_id, 4)
    # a workflow that starts with a parallel stage: the older client sends the chord itself
    run = older.start("fanning", {"n": 3})
    result = run.wait(30)
    assert result.status is RunStatus.SUCCEEDED, result.error
    assert result.output == {"n": 3 * 2 + 10**80 + 3}
    log = pipeline.store.log(run.run_id)
    assert len([e for e in log if e.get("joined")]) == 1
    assert [e["step"] for e in log if e["event"] == "step.started"].count("1:join") == 1
