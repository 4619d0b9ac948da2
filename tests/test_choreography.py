"""Choreography: event routing, the delivery ledger, exactly-once handling, and the hybrid
saga, on real Redis and real workers (the research flow does real retrieval work)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis

from pipeline import Pipeline, RunStatus
from pipeline.agent import Agent, AgentRegistry
from pipeline.choreography import Choreography, publish
from pipeline.contracts import contracts
from pipeline.errors import ContractMismatch, InputError, WorkflowDefinitionError
from pipeline.events import check_pattern, matches
from pipeline.keys import RunKeys
from pipeline.observe.ledger import events, explain
from tasks import SAMPLES, research
from tasks.retrieval import search
from tests.agents import CRASH_BEFORE_DISPATCH_KEY, TICK_HOLD_KEY
from tests.conftest import Cluster, wait_for
from tests.quick_agents import EXECUTIONS_KEY, SIDE_EFFECTS_KEY
from tests.test_saga import invoke_cli

from . import late_subscriber

QUESTION = json.loads((SAMPLES / "research.json").read_text())
OFF_TOPIC = json.loads((SAMPLES / "research_off_topic.json").read_text())


def executions(r: redis.Redis, run_id: str, agent: str) -> int:
    return int(r.get(EXECUTIONS_KEY.format(run_id=run_id, agent=agent)) or 0)


def deliveries(p: Pipeline, run_id: str) -> dict[str, list[str]]:
    """Delivery key -> the states recorded for it (the first, then one per duplicate)."""
    out: dict[str, list[str]] = {}
    for v in events(p.store, run_id):
        for d in v.deliveries:
            out.setdefault(d.step or f"{v.event_id}:-", []).append(d.state)
    return out


def event_chain(p: Pipeline, run_id: str) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(type, publisher, type of its cause, subscribers) of every event, in order."""
    views = events(p.store, run_id)
    types = {v.event_id: v.type for v in views}
    return [(v.type, v.publisher, types.get(v.cause, ""), tuple(v.subscribers)) for v in views]


# -- routing and checks (pure logic) ------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "event_type", "expected"), [
    ("research.completed", "research.completed", True),
    ("research.*", "research.completed", True),
    ("*.completed", "report.completed", True),
    ("*.completed", "research.requested", False),
    ("*", "research.completed", False),  # one segment only
    ("research.*", "research.completed.late", False),
    ("*.*", "a.b", True),
])
def test_a_pattern_star_stands_for_exactly_one_segment(pattern: str, event_type: str,
                                                       expected: bool) -> None:
    assert matches(pattern, event_type) is expected


@pytest.mark.parametrize("bad", ["", "research..done", "research.comp*", "research.**",
                                 "a b", "x" * 201])
def test_a_malformed_pattern_is_refused_with_where_it_was_declared(bad: str) -> None:
    with pytest.raises(ValueError, match="agent a: on"):
        check_pattern(bad, "agent a: on")


def test_an_agent_cannot_emit_a_pattern() -> None:
    with pytest.raises(ValueError, match="emits"):
        Agent(name="x", execute=lambda p, c: p, input="count@1", output="count@1",
              emits="research.*")


@pytest.mark.parametrize("policy", [{"on": ["*.failed"]}, {"emits": "payment.failed"}])
def test_failure_events_are_reserved_for_the_saga(policy: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="reserved"):
        Agent(name="x", execute=lambda p, c: p, input="count@1", output="count@1", **policy)


def _flow(*defs: tuple[str, list[str], str | None, str, str], terminal: str = "t.done",
          start: str = "t.start") -> Choreography:
    registry = AgentRegistry()
    for name, on, emits, inp, out in defs:
        registry.register(Agent(name=name, execute=lambda p, c: p, input=inp, output=out,
                                on=on, emits=emits))
    return Choreography("t", start=start, terminal=[terminal], input="count@1",
                        agent_registry=registry, register=False)


def test_a_flow_nobody_starts_is_refused() -> None:
    flow = _flow(("a", ["t.other"], "t.done", "count@1", "count@1"))
    with pytest.raises(WorkflowDefinitionError, match="no agent subscribes to its start"):
        flow.check()


