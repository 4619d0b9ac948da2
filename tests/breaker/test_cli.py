"""`pipeline breakers` and `pipeline resume`, as an operator runs them."""

from __future__ import annotations

import json

from click.testing import CliRunner, Result

from pipeline import RunStatus
from pipeline.cli import main
from tests.conftest import AGENT_MODULES, Cluster, wait_for


def invoke(url: str, *args: str, stdin: str | None = None) -> Result:
    env = {"PIPELINE_REDIS_URL": url, "PIPELINE_AGENT_MODULES": AGENT_MODULES,
           "CELERY_BROKER_URL": None, "CELERY_RESULT_BACKEND": None}
    return CliRunner().invoke(main, list(args), input=stdin, env=env)


def by_agent(result: Result) -> dict[str, dict[str, object]]:
    assert result.exit_code == 0, result.output
    return {b["agent"]: b for b in json.loads(result.stdout)}


def test_breakers_lists_every_agent_and_opens_and_resets_one_by_hand(cluster: Cluster) -> None:
    listed = by_agent(invoke(cluster.url, "breakers", "--json"))
    assert {"credit_score", "income_verification", "final_approval"} <= set(listed)
    assert all(b["state"] == "closed" for b in listed.values())

    opened = invoke(cluster.url, "breakers", "open", "fraud_detection")
    assert opened.exit_code == 0 and "open until" in opened.stdout
    fraud = by_agent(invoke(cluster.url, "breakers", "--json"))["fraud_detection"]
    assert (fraud["state"], fraud["forced"]) == ("open", True)
    assert fraud["last_transition"]["to"] == "open"  # type: ignore[index]
    table = invoke(cluster.url, "breakers").stdout
    assert "fraud_detection" in table and "open (forced)" in table

    assert invoke(cluster.url, "breakers", "reset", "fraud_detection").exit_code == 0
    assert by_agent(invoke(cluster.url, "breakers", "--json"))["fraud_detection"]["state"] \
        == "closed"


def test_breakers_on_an_unknown_agent_is_a_clear_error(cluster: Cluster) -> None:
    result = invoke(cluster.url, "breakers", "open", "nobody")
    assert result.exit_code == 2 and "unknown agent 'nobody'" in result.stderr


def test_resume_of_a_run_that_is_not_parked_exits_2(cluster: Cluster) -> None:
    cluster.worker()
    run = cluster.pipeline().start("counting", {"n": 1})
    run.wait(20)
    result = invoke(cluster.url, "resume", run.run_id)
    assert result.exit_code == 2
    assert "succeeded, not waiting_for_human" in result.stderr


def test_resume_with_an_output_file_finishes_a_parked_run_and_trace_shows_why(
    cluster: Cluster,
) -> None:
    cluster.worker()
    p = cluster.pipeline()
    p.breakers.force_open("guarded_park")
    run = p.start("w_guarded_park", {"n": 1})
    wait_for(lambda: run.status() is RunStatus.WAITING_FOR_HUMAN, message="the run to park")
    status = json.loads(invoke(cluster.url, "status", run.run_id, "--json").stdout)
    assert status["status"] == "waiting_for_human" and status["parked_step"] == "1:guarded_park"

    bad = invoke(cluster.url, "resume", run.run_id, "--output", "-", stdin='{"n": "x"}')
    assert bad.exit_code == 2 and "n: Not a valid integer" in bad.stderr
    assert run.status() is RunStatus.WAITING_FOR_HUMAN  # a refused output changes nothing

    done = invoke(cluster.url, "resume", run.run_id, "--output", "-", "--wait", "--json",
                  stdin='{"n": 5}')
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["output"] == {"n": 10}
    trace = invoke(cluster.url, "trace", run.run_id).stdout
    for event in ("step.refused", "run.parked", "run.resumed", "run.succeeded"):
        assert event in trace
