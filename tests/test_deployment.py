"""The deployment files: docker-compose.yml, Procfile, the Celery settings, Flower's auth.

Docker does not run here, so the compose file is checked by reading it: every
agent queue has a pool, Redis persists, Flower demands credentials.
"""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.embedded import free_port
from tests.conftest import ROOT, wait_for

COMPOSE = yaml.safe_load((Path(ROOT) / "docker-compose.yml").read_text())
PROCFILE = dict(
    line.split(": ", 1) for line in (Path(ROOT) / "Procfile").read_text().splitlines() if line
)


def served_queues(commands: list[str]) -> set[str]:
    queues: set[str] = set()
    for cmd in commands:
        for arg in shlex.split(cmd):
            if arg.startswith("--queues="):
                queues |= set(arg.removeprefix("--queues=").split(","))
    return queues


def agent_queues() -> set[str]:
    """The deployment's queues: one per agent in tasks/, and the pipeline's own."""
    import tasks  # noqa: F401
    from pipeline import agents

    return {a.queue for a in agents if a.execute.__module__.startswith("tasks.")} | {"pipeline"}


def test_compose_runs_a_pool_for_every_agent_queue() -> None:
    services = COMPOSE["services"]
    workers = [s["command"] for name, s in services.items() if name.startswith("worker-")]
    assert served_queues(workers) == agent_queues()
    for name, service in services.items():
        if name != "redis":
            env = service["environment"]
            assert env["PIPELINE_REDIS_URL"] == "redis://redis:6379/0"
            assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_redis_keeps_an_append_only_file() -> None:
    command = COMPOSE["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert COMPOSE["services"]["redis"]["volumes"]


def test_compose_flower_needs_credentials_and_listens_on_loopback_only() -> None:
    flower = COMPOSE["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])
    assert flower["command"] == "celery -A config flower"  # reads ./flowerconfig.py
    assert "COPY flowerconfig.py" in (Path(ROOT) / "Dockerfile").read_text()


def test_procfile_runs_redis_flower_and_a_pool_for_every_queue() -> None:
    assert served_queues([c for n, c in PROCFILE.items() if n.startswith("worker")]) \
        == agent_queues()
    assert "--appendonly yes" in PROCFILE["redis"]
    assert PROCFILE["flower"] == "celery -A config flower"


def test_the_celery_app_accepts_json_only_and_survives_lost_workers() -> None:
    import config

    conf = config.app.conf
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_deduplicate_successful_tasks
    assert conf.task_allow_error_cb_on_chord_header
    limits = [t.time_limit for name, t in config.app.tasks.items() if name.startswith("agent.")]
    assert limits and max(limits) < conf.broker_transport_options["visibility_timeout"]


def flower_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    return {**env, "PIPELINE_REDIS_URL": redis_url, **extra}


def test_plain_celery_flower_refuses_to_start_without_authentication(redis_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "config", "flower"],
        cwd=ROOT, env=flower_env(redis_url), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "without authentication" in done.stderr + done.stdout


def test_flower_answers_401_without_credentials_and_200_with_them(redis_url: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "flower"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=flower_env(redis_url, FLOWER_BASIC_AUTH="ops:correct-horse", FLOWER_PORT=str(port)),
    )
    url = f"http://127.0.0.1:{port}/api/workers"

    def status(auth: str | None) -> int:
        request = urllib.request.Request(url)
        if auth:
            request.add_header("Authorization",
                               "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    try:
        wait_for(lambda: status(None), timeout_s=30, message="flower to listen")
        assert status(None) == 401
        assert status("ops:wrong") == 401
        assert status("ops:correct-horse") == 200
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize("name", ["Dockerfile"])
def test_the_image_runs_as_a_non_root_user(name: str) -> None:
    text = (Path(ROOT) / name).read_text()
    assert "\nUSER " in text and "USER root" not in text
