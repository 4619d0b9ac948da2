"""The ``pipeline`` command against real Redis and real workers: exit codes, one-line
errors, and the JSON every read command prints."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pipeline import Pipeline
from pipeline.cli import main
from pipeline.keys import RUNS_INDEX
from tasks import SAMPLES
from tests.conftest import AGENT_MODULES, Cluster

WORKFLOW = "credit_decision"
FIRST_QUEUE = "agents.credit_score"
GOOD = str(SAMPLES / "good.json")
DECLINED = str(SAMPLES / "declined.json")
INVALID = str(SAMPLES / "invalid.json")
# the run's documented JSON keys, and `degraded` (added with the breakers; keys are only added)
RUN_KEYS = {"run_id", "workflow", "status", "version", "output", "error", "degraded"}
VERSION_KEYS = {"run_id", "version", "parents", "agent", "contract", "payload", "digest",
                "created_at", "step", "degraded"}


def invoke(url: str, *args: str, stdin: str | None = None, **env: str) -> Result:
    """Run ``pipeline ARGS`` in-process as a user would, configured only by the environment."""
    environ: dict[str, str | None] = {
        "PIPELINE_REDIS_URL": url,
        "PIPELINE_AGENT_MODULES": AGENT_MODULES,
        # Unset so that the broker and results follow PIPELINE_REDIS_URL, as documented.
        "CELERY_BROKER_URL": None,
        "CELERY_RESULT_BACKEND": None,
        "PIPELINE_CHAOS": None,
        "PIPELINE_MAX_PAYLOAD_BYTES": None,
        **env,
    }
    return CliRunner().invoke(main, list(args), input=stdin, env=environ)


def one_error_line(result: Result) -> str:
    """The single ``error: ...`` line a failed command prints, with no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def footprint(p: Pipeline) -> tuple[set[str], dict[str, int]]:
    """What a start can leave behind: the pipeline's keys and every broker queue's length."""
    r = p.store.redis
    queues = sorted(q.name for q in p.app.conf.task_queues)
    indexed = {f"pipeline:{{{run_id}}}:indexed" for run_id in r.zrange(RUNS_INDEX, 0, -1)}
    keys = set(r.scan_iter("pipeline:*")) - {RUNS_INDEX} | indexed
    return keys, {q: r.llen(q) for q in queues}


@pytest.fixture
def idle(cluster: Cluster) -> Cluster:
    """A private database with no worker and one valid run already waiting in the broker."""
    cluster.pipeline().start(WORKFLOW, json.loads(Path(GOOD).read_text()))
    return cluster


@pytest.fixture
def unchanged(idle: Cluster) -> Iterator[None]:
    """Asserts after the test that nothing was written to ``idle`` or enqueued there."""
    before = footprint(idle.pipeline())
    assert before[1][FIRST_QUEUE] == 1
    yield
    assert footprint(idle.pipeline()) == before


@pytest.fixture(scope="module")
def finished(pipeline: Pipeline) -> str:
    """The id of a credit_decision run of good.json that the shared worker finished."""
    run = pipeline.start(WORKFLOW, json.loads(Path(GOOD).read_text()))
    assert run.wait(30).status.value == "succeeded"
    return run.run_id


# -- run -----------------------------------------------------------------------------


