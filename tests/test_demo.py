"""`pipeline demo` and the embedded Redis, as a new user runs them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.embedded import EmbeddedRedis
from tests.conftest import ROOT, Cluster, http_get


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=ROOT, env={**os.environ, "PIPELINE_CHAOS": "", **env},
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def demo(second_redis_url: str, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[subprocess.CompletedProcess[str]]:
    """`pipeline demo` on the second test database, run once for the tests that read it."""
    client = redis.Redis.from_url(second_redis_url)
    client.flushdb()
    data = tmp_path_factory.mktemp("demo-data")
    yield run_cli("demo", PIPELINE_REDIS_URL=second_redis_url, PIPELINE_DATA_DIR=str(data),
                  PIPELINE_ARCHIVE_URI="")
    client.flushdb()
    client.close()


def test_demo_runs_the_batch_and_shows_decisions_and_lineage(
    demo: subprocess.CompletedProcess[str],
) -> None:
    done = demo
    assert done.returncode == 0, done.stderr
    out, chaos = done.stdout.split("the same batch again with PIPELINE_CHAOS=")
    assert "8/8 runs succeeded" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("app-")}
    assert lines["app-1001"][1:3] == ["approved", "759"]
    assert lines["app-1002"][1:3] == ["declined", "300"]
    assert "lineage of run" in out and "final_approval" in out
    assert "ContractViolation" in out and "income.annual" in out  # the refused sample
    # the research flow, choreographed: one question answered, one refused and compensated
    answered, refused = out.split("choreography research_report: ")[1].split('{"question"')[1:]
    assert ": succeeded in " in answered and "report.completed (terminal)" in answered
    assert "1. Breakers stop cascading failures. [circuit-breakers#3]" in answered
    assert ": compensated in " in refused and "analysis.failed (failure)" in refused
    assert "contract confident_findings@1 refused field(s) confidence" in refused
    undone = refused.split("compensated, newest first: ")[1].splitlines()[0]
    assert undone.split(", ")[-1] == "e1:research"  # the first sealed, undone last
    # four questions at once on the model's shared limit: every run succeeds, some wait
    paced = out.split("limits: research_paced: ")[1]
    runs = [line.split() for line in paced.splitlines() if UUID.match(line)][:4]
    assert [r[1] for r in runs] == ["succeeded"] * 4
    assert sum(int(r[3]) for r in runs) > 0  # throttled rows
    assert "throttled" in paced and "limit demo:research-model: requests, wait" in paced
    budget = paced.split("budget=Budget(tokens=2,500)): ")[1]
    assert budget.startswith("compensated")
    assert "BudgetExceeded: run" in budget and "step 2:report_paced" in budget
    assert "compensated, newest first: 1:analysis_paced, 0:research_paced" in budget
    # with income_verification failing: some runs fail until its breaker opens,
    # then the rest seal its cached answer, marked degraded
    rows = [line for line in chaos.splitlines() if line.startswith("app-")]
    assert len(rows) == 8
    failed = [r for r in rows if "income_verification: ChaosError" in r and "compensated" in r]
    degraded = [r for r in rows if r.endswith("degraded: income_verification")]
    assert len(failed) >= 5 and degraded and len(failed) + len(degraded) == 8
    assert "income_verification: open (5 consecutive failures" in chaos
    trail = chaos.split("compensation of run ")[1]
    assert "run.compensating" in trail and "compensation.done      0:credit_score" in trail
    assert trail.index("1.") < trail.index("0:credit_score") < trail.index("run.compensated")
    assert "breakers reset" in chaos and "worker pool stopped" in chaos
    # every run of the demo archived, one of them deleted from Redis and read back
    archived = chaos.split("\narchive ", 1)[1]
    assert re.match(r"\S+/demo-data\d*/archive: 23 runs archived in 1 batch\n", archived)
    assert "6 versions, digests checked, as Redis had them" in archived
    approvals = archived.split("approvals by risk rating")[1].split("p95 latency")[0]
    counted = {tuple(line.split()[:2]): int(line.split()[2])
               for line in approvals.splitlines()[3:-1]}
    # the good batch (8) and, of the chaos batch, those sealed with the cached answer
    assert counted[("very_high", "declined")] >= 1  # app-1002: score 300
    assert sum(counted.values()) == 8 + len(degraded)
    latency = archived.split("p95 latency per day (the calls table):")[1].splitlines()
    assert any(line.split()[1:3] == ["credit_score", "16"] for line in latency)  # 2 batches


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}")


def masked(line: str) -> str:
    """A line of the demo's output without what changes from run to run: run ids, times,
    and every number (timings, and the versions parallel agents happen to seal as); a
    table's rule is as wide as its widest cell, and cells are padded to it."""
    line = TIMESTAMP.sub("TIME", UUID.sub("RUN", line))
    line = re.sub(r"\d+", "0", re.sub(r"-{2,}", "--", line))
    return " ".join(line.split())