def test_an_event_loop_is_refused_naming_the_loop() -> None:
    flow = _flow(("a", ["t.start", "t.back"], "t.mid", "count@1", "count@1"),
                 ("b", ["t.mid"], "t.back", "count@1", "count@1"),
                 ("c", ["t.mid"], "t.done", "count@1", "count@1"))
    with pytest.raises(WorkflowDefinitionError, match=r"t.mid -> t.back -> t.mid"):
        flow.check()


def test_a_flow_whose_terminal_event_nothing_publishes_is_refused() -> None:
    flow = _flow(("a", ["t.start"], "t.mid", "count@1", "count@1"))
    with pytest.raises(WorkflowDefinitionError, match="could never end"):
        flow.check()


def test_a_subscription_whose_contract_refuses_the_event_is_refused_when_checked() -> None:
    contracts.get("research_findings@1")  # registered by tasks
    flow = _flow(("a", ["t.start"], "t.mid", "count@1", "count@1"),
                 ("b", ["t.*"], "t.done", "research_findings@1", "count@1"))
    with pytest.raises(ContractMismatch, match=r"event t.start from client to b.*question"):
        flow.check()


def test_the_research_flow_routes_as_the_talk_draws_it() -> None:
    flow = research.research_report
    flow.check()
    assert flow.shape() == ("research.requested -> research; research.completed -> analysis, "
                            "audit; analysis.ready -> report; report.completed -> audit; ends "
                            "at report.completed")
    assert flow.describe()["output_contract"] == "report@1"
    assert [a.name for a in flow.subscribers("research.completed")] == ["analysis", "audit"]


def test_a_choreography_compensates_newest_sealed_first_one_at_a_time() -> None:
    from pipeline.state import Version

    def v(n: int) -> Version:
        return Version(run_id="r", version=n, parents=(), agent="", contract="", payload={},
                       digest="", created_at=0.0, step="")

    stages = research.research_report.compensation_stages(
        {"e1:research": v(1), "e2:audit": v(3), "e2:analysis": v(2)}, {"e3:report"})
    assert stages == [["e3:report"], ["e2:audit"], ["e2:analysis"], ["e1:research"]]


