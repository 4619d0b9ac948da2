"""A fleet whose pools import different agent modules never strands a run.

The pool that serves the ``pipeline`` queue (sagas, re-drives, sweeps) imports none of
the credit agents here: it reads what it needs of a run (its stages, its agents' queues)
from the route the run recorded when it was created. A pool told to consume a queue
whose agent it does not import gives the message back instead of dropping it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from kombu import Connection

from pipeline import RunStatus
from pipeline.cli import main
from pipeline.names import SWEEP_TASK
from tasks import SAMPLES
from tasks.credit import ledger
from tests.conftest import ROOT, Cluster, wait_for
from tests.quick_agents import SIDE_EFFECTS_KEY

pytestmark = pytest.mark.workers

GOOD = json.loads((SAMPLES / "good.json").read_text())
CREDIT_AGENTS = ("credit_score", "income_verification", "risk_assessment", "fraud_detection",
                 "final_approval")
CREDIT_QUEUES = tuple(f"agents.{a}" for a in CREDIT_AGENTS)
NO_CREDIT_AGENTS = "tests.quick_agents"
"""What the ``pipeline`` queue's pool imports: agents, but none of the credit ones."""
LEASE_S = 2


def entries(cluster: Cluster, run_id: str, event: str) -> list[dict[str, str]]:
    return [e for e in cluster.pipeline().store.log(run_id) if e.get("event") == event]


def cli_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    return {"PIPELINE_REDIS_URL": cluster.url, "CELERY_BROKER_URL": cluster.url,
            "CELERY_RESULT_BACKEND": cluster.url, "PIPELINE_CHAOS": "", **extra}


def test_a_failed_run_is_compensated_by_a_pipeline_pool_that_knows_none_of_its_agents(
        cluster: Cluster) -> None:
    cluster.worker(queues=("pipeline",), concurrency=1, PIPELINE_AGENT_MODULES=NO_CREDIT_AGENTS)
    chaotic = cluster.worker(queues=CREDIT_QUEUES, concurrency=3,
                             PIPELINE_CHAOS="final_approval=error:1")
    p = cluster.pipeline()

    failed = p.start("credit_decision", GOOD, idempotency_key="fails").wait(30)

    assert failed.status is RunStatus.COMPENSATED, failed.error
    log = p.store.log(failed.run_id)
    planned = [e for e in log if e["event"] == "compensation.planned"]
    assert len(planned) == 1
    done = sorted(e["step"] for e in log if e["event"] == "compensation.done")
    assert done == ["0:credit_score", "1.0:income_verification", "1.1:risk_assessment",
                    "1.2:fraud_detection"]
    assert ledger(cluster.redis, failed.run_id) == {}

    chaotic.kill()
    cluster.worker(queues=CREDIT_QUEUES, concurrency=3)
    good = p.start("credit_decision", GOOD, idempotency_key="succeeds").wait(30)
    assert good.status is RunStatus.SUCCEEDED and good.output["decision"] == "approved"
    assert [v.agent for v in p.store.history(good.run_id)][-1] == "final_approval"


def test_a_compensation_goes_to_the_queue_its_agent_named_though_the_planner_knows_none(
        cluster: Cluster) -> None:
    cluster.worker(queues=("pipeline",), concurrency=1, PIPELINE_AGENT_MODULES=NO_CREDIT_AGENTS)
    cluster.worker(queues=("agents.shared", "agents.tripwire"), concurrency=2,
                   PIPELINE_CHAOS="tripwire=error:1")
    p = cluster.pipeline()
    run = p.start("sharing", {"n": 1})

    result = run.wait(30)

    assert result.status is RunStatus.COMPENSATED, result.error
    assert json.loads(run.info().route)["queues"] == {"shared_booked": "agents.shared"}
    done = [e["step"] for e in entries(cluster, run.run_id, "compensation.done")]
    assert done == ["0:shared_booked"]
    assert cluster.redis.hgetall(SIDE_EFFECTS_KEY.format(run_id=run.run_id)) == {}


