"""The credit workflow with RabbitMQ as Celery's broker while Redis keeps state, breakers
and results. Real workers, in a virtual host of the test's own, deleted afterwards.

RabbitMQ: PIPELINE_TEST_AMQP_URL, else amqp://guest:guest@127.0.0.1:5672//; skipped when
it does not answer or when ``rabbitmqctl`` cannot make the virtual host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
from kombu import Connection

from pipeline import Pipeline, RunStatus
from pipeline.app import create_app
from pipeline.settings import Settings
from tasks.credit import ledger
from tests.conftest import AGENT_MODULES, Cluster

SAMPLES = Path(__file__).parent.parent / "tasks" / "samples"
BATCH = json.loads((SAMPLES / "batch.json").read_text())
AMQP_URL = os.environ.get("PIPELINE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
CREDIT_QUEUES = {"agents.credit_score", "agents.income_verification", "agents.risk_assessment",
                 "agents.fraud_detection", "agents.final_approval", "pipeline"}


def answers(url: str) -> bool:
    try:
        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:  # noqa: BLE001 - anything means "not here"
        return False


def rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)


def in_vhost(url: str, vhost: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), "", ""))


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    """A fresh virtual host on the RabbitMQ at AMQP_URL, deleted with all it holds."""
    if not answers(AMQP_URL):
        pytest.skip(f"no RabbitMQ answers at {AMQP_URL} (PIPELINE_TEST_AMQP_URL)")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed: cannot make a private virtual host")
    vhost = f"pipeline-test-{uuid.uuid4().hex[:12]}"
    user = urlsplit(AMQP_URL).username or "guest"
    made = rabbitmqctl("add_vhost", vhost)
    if made.returncode != 0:
        pytest.skip(f"rabbitmqctl cannot add a virtual host: {made.stderr.strip()[:200]}")
    try:
        granted = rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        assert granted.returncode == 0, granted.stderr
        yield in_vhost(AMQP_URL, vhost)
    finally:
        rabbitmqctl("delete_vhost", vhost)


def queues_in(url: str) -> dict[str, int]:
    """Queue name -> messages ready, in the virtual host ``url`` names."""
    vhost = urlsplit(url).path.lstrip("/")
    listed = rabbitmqctl("list_queues", "-q", "-p", vhost, "name", "messages_ready")
    rows = [line.split("\t") for line in listed.stdout.splitlines() if "\t" in line]
    return {name: int(ready) for name, ready in rows if name != "name"}


@pytest.fixture
def on_rabbitmq(amqp_url: str, cluster: Cluster) -> Iterator[Pipeline]:
    """A client whose broker is RabbitMQ; state, breakers and results on the test Redis."""
    settings = Settings(redis_url=cluster.url, broker_url=amqp_url, result_backend=cluster.url,
                        agent_modules=tuple(AGENT_MODULES.split(",")))
    app = create_app(settings)
    yield Pipeline(settings=settings, app=app)
    app.close()


def test_settings_take_an_amqp_broker_and_keep_redis_only_options_off_it() -> None:
    settings = Settings.from_env({"PIPELINE_REDIS_URL": "redis://127.0.0.1:6379/4",
                                  "CELERY_BROKER_URL": "amqp://guest:secret@127.0.0.1:5672//"})
    assert settings.result_backend == "redis://127.0.0.1:6379/4" and not settings.broker_is_redis
    options = create_app(settings).conf.broker_transport_options
    assert options == {"confirm_publish": True}  # no visibility timeout, no restore sweep
    with pytest.raises(Exception, match="not a plain Redis URL") as info:
        Settings.from_env({"CELERY_BROKER_URL": "amqp://h//", "CELERY_RESULT_BACKEND": "rpc://"})
    assert "secret" not in str(info.value)
    with pytest.raises(Exception, match="not a Redis or RabbitMQ URL; expected redis://"):
        Settings.from_env({"CELERY_BROKER_URL": "sqs://"})


def test_a_batch_of_credit_runs_succeeds_with_rabbitmq_as_the_broker(
    amqp_url: str, cluster: Cluster, on_rabbitmq: Pipeline,
) -> None:
    cluster.worker(concurrency=3, CELERY_BROKER_URL=amqp_url)
    p = on_rabbitmq
    runs = [p.start("credit_decision", a) for a in BATCH]
    results = [run.wait(60) for run in runs]
    assert [r.status for r in results] == [RunStatus.SUCCEEDED] * len(BATCH), \
        [r.error for r in results]
    decisions = {a["application_id"]: r.output["decision"] for a, r in zip(BATCH, results,
                                                                              strict=True)}
    assert (decisions["app-1001"], decisions["app-1002"], decisions["app-1005"]) == (
        "approved", "declined", "referred")
    assert all([v.version for v in run.history()] == list(range(6)) for run in runs)
    # The messages went through RabbitMQ, and none is left behind; Redis has no queue.
    assert CREDIT_QUEUES <= set(queues_in(amqp_url))
    assert all(queues_in(amqp_url)[q] == 0 for q in CREDIT_QUEUES)
    assert not cluster.redis.keys("_kombu*") and not cluster.redis.exists(*CREDIT_QUEUES)


def test_a_failed_run_is_compensated_with_rabbitmq_as_the_broker(
    amqp_url: str, cluster: Cluster, on_rabbitmq: Pipeline,
) -> None:
    cluster.worker(concurrency=3, CELERY_BROKER_URL=amqp_url,
                   PIPELINE_CHAOS="final_approval=error:1")
    run = on_rabbitmq.start("credit_decision", BATCH[0])
    result = run.wait(60)
    assert result.status is RunStatus.COMPENSATED, result.error
    assert (result.error or "").startswith("ChaosError")
    assert ledger(cluster.redis, run.run_id) == {}
    undone = [e["step"] for e in on_rabbitmq.store.log(run.run_id)
              if e["event"] == "compensation.done"]
    assert undone[-1] == "0:credit_score" and len(undone) == 4