def test_run_with_wait_prints_the_decision_as_json(pipeline: Pipeline, redis_url: str) -> None:
    result = invoke(redis_url, "run", WORKFLOW, "--input", GOOD, "--wait", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == RUN_KEYS
    assert (data["workflow"], data["status"], data["version"], data["error"]) == (
        WORKFLOW, "succeeded", 5, None)
    assert data["output"]["decision"] == "approved"
    assert data["output"]["approved_amount"] == 25000.0
    assert pipeline.run(data["run_id"]).result().output == data["output"]


def test_run_reads_the_payload_from_stdin_given_a_dash(
    pipeline: Pipeline, redis_url: str
) -> None:
    stdin = Path(DECLINED).read_text()
    result = invoke(redis_url, "run", WORKFLOW, "--input", "-", "--wait", "--json", stdin=stdin)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "succeeded"
    assert data["output"]["application_id"] == "app-1002"
    assert data["output"]["decision"] == "declined"
    assert data["output"]["approved_amount"] == 0


def test_run_without_wait_returns_at_once_with_the_run_queued(cluster: Cluster) -> None:
    result = invoke(cluster.url, "run", WORKFLOW, "--input", GOOD, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["status"], data["version"], data["output"]) == ("running", 0, None)
    assert footprint(cluster.pipeline())[1][FIRST_QUEUE] == 1


def test_run_whose_agent_fails_exits_1_and_names_the_agent(cluster: Cluster) -> None:
    cluster.worker(PIPELINE_CHAOS="risk_assessment=error:1")
    result = invoke(cluster.url, "run", WORKFLOW, "--input", GOOD, "--wait", "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert (data["status"], data["output"]) == ("compensated", None)
    assert "ChaosError" in data["error"] and "risk_assessment" in data["error"]
    info = cluster.pipeline().run(data["run_id"]).info()
    assert info.failed_agent == "risk_assessment"


# -- bad input: exit 2, one line, nothing written or enqueued --------------------------


@pytest.mark.usefixtures("unchanged")
def test_broken_json_input_names_the_file_and_line(idle: Cluster, tmp_path: Path) -> None:
    broken = tmp_path / "application.json"
    broken.write_text('{\n  "application_id": "app-1",\n  "loan": {,}\n}\n')
    line = one_error_line(invoke(idle.url, "run", WORKFLOW, "--input", str(broken)))
    assert str(broken) in line and "not JSON" in line and "line 3" in line


@pytest.mark.usefixtures("unchanged")
def test_broken_json_on_stdin_is_reported_as_stdin(idle: Cluster) -> None:
    line = one_error_line(invoke(idle.url, "run", WORKFLOW, "--input", "-", stdin="{"))
    assert "input stdin is not JSON" in line and "line 1" in line


@pytest.mark.usefixtures("unchanged")
def test_a_missing_input_file_is_named(idle: Cluster, tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    line = one_error_line(invoke(idle.url, "run", WORKFLOW, "--input", str(missing)))
    assert f"cannot read input {missing}" in line


@pytest.mark.usefixtures("unchanged")
def test_input_breaking_the_contract_names_the_failing_fields(idle: Cluster) -> None:
    line = one_error_line(invoke(idle.url, "run", WORKFLOW, "--input", INVALID))
    assert "credit_application@1" in line
    for path in ("applicant.country", "applicant.email", "credit_history.on_time_payment_ratio",
                 "income.annual", "loan.amount"):
        assert path in line


@pytest.mark.usefixtures("unchanged")
def test_an_unknown_workflow_exits_2(idle: Cluster) -> None:
    line = one_error_line(invoke(idle.url, "run", "credit_decisoin", "--input", GOOD))
    assert "unknown workflow 'credit_decisoin'" in line and WORKFLOW in line


@pytest.mark.usefixtures("unchanged")
def test_input_over_the_size_limit_exits_2(idle: Cluster, tmp_path: Path) -> None:
    payload = json.loads(Path(GOOD).read_text())
    payload["income"]["documents"] = ["x" * 4000]
    big = tmp_path / "big.json"
    big.write_text(json.dumps(payload))
    line = one_error_line(invoke(idle.url, "run", WORKFLOW, "--input", str(big),
                                 PIPELINE_MAX_PAYLOAD_BYTES="2048"))
    assert "over the limit of 2,048 bytes" in line


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("command", ["status", "history", "trace"])
def test_an_unknown_run_id_exits_2_with_no_run(idle: Cluster, command: str) -> None:
    missing = str(uuid.uuid4())
    line = one_error_line(invoke(idle.url, command, missing, "--json"))
    assert line.startswith(f"error: no run '{missing}'")


@pytest.mark.parametrize("command", ["run", "status"])
def test_an_unreachable_redis_is_one_line_without_the_password(command: str) -> None:
    args = ["run", WORKFLOW, "--input", GOOD] if command == "run" else ["status", "r-1"]
    line = one_error_line(invoke("redis://:hunter2@127.0.0.1:1/0", *args))
    assert line.startswith("error: cannot reach Redis at")
    assert "127.0.0.1:1" in line and "hunter2" not in line


# -- read commands ----------------------------------------------------------------------


def test_status_json_shows_the_finished_run(finished: str, redis_url: str) -> None:
    result = invoke(redis_url, "status", finished, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["run_id"], info["workflow"], info["status"]) == (finished, WORKFLOW, "succeeded")
    assert (info["head"], info["output_version"], info["error"]) == (5, 5, None)
    assert info["input_contract"] == "credit_application@1"
    assert info["finished_at"] >= info["created_at"]


def test_history_json_lists_every_version_with_every_field(
    finished: str, redis_url: str
) -> None:
    result = invoke(redis_url, "history", finished, "--json")
    assert result.exit_code == 0, result.output
    versions = json.loads(result.stdout)
    assert [v["version"] for v in versions] == [0, 1, 2, 3, 4, 5]
    assert all(set(v) == VERSION_KEYS and v["run_id"] == finished for v in versions)
    first, last = versions[0], versions[-1]
    assert (first["agent"], first["contract"], first["parents"], first["step"]) == (
        "", "credit_application@1", [], "input")
    assert first["payload"] == json.loads(Path(GOOD).read_text())
    assert versions[1]["agent"] == "credit_score" and versions[1]["parents"] == [0]
    assert {v["agent"] for v in versions[2:5]} == {
        "income_verification", "risk_assessment", "fraud_detection"}
    assert all(v["parents"] == [1] for v in versions[2:5])
    assert (last["agent"], last["contract"]) == ("final_approval", "credit_decision@1")
    assert sorted(last["parents"]) == [2, 3, 4]
    assert last["payload"]["decision"] == "approved"
    assert not any(v["degraded"] for v in versions)
    assert all(len(v["digest"]) == 64 for v in versions)


def test_history_without_json_prints_a_table_in_version_order(
    finished: str, redis_url: str
) -> None:
    result = invoke(redis_url, "history", finished)
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()
    assert rows[0].split()[:4] == ["version", "parents", "agent", "contract"]
    assert [r.split()[0] for r in rows[2:]] == ["0", "1", "2", "3", "4", "5"]
    assert rows[2].split()[:4] == ["0", "-", "-", "credit_application@1"]  # no agent, no parent
    assert "final_approval" in rows[7]


def test_trace_json_tells_what_happened_in_order(finished: str, redis_url: str) -> None:
    result = invoke(redis_url, "trace", finished, "--json")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)["log"]
    events = [e["event"] for e in entries]
    assert events[0] == "run.created" and events[-1] == "run.succeeded"
    sealed = [e for e in entries if e["event"] == "step.sealed"]
    assert [int(e["version"]) for e in sealed] == [1, 2, 3, 4, 5]
    assert sealed[0]["agent"] == "credit_score" and sealed[-1]["agent"] == "final_approval"
    assert sorted(e["agent"] for e in sealed[1:4]) == [
        "fraud_detection", "income_verification", "risk_assessment"]
    assert "step.failed" not in events


def test_contracts_json_lists_the_input_contract_and_its_fields(redis_url: str) -> None:
    result = invoke(redis_url, "contracts", "--json")
    assert result.exit_code == 0, result.output
    by_ref = {c["contract"]: c["fields"] for c in json.loads(result.stdout)}
    assert {"credit_application@1", "credit_score@1", "credit_decision@1"} <= set(by_ref)
    fields = by_ref["credit_application@1"]
    assert set(fields) == {"application_id", "applicant", "income", "credit_history", "loan",
                           "device"}
    assert fields["applicant"]["fields"]["email"] == {
        "type": "Email", "required": True, "allow_none": False, "validators": ["Email()"]}
    assert fields["loan"]["fields"]["amount"]["required"] is True


def test_contracts_show_required_allow_none_and_validators(redis_url: str) -> None:
    result = invoke(redis_url, "contracts", "--json")
    assert result.exit_code == 0, result.output
    by_ref = {c["contract"]: c for c in json.loads(result.stdout)}
    decision = by_ref["credit_decision@1"]
    assert decision["schema_validators"] == ["approval_is_consistent"]
    fields = decision["fields"]
    assert fields["apr"] == {"type": "Float", "required": True, "allow_none": True,
                             "validators": []}
    assert fields["decision"]["validators"] == [
        "OneOf(choices=['approved', 'declined', 'referred'])"]
    assert fields["approved_amount"]["validators"] == ["Range(min=0)"]
    application = by_ref["credit_application@1"]
    assert application["schema_validators"] == []
    loan = application["fields"]["loan"]
    assert loan["schema_validators"] == [] and loan["allow_none"] is False
    assert loan["fields"]["term_months"]["validators"] == ["Range(min=6, max=360)"]
    assert application["fields"]["applicant"]["fields"]["country"]["validators"] == [
        "Regexp(regex='^[A-Z]{2}$')"]
    assert by_ref["research_question@1"]["fields"]["max_passages"] == {
        "type": "Integer", "required": False, "allow_none": False,
        "validators": ["Range(min=1, max=10)"]}
    assert by_ref["credit_assessments@1"]["schema_validators"] == ["same_application"]

    text = invoke(redis_url, "contracts")
    assert text.exit_code == 0, text.output
    section = text.stdout.split("\ncredit_decision@1")[1].split("\n\n")[0].splitlines()
    assert section[0] == "  (schema validators: approval_is_consistent)"
    assert section[1].split() == ["field", "type", "required", "allow_none", "validators"]
    rows = {line.split()[0]: line.split() for line in section[3:]}
    assert rows["apr"] == ["apr", "Float", "yes", "yes", "-"]
    assert rows["decision"][2:] == ["yes", "no", "OneOf(choices=['approved',", "'declined',",
                                    "'referred'])"]
    optional = text.stdout.split("\nresearch_question@1")[1].split("\n\n")[0]
    assert ["max_passages", "Integer", "no", "no", "Range(min=1,", "max=10)"] in [
        line.split() for line in optional.splitlines()]


def test_cancel_prints_what_run_prints(cluster: Cluster) -> None:
    p = cluster.pipeline()  # no worker: the runs wait in the broker
    first, second = (p.start(WORKFLOW, json.loads(Path(GOOD).read_text()),
                             idempotency_key=key) for key in ("a", "b"))
    result = invoke(cluster.url, "cancel", first.run_id)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"run {first.run_id} of {WORKFLOW}: compensating (version 0)",
        "error: cancelled by hand"]
    result = invoke(cluster.url, "cancel", second.run_id, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == RUN_KEYS
    assert (data["run_id"], data["workflow"], data["status"], data["version"]) == (
        second.run_id, WORKFLOW, "compensating", 0)


def test_workflows_json_lists_credit_decision_and_its_shape(redis_url: str) -> None:
    result = invoke(redis_url, "workflows", "--json")
    assert result.exit_code == 0, result.output
    by_name = {w["workflow"]: w for w in json.loads(result.stdout)}
    wf = by_name[WORKFLOW]
    assert wf["shape"] == ("credit_score -> (income_verification | risk_assessment | "
                           "fraud_detection) -> final_approval")
    assert (wf["input_contract"], wf["output_contract"]) == (
        "credit_application@1", "credit_decision@1")


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"n": ' + "9" * 5000 + "}", "not usable JSON"),  # past Python's int digit limit
        ('{"name": "\\ud800"}', "not JSON"),  # a lone surrogate UTF-8 cannot carry
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ],
    ids=["huge-integer", "lone-surrogate", "deep-nesting"],
)
def test_hostile_json_input_is_one_clear_error(idle: Cluster, text: str, expected: str) -> None:
    line = one_error_line(invoke(idle.url, "run", WORKFLOW, "--input", "-", stdin=text))
    assert expected in line


def test_a_redis_url_that_is_not_a_url_is_named(idle: Cluster) -> None:
    line = one_error_line(invoke(idle.url, "status", "x", PIPELINE_REDIS_URL="127.0.0.1:6379"))
    assert "PIPELINE_REDIS_URL=127.0.0.1:6379 is not a Redis URL" in line


def test_run_wait_json_that_times_out_reports_the_run_still_running(idle: Cluster) -> None:
    result = invoke(idle.url, "run", WORKFLOW, "--input", GOOD, "--wait", "--timeout", "0.2",
                    "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["status"] == "running" and "still running" in data["error"]