def test_retrieval_ranks_the_passages_that_answer_and_doubts_what_the_corpus_lacks() -> None:
    hits, confidence = search(QUESTION["question"], 3)
    assert confidence >= research.MIN_CONFIDENCE
    assert all(h.passage.source.startswith("circuit-breakers#") for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    _, off = search(OFF_TOPIC["question"], 3)
    assert off < research.MIN_CONFIDENCE
    assert search("sourdough bread recipe", 3) == ([], 0.0)


# -- the ledger script, straight on Redis ---------------------------------------------------


def _new_run(p: Pipeline, workflow: str = "ticking") -> str:
    run_id = str(uuid.uuid4())
    p.store.create_run(run_id, workflow=workflow, payload={"n": 1}, contract="count@1")
    return run_id


def test_an_event_is_published_once_per_publisher_and_its_deliveries_once_each(
    client_only: Pipeline,
) -> None:
    p = client_only
    run_id = _new_run(p)
    first = publish(p.store, run_id, source="start", event_type="tick.requested",
                    publisher="client", version=0, subscribers=["ticker", "tocker"],
                    terminal=["tick.tocked"])
    again = publish(p.store, run_id, source="start", event_type="tick.requested",
                    publisher="client", version=0, subscribers=["ticker", "tocker"])
    assert (first.outcome, first.event, first.subscribers) == ("published", "e1",
                                                               ("ticker", "tocker"))
    # Published before: the same event, and the deliveries nobody picked up yet.
    assert (again.outcome, again.event, again.subscribers) == ("again", "e1",
                                                               ("ticker", "tocker"))
    info = p.store.redis.hgetall(RunKeys(run_id).run)
    assert info["outstanding"] == "2" and info["events"] == "1"
    assert info["terminal_types"] == "tick.tocked"
    assert sum(e["event"] == "event.published" for e in p.store.log(run_id)) == 1


def test_nothing_outstanding_and_no_terminal_event_stalls_the_run(client_only: Pipeline) -> None:
    p = client_only
    run_id = _new_run(p)
    reply = publish(p.store, run_id, source="start", event_type="tick.lost", publisher="client",
                    version=0, subscribers=[], terminal=["tick.tocked"])
    # The same script that saw the stall began the saga (the caller enqueues its planner).
    assert reply.outcome == "compensating"
    assert reply.reason == ("choreography stalled: no delivery is outstanding and no "
                                "terminal event (tick.tocked) was published; unrouted: "
                                "tick.lost (e1)")
    assert p.store.run_info(run_id).status is RunStatus.COMPENSATING
    assert [e["event"] for e in p.store.log(run_id)][-2:] == ["event.unrouted",
                                                              "run.compensating"]


def _handle(p: Pipeline, run_id: str, step: str, task: str, *, emits: str = "",
            subscribers: tuple[str, ...] = ()) -> Any:
    """Open, seal and end one delivery the way a worker does (open, then seal + emit)."""
    from pipeline.choreography.publishing import EMIT, Handover, emit_args

    event, agent = step.split(":")
    opened = p.store.open_step(run_id, step=step, agent=agent, inputs=[0], max_deliveries=5,
                               task_id=task, claim=True)
    assert opened.outcome == "open"
    p.store.seal(run_id, step=step, agent=agent, contract="count@1", payload={"n": 1},
                 parents=[0])
    reply = EMIT(p.store.redis, RunKeys(run_id).all(), emit_args(
        delivery=step, outcome="handled", task_id=task, source=step, event_type=emits,
        publisher=agent, cause=event, version="", terminal=(), failure=False,
        retention_s=60, subscribers=subscribers))
    return Handover.from_reply(reply)


def test_a_failure_begins_the_saga_in_the_same_script_so_no_sibling_can_end_the_run(
    client_only: Pipeline,
) -> None:
    from pipeline.choreography import fail_delivery

    p = client_only
    run_id = _new_run(p)
    publish(p.store, run_id, source="start", event_type="tick.requested", publisher="client",
            version=0, subscribers=["ticker", "tocker"], terminal=["tick.requested.done"])
    _handle(p, run_id, "e1:ticker", "t1", emits="tick.requested.done")  # terminal, no subs
    failed = fail_delivery(p.store, run_id, "e1:tocker", "tocker", "t2", "ValueError: boom")
    assert failed.outcome == "compensating"
    info = p.store.run_info(run_id)
    assert info.status is RunStatus.COMPENSATING and info.failed_agent == "tocker"
    assert info.error == "tocker.failed (e3): ValueError: boom"
    # recorded again (a redelivered errback): nothing new, the saga is begun once
    again = fail_delivery(p.store, run_id, "e1:tocker", "tocker", "t2", "ValueError: boom")
    assert again.outcome == "done"
    log = p.store.log(run_id)
    assert sum(e["event"] == "run.compensating" for e in log) == 1
    assert [e["type"] for e in log if e["event"] == "event.published"] == [
        "tick.requested", "tick.requested.done", "tocker.failed"]


def test_a_waiting_run_ends_once_nothing_is_outstanding_and_an_unknown_delivery_counts_not(
    client_only: Pipeline,
) -> None:
    p = client_only
    run_id = _new_run(p)
    publish(p.store, run_id, source="start", event_type="tick.requested", publisher="client",
            version=0, subscribers=["ticker"], terminal=["tick.requested.done"])
    from pipeline.choreography.publishing import EMIT, emit_args

    EMIT(p.store.redis, RunKeys(run_id).all(), emit_args(  # no such delivery: ignored
        delivery="e9:ghost", outcome="failed", task_id="x", source="e9:ghost#failed",
        event_type="", publisher="ghost", cause="e9", version="", terminal=(), failure=False,
        retention_s=60, subscribers=()))
    assert p.store.redis.hget(RunKeys(run_id).run, "outstanding") == "1"
    assert p.store.park(run_id, step="e0:other", agent="other", reason="test")
    done = _handle(p, run_id, "e1:ticker", "t1", emits="tick.requested.done")
    assert (done.outcome, done.version) == ("succeeded", 1)
    assert p.store.run_info(run_id).status is RunStatus.SUCCEEDED


def test_the_ledger_lives_as_long_as_its_run(client_only: Pipeline) -> None:
    p = client_only
    run_id = _new_run(p)
    keys = RunKeys(run_id)
    publish(p.store, run_id, source="start", event_type="tick.requested", publisher="client",
            version=0, subscribers=["ticker"], terminal=["tick.tocked"])
    r = p.store.redis
    assert 0 < r.ttl(keys.ledger) <= r.ttl(keys.run)  # never enqueued: it goes with the run
    p.store.mark_enqueued(run_id)
    assert r.ttl(keys.run) == r.ttl(keys.ledger) == r.ttl(keys.events) == -1  # live: kept
    _handle(p, run_id, "e1:ticker", "t1", emits="tick.tocked")
    assert p.store.run_info(run_id).status is RunStatus.SUCCEEDED
    assert 0 < r.ttl(keys.ledger) <= 60 and 0 < r.ttl(keys.events) <= 60


def test_a_second_task_delivering_the_same_event_is_a_duplicate(client_only: Pipeline) -> None:
    p = client_only
    run_id = _new_run(p)
    publish(p.store, run_id, source="start", event_type="tick.requested", publisher="client",
            version=0, subscribers=["ticker"], terminal=["tick.tocked"])

    def open_as(task_id: str) -> Any:
        return p.store.open_step(run_id, step="e1:ticker", agent="ticker", inputs=[0],
                                 max_deliveries=5, task_id=task_id, claim=True)

    assert open_as("task-a").outcome == "open"
    assert open_as("task-b").outcome == "duplicate"
    assert open_as("task-a").outcome == "open"  # the same message again: a redelivery
    assert p.store.open_step(run_id, step="e9:ticker", agent="ticker", inputs=[0],
                             max_deliveries=5, task_id="x", claim=True).outcome == "unknown"
    log = p.store.log(run_id)
    assert [e["task_id"] for e in log if e["event"] == "delivery.duplicate"] == ["task-b"]
    assert [e["attempt"] for e in log if e["event"] == "step.started"] == ["1", "2"]


# -- end to end, on the shared workers ------------------------------------------------------


def test_the_research_flow_runs_end_to_end_with_its_ledger_lineage_and_usage(
    pipeline: Pipeline, rclient: redis.Redis, redis_url: str,
) -> None:
    result = invoke_cli(redis_url, "run", "research_report", "--input",
                        str(SAMPLES / "research.json"), "--wait", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    out = json.loads(result.stdout)
    run_id = out["run_id"]
    assert out["status"] == "succeeded" and out["workflow"] == "research_report"
    report = out["output"]
    assert report["title"] == f"Report: {QUESTION['question']}"
    assert report["sources"] == ["circuit-breakers"] and report["confidence"] >= 0.7
    assert "Breakers stop cascading failures." in report["body"]

    assert event_chain(pipeline, run_id) == [
        ("research.requested", "client", "", ("research",)),
        ("research.completed", "research", "research.requested", ("analysis", "audit")),
        ("analysis.ready", "analysis", "research.completed", ("report",)),
        ("report.completed", "report", "analysis.ready", ("audit",)),
    ]
    assert deliveries(pipeline, run_id) == {
        "e1:research": ["handled"], "e2:analysis": ["handled"], "e2:audit": ["handled"],
        "e3:report": ["handled"], "e4:audit": ["handled"]}
    # The output is the terminal event's version; its lineage runs back to the question.
    run = pipeline.run(run_id)
    assert [v.agent or "input" for v in run.lineage(out["version"])] == [
        "report", "analysis", "research", "input"]
    assert run.info().head == 5  # and both audits sealed, after the report
    # Every agent reported the text it handled as token usage, in its trace entry.
    sealed = [e for e in pipeline.store.log(run_id) if e["event"] == "step.sealed"]
    assert {e["agent"] for e in sealed} == {"research", "analysis", "report", "audit"}
    assert all(int(e["prompt_tokens"]) > 0 and int(e["completion_tokens"]) > 0
               and e["model"] == research.MODEL for e in sealed)
    # What the agents did: cached, drafted, published, audited twice.
    assert rclient.hlen(research.CACHE_KEY.format(run_id=run_id)) == 3
    assert rclient.hget(research.DRAFTS_KEY, run_id)
    assert rclient.hget(research.REPORTS_KEY, run_id) == report["body"]
    audited = [json.loads(x) for x in rclient.lrange(research.AUDIT_KEY.format(run_id=run_id),
                                                     0, -1)]
    assert sorted(a["event_type"] for a in audited) == ["report.completed", "research.completed"]

    text = invoke_cli(redis_url, "events", run_id)
    assert text.exit_code == 0
    assert "report.completed (terminal)" in text.stdout and "unrouted" not in text.stderr
    why = invoke_cli(redis_url, "explain", run_id, "audit", "--json")
    assert json.loads(why.stdout)["summary"] == (
        "audit reacted to 2 event(s): e2 research.completed, e4 report.completed")


def test_the_same_agents_run_orchestrated_too(pipeline: Pipeline) -> None:
    result = pipeline.start("research_chain", QUESTION).wait(30)
    assert result.status is RunStatus.SUCCEEDED, result.error
    assert result.output["sources"] == ["circuit-breakers"]


def test_an_unrouted_event_is_recorded_and_warned_about_and_the_run_still_ends(
    pipeline: Pipeline, redis_url: str,
) -> None:
    run = pipeline.start("straying", {"n": 3})
    result = run.wait(30)
    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 3}
    views = {v.type: v for v in events(pipeline.store, run.run_id)}
    assert views["stray.noticed"].unrouted and not views["stray.done"].unrouted
    assert [d.state for d in views["stray.noticed"].deliveries] == ["unrouted"]
    cli = invoke_cli(redis_url, "events", run.run_id)
    assert cli.exit_code == 0
    assert "stray.noticed from stray_side is unrouted" in cli.stderr
    listed = json.loads(invoke_cli(redis_url, "events", run.run_id, "--json").stdout)
    assert [e["type"] for e in listed if e["unrouted"]] == ["stray.noticed"]


def test_events_lists_a_terminal_event_no_agent_subscribes_to(
    pipeline: Pipeline, redis_url: str,
) -> None:
    run = pipeline.start("ticking", {"n": 1})
    assert run.wait(30).status is RunStatus.SUCCEEDED
    listed = json.loads(invoke_cli(redis_url, "events", run.run_id, "--json").stdout)
    assert [(e["type"], e["terminal"], e["subscribers"]) for e in listed][-1] == (
        "tick.tocked", True, [])
    cli = invoke_cli(redis_url, "events", run.run_id)
    assert cli.exit_code == 0 and cli.stderr == ""  # a terminal event is not unrouted
    rows = {line.split()[0]: line.split() for line in cli.stdout.splitlines()[3:]
            if line and not line.startswith(" ")}
    assert list(rows) == [e["event_id"] for e in listed]  # every event, in order
    assert rows["e3"][:6] == ["e3", "tick.tocked", "(terminal)", "e2", "tocker", "2"]
    assert rows["e3"][7:] == ["-", "no", "subscriber"]


def test_publishing_an_event_again_is_handled_once_per_subscriber(
    pipeline: Pipeline, rclient: redis.Redis,
) -> None:
    """The start event is sent twice while its first delivery runs, and every event is sent
    again once the run is over: each subscriber handled each event once."""
    key = str(uuid.uuid4())
    run_id = Pipeline.run_id_for("ticking", key)
    rclient.set(TICK_HOLD_KEY.format(run_id=run_id), "1", ex=60)
    run = pipeline.start("ticking", {"n": 1}, idempotency_key=key)
    wait_for(lambda: executions(rclient, run_id, "ticker") == 1, 20, "the ticker to start")
    assert pipeline.redeliver(run_id, "e1") == ["ticker"]
    wait_for(lambda: deliveries(pipeline, run_id).get("e1:ticker") == ["running", "duplicate"],
             20, "the second delivery to be recorded a duplicate")
    rclient.delete(TICK_HOLD_KEY.format(run_id=run_id))
    result = run.wait(30)
    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 4}

    for event in ("e1", "e2"):
        pipeline.redeliver(run_id, event)
    wait_for(lambda: deliveries(pipeline, run_id) == {
        "e1:ticker": ["handled", "duplicate", "duplicate"],
        "e2:tocker": ["handled", "duplicate"]}, 20, "the redeliveries to be recorded")
    assert executions(rclient, run_id, "ticker") == 1
    assert executions(rclient, run_id, "tocker") == 1
    assert [v.step for v in run.history()] == ["input", "e1:ticker", "e2:tocker"]
    with pytest.raises(InputError, match="no event 'e7'"):
        pipeline.redeliver(run_id, "e7")


