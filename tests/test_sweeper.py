"""The sweeper against real workers killed whole: recovery bounded by the lease, not by
the broker's visibility timeout (an hour here); long steps kept alive by their heartbeat;
runs whose client died before enqueuing them; sagas that stopped moving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline import saga
from pipeline.keys import HELD, LIVE, SAGAS, SWEEP_LOCK, UNENQUEUED, RunKeys
from pipeline.local import BeatProcess
from pipeline.state import RunStatus
from pipeline.sweeper import lock_ttl_s, sweep
from tests.conftest import ROOT, Cluster, wait_for, worker_env
from tests.quick_agents import EXECUTIONS_KEY, HOLD_KEY

ROOT_PATH = Path(ROOT)
CREDIT = json.loads((ROOT_PATH / "tasks" / "samples" / "good.json").read_text())
QUESTION = json.loads((ROOT_PATH / "tasks" / "samples" / "research.json").read_text())

pytestmark = pytest.mark.workers

LEASE_S = 2


def events(cluster: Cluster, run_id: str, name: str) -> list[dict[str, str]]:
    return [e for e in cluster.pipeline().store.log(run_id) if e.get("event") == name]


def wait_started(cluster: Cluster, run_id: str, step: str) -> None:
    wait_for(lambda: any(e.get("step") == step for e in events(cluster, run_id, "step.started")),
             timeout_s=30, message=f"step {step} of {run_id} to start")


def unacked_tasks(cluster: Cluster) -> list[str]:
    """The messages kombu holds unacked (its ``unacked`` hash): task names, ``+eta`` for a
    message with a countdown (a retry)."""
    heads = [json.loads(v)[0]["headers"] for v in cluster.redis.hgetall("unacked").values()]
    return [h["task"] + ("+eta" if h.get("eta") else "") for h in heads]


def executions(cluster: Cluster, run_id: str, agent: str) -> int:
    return int(cluster.redis.get(EXECUTIONS_KEY.format(run_id=run_id, agent=agent)) or 0)


def test_a_worker_killed_whole_mid_step_is_recovered_by_beat_within_the_lease(
        cluster: Cluster) -> None:
    """Without the sweeper the step's message would wait for the visibility timeout
    (3600 s here); beat's sweeper hands it out again once its lease ran out."""
    env = {"PIPELINE_LEASE_S": str(LEASE_S), "PIPELINE_SWEEP_INTERVAL_S": "1"}
    doomed = cluster.worker(concurrency=1, **env)
    p = cluster.pipeline(lease_s=LEASE_S)
    cluster.redis.set(HOLD_KEY.format(run_id=p.run_id_for("pausing", "held")), "1")
    run = p.start("pausing", {"n": 1}, idempotency_key="held")
    wait_started(cluster, run.run_id, "1:pause")
    [started] = [e for e in events(cluster, run.run_id, "step.started")
                 if e["step"] == "1:pause"]
    wait_for(lambda: cluster.redis.zscore(HELD, started["task_id"]), timeout_s=10,
             message="the worker's heartbeat to mark the step's message held")
    doomed.kill()  # main process and pool, SIGKILL: nothing acked, nothing said
    killed_at = time.monotonic()
    cluster.redis.delete(HOLD_KEY.format(run_id=run.run_id))
    cluster.worker(concurrency=1, **env)
    with BeatProcess(env=worker_env(cluster.url, **env), cwd=str(ROOT)):
        result = run.wait(timeout=60)
    recovered_s = time.monotonic() - killed_at

    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 6}
    assert recovered_s < 30, f"recovered after {recovered_s:.0f}s"
    [redelivered] = events(cluster, run.run_id, "step.redelivered")
    assert redelivered["step"] == "1:pause"
    assert "no live worker has held it for" in redelivered["reason"]
    assert redelivered["reason"].endswith("its worker is gone")
    assert executions(cluster, run.run_id, "pause") == 2  # run again, sealed once
    history = p.store.history(run.run_id)
    assert [v.version for v in history] == [0, 1, 2, 3]
    assert [v.agent for v in history[1:]] == ["increment", "pause", "double"]
    deliveries = cluster.redis.hget(RunKeys(run.run_id).deliveries, "1:pause")
    assert deliveries == "2"