def test_a_run_that_lost_its_message_is_redriven_by_a_pipeline_pool_without_its_agents(
        cluster: Cluster) -> None:
    lease = {"PIPELINE_LEASE_S": str(LEASE_S)}
    cluster.worker(queues=("pipeline",), concurrency=1, PIPELINE_AGENT_MODULES=NO_CREDIT_AGENTS,
                   **lease)
    cluster.worker(queues=CREDIT_QUEUES[:-1], concurrency=3, **lease)
    p = cluster.pipeline(lease_s=LEASE_S)
    run = p.start("credit_decision", GOOD)
    wait_for(lambda: cluster.redis.llen("agents.final_approval") == 1, timeout_s=30,
             message="the join to wait in its queue, which nobody serves yet")
    cluster.redis.delete("agents.final_approval")  # lost: nothing of the run is left

    def redriven() -> list[dict[str, str]]:
        # swept by the pool without agents; a sweep not taken within a second is dropped
        p.app.send_task(SWEEP_TASK, queue="pipeline", expires=1.0)
        time.sleep(0.5)
        return entries(cluster, run.run_id, "run.redriven")

    [event] = wait_for(redriven, timeout_s=30, message="the sweeper to re-drive the run")
    assert event["steps"] == "2:final_approval"
    cluster.worker(queues=("agents.final_approval",), concurrency=1, **lease)
    result = run.wait(30)
    assert result.status is RunStatus.SUCCEEDED and result.output["decision"] == "approved"
    history = p.store.history(run.run_id)
    assert [v.agent for v in history][-1] == "final_approval"
    assert sorted(history[-1].parents) == [2, 3, 4]


def test_a_step_for_an_agent_a_pool_does_not_import_goes_back_to_the_broker(
        cluster: Cluster) -> None:
    cluster.worker(queues=("pipeline",), concurrency=1)
    stranger = cluster.worker(queues=("agents.credit_score",), concurrency=1,
                              PIPELINE_AGENT_MODULES=NO_CREDIT_AGENTS)
    p = cluster.pipeline()
    run = p.start("credit_decision", GOOD)

    [returned] = wait_for(lambda: entries(cluster, run.run_id, "message.returned"),
                          timeout_s=30, message="the stranger to give the message back")
    assert returned["step"] == "0:credit_score" and returned["queue"] == "agents.credit_score"
    assert returned["task"] == "agent.credit_score"
    assert "not registered in this worker" in returned["reason"]
    assert "stopped consuming agents.credit_score" in returned["reason"]
    wait_for(lambda: cluster.redis.llen("agents.credit_score") == 1, timeout_s=10,
             message="the message to wait in its queue again")
    assert run.status() is RunStatus.RUNNING
    assert "Canceling queue agents.credit_score" in stranger.tail()
    inspected = CliRunner().invoke(main, ["inspect", run.run_id], env=cli_env(cluster))
    assert inspected.exit_code == 0, inspected.output
    assert ("waiting: message.returned 0:credit_score: agent credit_score is not registered "
            "in this worker") in inspected.output

    cluster.worker(queues=CREDIT_QUEUES, concurrency=3)
    result = run.wait(30)
    assert result.status is RunStatus.SUCCEEDED and result.output["decision"] == "approved"
    assert len(entries(cluster, run.run_id, "message.returned")) == 1
    assert [e["step"] for e in entries(cluster, run.run_id, "step.started")][0] \
        == "0:credit_score"


OPERATOR = """
import json, sys
from click.testing import CliRunner
from kombu import Connection
from pipeline.cli import main

replies = {}
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(main, args)
    replies[" ".join(args)] = {"exit": r.exit_code, "out": r.output}
agent_code = sorted(m for m in sys.modules if m.split(".")[0] in ("tasks", "tests"))
print(json.dumps({"replies": replies, "agent_code": agent_code}))
"""


