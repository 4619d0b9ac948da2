"""Cancel reaches a running agent: the step sees ``ctx.cancelled`` and stops, the run ends
``cancelled`` (not ``compensated``), the stopped step is no failure of its agent; and the
check itself (``CancelCheck``) reads the run's status at most once a second, for good once
it stopped."""

from __future__ import annotations

import json
import uuid
from typing import Any

import redis
from click.testing import CliRunner

from pipeline import BreakerRegistry, Pipeline, RunStatus, StepContext, agents
from pipeline.cli import main
from pipeline.context import CANCEL_CHECK_S, CancelCheck
from pipeline.observe import report
from tests.agents import COMP_FAIL_KEY, WATCH_SLICES_KEY
from tests.conftest import AGENT_MODULES, wait_for
from tests.quick_agents import COMP_TRIES_KEY, SIDE_EFFECTS_KEY, UNDONE_KEY


def cli(url: str, *args: str) -> Any:
    env: dict[str, str | None] = {
        "PIPELINE_REDIS_URL": url, "PIPELINE_AGENT_MODULES": AGENT_MODULES,
        "CELERY_BROKER_URL": None, "CELERY_RESULT_BACKEND": None, "PIPELINE_CHAOS": None,
    }
    return CliRunner().invoke(main, list(args), env=env)


def slices(r: redis.Redis, run_id: str) -> int:
    return int(r.get(WATCH_SLICES_KEY.format(run_id=run_id)) or 0)


def watcher_failures(r: redis.Redis) -> tuple[int, int]:
    """The watcher breaker's failures and successes in its window."""
    snap = BreakerRegistry(r).snapshot("watcher", agents.get("watcher").breaker)
    return snap.failures, snap.successes


def events_of(p: Pipeline, run_id: str, step: str) -> list[str]:
    return [e["event"] for e in p.store.log(run_id) if e.get("step") == step]


# -- on real workers -------------------------------------------------------------------------