def test_a_step_longer_than_its_lease_is_kept_alive_by_its_workers_heartbeat(
        cluster: Cluster) -> None:
    env = {"PIPELINE_LEASE_S": str(LEASE_S)}
    cluster.worker(concurrency=1, **env)
    p = cluster.pipeline(lease_s=LEASE_S)
    run = p.start("slow_counting", {"n": 1, "sleep_s": 3 * LEASE_S})
    wait_started(cluster, run.run_id, "0:slow_increment")
    sweeps = []
    while p.store.run_info(run.run_id).status is RunStatus.RUNNING:
        sweeps.append(sweep(p.app, p.store))
        time.sleep(0.3)
    assert run.wait(timeout=30).status is RunStatus.SUCCEEDED
    assert len(sweeps) >= 10 and any(s.unacked for s in sweeps)  # it was looked at, alive
    assert not any(s.redelivered for s in sweeps)
    assert events(cluster, run.run_id, "step.redelivered") == []
    assert executions(cluster, run.run_id, "slow_increment") == 1


def test_a_live_workers_retry_waiting_behind_a_busy_pool_is_never_handed_out(
        cluster: Cluster) -> None:
    """Unacked longer than the lease, never opened since: yet its worker is alive and holds
    it (a retry's countdown, then no free process). Handing it out would run it twice."""
    cluster.worker(concurrency=1, PIPELINE_LEASE_S=str(LEASE_S))
    p = cluster.pipeline(lease_s=LEASE_S)
    retried = p.start("deferring", {"n": 1})
    wait_for(lambda: unacked_tasks(cluster) == ["agent.deferred+eta"], timeout_s=20,
             message="the worker to hold the retry until its countdown ends (6 s)")
    # held before it starts: a free process would otherwise run it before the test holds it
    cluster.redis.set(HOLD_KEY.format(run_id=p.run_id_for("blocking", "blocker")), "1")
    blocker = p.start("blocking", {"n": 1}, idempotency_key="blocker")
    wait_started(cluster, blocker.run_id, "0:holder")  # the only process is taken
    sweeps = []
    deadline = time.monotonic() + 6 + 3 * LEASE_S  # past the retry's ETA, then the lease
    while time.monotonic() < deadline:
        sweeps.append(sweep(p.app, p.store))
        time.sleep(0.3)
    assert max(s.unacked for s in sweeps) == 2  # the retry and the blocker, both looked at
    assert [s.redelivered for s in sweeps if s.redelivered] == []
    cluster.redis.delete(HOLD_KEY.format(run_id=blocker.run_id))
    assert retried.wait(timeout=30).status is RunStatus.SUCCEEDED
    assert blocker.wait(timeout=30).status is RunStatus.SUCCEEDED
    assert executions(cluster, retried.run_id, "deferred") == 2  # the failure, the retry
    assert cluster.redis.hget(RunKeys(retried.run_id).deliveries, "0:deferred") == "2"


def test_a_run_whose_client_died_before_enqueuing_it_is_enqueued(cluster: Cluster) -> None:
    cluster.worker(concurrency=1)
    p = cluster.pipeline(lease_s=LEASE_S)
    # what Pipeline.start does before it enqueues: the client dies right here
    p.store.create_run("orphan", workflow="counting", payload={"n": 3}, contract="count@1")
    enqueued = p.start("counting", {"n": 1})
    assert cluster.redis.zscore(UNENQUEUED, "orphan") is not None
    assert cluster.redis.zscore(UNENQUEUED, enqueued.run_id) is None  # handed over: not watched
    assert sweep(p.app, p.store).enqueued == []  # not before its grace

    def swept() -> list[str]:
        return sweep(p.app, p.store).enqueued

    assert wait_for(swept, timeout_s=10, message="the orphan to be enqueued") == ["orphan"]
    result = p.run("orphan").wait(timeout=30)
    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 8}
    assert [e["by"] for e in events(cluster, "orphan", "run.enqueued")] == ["sweeper"]
    assert cluster.redis.zscore(UNENQUEUED, "orphan") is None
    assert enqueued.wait(timeout=30).status is RunStatus.SUCCEEDED
    assert sweep(p.app, p.store).enqueued == []