# -- with workers of their own ----------------------------------------------------------------


def test_a_worker_killed_after_sealing_and_before_dispatching_loses_no_event(
    cluster: Cluster,
) -> None:
    """The pool process dies after the ticker sealed and published tick.ticked, before the
    tocker's task reached the broker. The broker hands the ticker's message out again; it
    finds its step sealed, records a duplicate, and dispatches what was never sent."""
    r = cluster.redis
    cluster.worker(PIPELINE_TEST_CRASH_BEFORE_DISPATCH="1")
    p = cluster.pipeline()
    key = str(uuid.uuid4())
    run_id = Pipeline.run_id_for("ticking", key)
    r.set(CRASH_BEFORE_DISPATCH_KEY.format(run_id=run_id), "1", ex=120)

    result = p.start("ticking", {"n": 5}, idempotency_key=key).wait(60)

    assert result.status is RunStatus.SUCCEEDED, result.error
    assert result.output == {"n": 12}
    assert not r.exists(CRASH_BEFORE_DISPATCH_KEY.format(run_id=run_id)), "no crash happened"
    assert executions(r, run_id, "ticker") == 1 and executions(r, run_id, "tocker") == 1
    assert deliveries(p, run_id) == {"e1:ticker": ["handled", "duplicate"],
                                     "e2:tocker": ["handled"]}
    assert [(v.version, v.step) for v in p.run(run_id).history()] == [
        (0, "input"), (1, "e1:ticker"), (2, "e2:tocker")]


