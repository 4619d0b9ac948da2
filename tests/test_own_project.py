"""The README's "Your own project", followed from a temporary directory outside the
repository: the module of agents and the start script are the README's own blocks, and the
commands are the README's own lines, run as written (the package is the one `make test`
installed; the repository is not on the path)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, Cluster, http_get, wait_for

pytestmark = pytest.mark.workers

README = (Path(ROOT) / "README.md").read_text()
SECTION = README.split("## Your own project", 1)[1].split("\n## ", 1)[0]
BIN = Path(sys.executable).parent


def block(first_line: str) -> str:
    """The section's Python block that starts with ``first_line``."""
    for body in re.findall(r"```python\n(.*?)```", SECTION, re.S):
        if body.startswith(first_line):
            return str(body)
    raise AssertionError(f"the README's own-project section has no block {first_line!r}")


def command(prefix: str) -> list[str]:
    """The section's shell line that starts with ``prefix``, without its comment."""
    shell = re.findall(r"```sh\n(.*?)```", SECTION, re.S)[0]
    for line in shell.splitlines():
        if line.startswith(prefix):
            return shlex.split(line.split(" #", 1)[0])
    raise AssertionError(f"the README's own-project section has no command {prefix!r}")


class Project:
    """A project directory of the user's, and the processes started in it."""

    def __init__(self, root: Path, cluster: Cluster) -> None:
        self.root = root
        self.data = root / "data"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PIPELINE_", "CELERY_", "FLOWER_"))}
        env.pop("PYTHONPATH", None)
        exported = dict(part.split("=", 1) for part in
                        (command("export PIPELINE_REDIS_URL")[1],
                         command("export PIPELINE_AGENT_MODULES")[1]))
        assert exported == {"PIPELINE_REDIS_URL": "redis://127.0.0.1:6379/0",
                            "PIPELINE_AGENT_MODULES": "support"}
        # the README's exports, on the test's own database
        self.env = {**env, **exported, "PIPELINE_REDIS_URL": cluster.url,
                    "PIPELINE_DATA_DIR": str(self.data),
                    "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def run(self, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=self.root, env={**self.env, **env}, text=True,
                              capture_output=True, timeout=90)

    def start(self, argv: list[str], **env: str) -> Path:
        log = self.root / f"process-{len(self.processes)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(argv, cwd=self.root, env={**self.env, **env},
                                       stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes.append((process, log))
        return log

    def stop(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process, _ in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def project(tmp_path: Path, cluster: Cluster) -> Iterator[Project]:
    assert not str(tmp_path).startswith(ROOT)
    p = Project(tmp_path, cluster)
    yield p
    p.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_readme_own_project_runs_from_a_directory_outside_the_repository(
        project: Project) -> None:
    (project.root / "support.py").write_text(block("# support.py"))
    (project.root / "start.py").write_text(block("# start.py"))
    ticket = re.search(r"`ticket.json` holds `(\{.*?\})`", SECTION)
    assert ticket is not None
    (project.root / "ticket.json").write_text(ticket.group(1))

    worker = project.start(command("pipeline worker --concurrency"))
    beat = project.start(command("pipeline worker --beat"))
    for log in (worker, beat):
        wait_for(lambda log=log: " ready." in log.read_text(errors="replace"), timeout_s=60,
                 message=f"the worker of {log.name} to be ready")

    started = project.run([sys.executable, "start.py"])
    assert started.returncode == 0, started.stderr[-2000:]
    assert started.stdout.strip() == "high"

    ran = project.run(command("pipeline run ticket_triage"))
    assert ran.returncode == 0, ran.stderr[-2000:]
    result = json.loads(ran.stdout)
    assert (result["status"], result["output"]["priority"]) == ("succeeded", "normal")

    # beat keeps its schedule under the data directory, nothing in the project's directory
    wait_for(lambda: list(project.data.glob("celerybeat-schedule*")), timeout_s=30,
             message="beat's schedule under PIPELINE_DATA_DIR")
    assert not list(project.root.glob("celerybeat-schedule*"))


def test_the_readme_own_project_tests_its_agents_with_pipeline_testing(
        project: Project, cluster: Cluster) -> None:
    (project.root / "support.py").write_text(block("# support.py"))
    (project.root / "conftest.py").write_text(block("# conftest.py"))
    (project.root / "test_support.py").write_text(block("# test_support.py"))
    db = cluster.url.rsplit("/", 1)[1]

    ran = project.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       "test_support.py"],
                      PIPELINE_TEST_REDIS_URL=cluster.url, PIPELINE_TEST_REDIS_DB=db)

    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-2000:]
    assert "2 passed" in ran.stdout


def test_the_readme_own_project_serves_flower_only_with_authentication(
        project: Project) -> None:
    (project.root / "support.py").write_text(block("# support.py"))
    argv = command("FLOWER_BASIC_AUTH=ops:change-me pipeline flower")
    assert argv[0] == "FLOWER_BASIC_AUTH=ops:change-me"
    refused = project.run(argv[1:])
    assert refused.returncode != 0
    assert "refusing to start Flower without authentication" in refused.stdout + refused.stderr

    port = free_port()
    project.start(argv[1:], FLOWER_BASIC_AUTH="ops:change-me", FLOWER_PORT=str(port))
    url = f"http://127.0.0.1:{port}/api/workers"
    deadline = time.monotonic() + 60
    while http_get(url)[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert http_get(url)[0] == 401
    assert http_get(url, "ops:wrong")[0] == 401
    assert http_get(url, "ops:change-me")[0] == 200
