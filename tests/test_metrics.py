"""The Prometheus exporter: real workers count in Redis, a separate exporter process
reads Redis when scraped, and the scrape says what happened to the runs.

Each test starts ``pipeline.observe.metrics.serve`` in a subprocess on a free port (as
``pipeline exporter`` does) and parses its ``/metrics`` with prometheus_client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline import Budget, Pipeline, RunStatus, counters
from pipeline.agent import Agent
from pipeline.breaker import BreakerRegistry
from pipeline.embedded import free_port
from pipeline.errors import ConfigurationError
from pipeline.hooks import hooks_of
from pipeline.keys import RUNS_INDEX
from pipeline.observe import metrics
from pipeline.state import StateStore
from pipeline.step import run_step
from tasks import SAMPLES
from tests.agents import COMP_FAIL_KEY
from tests.conftest import AGENT_MODULES, ROOT, Cluster, settings_for, socket_writes, wait_for

GOOD = json.loads((SAMPLES / "good.json").read_text())
CREDIT_AGENTS = ("credit_score", "income_verification", "risk_assessment", "fraud_detection",
                 "final_approval")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One scrape of ``/metrics``: ``s("pipeline_runs", workflow=..., status=...)``."""

    def __init__(self, text: str) -> None:
        self.families = list(text_string_to_metric_families(text))
        self.samples: Samples = {(s.name, frozenset(s.labels.items())): s.value
                                 for f in self.families for s in f.samples}

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def latency_count(self, agent: str) -> float:
        return self("pipeline_step_latency_seconds_count", agent=agent)


def scrape_url(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return Scrape(response.read().decode("utf-8"))


@pytest.fixture
def exporter(cluster: Cluster) -> Iterator[Callable[[], Scrape]]:
    """``pipeline.observe.metrics.serve`` in a process of its own, on the cluster's database."""
    port = free_port()
    env = {**os.environ, "PIPELINE_REDIS_URL": cluster.url, "CELERY_BROKER_URL": cluster.url,
           "CELERY_RESULT_BACKEND": cluster.url, "PIPELINE_AGENT_MODULES": AGENT_MODULES}
    code = ("from pipeline.observe import metrics; from pipeline.settings import Settings; "
            f"metrics.serve(Settings.from_env(), '127.0.0.1', {port})")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}/metrics"

    def answers() -> bool:
        assert process.poll() is None, "the exporter exited at start"
        try:
            scrape_url(url)
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    wait_for(answers, 30, "the exporter to answer")
    yield lambda: scrape_url(url)
    process.terminate()
    process.wait(10)


def wait_for_scrape(scrape: Callable[[], Scrape], check: Callable[[Scrape], bool],
                    message: str) -> Scrape:
    """Scrape until ``check`` holds: a counter may land just after the run's end is seen."""
    found: list[Scrape] = []

    def holds() -> bool:
        found[:] = [scrape()]
        return check(found[0])

    wait_for(holds, 30, message)
    return found[0]


def test_each_credit_run_is_one_latency_observation_per_agent_and_a_succeeded_run(
    cluster: Cluster, exporter: Callable[[], Scrape]
) -> None:
    cluster.worker(concurrency=3)
    p = cluster.pipeline()
    n = 3

    results = [run.wait(30) for run in [p.start("credit_decision", GOOD) for _ in range(n)]]

    assert [r.status for r in results] == [RunStatus.SUCCEEDED] * n
    s = wait_for_scrape(exporter, lambda s: all(s.latency_count(a) == n for a in CREDIT_AGENTS),
                        f"{n} latency observations per credit agent")
    for a in CREDIT_AGENTS:
        assert s("pipeline_step_latency_seconds_bucket", agent=a, le="+Inf") == n
        buckets = [v for (name, labels), v in s.samples.items()
                   if name == "pipeline_step_latency_seconds_bucket" and ("agent", a) in labels]
        assert buckets == sorted(buckets)  # cumulative
        assert 0 < s("pipeline_step_latency_seconds_sum", agent=a) < 30 * n
        assert s("pipeline_breaker_state", agent=a) == 0
        assert s("pipeline_breaker_calls_total", agent=a, outcome="success") == n
        assert s("pipeline_step_failures_total", agent=a) == 0
    assert s("pipeline_runs", workflow="credit_decision", status="succeeded") == n
    assert s("pipeline_runs", workflow="credit_decision", status="running") == 0
    assert s("pipeline_runs", workflow="counting", status="succeeded") == 0  # every flow listed
    assert s("pipeline_dead_letters") == 0
    assert s("pipeline_redis_up") == 1
    for family in s.families:
        assert family.name.startswith("pipeline_") and family.documentation, family.name