def test_a_saga_begun_by_a_worker_that_died_before_sending_its_planner_is_nudged(
        cluster: Cluster) -> None:
    cluster.worker(concurrency=2)
    p = cluster.pipeline(lease_s=LEASE_S)
    cluster.redis.set(HOLD_KEY.format(run_id=p.run_id_for("pausing", "held")), "1")
    run = p.start("pausing", {"n": 1}, idempotency_key="held")
    wait_started(cluster, run.run_id, "1:pause")
    # the errback's worker: the saga begins (and is watched, in the same round trip), then
    # the process dies before it sends the planner
    started, _ = saga.begin(p.store, run.run_id, reason="ChaosError: boom", agent="pause")
    assert started and cluster.redis.zscore(SAGAS, run.run_id) is not None
    cluster.redis.delete(HOLD_KEY.format(run_id=run.run_id))
    wait_for(lambda: events(cluster, run.run_id, "step.discarded"), timeout_s=20,
             message="the held step to find the saga and discard itself")
    assert p.store.run_info(run.run_id).status is RunStatus.COMPENSATING
    assert not cluster.redis.hexists(RunKeys(run.run_id).saga, "plan")  # nobody planned it

    def nudged() -> list[str]:
        return sweep(p.app, p.store).nudged

    assert wait_for(nudged, timeout_s=10, message="the saga to be nudged") == [run.run_id]
    result = run.wait(timeout=30)
    assert result.status is RunStatus.COMPENSATED
    done = [e["step"] for e in events(cluster, run.run_id, "compensation.done")]
    assert done == ["0:increment"]  # the held step discarded itself when it found the saga
    assert cluster.redis.zscore(SAGAS, run.run_id) is None  # finished: no longer watched
    assert sweep(p.app, p.store).nudged == []


def test_pipeline_sweep_prints_what_it_did(cluster: Cluster) -> None:
    p = cluster.pipeline(lease_s=LEASE_S)
    p.store.create_run("forgotten", workflow="counting", payload={"n": 1}, contract="count@1")
    env = {**worker_env(cluster.url, PIPELINE_LEASE_S="1")}

    def swept() -> dict[str, Any] | None:
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", "--json"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = json.loads(done.stdout)
        return report if report["enqueued"] else None

    report = wait_for(swept, timeout_s=20, message="pipeline sweep to enqueue the run")
    assert isinstance(report, dict)
    assert report["enqueued"] == ["forgotten"] and report["busy"] is False
    assert report["redelivered"] == [] and report["nudged"] == []


# -- runs that stopped moving, with no message left ------------------------------------------


def sweep_until(p: Any, what: str, *, timeout_s: float = 20, lose: str = "") -> Any:
    """Sweep until the report's ``what`` is not empty; each pass first drops every message
    waiting in queue ``lose`` (lost as a worker killed between the broker's pop and its
    unacked record loses one)."""
    client = p.store.redis

    def swept() -> Any:
        if lose:
            client.delete(lose)
        return getattr(sweep(p.app, p.store), what)

    return wait_for(swept, timeout_s=timeout_s, message=f"a sweep to report {what}")


def test_a_run_whose_message_was_lost_is_redriven_from_its_last_sealed_version(
        cluster: Cluster) -> None:
    cluster.worker(concurrency=1, queues=("pipeline", "agents.increment"))
    p = cluster.pipeline(lease_s=LEASE_S)
    run = p.start("pausing", {"n": 1})
    wait_for(lambda: cluster.redis.llen("agents.pause") == 1, timeout_s=20,
             message="the second step to wait in its queue, which nobody serves yet")
    waiting_until = time.monotonic() + 2 * LEASE_S + 2  # idle past the stall threshold
    while time.monotonic() < waiting_until:
        assert sweep(p.app, p.store).redriven == {}  # its message waits: not stuck
        time.sleep(0.3)
    cluster.redis.delete("agents.pause")  # lost: nothing of the run is left in the broker

    redriven = sweep_until(p, "redriven")
    assert redriven == {run.run_id: ["1:pause"]}
    cluster.worker(concurrency=1)  # every queue
    result = run.wait(timeout=30)
    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 6}
    [event] = events(cluster, run.run_id, "run.redriven")
    assert event["steps"] == "1:pause" and event["by"] == "sweeper" and event["redrive"] == "1"
    history = p.store.history(run.run_id)
    assert [v.agent for v in history[1:]] == ["increment", "pause", "double"]
    assert [v.parents for v in history[1:]] == [(0,), (1,), (2,)]
    assert [executions(cluster, run.run_id, a) for a in ("increment", "pause", "double")] \
        == [1, 1, 1]

    def forgotten() -> bool:  # finished: no longer watched, once a sweep looks at it again
        sweep(p.app, p.store)
        return cluster.redis.zscore(LIVE, run.run_id) is None

    assert cluster.redis.zscore(LIVE, run.run_id) is not None
    wait_for(forgotten, timeout_s=2 * LEASE_S + 10, message="the run to leave pipeline:live")