def test_adding_a_subscriber_changes_nothing_for_the_others(cluster: Cluster) -> None:
    p = cluster.pipeline()
    before = cluster.worker()
    first = p.start("research_report", QUESTION).wait(30)
    before.stop()
    cluster.worker(PIPELINE_AGENT_MODULES="tasks,tests.agents,tests.extra_subscriber")
    second = p.start("research_report", QUESTION).wait(30)

    assert first.status is second.status is RunStatus.SUCCEEDED
    assert first.output == second.output
    chain_before, chain_after = event_chain(p, first.run_id), event_chain(p, second.run_id)
    assert chain_after[2] == ("analysis.ready", "analysis", "research.completed",
                              ("report", "word_counter"))
    assert [c for i, c in enumerate(chain_after) if i != 2] == \
        [c for i, c in enumerate(chain_before) if i != 2]
    assert chain_before[2][3] == ("report",)
    after = deliveries(p, second.run_id)
    assert after.pop("e3:word_counter") == ["handled"]
    assert after == deliveries(p, first.run_id)

    def sealed(run_id: str) -> dict[str, Any]:
        out = {}
        for v in p.run(run_id).history()[1:]:
            payload = dict(v.payload)
            payload.pop("retrieved_at", None)  # research's clock, and audit's digest of it
            if v.agent == "audit" and payload["event_type"] == "research.completed":
                payload.pop("digest")
            out[v.step] = payload
        return out

    extra = sealed(second.run_id)
    assert extra.pop("e3:word_counter")["words"] > 0
    assert extra == sealed(first.run_id)


