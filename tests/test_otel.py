"""OpenTelemetry: one span per step attempt, every step of a run in the client's trace,
each a child of the step that published it, on real Redis and real worker processes.

The client's spans go to the SDK's in-memory exporter; the workers' (tests.otel_agents)
come back as JSON on a Redis list in the test database."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline import Pipeline, RunStatus
from pipeline.observe import otel
from pipeline.observe.ledger import events
from tasks import SAMPLES
from tests.conftest import ROOT, Cluster, settings_for, wait_for
from tests.otel_agents import SPANS_KEY, record

Span = dict[str, Any]

TRACED_WORKER = {"PIPELINE_OTEL": "1",
                 "PIPELINE_AGENT_MODULES": "tasks,tests.agents,tests.otel_agents"}
APPLICATION = next(a for a in json.loads((SAMPLES / "batch.json").read_text())
                   if a["application_id"] == "app-1001")
QUESTION = json.loads((SAMPLES / "research.json").read_text())
OFF_TOPIC = json.loads((SAMPLES / "research_off_topic.json").read_text())
CREDIT_AGENTS = {"credit_score", "income_verification", "risk_assessment", "fraud_detection",
                 "final_approval"}
SETTLE_S = 0.3
"""How long to keep watching for spans beyond those expected (none may come)."""


@pytest.fixture(scope="module")
def module_exporter() -> InMemorySpanExporter:
    """The SDK's in-memory exporter on this process's TracerProvider (set here if none is)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def exporter(module_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """The spans this (the client's) process finishes during the test."""
    module_exporter.clear()
    return module_exporter


def client_spans(exporter: InMemorySpanExporter) -> list[Span]:
    return [record(s) for s in exporter.get_finished_spans()]


def worker_spans(cluster: Cluster, run_id: str | None = None) -> list[Span]:
    spans = [json.loads(raw) for raw in cluster.redis.lrange(SPANS_KEY, 0, -1)]
    return [s for s in spans if run_id is None or s["attributes"].get("pipeline.run_id") == run_id]


def settled_spans(cluster: Cluster, run_id: str, count: int) -> list[Span]:
    """The run's worker spans once ``count`` have ended, and no more came after a moment."""
    wait_for(lambda: len(worker_spans(cluster, run_id)) >= count, 20,
             f"{count} worker spans of run {run_id}")
    time.sleep(SETTLE_S)
    return worker_spans(cluster, run_id)


def root_of(exporter: InMemorySpanExporter, workflow: str, run_id: str) -> Span:
    [root] = [s for s in client_spans(exporter) if s["name"] == f"pipeline.start {workflow}"]
    assert root["attributes"] == {"pipeline.run_id": run_id, "pipeline.workflow": workflow}
    assert root["kind"] == "PRODUCER"
    return root


def by_step(spans: list[Span]) -> dict[str, Span]:
    steps = [s["attributes"]["pipeline.step"] for s in spans if s["name"].startswith("agent.")]
    assert len(steps) == len(set(steps)), f"a step has more than one span: {sorted(steps)}"
    return {s["attributes"]["pipeline.step"]: s for s in spans if s["name"].startswith("agent.")}


def assert_matches_history(p: Pipeline, run_id: str, steps: dict[str, Span]) -> None:
    """Each step span names its run, agent, input versions and the version it sealed."""
    history = {v.step: v for v in p.store.history(run_id)[1:]}
    assert set(steps) == set(history)
    for key, span in steps.items():
        v, attrs = history[key], span["attributes"]
        assert span["name"] == f"agent.{v.agent}" and span["kind"] == "CONSUMER"
        assert attrs["pipeline.run_id"] == run_id and attrs["pipeline.agent"] == v.agent
        assert attrs["pipeline.input_versions"] == list(v.parents)
        assert attrs["pipeline.output_version"] == v.version
        assert attrs["celery.state"] == "SUCCESS" and span["status"] == "UNSET"
        assert attrs["celery.retries"] == 0 and attrs["celery.task_id"]


def test_every_step_of_a_credit_decision_is_one_span_in_the_clients_trace(
    cluster: Cluster, exporter: InMemorySpanExporter,
) -> None:
    cluster.worker(concurrency=3, **TRACED_WORKER)
    p = cluster.pipeline(otel=True)
    run = p.start("credit_decision", APPLICATION)
    assert run.wait(30).status is RunStatus.SUCCEEDED

    root = root_of(exporter, "credit_decision", run.run_id)
    assert root["parent_id"] is None
    spans = settled_spans(cluster, run.run_id, len(CREDIT_AGENTS))
    steps = by_step(spans)
    assert len(spans) == len(steps) == 5  # the chord joins in Redis: no extra task
    assert {s["trace_id"] for s in spans} == {root["trace_id"]}
    assert_matches_history(p, run.run_id, steps)

    agent = {s["attributes"]["pipeline.agent"]: s for s in spans}
    assert set(agent) == CREDIT_AGENTS
    assert agent["credit_score"]["parent_id"] == root["span_id"]
    parallel = {"income_verification", "risk_assessment", "fraud_detection"}
    for name in parallel:  # published by credit_score's worker, as the chain went on
        assert agent[name]["parent_id"] == agent["credit_score"]["span_id"]
    # The chord's body is published by whichever member finished last.
    assert agent["final_approval"]["parent_id"] in {agent[n]["span_id"] for n in parallel}
    assert len(agent["final_approval"]["attributes"]["pipeline.input_versions"]) == 3


def test_a_choreographed_run_is_one_trace_each_delivery_a_child_of_its_publisher(
    cluster: Cluster, exporter: InMemorySpanExporter,
) -> None:
    cluster.worker(**TRACED_WORKER)
    p = cluster.pipeline(otel=True)
    run = p.start("research_report", QUESTION)
    assert run.wait(30).status is RunStatus.SUCCEEDED

    root = root_of(exporter, "research_report", run.run_id)
    spans = settled_spans(cluster, run.run_id, 5)
    steps = by_step(spans)
    assert sorted(steps) == ["e1:research", "e2:analysis", "e2:audit", "e3:report", "e4:audit"]
    assert {s["trace_id"] for s in spans} == {root["trace_id"]}
    assert_matches_history(p, run.run_id, steps)

    for view in events(p.store, run.run_id):
        publisher = (root if view.publisher == "client"
                     else steps[f"{view.cause}:{view.publisher}"])
        for name in view.subscribers:
            span = steps[f"{view.event_id}:{name}"]
            assert span["parent_id"] == publisher["span_id"], (view.event_id, name)
            assert span["attributes"]["pipeline.event"] == view.event_id
            assert span["attributes"]["pipeline.event_type"] == view.type


def test_a_refused_handoff_is_an_error_span_and_the_saga_goes_on_in_the_same_trace(
    cluster: Cluster, exporter: InMemorySpanExporter,
) -> None:
    cluster.worker(**TRACED_WORKER)
    p = cluster.pipeline(otel=True)
    run = p.start("research_report", OFF_TOPIC)
    assert run.wait(30).status is RunStatus.COMPENSATED

    root = root_of(exporter, "research_report", run.run_id)
    wait_for(lambda: any(s["attributes"].get("pipeline.step") == "e1:research"
                         for s in worker_spans(cluster, run.run_id)
                         if s["name"] == "compensate.research"), 20, "research's compensation")
    time.sleep(SETTLE_S)
    spans = worker_spans(cluster, run.run_id)
    assert {s["trace_id"] for s in spans} == {root["trace_id"]}

    steps = by_step(spans)
    analysis = steps["e2:analysis"]
    assert analysis["status"] == "ERROR" and analysis["attributes"]["celery.state"] == "FAILURE"
    assert analysis["status_description"].startswith("ContractViolation: ")
    [exception] = [e for e in analysis["events"] if e["name"] == "exception"]
    assert exception["exception.type"].endswith("ContractViolation")
    assert "confident_findings@1" in exception["exception.message"]
    assert "pipeline.output_version" not in analysis["attributes"]
    assert steps["e1:research"]["status"] == "UNSET"

    # The failed step began the saga: its planner, then each compensation, descend from it.
    [planner] = [s for s in spans if s["name"] == "pipeline.compensate_run"]
    assert planner["parent_id"] == analysis["span_id"]
    undo = [s for s in spans if s["name"].startswith("compensate.")]
    assert "e1:research" in {s["attributes"]["pipeline.step"] for s in undo}
    assert all(s["attributes"]["pipeline.agent"] == s["name"].removeprefix("compensate.")
               for s in undo)
    saga_ids = {planner["span_id"]} | {s["span_id"] for s in undo}
    assert all(s["parent_id"] in saga_ids for s in undo)


def test_a_retried_step_has_one_span_per_attempt_under_the_callers_span(
    cluster: Cluster, exporter: InMemorySpanExporter,
) -> None:
    """``flaky`` fails twice with a transient error, then succeeds; the caller's span is
    current when it starts the run, so the run's span is its child."""
    cluster.worker(**TRACED_WORKER)
    p = cluster.pipeline(otel=True)
    with trace.get_tracer("tests").start_as_current_span("checkout") as checkout:
        run = p.start("flaking", {"n": 1})
    assert run.wait(30).status is RunStatus.SUCCEEDED

    root = root_of(exporter, "flaking", run.run_id)
    assert root["parent_id"] == format(checkout.get_span_context().span_id, "016x")
    attempts = sorted(settled_spans(cluster, run.run_id, 3),
                      key=lambda s: s["attributes"]["celery.retries"])
    assert [s["attributes"]["celery.retries"] for s in attempts] == [0, 1, 2]
    assert {s["trace_id"] for s in attempts} == {root["trace_id"]}
    # Attempts are siblings: each retry is published with its attempt's parent.
    assert {s["parent_id"] for s in attempts} == {root["span_id"]}
    assert len({s["attributes"]["celery.task_id"] for s in attempts}) == 1
    for failed in attempts[:2]:
        assert failed["status"] == "ERROR" and failed["attributes"]["celery.state"] == "RETRY"
        assert failed["status_description"].startswith("retried: ")
        assert [e["exception.type"] for e in failed["events"]] == [
            "pipeline.errors.TransientAgentError"]
    last = attempts[2]
    assert last["status"] == "UNSET" and last["attributes"]["celery.state"] == "SUCCESS"
    assert last["attributes"]["pipeline.output_version"] == run.info().head == 1


def test_without_pipeline_otel_nothing_is_traced(
    cluster: Cluster, exporter: InMemorySpanExporter,
) -> None:
    """A worker with a TracerProvider but without PIPELINE_OTEL records no span, and
    a client without it adds no span to the caller's trace."""
    cluster.worker(PIPELINE_AGENT_MODULES=TRACED_WORKER["PIPELINE_AGENT_MODULES"])
    p = cluster.pipeline()
    with trace.get_tracer("tests").start_as_current_span("checkout"):
        run = p.start("counting", {"n": 1})
    assert run.wait(30).status is RunStatus.SUCCEEDED
    time.sleep(SETTLE_S)
    assert worker_spans(cluster) == []
    assert [s["name"] for s in client_spans(exporter)] == ["checkout"]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env={
        "PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60)


def test_without_pipeline_otel_no_handler_is_connected_and_pipeline_otel_not_imported() -> None:
    done = run_python("""
        import sys
        from celery import signals
        from pipeline.app import create_app
        from pipeline.settings import Settings

        create_app(Settings.from_env())
        connected = [key for s in (signals.before_task_publish, signals.task_prerun,
                                   signals.task_postrun, signals.task_failure,
                                   signals.task_retry)
                     for key, _ in s.receivers if "pipeline.observe.otel" in str(key)]
        print(connected, "pipeline.observe.otel" in sys.modules)
    """, PIPELINE_AGENT_MODULES="tasks")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] False"


def test_pipeline_otel_without_the_extra_says_what_to_install() -> None:
    done = run_python("""
        import sys
        sys.modules["opentelemetry"] = None  # as if the `otel` extra were not installed
        from pipeline.app import create_app
        from pipeline.errors import ConfigurationError
        from pipeline.settings import Settings

        try:
            create_app(Settings.from_env())
        except ConfigurationError as e:
            print(e)
    """, PIPELINE_AGENT_MODULES="tasks", PIPELINE_OTEL="1")
    assert done.returncode == 0, done.stderr
    assert "pip install celery-agent-pipeline[otel]" in done.stdout
    assert "PIPELINE_OTEL" in done.stdout


class _BrokenTask:
    """A task whose request cannot be read: the tracing handlers must cope."""

    name = "agent.increment"

    def __init__(self, app: Any) -> None:
        self.app = app

    @property
    def request(self) -> Any:
        raise RuntimeError("no request")


def test_a_tracing_error_is_logged_and_never_raised(
    redis_url: str, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture,
) -> None:
    from pipeline.app import create_app

    app = create_app(settings_for(redis_url, otel=True))
    caplog.set_level(logging.ERROR, logger="pipeline.observe.otel")
    task = _BrokenTask(app)
    otel._start(sender=task, task_id="t-1", args=(0,), kwargs={"run_id": "r", "step": "0:x"})
    otel._failed(sender=task, task_id="t-1", exception=RuntimeError("step failed"))
    otel._end(sender=task, task_id="t-1", retval=1, state="SUCCESS")
    otel._inject(sender="agent.increment", headers=["not", "a", "mapping"])
    assert "could not start the span of task t-1" in caplog.text
    assert "could not put the trace context in a agent.increment message" in caplog.text
    assert not trace.get_current_span().get_span_context().is_valid
    assert client_spans(exporter) == []