def test_a_lost_chord_member_is_handed_out_again_and_the_join_runs_once(
        cluster: Cluster) -> None:
    served = ("pipeline", "agents.credit_score", "agents.income_verification",
              "agents.fraud_detection", "agents.final_approval")
    cluster.worker(concurrency=2, queues=served)
    p = cluster.pipeline(lease_s=LEASE_S)
    run = p.start("credit_decision", CREDIT)
    wait_for(lambda: cluster.redis.llen("agents.risk_assessment") == 1, timeout_s=20,
             message="risk_assessment to wait in its queue")
    wait_for(lambda: len(p.store.history(run.run_id)) == 4, timeout_s=20,
             message="the other two members to seal")
    cluster.redis.delete("agents.risk_assessment")

    assert sweep_until(p, "redriven") == {run.run_id: ["1.1:risk_assessment"]}
    cluster.worker(concurrency=1, queues=("agents.risk_assessment",))
    result = run.wait(timeout=30)
    assert result.status is RunStatus.SUCCEEDED and result.output["decision"] == "approved"
    history = p.store.history(run.run_id)
    agents_sealed = [v.agent for v in history[1:]]
    assert sorted(agents_sealed[1:4]) == ["fraud_detection", "income_verification",
                                          "risk_assessment"]
    assert agents_sealed[-1] == "final_approval" and len(history) == 6  # joined once
    assert sorted(history[-1].parents) == [2, 3, 4]


def researching(cluster: Cluster, runs: int = 1) -> tuple[Any, list[Any]]:
    """Research flows whose analysis deliveries wait in their queue, which nobody serves."""
    cluster.worker(concurrency=2, queues=("pipeline", "agents.research", "agents.audit",
                                          "agents.report"))
    p = cluster.pipeline(lease_s=LEASE_S)
    started = [p.start("research_report", QUESTION) for _ in range(runs)]
    wait_for(lambda: cluster.redis.llen("agents.analysis") == runs, timeout_s=20,
             message="the analysis deliveries to wait in their queue")
    return p, started


def test_a_lost_delivery_of_a_choreography_is_handed_out_again_and_handled_once(
        cluster: Cluster) -> None:
    p, [run] = researching(cluster)
    cluster.redis.delete("agents.analysis")

    redriven = sweep_until(p, "redriven")
    [(run_id, [delivery])] = redriven.items()
    assert run_id == run.run_id and delivery.endswith(":analysis")
    cluster.worker(concurrency=1, queues=("agents.analysis",))
    assert run.wait(timeout=30).status is RunStatus.SUCCEEDED
    ledger = cluster.redis.hgetall(RunKeys(run.run_id).ledger)
    assert ledger[delivery].startswith("handled:")
    assert all(state.startswith("handled:") for state in ledger.values()), ledger
    handled = [e for e in events(cluster, run.run_id, "delivery.handled")
               if e["step"] == delivery]
    assert len(handled) == 1 and events(cluster, run.run_id, "delivery.duplicate") == []


def test_a_run_that_keeps_stopping_is_compensated_after_its_redrives(cluster: Cluster) -> None:
    cluster.worker(concurrency=1, queues=("pipeline", "agents.increment"))
    p = cluster.pipeline(lease_s=1)
    run = p.start("pausing", {"n": 1})
    wait_for(lambda: cluster.redis.llen("agents.pause") == 1, timeout_s=20,
             message="the second step to wait in its queue")

    stuck = sweep_until(p, "stuck", timeout_s=40, lose="agents.pause")
    assert stuck == [run.run_id]
    result = run.wait(timeout=30)
    assert result.status is RunStatus.COMPENSATED
    assert [e["redrive"] for e in events(cluster, run.run_id, "run.redriven")] == ["1", "2", "3"]
    [begun] = events(cluster, run.run_id, "run.compensating")
    assert "stopped moving again after 3 re-drives" in begun["reason"]
    assert executions(cluster, run.run_id, "pause") == 0