def test_low_confidence_research_is_refused_at_the_analysis_boundary_and_compensated(
    cluster: Cluster,
) -> None:
    r = cluster.redis
    cluster.worker()
    p = cluster.pipeline()
    run = p.start("research_report", OFF_TOPIC)
    result = run.wait(30)

    assert result.status is RunStatus.COMPENSATED
    assert result.error and result.error.startswith("analysis.failed (e3): ContractViolation")
    assert "confident_findings@1" in result.error and "confidence" in result.error
    views = {v.type: v for v in events(p.store, run.run_id)}
    refused = views["research.completed"].deliveries[0]
    assert (refused.agent, refused.state, refused.contract, refused.fields) == (
        "analysis", "failed", "confident_findings@1", ["confidence"])
    assert views["analysis.failed"].failure and views["analysis.failed"].cause == "e2"
    assert "report" not in {d.agent for v in views.values() for d in v.deliveries}

    why = invoke_cli(cluster.url, "explain", run.run_id, "analysis")
    assert why.exit_code == 0
    assert "contract confident_findings@1 refused field(s) confidence" in why.stdout
    assert "it published e3 analysis.failed and the run is compensated" in why.stdout
    report_why = explain(p.store, run.run_id, "report", research.report)
    assert report_why.summary.startswith("report never reacted: none of this run's events")
    # The research cache is cleared; the auditor's record of it is retracted.
    assert not r.exists(research.CACHE_KEY.format(run_id=run.run_id))
    trail = [json.loads(x) for x in r.lrange(research.AUDIT_KEY.format(run_id=run.run_id), 0,
                                             -1)]
    assert len([t for t in trail if "retracted" in t]) == len([t for t in trail
                                                               if "event_id" in t])