def test_a_failed_step_and_the_compensations_it_caused_are_counted_per_agent(
    cluster: Cluster, exporter: Callable[[], Scrape]
) -> None:
    cluster.worker(concurrency=3, PIPELINE_CHAOS="final_approval=error:1")
    p = cluster.pipeline()

    result = p.start("credit_decision", GOOD).wait(30)

    assert result.status is RunStatus.COMPENSATED
    undone = CREDIT_AGENTS[:-1]  # everything before final_approval sealed
    s = wait_for_scrape(
        exporter, lambda s: all(s("pipeline_compensations_total", agent=a, outcome="done") == 1
                                for a in undone), "a compensation per sealed agent")
    assert s("pipeline_step_failures_total", agent="final_approval") == 1
    assert all(s("pipeline_step_failures_total", agent=a) == 0 for a in undone)
    assert s("pipeline_breaker_calls_total", agent="final_approval", outcome="failure") == 1
    assert s.latency_count("final_approval") == 0  # it never sealed
    assert all(s.latency_count(a) == 1 for a in undone)
    assert all(s("pipeline_compensations_total", agent=a, outcome="dead") == 0
               for a in CREDIT_AGENTS)
    assert s("pipeline_runs", workflow="credit_decision", status="compensated") == 1
    assert s("pipeline_dead_letters") == 0


def test_a_compensation_that_keeps_failing_is_counted_dead_and_its_dead_letter_too(
    cluster: Cluster, exporter: Callable[[], Scrape]
) -> None:
    cluster.worker(PIPELINE_CHAOS="tripwire=error:1")
    p = cluster.pipeline()
    key = str(uuid.uuid4())
    cluster.redis.set(COMP_FAIL_KEY.format(run_id=Pipeline.run_id_for("saga_fickle", key)),
                      1000, ex=300)

    result = p.start("saga_fickle", {"n": 1}, idempotency_key=key).wait(30)

    assert result.status is RunStatus.COMPENSATION_FAILED
    s = wait_for_scrape(exporter, lambda s: s("pipeline_dead_letters") == 1, "one dead letter")
    assert s("pipeline_compensations_total", agent="fickle", outcome="dead") == 1
    assert s("pipeline_compensations_total", agent="booked", outcome="done") == 1
    assert s("pipeline_step_failures_total", agent="tripwire") == 1
    assert s("pipeline_runs", workflow="saga_fickle", status="compensation_failed") == 1


def test_a_breaker_forced_open_reads_2_until_it_is_reset(
    cluster: Cluster, exporter: Callable[[], Scrape]
) -> None:
    breakers = BreakerRegistry(cluster.redis)

    breakers.force_open("fraud_detection")
    s = exporter()

    assert s("pipeline_breaker_state", agent="fraud_detection") == 2
    assert s("pipeline_breaker_state", agent="risk_assessment") == 0
    breakers.reset("fraud_detection")
    assert exporter()("pipeline_breaker_state", agent="fraud_detection") == 0


def test_a_run_that_expires_leaves_the_gauge_and_the_index(
    cluster: Cluster, exporter: Callable[[], Scrape]
) -> None:
    cluster.worker(PIPELINE_RETENTION_S="2")
    p = cluster.pipeline()
    r = cluster.redis
    now_ms = time.time() * 1000
    r.zadd(RUNS_INDEX, {"expired-long-ago": now_ms - 3_600_000, "being-created": now_ms})

    run = p.start("counting", {"n": 1})
    assert run.wait(30).status is RunStatus.SUCCEEDED
    s = exporter()

    assert s("pipeline_runs", workflow="counting", status="succeeded") == 1
    assert r.zscore(RUNS_INDEX, "expired-long-ago") is None  # missing and old: dropped
    assert r.zscore(RUNS_INDEX, "being-created") is not None  # its keys may still come
    wait_for_scrape(exporter, lambda s: s("pipeline_runs", workflow="counting",
                                          status="succeeded") == 0, "the expired run to go")
    assert r.zscore(RUNS_INDEX, run.run_id) is None