def test_a_sweeper_killed_mid_pass_holds_off_the_others_only_briefly(cluster: Cluster) -> None:
    """Beat's sweep runs on whichever worker serves the pipeline queue, and dies with it:
    the lock it leaves stops every recovery until it expires."""
    p = cluster.pipeline(lease_s=LEASE_S)
    dead = p.store.redis.lock(SWEEP_LOCK, timeout=lock_ttl_s(LEASE_S), blocking=False)
    assert dead.acquire(token="a-sweeper-that-was-killed")
    assert sweep(p.app, p.store).busy
    started = time.monotonic()
    wait_for(lambda: not sweep(p.app, p.store).busy, timeout_s=lock_ttl_s(LEASE_S) + 3,
             message="the dead sweeper's lock to expire")
    assert time.monotonic() - started <= lock_ttl_s(LEASE_S) + 1 and lock_ttl_s(60) == 30


def test_a_delivery_claimed_by_a_task_whose_message_is_gone_is_claimed_anew_and_handled_once(
        cluster: Cluster) -> None:
    """The task that claimed it died and its message was lost: the delivery goes out under a
    new task that takes the claim over; the old task, should it turn up, is a duplicate."""
    p, [run] = researching(cluster)
    ledger_key = RunKeys(run.run_id).ledger
    [delivery] = [k for k, v in cluster.redis.hgetall(ledger_key).items()
                  if k.endswith(":analysis")]
    cluster.redis.delete("agents.analysis")
    cluster.redis.hset(ledger_key, delivery, "running:a-task-that-died")  # claimed, then lost

    assert sweep_until(p, "redriven") == {run.run_id: [delivery]}
    cluster.worker(concurrency=1, queues=("agents.analysis",))
    assert run.wait(timeout=30).status is RunStatus.SUCCEEDED
    handled_by = cluster.redis.hget(ledger_key, delivery)
    assert handled_by.startswith("handled:") and handled_by != "handled:a-task-that-died"

    event_id = delivery.split(":")[0]
    event = json.loads(cluster.redis.hget(RunKeys(run.run_id).events, event_id))
    p.app.send_task("agent.analysis", args=(int(event["version"]),), task_id="a-task-that-died",
                    kwargs={"run_id": run.run_id, "step": delivery, "event": event_id,
                            "event_type": event["type"]}, queue="agents.analysis")
    wait_for(lambda: [e for e in events(cluster, run.run_id, "delivery.duplicate")
                      if e["task_id"] == "a-task-that-died"], timeout_s=20,
             message="the old task to turn up and be recorded a duplicate")
    assert cluster.redis.hget(ledger_key, delivery) == handled_by
    assert len([e for e in events(cluster, run.run_id, "delivery.handled")
                if e["step"] == delivery]) == 1


def test_one_run_that_cannot_be_redriven_does_not_stop_the_others(cluster: Cluster) -> None:
    p, [broken, fine] = researching(cluster, runs=2)
    cluster.redis.delete("agents.analysis")
    cluster.redis.delete(RunKeys(broken.run_id).events)  # its event records are gone

    assert sweep_until(p, "redriven") == {fine.run_id: [
        k for k in cluster.redis.hkeys(RunKeys(fine.run_id).ledger) if k.endswith(":analysis")]}
    assert events(cluster, broken.run_id, "run.redriven") == []
    cluster.worker(concurrency=1, queues=("agents.analysis",))
    assert fine.wait(timeout=30).status is RunStatus.SUCCEEDED


@pytest.mark.timeout(60)
def test_pipeline_sweep_every_outlives_a_redis_it_cannot_reach() -> None:
    env = {**os.environ, **worker_env("redis://:s3cret@127.0.0.1:1/0")}
    with subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sweep", "--every", "0.2"],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True) as sweeper:
        assert sweeper.stderr is not None
        failures = []
        try:
            while len(failures) < 3:  # three passes in a row meet no Redis
                line = sweeper.stderr.readline()
                if not line:  # it exited
                    break
                failures += [line] if line.startswith("sweep failed") else []
            alive = sweeper.poll() is None
        finally:
            sweeper.terminate()
    assert alive and len(failures) == 3, failures
    assert all("StoreUnavailable: cannot reach Redis at redis://:***@127.0.0.1:1/0" in f
               for f in failures), failures
    assert not any("s3cret" in f for f in failures)