def test_a_failed_handler_publishes_its_failure_and_the_saga_undoes_newest_first(
    cluster: Cluster,
) -> None:
    """The report agent breaks its output contract (after publishing the report): it
    publishes report.failed, and every sealed step is undone, newest version first,
    the broken step before them."""
    r = cluster.redis
    cluster.worker(PIPELINE_CHAOS="report=bad_output:1")
    p = cluster.pipeline()
    run = p.start("research_report", QUESTION)
    result = run.wait(30)

    assert result.status is RunStatus.COMPENSATED, result.error
    log = p.store.log(run.run_id)
    failed = [e for e in log if e["event"] == "event.published" and e["failure"] == "1"]
    assert [(e["type"], e["cause"], e["publisher"]) for e in failed] == [
        ("report.failed", "e3", "report")]
    newest_first = [v.step for v in sorted(run.history()[1:], key=lambda v: -v.version)]
    done = [e["step"] for e in log if e["event"] == "compensation.done"]
    assert done == ["e3:report", *newest_first]
    assert done[-1] == "e1:research"
    # Each compensation ran after the one before it had ended.
    assert [json.loads(e["plan"]) for e in log if e["event"] == "compensation.planned"] == [
        [[s] for s in done]]
    assert r.hget(research.REPORTS_KEY, run.run_id) is None
    assert r.hget(research.DRAFTS_KEY, run.run_id) is None
    assert not r.exists(research.CACHE_KEY.format(run_id=run.run_id))


def test_a_flow_whose_publisher_knows_no_subscriber_stalls_and_explain_says_why(
    cluster: Cluster,
) -> None:
    """The client knows dangle_last and its flow; the workers do not (they run without
    tests.late_subscriber). dangle.next is published to nobody, nothing is outstanding and
    no terminal event came: the run is stalled, and compensated."""
    r = cluster.redis
    cluster.worker()
    p = cluster.pipeline()
    run = p.start("dangling", {"n": 1})
    result = run.wait(30)

    assert result.status is RunStatus.COMPENSATED
    assert result.error and result.error.startswith("choreography stalled")
    assert "unrouted: dangle.next (e2)" in result.error
    assert [e["step"] for e in p.store.log(run.run_id)
            if e["event"] == "compensation.done"] == ["e1:dangle_first"]
    assert not r.hgetall(SIDE_EFFECTS_KEY.format(run_id=run.run_id))
    why = explain(p.store, run.run_id, "dangle_last", late_subscriber.dangle_last)
    assert not why.reacted
    assert why.events[1]["why"] == (
        "matches 'dangle.next', but dangle_first did not route it here (routed to: nobody): "
        "the publishing worker did not have this subscription when it published")


def test_a_parked_delivery_takes_a_persons_output_or_is_handed_out_again(
    cluster: Cluster,
) -> None:
    r = cluster.redis
    cluster.worker()
    p = cluster.pipeline()
    p.breakers.force_open("guard_park")
    by_hand = p.start("guarding", {"n": 2})
    wait_for(lambda: by_hand.status() is RunStatus.WAITING_FOR_HUMAN, 20, "the run to park")
    assert deliveries(p, by_hand.run_id) == {"e1:guard_park": ["parked"]}

    result = p.resume(by_hand.run_id, {"n": 99}).wait(20)

    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 99}
    assert deliveries(p, by_hand.run_id) == {"e1:guard_park": ["handled"]}
    assert executions(r, by_hand.run_id, "guard_park") == 0

    again = p.start("guarding", {"n": 3})
    wait_for(lambda: again.status() is RunStatus.WAITING_FOR_HUMAN, 20, "the run to park")
    with pytest.raises(InputError, match="is not parked"):
        p.resume(again.run_id, step="e9:guard_park")
    p.breakers.reset("guard_park")
    result = p.resume(again.run_id).wait(20)
    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 30}
    assert executions(r, again.run_id, "guard_park") == 1
    assert deliveries(p, again.run_id) == {"e1:guard_park": ["handled"]}