def test_cancel_reaches_the_running_step_which_stops_and_the_run_ends_cancelled(
    pipeline: Pipeline, redis_url: str, rclient: redis.Redis,
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    breaker_before = watcher_failures(r)
    run = pipeline.start("saga_watched", {"n": 1})
    wait_for(lambda: slices(r, run.run_id) >= 3, 30, "watcher to be working")

    done = cli(redis_url, "cancel", run.run_id, "--wait", "--json")

    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["status"] == "cancelled"
    # the run ends without waiting for the running step (it sealed nothing to undo); the
    # step sees the stop within a second and ends itself, long before its 30 s of work
    wait_for(lambda: len(events_of(pipeline, run.run_id, "1:watcher")) > 1, 10,
             "the watcher to stop")
    assert events_of(pipeline, run.run_id, "1:watcher") == ["step.started", "step.cancelled"]
    [row] = [c for c in report(pipeline.store, run.run_id).calls if c.step == "1:watcher"]
    assert row.status == "cancelled" and row.error_type == "" and row.output is None
    assert "StepCancelled" not in {c.error_type for c in report(pipeline.store,
                                                                run.run_id).calls}
    # what was sealed is undone once; what the step began it undid itself
    assert [v.step for v in run.history()[1:]] == ["0:booked"]
    assert int(r.get(UNDONE_KEY.format(run_id=run.run_id, agent="booked")) or 0) == 1
    assert not r.exists(UNDONE_KEY.format(run_id=run.run_id, agent="watcher"))
    assert r.hgetall(SIDE_EFFECTS_KEY.format(run_id=run.run_id)) == {}
    assert run.status() is RunStatus.CANCELLED
    assert run.info().error == "cancelled by hand"
    # a cancel is no failure of the agent: its breaker counted nothing
    assert watcher_failures(r) == breaker_before
    # and the run is listed as cancelled
    listed = cli(redis_url, "runs", "--status", "cancelled", "--json")
    assert listed.exit_code == 0, listed.output
    assert run.run_id in {row["run_id"] for row in json.loads(listed.stdout)}
    again = cli(redis_url, "cancel", run.run_id)
    assert again.exit_code == 2 and "is cancelled: there is nothing to cancel" in again.stderr


def test_a_cancelled_run_whose_undo_fails_is_compensation_failed_then_cancelled_when_redriven(
    pipeline: Pipeline, redis_url: str,
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    key = str(uuid.uuid4())
    run_id = Pipeline.run_id_for("saga_fickle_watched", key)
    r.set(COMP_FAIL_KEY.format(run_id=run_id), 4, ex=120)  # the first try and 3 retries fail
    pipeline.start("saga_fickle_watched", {"n": 1}, idempotency_key=key)
    wait_for(lambda: slices(r, run_id) >= 1, 30, "watcher to be working")

    assert pipeline.cancel(run_id).wait(60).status is RunStatus.COMPENSATION_FAILED
    assert int(r.get(COMP_TRIES_KEY.format(run_id=run_id, agent="fickle")) or 0) == 4

    redriven = cli(redis_url, "compensate", run_id, "--wait", "--json")

    assert redriven.exit_code == 0, redriven.output
    assert json.loads(redriven.stdout)["status"] == "cancelled"
    assert int(r.get(UNDONE_KEY.format(run_id=run_id, agent="fickle")) or 0) == 1
    wait_for(lambda: len(events_of(pipeline, run_id, "1:watcher")) > 1, 10,
             "the watcher to stop")
    assert events_of(pipeline, run_id, "1:watcher") == ["step.started", "step.cancelled"]
    assert r.hgetall(SIDE_EFFECTS_KEY.format(run_id=run_id)) == {}


def test_step_cancelled_raised_while_the_run_is_live_is_an_ordinary_failure(
    pipeline: Pipeline,
) -> None:
    result = pipeline.start("saga_pretend", {"n": 1}).wait(30)

    assert result.status is RunStatus.COMPENSATED  # failed by its step, not cancelled
    [row] = [c for c in report(pipeline.store, result.run_id).calls if c.step == "1:pretender"]
    assert (row.status, row.error_type) == ("failed", "StepCancelled")


# -- the check itself (pure logic: a fake status and a fake clock) -----------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_check_reads_at_most_once_a_second_and_a_stop_is_for_good() -> None:
    statuses = ["running", "running", "compensating", "running"]
    reads: list[str] = []

    def status() -> str:
        reads.append(statuses[len(reads)])
        return reads[-1]

    clock = Clock()
    check = CancelCheck(status, clock=clock)
    assert check.stopped() == "" and len(reads) == 1
    clock.now += CANCEL_CHECK_S / 2
    assert check.stopped() == "" and len(reads) == 1  # answered from memory
    clock.now += CANCEL_CHECK_S / 2
    assert check.stopped() == "" and len(reads) == 2
    clock.now += CANCEL_CHECK_S
    assert check.stopped() == "compensating" and len(reads) == 3
    clock.now += CANCEL_CHECK_S
    assert check.stopped() == "compensating" and len(reads) == 3  # never read again


def test_the_check_says_gone_for_an_expired_run_and_nothing_when_redis_is_unreachable(
) -> None:
    assert CancelCheck(lambda: None).stopped() == "gone"

    def unreachable() -> str:
        raise redis.ConnectionError("Connection refused")

    assert CancelCheck(unreachable).stopped() == ""  # the seal still refuses a stopped run
    for status in ("waiting_for_human", "running"):
        assert CancelCheck(lambda s=status: s).stopped() == ""
    for status in ("failed", "cancelled", "compensated", "compensation_failed"):
        assert CancelCheck(lambda s=status: s).stopped() == status


def test_a_context_built_by_hand_checks_its_run_through_its_own_redis(
    rclient: redis.Redis,
) -> None:
    ctx = StepContext(run_id=f"no-such-run-{uuid.uuid4()}", step="0:a", agent="a", attempt=1,
                      input_versions=(0,), redis=rclient)
    assert ctx.cancelled
    assert ctx.sleep(30)  # returns at once: the run is gone


def test_a_choreographed_delivery_sees_the_cancel_and_its_ledger_says_cancelled(
    pipeline: Pipeline, redis_url: str,
) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    run = pipeline.start("watching", {"n": 1})
    wait_for(lambda: slices(r, run.run_id) >= 1, 30, "the delivery to be working")

    assert pipeline.cancel(run.run_id).wait(30).status is RunStatus.CANCELLED

    wait_for(lambda: "step.cancelled" in {e["event"] for e in pipeline.store.log(run.run_id)},
             10, "the delivery to stop")
    shown = cli(redis_url, "events", run.run_id, "--json")
    assert shown.exit_code == 0, shown.output
    [delivery] = [d for e in json.loads(shown.stdout) for d in e["deliveries"]]
    assert (delivery["agent"], delivery["state"]) == ("event_watcher", "cancelled")
    assert r.hgetall(SIDE_EFFECTS_KEY.format(run_id=run.run_id)) == {}