def test_without_redis_the_exporter_answers_that_redis_is_down(cluster: Cluster) -> None:
    server = metrics.start(settings_for(f"redis://127.0.0.1:{free_port()}/0"),
                           port=free_port())
    try:
        s = scrape_url(f"http://127.0.0.1:{server.server_address[1]}/metrics")
    finally:
        server.shutdown()
        server.server_close()

    assert server.server_address[0] == metrics.DEFAULT_ADDRESS == "127.0.0.1"
    assert s.samples == {("pipeline_redis_up", frozenset()): 0}


def test_a_port_in_use_is_a_configuration_error_naming_it(cluster: Cluster) -> None:
    server = metrics.start(settings_for(cluster.url), port=free_port())
    port = server.server_address[1]
    try:
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{port}"):
            metrics.start(settings_for(cluster.url), port=port)
    finally:
        server.shutdown()
        server.server_close()


def test_without_the_metrics_extra_the_exporter_says_what_to_install(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails

    with pytest.raises(ConfigurationError, match=r"pip install celery-agent-pipeline\[metrics\]"):
        metrics.start(settings_for(cluster.url), port=free_port())


def test_a_step_still_costs_two_round_trips_with_its_latency_counted(cluster: Cluster) -> None:
    """The step runs in this process so its round trips can be counted: one write to the
    socket per round trip (a pipelined batch is one write)."""
    app = SimpleNamespace()
    counters.install_hooks(app)
    counters.install_hooks(app)
    assert [type(h) for h in hooks_of(app)] == [counters.MetricsHooks]
    store = StateStore.from_settings(settings_for(cluster.url))
    metered = Agent(name="metered", execute=lambda payload, ctx: {"n": payload["n"] + 1},
                    input="count@1", output="count@1")  # its breaker rides the same trips
    task = SimpleNamespace(app=app,
                           request=SimpleNamespace(hostname="test", id="task", retries=0))
    for run_id in ("warm-up", "counted"):
        store.create_run(run_id, workflow="metered", payload={"n": 1}, contract="count@1")
    run_step(task, metered, store, 0, run_id="warm-up", step="0:metered", final=True)
    with socket_writes() as writes:
        version = run_step(task, metered, store, 0, run_id="counted", step="0:metered",
                           final=True)

    assert version == 1 and store.run_info("counted").status is RunStatus.SUCCEEDED
    assert len(writes) == 2  # open, seal
    latency = cluster.redis.hgetall(counters.LATENCY)
    assert latency["metered:count"] == "2"
    assert sum(int(v) for k, v in latency.items()
               if k.startswith("metered:") and k.split(":")[1] not in ("count", "sum_us")) == 2


def test_the_exporter_shows_the_limits_the_agents_draw_on_and_the_budgets_that_stopped_runs(
        cluster: Cluster, exporter: Callable[[], Scrape]) -> None:
    """Runs that a limit of one call at a time throttled, and a run its budget stopped: the
    limit's throttled calls and time, nothing left in flight, its full rate; one step that
    did not run for its budget."""
    cluster.worker(concurrency=3)
    p = cluster.pipeline()
    runs = [p.start("one_at_a_time", {"n": n}) for n in range(3)]
    stopped = p.start("budgeted", {"n": 1}, budget=Budget(tokens=700))
    for run in [*runs, stopped]:
        assert run.wait(60).status.is_final
    assert stopped.info().status is RunStatus.COMPENSATED
    throttled = sum(1 for run in runs for e in p.store.log(run.run_id)
                    if e["event"] == "step.throttled")
    s = wait_for_scrape(
        exporter, lambda s: s("pipeline_budget_exceeded_total", agent="publish") == 1,
        "the step the budget stopped")
    limit = "test:one-at-a-time"
    assert s("pipeline_limit_throttled_total", limit=limit) == throttled > 0
    assert s("pipeline_limit_throttled_seconds_total", limit=limit) > 0
    assert s("pipeline_limit_in_flight", limit=limit) == 0
    assert s("pipeline_limit_rate_factor", limit=limit) == 1
    assert s("pipeline_budget_exceeded_total", agent="draft") == 0
    assert s("pipeline_step_failures_total", agent="publish") == 0  # not the agent's failure
