"""Run inspection on real runs: trace (one row per call, token sums), inspect, graph, runs,
replay and batch runs, in text and JSON, for a succeeded, a compensated, a degraded and a
parked run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import Pipeline, RunStatus
from pipeline.observe.lineage import lineage_dot
from pipeline.route import Route
from tasks import SAMPLES, research
from tasks.contracts import band_of
from tasks.retrieval import index, words
from tests.conftest import Cluster, wait_for
from tests.test_cli import RUN_KEYS
from tests.test_saga import invoke_cli

GOOD = json.loads((SAMPLES / "good.json").read_text())
QUESTION = json.loads((SAMPLES / "research.json").read_text())


def cli_json(url: str, *args: str) -> Any:
    result = invoke_cli(url, *args, "--json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def succeeded(pipeline: Pipeline) -> str:
    run = pipeline.start("credit_decision", GOOD)
    assert run.wait(30).status is RunStatus.SUCCEEDED
    return run.run_id


@pytest.fixture(scope="module")
def researched(pipeline: Pipeline) -> str:
    run = pipeline.start("research_report", QUESTION)
    assert run.wait(30).status is RunStatus.SUCCEEDED
    return run.run_id


# -- trace --------------------------------------------------------------------------------


def test_trace_has_one_row_per_call_with_where_and_how_it_ran(succeeded: str,
                                                               redis_url: str) -> None:
    data = cli_json(redis_url, "trace", succeeded)
    calls = data["calls"]
    assert [c["agent"] for c in calls][0] == "credit_score"
    assert [c["agent"] for c in calls][-1] == "final_approval"
    assert len(calls) == 5 and all(c["status"] == "ok" and c["attempt"] == 1 for c in calls)
    assert all(c["queue"] == f"agents.{c['agent']}" and c["worker"] for c in calls)
    assert all(c["breaker"] == "closed" and c["latency_ms"] is not None for c in calls)
    assert sorted(c["output"] for c in calls) == [1, 2, 3, 4, 5]
    final = calls[-1]
    assert sorted(final["inputs"]) == [2, 3, 4] and final["output"] == 5
    assert data["log"][0]["event"] == "run.created"
    assert data["log"][-1]["event"] == "run.succeeded"
    text = invoke_cli(redis_url, "trace", succeeded).stdout
    assert "agents.final_approval" in text and "run.succeeded" in text


def test_trace_sums_the_tokens_each_agent_reported(researched: str, redis_url: str,
                                                   pipeline: Pipeline) -> None:
    """Recomputed from the sealed versions: what each research agent says it read and wrote."""
    data = cli_json(redis_url, "trace", researched)
    by_step = {v.step: v for v in pipeline.run(researched).history()}
    question, findings = QUESTION["question"], by_step["e1:research"].payload["findings"]
    expected = {
        "research": (index().total_words + len(words(question)),
                     len(words(json.dumps(findings)))),
        "analysis": (len(words(" ".join(f["passage"] for f in findings))),
                     len(words(json.dumps(by_step["e2:analysis"].payload)))),
    }
    per = data["tokens"]["by_agent"]
    for agent, (prompt, completion) in expected.items():
        assert (per[agent]["prompt_tokens"], per[agent]["completion_tokens"]) == (
            prompt, completion), agent
    assert per["audit"]["calls"] == 2
    total = data["tokens"]["total"]
    assert total["prompt_tokens"] == sum(u["prompt_tokens"] for u in per.values())
    assert total["total_tokens"] == total["prompt_tokens"] + total["completion_tokens"] > 1700
    assert all(c["model"] == research.MODEL for c in data["calls"])


# -- inspect and graph ------------------------------------------------------------------------


def test_inspect_shows_the_header_the_lineage_tree_and_the_calls(succeeded: str,
                                                                 redis_url: str) -> None:
    text = invoke_cli(redis_url, "inspect", succeeded)
    assert text.exit_code == 0
    out = text.stdout
    assert f"run       {succeeded}" in out and "status    succeeded" in out
    tree = out.split("lineage")[1].split("calls:")[0].splitlines()
    assert tree[1].strip().startswith("v5 final_approval credit_decision@1")
    assert any("`-- v0 credit_application@1" in line for line in tree)
    assert sum("(above)" in line for line in tree) == 2  # v1 reached three times, shown once
    data = cli_json(redis_url, "inspect", succeeded)
    assert data["run"]["status"] == "succeeded" and len(data["versions"]) == 6
    assert len(data["calls"]) == 5 and data["compensations"] == []


def test_graph_writes_the_lineage_as_dot(succeeded: str, redis_url: str, tmp_path: Any,
                                         pipeline: Pipeline) -> None:
    target = tmp_path / "run.dot"
    result = invoke_cli(redis_url, "graph", succeeded, "--output", str(target))
    assert result.exit_code == 0, result.stderr
    dot = target.read_text()
    assert dot.startswith(f'digraph "run {succeeded}"')
    edges = sorted(line.strip() for line in dot.splitlines() if "->" in line)
    assert edges == sorted(["v0 -> v1;", "v1 -> v2;", "v1 -> v3;", "v1 -> v4;", "v2 -> v5;",
                            "v3 -> v5;", "v4 -> v5;"])
    assert dot == lineage_dot(pipeline.store.run_info(succeeded),
                              pipeline.store.history(succeeded))


def test_graph_as_svg_without_graphviz_is_a_clear_error(succeeded: str, redis_url: str,
                                                        monkeypatch: Any) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    result = invoke_cli(redis_url, "graph", succeeded, "--format", "svg")
    assert result.exit_code == 2 and "Graphviz's `dot`" in result.stderr


def test_graph_to_an_svg_file_without_graphviz_suggests_a_dot_file_and_writes_nothing(
    succeeded: str, redis_url: str, monkeypatch: Any, tmp_path: Any,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # a machine without Graphviz
    target = tmp_path / "run.svg"
    result = invoke_cli(redis_url, "graph", succeeded, "-o", str(target))
    assert result.exit_code == 2 and "Graphviz's `dot`" in result.stderr
    assert f"-o {tmp_path / 'run.dot'}" in result.stderr and "--format" not in result.stderr
    assert not target.exists()
    advised = invoke_cli(redis_url, "graph", succeeded, "-o", str(tmp_path / "run.dot"))
    assert advised.exit_code == 0, advised.stderr
    assert (tmp_path / "run.dot").read_text().startswith(f'digraph "run {succeeded}"')


@pytest.mark.parametrize(("fmt", "name", "right"), [
    ("dot", "run.svg", "run.dot"), ("svg", "run.dot", "run.svg"), ("dot", "RUN.SVG", "RUN.dot")])
def test_graph_refuses_a_format_that_contradicts_the_file_name(
    succeeded: str, redis_url: str, tmp_path: Any, fmt: str, name: str, right: str,
) -> None:
    result = invoke_cli(redis_url, "graph", succeeded, "--format", fmt, "-o",
                        str(tmp_path / name))
    assert result.exit_code == 2
    assert f"--format {fmt} would write {fmt.upper()} into {tmp_path / name}" in result.stderr
    assert f"name the file {tmp_path / right}" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_input_version_has_no_agent_in_every_view(succeeded: str, redis_url: str,
                                                      pipeline: Pipeline) -> None:
    """Version 0 is the run's input: its agent is empty in Python and in JSON, shown as an
    empty cell (``-``) in tables, and lines name it ``v0`` and its step ``[input]``."""
    v0 = pipeline.run(succeeded).history()[0]
    assert (v0.agent, v0.step) == ("", "input")
    assert cli_json(redis_url, "history", succeeded)[0]["agent"] == ""
    assert cli_json(redis_url, "inspect", succeeded)["versions"][0]["agent"] == ""
    history = invoke_cli(redis_url, "history", succeeded).stdout
    assert history.splitlines()[2].split()[:4] == ["0", "-", "-", "credit_application@1"]
    page = invoke_cli(redis_url, "inspect", succeeded).stdout
    assert f"`-- v0 credit_application@1 {v0.digest[:12]} [input]" in page
    dot = invoke_cli(redis_url, "graph", succeeded).stdout
    assert f'v0 [label="v0\\ncredit_application@1\\n{v0.digest[:12]}\\n[input]"' in dot
    trace = invoke_cli(redis_url, "trace", succeeded).stdout
    for shown in (history, page, dot, trace):
        assert "(input)" not in shown and "v0 input" not in shown


# -- compensated, degraded, parked ------------------------------------------------------------


def test_each_command_on_a_compensated_a_degraded_and_a_parked_run(cluster: Cluster) -> None:
    cluster.worker(PIPELINE_CHAOS="final_approval=error:1")
    p = cluster.pipeline()
    compensated = p.start("credit_decision", GOOD)
    assert compensated.wait(30).status is RunStatus.COMPENSATED
    p.breakers.force_open("guarded_skip")
    degraded = p.start("w_guarded_skip", {"n": 1})
    assert degraded.wait(30).status is RunStatus.SUCCEEDED
    p.breakers.force_open("guarded_park")
    parked = p.start("w_guarded_park", {"n": 1})
    wait_for(lambda: parked.status() is RunStatus.WAITING_FOR_HUMAN, 20, "the run to park")
    url = cluster.url

    calls = cli_json(url, "trace", compensated.run_id)["calls"]
    failed = [c for c in calls if c["status"] == "failed"]
    assert [(c["agent"], c["error_type"]) for c in failed] == [("final_approval", "ChaosError")]
    page = invoke_cli(url, "inspect", compensated.run_id).stdout
    assert "status    compensated" in page and "error     final_approval: ChaosError" in page
    undone = page.split("compensation:")[1]
    assert undone.index("1.") < undone.index("0:credit_score") < undone.index("run.compensated")
    assert len(cli_json(url, "inspect", compensated.run_id)["compensations"]) >= 6

    skip = cli_json(url, "trace", degraded.run_id)["calls"]
    assert [(c["status"], c["fallback"], c["breaker"], c["degraded"]) for c in skip] == [
        ("ok", "skip", "open", True)]
    assert "DEGRADED" in invoke_cli(url, "inspect", degraded.run_id).stdout
    assert "(degraded)" in invoke_cli(url, "runs", "--workflow", "w_guarded_skip").stdout

    park = cli_json(url, "trace", parked.run_id)["calls"]
    assert [(c["agent"], c["status"], c["fallback"]) for c in park] == [
        ("increment", "ok", ""), ("guarded_park", "refused", "park")]
    rows = cli_json(url, "runs", "--status", "waiting_for_human")
    assert [r["run_id"] for r in rows] == [parked.run_id]
    listed = cli_json(url, "runs")
    assert [r["run_id"] for r in listed] == [parked.run_id, degraded.run_id,
                                             compensated.run_id]  # newest first
    assert [r["status"] for r in cli_json(url, "runs", "--limit", "1")] == ["waiting_for_human"]
    bad = invoke_cli(url, "runs", "--status", "finished")
    assert bad.exit_code == 2 and "not a run status" in bad.stderr


def test_runs_drops_runs_that_expired_from_the_index(cluster: Cluster) -> None:
    cluster.worker()
    p = cluster.pipeline()
    kept, gone = (p.start("counting", {"n": i}) for i in (1, 2))
    assert kept.wait(20).status is gone.wait(20).status is RunStatus.SUCCEEDED
    r = cluster.redis
    r.delete(*[k for k in r.scan_iter(f"pipeline:{{{gone.run_id}}}:*")])  # as retention does
    assert [row["run_id"] for row in cli_json(cluster.url, "runs")] == [kept.run_id]
    # kept in the index for a minute (a run being created on a cluster looks the same) ...
    assert sorted(r.zrange("pipeline:runs", 0, -1)) == sorted([kept.run_id, gone.run_id])
    r.zadd("pipeline:runs", {gone.run_id: 1}, xx=True)  # ... then dropped
    assert [row["run_id"] for row in cli_json(cluster.url, "runs")] == [kept.run_id]
    assert r.zrange("pipeline:runs", 0, -1) == [kept.run_id]


# -- replay -------------------------------------------------------------------------------


def test_replay_forks_a_run_from_a_sealed_version(succeeded: str, redis_url: str,
                                                  pipeline: Pipeline) -> None:
    data = cli_json(redis_url, "replay", succeeded, "--from-version", "1", "--wait")
    assert data["status"] == "succeeded"
    new = pipeline.run(data["run_id"])
    source = pipeline.run(succeeded)
    v0, v1 = new.history()[0], source.history()[1]
    assert (v0.payload, v0.digest, v0.contract) == (v1.payload, v1.digest, v1.contract)
    # only what came after version 1 ran again, and decided the same
    assert sorted(v.step for v in new.history()[1:]) == sorted(
        v.step for v in source.history()[2:])
    assert data["output"] == source.result().output
    assert new.info().replay_of == f"{succeeded}@1"
    assert data["run_id"] in source.info().replays
    # where it starts is in its route too (a sweeper enqueuing it, its client dead, reads it)
    assert Route.from_json(new.info().route).start == "1"
    assert f"replayed  as {data['run_id']}" in invoke_cli(redis_url, "inspect",
                                                          succeeded).stdout


def test_replay_with_an_edit_seals_a_persons_correction_and_runs_on_from_it(
    succeeded: str, redis_url: str, pipeline: Pipeline, tmp_path: Path,
) -> None:
    source = pipeline.run(succeeded)
    scored = source.history()[1]
    assert scored.agent == "credit_score"
    corrected = {**scored.payload, "score": 320, "band": band_of(320)}
    (tmp_path / "edit.json").write_text(json.dumps(corrected))

    data = cli_json(redis_url, "replay", succeeded, "--from-version", "1", "--edit",
                    str(tmp_path / "edit.json"), "--author", "alice", "--wait")

    assert data["status"] == "succeeded"
    fork = pipeline.run(data["run_id"])
    history = fork.history()
    assert history[0].digest == scored.digest  # version 0: the source version, unchanged
    edit = history[1]
    assert (edit.step, edit.agent, edit.contract, edit.parents, edit.payload) == (
        "edit", "credit_score", scored.contract, (0,), corrected)
    assert all(v.parents == (1,) for v in history[2:5])  # the next stage read the edit
    assert data["output"]["decision"] == "declined" != source.result().output["decision"]
    [edited] = [e for e in fork.pipeline.store.log(fork.run_id)
                if e["event"] == "replay.edited"]
    assert (edited["author"], edited["source_digest"]) == ("alice", scored.digest)
    assert Route.from_json(fork.info().route).input_version == 1


def test_an_edit_that_breaks_its_versions_contract_starts_nothing(
    succeeded: str, redis_url: str, pipeline: Pipeline, tmp_path: Path,
) -> None:
    scored = pipeline.run(succeeded).history()[1]
    (tmp_path / "edit.json").write_text(json.dumps({**scored.payload, "score": 320}))
    before = len(cli_json(redis_url, "runs", "--limit", "1000"))

    refused = invoke_cli(redis_url, "replay", succeeded, "--from-version", "1", "--edit",
                         str(tmp_path / "edit.json"))

    assert refused.exit_code == 2
    assert "breaks contract credit_score@1" in refused.stderr and "band" in refused.stderr
    assert len(cli_json(redis_url, "runs", "--limit", "1000")) == before


def test_replay_prints_what_run_prints(succeeded: str, redis_url: str,
                                      pipeline: Pipeline) -> None:
    text = invoke_cli(redis_url, "replay", succeeded, "--from-version", "1", "--wait")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    fork = lines[0].split()[1]
    assert lines[0] == f"run {fork} replays {succeeded} from version 1"
    assert lines[1] == f"run {fork} of credit_decision: succeeded (version 4)"
    assert json.loads("\n".join(lines[2:])) == pipeline.run(succeeded).result().output
    data = cli_json(redis_url, "replay", succeeded, "--from-version", "1", "--wait")
    assert set(data) == RUN_KEYS and data["workflow"] == "credit_decision"


def test_replay_of_a_choreography_starts_at_the_event_its_version_published(
    researched: str, redis_url: str, pipeline: Pipeline,
) -> None:
    source = pipeline.run(researched)
    sealed = {v.step: v for v in source.history()}
    analysed = sealed["e2:analysis"]
    data = cli_json(redis_url, "replay", researched, "--from-version", str(analysed.version),
                    "--wait")
    assert data["status"] == "succeeded" and data["output"] == source.result().output
    events = cli_json(redis_url, "events", data["run_id"])
    assert [(e["type"], e["publisher"]) for e in events] == [
        ("analysis.ready", "client"), ("report.completed", "report")]
    assert pipeline.run(data["run_id"]).history()[0].digest == analysed.digest
    route = Route.from_json(pipeline.run(data["run_id"]).info().route)
    assert (route.start, route.subscribers) == ("analysis.ready", ("report",))
    audited = sealed["e2:audit"].version
    refused = invoke_cli(redis_url, "replay", researched, "--from-version", str(audited))
    assert refused.exit_code == 2 and "publishes nothing" in refused.stderr


@pytest.mark.parametrize(("version", "message"), [
    (2, "one of a parallel group"), (5, "is the run's output"), (9, "has no version 9")])
def test_replay_refuses_a_version_it_cannot_start_from(succeeded: str, redis_url: str,
                                                       version: int, message: str) -> None:
    result = invoke_cli(redis_url, "replay", succeeded, "--from-version", str(version))
    assert result.exit_code == 2 and message in result.stderr


# -- many runs ------------------------------------------------------------------------------


def test_a_batch_waits_for_every_run_and_summarizes(redis_url: str, pipeline: Pipeline,
                                                    tmp_path: Any) -> None:
    batch = SAMPLES / "batch.json"
    result = invoke_cli(redis_url, "run", "credit_decision", "--input", str(batch), "--batch")
    assert result.exit_code == 0, result.output + result.stderr
    assert "8 runs of credit_decision" in result.stderr  # the progress bar's label
    assert "succeeded  8" in result.stdout and "latency: median" in result.stdout
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([{"n": 1}, {"n": 2}]))
    data = cli_json(redis_url, "run", "counting", "--input", str(mixed), "--batch")
    assert [r["output"] for r in data] == [{"n": 4}, {"n": 6}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"n": 1}, {"m": 2}]))
    refused = invoke_cli(redis_url, "run", "counting", "--input", str(bad), "--batch")
    assert refused.exit_code == 2 and "payload 1 of the batch" in refused.stderr


def test_replaying_a_replay_from_its_start_runs_only_what_that_replay_ran(
    pipeline: Pipeline, redis_url: str, rclient: Any,
) -> None:
    first = pipeline.start("counting", {"n": 1})
    assert first.wait(20).output == {"n": 4}
    fork = cli_json(redis_url, "replay", first.run_id, "--from-version", "1", "--wait")
    again = cli_json(redis_url, "replay", fork["run_id"], "--from-version", "0", "--wait")
    assert fork["output"] == again["output"] == {"n": 4}  # increment never ran again
    assert [v.step for v in pipeline.run(again["run_id"]).history()] == ["input", "1:double"]
    assert pipeline.run(again["run_id"]).info().replay_of == f"{fork['run_id']}@0"


def test_a_replay_that_parks_at_its_first_step_resumes(cluster: Cluster) -> None:
    cluster.worker()
    p = cluster.pipeline()
    source = p.start("w_guarded_park", {"n": 1})
    p.breakers.force_open("guarded_park")
    wait_for(lambda: source.status() is RunStatus.WAITING_FOR_HUMAN, 20, "the run to park")
    fork = p.replay(source.run_id, 1)
    wait_for(lambda: fork.status() is RunStatus.WAITING_FOR_HUMAN, 20, "the replay to park")
    p.breakers.reset("guarded_park")
    result = p.resume(fork.run_id).wait(20)
    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 40}
    # a person's output for the source is its own row in the trace, not the refused call's
    assert p.resume(source.run_id, {"n": 7}).wait(20).output == {"n": 14}
    rows = [(c["agent"], c["status"], c["worker"])
            for c in cli_json(cluster.url, "trace", source.run_id)["calls"]]
    assert rows[1:] == [("guarded_park", "refused", rows[1][2]),
                        ("guarded_park", "ok", "person"), ("double", "ok", rows[3][2])]


def test_a_choreography_is_not_replayed_from_its_output(researched: str, redis_url: str,
                                                        pipeline: Pipeline) -> None:
    output = pipeline.run(researched).info().output_version
    result = invoke_cli(redis_url, "replay", researched, "--from-version", str(output))
    assert result.exit_code == 2 and "is the run's output" in result.stderr


def test_a_crash_loop_is_one_lost_row_per_delivery_then_the_refusal(cluster: Cluster) -> None:
    cluster.worker(PIPELINE_CHAOS="increment=crash:1")
    p = cluster.pipeline()
    run = p.start("counting", {"n": 1})
    assert run.wait(60).status is RunStatus.FAILED
    rows = [(c["attempt"], c["status"], c["error_type"])
            for c in cli_json(cluster.url, "trace", run.run_id)["calls"]]
    limit = len(rows) - 1
    assert rows == [(i, "lost", "") for i in range(1, limit + 1)] + [
        (limit + 1, "exhausted", "DeliveryLimitExceeded")]


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://127.0.0.1:1/0?password=s3cret", "redis://127.0.0.1:1/0?password=***"),
    ("amqp://guest:s3cret@h:5672/vh?token=s3cret&x=1", "amqp://guest:***@h:5672/vh?token=***&x=1"),
])
def test_urls_are_shown_without_their_secrets(url: str, shown: str) -> None:
    from pipeline.settings import redact_url

    assert redact_url(url) == shown and "s3cret" not in redact_url(url)
