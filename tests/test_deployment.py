"""The deployment files: docker-compose.yml, Procfile, the Celery settings, Flower's auth.

Docker does not run here, so the compose file is checked without it: against the Compose
specification's JSON schema (vendored in tests/compose-spec/, so this runs on any machine;
``docker compose config`` or ``docker-compose config`` checks it too where one is installed),
and by reading it: every agent queue has a pool, every command and option it names exists,
Redis persists, Flower demands credentials. The Procfile's pools run for real under honcho.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

from pipeline import RunStatus
from pipeline.embedded import free_port
from tests.conftest import ROOT, Cluster, http_get, wait_for

COMPOSE = yaml.safe_load((Path(ROOT) / "docker-compose.yml").read_text())
PROCFILE = dict(
    line.split(": ", 1) for line in (Path(ROOT) / "Procfile").read_text().splitlines()
    if line and not line.startswith("#")
)
SAMPLES = Path(ROOT) / "tasks" / "samples"
BIN = Path(sys.executable).parent


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
    assert all(s["deploy"]["replicas"] >= 2 for n, s in services.items()
               if n.startswith("worker-"))
    assert "agents.audit" in served_queues([services["worker-research"]["command"]])
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
    assert PROCFILE["exporter"].startswith("pipeline exporter ")


# -- every command, option and queue the files name exists -------------------------------

@functools.cache
def celery_options(subcommand: str) -> set[str]:
    """The options ``celery -A config <subcommand> --help`` lists, run for real (Flower's
    plugin included)."""
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "config", subcommand, "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "FLOWER_BASIC_AUTH": "x:y", "PIPELINE_AGENT_MODULES": "tasks"},
    )
    assert done.returncode == 0, f"celery has no subcommand {subcommand}: {done.stderr[-500:]}"
    return set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", done.stdout))


def pipeline_options(subcommand: str) -> set[str]:
    from pipeline.cli import main

    command = main.get_command(click.Context(main), subcommand)
    assert command is not None, f"`pipeline {subcommand}` is not a command of the pipeline CLI"
    return {opt for param in command.params for opt in param.opts}


def unknown_parts(command: str) -> list[str]:
    """What in ``command`` names no existing program, subcommand, option or queue."""
    argv = shlex.split(command)
    options = [a.split("=", 1)[0] for a in argv if a.startswith("-")]
    if argv[0] == "redis-server":
        return []  # its options are Redis settings, checked by Redis at start
    if argv[0] == "pipeline":
        known = pipeline_options(argv[1]) | {"--help"}
        return [o for o in options if o not in known]
    if argv[:3] != ["celery", "-A", "config"]:
        return [argv[0]]
    known = celery_options(argv[3])
    wrong = [o for o in options[1:] if o not in known]  # -A is celery's own
    queues = served_queues([command]) - agent_queues()
    return wrong + sorted(queues)


def compose_commands() -> dict[str, str]:
    out = {}
    for name, service in COMPOSE["services"].items():
        command = service.get("command")
        out[name] = command if isinstance(command, str) else shlex.join(command)
    return out


def test_compose_names_only_commands_options_and_queues_that_exist() -> None:
    commands = compose_commands()
    assert {n: unknown_parts(c) for n, c in commands.items()} == {n: [] for n in commands}
    assert commands["exporter"] == "pipeline exporter --address 0.0.0.0 --port 9808"
    assert COMPOSE["services"]["exporter"]["ports"] == ["127.0.0.1:9808:9808"]


def test_procfile_names_only_commands_options_and_queues_that_exist() -> None:
    assert {n: unknown_parts(c) for n, c in PROCFILE.items()} == {n: [] for n in PROCFILE}


# -- the file against the Compose specification ------------------------------------------

# The specification's JSON schema, unmodified from Debian's docker-compose 1.29.2 (Apache-2.0;
# tests/compose-spec/README.md says more). docker-compose 1.29 validates with it as draft 4,
# with format checks of its own; the two below are the formats this file uses.
COMPOSE_SCHEMA = Path(__file__).parent / "compose-spec" / "compose_spec.json"
FORMATS = jsonschema.FormatChecker(())
DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|ms|s|m|h))+")  # Go's time.ParseDuration
PORTS = re.compile(r"((\d{1,3}(\.\d{1,3}){3}|\[[\da-fA-F:]+\]):)?"   # [host ip:]
                   r"(\d+(-\d+)?:)?\d+(-\d+)?(/(tcp|udp|sctp))?")   # [host port:]port[/proto]


@FORMATS.checks("duration")
def _duration(value: object) -> bool:
    return not isinstance(value, str) or DURATION.fullmatch(value) is not None


@FORMATS.checks("ports")
def _ports(value: object) -> bool:
    return not isinstance(value, str) or PORTS.fullmatch(value) is not None


def schema_errors(document: object) -> list[str]:
    """What the Compose specification's schema refuses in ``document``, one line each."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft4Validator.check_schema(schema)
    errors = jsonschema.Draft4Validator(schema, format_checker=FORMATS).iter_errors(document)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
                  for e in errors)