def readme_transcript() -> list[str]:
    """The block after "What it prints (shortened):" in the README's "Two commands"."""
    text = (Path(ROOT) / "README.md").read_text(encoding="utf-8")
    after = text.split("What it prints (shortened):", 1)[1]
    return after.split("```", 2)[1].splitlines()[1:]  # [0] is the rest of the fence line


def test_the_readme_transcript_is_what_the_demo_prints(
    demo: subprocess.CompletedProcess[str],
) -> None:
    """Every line of the README's transcript is a line the demo printed, once what changes
    from run to run is masked; a `...` stands for what the README cut (lines, or the rest
    of a line)."""
    assert demo.returncode == 0, demo.stderr
    printed = {masked(line) for line in demo.stdout.splitlines()}
    shown = [line for line in readme_transcript() if line.strip() and line.strip() != "..."]
    assert len(shown) > 30, "the transcript was not found in the README"
    missing = []
    for line in shown:
        pattern = re.compile(".*".join(re.escape(part) for part in masked(line).split("...")))
        if not any(pattern.fullmatch(out) for out in printed):
            missing.append(line)
    assert not missing, "README lines the demo does not print:\n" + "\n".join(missing)


def test_demo_with_an_unreachable_redis_url_says_so(cluster: Cluster) -> None:
    done = run_cli("demo", PIPELINE_REDIS_URL="redis://:pw@127.0.0.1:1/0")
    assert done.returncode == 2
    assert "127.0.0.1:1" in done.stderr and "does not answer" in done.stderr
    assert "pw@" not in done.stderr and "Traceback" not in done.stderr


def test_embedded_redis_supports_streams_and_stops_cleanly() -> None:
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.xadd("s", {"a": "1"}, id="0-1") == "0-1"
        port, data_dir = server.port, server.dir
    assert data_dir is not None and not os.path.exists(data_dir)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def _can_isolate_network() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_isolate_network(), reason="needs `unshare -n` (a network namespace)")
def test_demo_starts_an_embedded_redis_when_nothing_answers(tmp_path: Path) -> None:
    """As on a fresh machine: in a network namespace of its own nothing listens
    on 127.0.0.1:6379, so the demo starts the embedded server and cleans up."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIPELINE_", "CELERY_"))}
    env["PIPELINE_DATA_DIR"] = str(tmp_path)  # its archive: not the user's
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c",
         f"ip link set lo up && exec {sys.executable} -m pipeline.cli demo"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "started an embedded one at redis://127.0.0.1:" in done.stdout
    assert "8/8 runs succeeded" in done.stdout and "worker pool stopped" in done.stdout


def test_demo_with_flower_prints_its_url_and_credentials_and_flower_requires_them(
    cluster: Cluster, tmp_path: Path,
) -> None:
    proc = subprocess.Popen(
        # Ctrl-C reaches it even where SIGINT is ignored (tests run as a shell's background
        # job): Python then keeps SIG_IGN, and the demo would hold Flower for the whole 60 s.
        [sys.executable, "-c", "import signal, sys; "
         "signal.signal(signal.SIGINT, signal.default_int_handler); "
         "from pipeline.cli import main; "
         "main(['demo', '--flower', '--hold', '60'], prog_name='pipeline')"],
        cwd=ROOT, env={**os.environ, "PIPELINE_CHAOS": "", "PIPELINE_REDIS_URL": cluster.url,
                       "FLOWER_BASIC_AUTH": "", "PIPELINE_DATA_DIR": str(tmp_path)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = ""
        for line in proc.stdout:
            if line.startswith("flower: "):
                break
        found = re.match(r"flower: (http://127\.0\.0\.1:\d+) \(user (\w+), password (\S+)\)",
                         line)
        assert found, line
        url, user, password = found.groups()

        assert http_get(f"{url}/api/workers")[0] == 401
        assert http_get(f"{url}/api/workers", f"{user}:{password}")[0] == 200
        for line in proc.stdout:  # the demo goes on; Flower sees its agent tasks
            if line.startswith("flower stays up"):
                break
        status, tasks = http_get(f"{url}/api/tasks?limit=1000", f"{user}:{password}")
        names = {t["name"] for t in tasks.values()} if status == 200 else set()
        assert {"agent.credit_score", "agent.final_approval", "agent.research"} <= names
        # a chord's members store no result: Flower knows their states from the events
        succeeded = {t["name"] for t in tasks.values() if t.get("state") == "SUCCESS"}
        assert {"agent.income_verification", "agent.risk_assessment",
                "agent.fraud_detection", "agent.final_approval"} <= succeeded
    finally:
        proc.send_signal(signal.SIGINT)  # the demo stops what it started
        proc.wait(60)
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(OSError):  # Flower is gone with it
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