def operate(cluster: Cluster, cwd: Path, *commands: list[str]) -> dict[str, dict[str, object]]:
    """Run ``pipeline`` commands in a process of their own, from a directory without the
    agent modules (an operator's laptop: the package, and nothing of the deployment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "CELERY_"))}
    env.update(cli_env(cluster), PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", OPERATOR, json.dumps(list(commands))],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    assert reply["agent_code"] == [], "the operator's process imported agent code"
    replies: dict[str, dict[str, object]] = reply["replies"]
    return replies


def test_operator_commands_need_none_of_the_agent_modules(cluster: Cluster,
                                                          tmp_path: Path) -> None:
    cluster.worker(queues=("pipeline",), concurrency=1, PIPELINE_AGENT_MODULES=NO_CREDIT_AGENTS)
    chaotic = cluster.worker(queues=CREDIT_QUEUES, concurrency=3,
                             PIPELINE_CHAOS="fraud_detection=error:1")
    p = cluster.pipeline()
    failed = p.start("credit_decision", GOOD).wait(30)
    assert failed.status is RunStatus.COMPENSATED, failed.error
    chaotic.kill()
    stuck = p.start("credit_decision", GOOD, idempotency_key="nobody serves it")
    assert Path(ROOT, "tasks").is_dir() and not Path(tmp_path, "tasks").exists()

    replies = operate(
        cluster, tmp_path,
        ["status", failed.run_id, "--json"], ["history", failed.run_id, "--json"],
        ["trace", failed.run_id], ["inspect", failed.run_id], ["graph", failed.run_id],
        ["runs", "--json"], ["events", failed.run_id], ["breakers", "--json"],
        ["explain", failed.run_id, "fraud_detection"], ["verify", failed.run_id, "--json"],
        ["compensate", failed.run_id], ["cancel", stuck.run_id, "--wait", "--json"],
    )

    def reply(*args: str) -> tuple[object, str]:
        r = replies[" ".join(args)]
        return r["exit"], str(r["out"])

    code, out = reply("status", failed.run_id, "--json")
    assert code == 0 and json.loads(out)["status"] == "compensated"
    code, out = reply("history", failed.run_id, "--json")
    assert code == 0 and [v["agent"] for v in json.loads(out)][:2] == ["", "credit_score"]
    code, out = reply("trace", failed.run_id)
    assert code == 0 and "ChaosError" in out and "fraud_detection" in out
    code, out = reply("inspect", failed.run_id)
    assert code == 0 and "compensation.done" in out
    code, out = reply("graph", failed.run_id)
    assert code == 0 and out.startswith("digraph")
    code, out = reply("runs", "--json")
    assert code == 0 and {r["run_id"] for r in json.loads(out)} >= {failed.run_id, stuck.run_id}
    code, out = reply("events", failed.run_id)
    assert code == 0
    code, out = reply("breakers", "--json")
    assert code == 0  # the credit agents' cards, as their workers published them
    assert {b["agent"] for b in json.loads(out)} >= set(CREDIT_AGENTS)
    code, out = reply("explain", failed.run_id, "fraud_detection")
    assert code == 0 and "fraud_detection" in out
    code, out = reply("verify", failed.run_id, "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    code, out = reply("compensate", failed.run_id)
    assert code == 2 and "not compensation_failed" in out
    code, out = reply("cancel", stuck.run_id, "--wait", "--json")
    assert code == 0 and json.loads(out)["status"] == "cancelled"  # nothing sealed to undo
    assert stuck.info().error == "cancelled by hand"


def test_a_pool_that_shares_a_queue_with_an_agent_it_lacks_gives_its_messages_back(
        cluster: Cluster) -> None:
    cluster.worker(queues=("pipeline",), concurrency=1)
    neighbour = cluster.worker(queues=("agents.shared",), concurrency=1,
                               PIPELINE_AGENT_MODULES="tests.shared_queue_agents")
    p = cluster.pipeline()
    run = p.start("sharing", {"n": 1})

    [returned] = wait_for(lambda: entries(cluster, run.run_id, "message.returned"),
                          timeout_s=30, message="the neighbour to give the message back")
    assert returned["step"] == "0:shared_booked" and returned["queue"] == "agents.shared"
    assert "stopped consuming" not in returned["reason"]  # it serves its own agent there
    assert "Canceling queue" not in neighbour.tail()
    cluster.worker(queues=("agents.shared", "agents.tripwire"), concurrency=2)
    result = run.wait(30)
    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 3}
    assert len(entries(cluster, run.run_id, "message.returned")) == 1  # noted once


def test_a_message_for_an_unknown_agent_whose_body_cannot_be_read_never_stops_the_worker(
        cluster: Cluster) -> None:
    stranger = cluster.worker(queues=("pipeline", "agents.credit_score"), concurrency=1,
                              PIPELINE_AGENT_MODULES=NO_CREDIT_AGENTS)
    with Connection(cluster.url) as connection:
        connection.Producer().publish(
            "{not json", routing_key="agents.credit_score", content_type="application/json",
            content_encoding="utf-8", headers={"task": "agent.credit_score", "id": "garbled-1"})

    wait_for(lambda: "agent.credit_score[garbled-1]: agent credit_score is not registered"
             in stranger.tail(), timeout_s=20, message="the stranger to give the message back")
    wait_for(lambda: cluster.redis.llen("agents.credit_score") == 1, timeout_s=10,
             message="the message to wait in its queue again")
    p = cluster.pipeline()
    replies = p.app.control.ping(destination=[f"{stranger.name}@{socket.gethostname()}"],
                                 timeout=5)
    assert replies and stranger.process is not None and stranger.process.poll() is None