def compose_tool() -> list[str] | None:
    """A Compose implementation that validates a file without a Docker engine, if any."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return ["docker", "compose"]
    return None


def compose_config(tool: list[str], path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``<tool> -f <path> config``: the file resolved and validated, with only ``env`` for
    Flower's credentials."""
    return subprocess.run(
        [*tool, "-f", str(path), "config"], cwd=path.parent, capture_output=True, text=True,
        timeout=60, env={**{k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"},
                         **env},
    )


def test_compose_file_follows_the_compose_specification() -> None:
    assert schema_errors(COMPOSE) == []
    tool = compose_tool()
    if tool is None:
        return  # the schema is the check here; a machine with Compose also runs the one below
    path = Path(ROOT) / "docker-compose.yml"
    done = compose_config(tool, path, FLOWER_BASIC_AUTH="ops:secret")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(resolved["services"]) == set(COMPOSE["services"])
    assert resolved["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "ops:secret"
    refused = compose_config(tool, path)  # no credentials: Compose will not start Flower
    assert refused.returncode != 0
    assert "set FLOWER_BASIC_AUTH=user:password" in refused.stderr


@pytest.mark.parametrize(("where", "value", "named", "by_compose"), [
    pytest.param(("services", "flower", "replica"), 1, "'replica'", True,
                 id="unknown-service-key"),
    pytest.param(("servics",), {}, "'servics'", True, id="unknown-top-level-key"),
    pytest.param(("services", "worker-approval", "deploy", "replicas"), "two", "replicas", True,
                 id="replicas-not-an-integer"),
    pytest.param(("services", "exporter", "depends_on", "redis", "condition"), "service_ready",
                 "condition", True, id="unknown-depends-on-condition"),
    pytest.param(("services", "flower", "ports"), ["127.0.0.1:flower:5555"], "ports", True,
                 id="port-not-a-port"),
    # docker-compose 1.29 does not check durations (`config` crashes printing this one)
    pytest.param(("services", "redis", "healthcheck", "interval"), "5 seconds", "interval",
                 False, id="interval-not-a-duration"),
])
def test_a_broken_copy_of_the_compose_file_is_refused(
    where: tuple[str, ...], value: object, named: str, by_compose: bool, tmp_path: Path,
) -> None:
    """The check above can fail: each validator refuses a copy with one thing wrong."""
    broken = json.loads(json.dumps(COMPOSE))  # a deep copy; the YAML merges shared values
    parent = functools.reduce(lambda node, key: node[key], where[:-1], broken)
    parent[where[-1]] = value
    errors = schema_errors(broken)
    assert errors, f"the schema accepts {'.'.join(where)} = {value!r}"
    service = ".".join(where[:2]) if len(where) > 1 else "(top level)"  # where it is reported
    assert any(e.startswith(service) and named.strip("'") in e for e in errors), errors
    tool = compose_tool()
    if tool is not None and by_compose:
        path = tmp_path / "docker-compose.yml"
        path.write_text(yaml.safe_dump(broken))
        done = compose_config(tool, path, FLOWER_BASIC_AUTH="ops:secret")
        assert done.returncode != 0, f"{tool} accepts {'.'.join(where)} = {value!r}"
        assert named in done.stderr, done.stderr


# -- the Procfile's pools, run by honcho --------------------------------------------------

@pytest.mark.workers
def test_honcho_runs_the_procfile_pools_and_each_serves_its_queues(
    cluster: Cluster, tmp_path: Path,
) -> None:
    pools = sorted(n for n in PROCFILE if n.startswith("worker_"))  # no redis, flower, exporter
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PIPELINE_REDIS_URL": cluster.url, "CELERY_BROKER_URL": cluster.url,
           "CELERY_RESULT_BACKEND": cluster.url, "PIPELINE_AGENT_MODULES": "tasks",
           "PIPELINE_CHAOS": ""}
    log = tmp_path / "honcho.log"
    with open(log, "wb") as out:
        honcho = subprocess.Popen(
            [str(BIN / "honcho"), "--no-colour", "-e", os.devnull, "-f", "Procfile",
             "start", *pools],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: nothing outlives the test
        )
    try:
        wait_for(lambda: all(_line_with(log, f"{pool.removeprefix('worker_')}-", " ready.")
                             for pool in pools),
                 timeout_s=60, message=f"honcho's pools to be ready (log: {log})")
        p = cluster.pipeline()
        credit = p.start("credit_decision", json.loads((SAMPLES / "good.json").read_text()))
        research = p.start("research_report",
                           json.loads((SAMPLES / "research.json").read_text()))
        for run in (credit, research):
            result = run.wait(60)
            assert result.status is RunStatus.SUCCEEDED, result.error
        served_by = {e["agent"]: e["worker"].split("@")[0].rsplit("-", 1)[0]  # pool-PORT@host
                     for run in (credit, research) for e in p.store.log(run.run_id)
                     if e["event"] == "step.sealed"}
        assert served_by == {
            "credit_score": "credit_score", "income_verification": "assessments",
            "risk_assessment": "assessments", "fraud_detection": "assessments",
            "final_approval": "approval", "research": "research", "analysis": "research",
            "report": "research", "audit": "research"}
    finally:
        honcho.send_signal(signal.SIGTERM)  # honcho stops every pool (warm shutdown)
        try:
            honcho.wait(30)
        except subprocess.TimeoutExpired:
            honcho.kill()
            honcho.wait()
        with contextlib.suppress(ProcessLookupError):  # anything left of its group
            os.killpg(honcho.pid, signal.SIGKILL)


def _line_with(path: Path, *parts: str) -> str:
    if not path.exists():
        return ""
    for line in path.read_text(errors="replace").splitlines():
        if all(part in line for part in parts):
            return line
    return ""


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
        return http_get(url, auth)[0]

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


def test_compose_and_the_procfile_run_one_beat_for_the_sweeper() -> None:
    beat = COMPOSE["services"]["beat"]
    assert compose_commands()["beat"].startswith("celery -A config beat ")
    assert beat["deploy"]["replicas"] == 1
    assert PROCFILE["beat"].startswith("celery -A config beat ")
