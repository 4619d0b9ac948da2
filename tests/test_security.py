"""Locked down by default: a Redis with a password, TLS (``rediss://``), secrets kept out of
every log, error and output, and Flower behind authentication.

Each Redis here is a ``redis-server`` of this module's own on a free loopback port: one
that requires a password, one that serves only TLS (with a certificate signed by a CA made
for the session, and the same password). Workers are real Celery processes; the CLI runs
as a user runs it, one process per command.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline import Pipeline, RunStatus
from pipeline.embedded import answers, free_port
from pipeline.errors import BrokerUnavailable, ConfigurationError, StoreUnavailable
from pipeline.local import WorkerProcess
from pipeline.settings import Settings, redact_url
from tasks import SAMPLES
from tests.conftest import AGENT_MODULES, ROOT, Cluster, http_get, wait_for

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
PASSWORD = f"pw-{secrets.token_hex(12)}"
WRONG = f"nope-{secrets.token_hex(12)}"
ACL_PASSWORD = f"acl-{secrets.token_hex(12)}"
PIPELINE = Path(sys.executable).parent / "pipeline"  # the console script a user runs
GOOD = str(SAMPLES / "good.json")
CREDIT = json.loads(Path(GOOD).read_text())

pytestmark = pytest.mark.skipif(not Path(REDIS_SERVER).exists(), reason="no redis-server here")


class ServerExited(Exception):
    """The redis-server stopped at start (the log says why)."""


@contextmanager
def redis_server(directory: Path, url_of: Callable[[int], str], *args: str) -> Iterator[str]:
    """A redis-server on a free port (``{port}`` in ``args``), no persistence; its URL."""
    port = free_port()
    log = directory / f"redis-{port}.log"
    process = subprocess.Popen(
        [REDIS_SERVER, "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
         "--appendonly", "no", "--logfile", str(log), *(a.format(port=port) for a in args)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = url_of(port)
    try:
        wait_for(lambda: process.poll() is not None or answers(url, 0.2), timeout_s=10,
                 message=f"redis-server on port {port}")
        if process.poll() is not None:
            raise ServerExited(log.read_text(errors="replace")[-500:] if log.exists() else "")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def workers_on(url: str) -> Iterator[Cluster]:
    """A ``Cluster`` on ``url`` whose workers are killed at the end."""
    cluster = Cluster(url)
    try:
        yield cluster
    finally:
        for w in cluster.workers:
            w.kill()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://:PASSWORD@127.0.0.1:<port>/0`` on a Redis that requires the password."""
    with redis_server(tmp_path_factory.mktemp("redis-auth"),
                      lambda port: f"redis://:{PASSWORD}@127.0.0.1:{port}/0",
                      "--port", "{port}", "--requirepass", PASSWORD) as url:
        yield url


@pytest.fixture(scope="module")
def secured_cluster(secured: str) -> Iterator[Cluster]:
    """A worker on the password Redis, serving every queue; ``tripwire`` always fails."""
    with workers_on(secured) as cluster:
        cluster.worker(PIPELINE_CHAOS="tripwire=error:1")
        yield cluster


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt, a server certificate it signed for 127.0.0.1, and other.crt, a CA that signed
    nothing here."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: no certificates for the TLS tests")
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "1",
                "-subj", f"/CN=pipeline test {ca}", cwd=d)
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
            cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.cnf", cwd=d)
    return d


def tls_url(port: int, ca: Path, db: int = 0) -> str:
    return f"rediss://:{PASSWORD}@127.0.0.1:{port}/{db}?ssl_ca_certs={ca}"


@pytest.fixture(scope="module")
def tls(certs: Path) -> Iterator[str]:
    """``rediss://:PASSWORD@127.0.0.1:<port>/0?ssl_ca_certs=<ca.crt>`` on a TLS-only Redis."""
    try:
        with redis_server(certs, lambda port: tls_url(port, certs / "ca.crt"),
                          "--port", "0", "--tls-port", "{port}", "--requirepass", PASSWORD,
                          "--tls-cert-file", str(certs / "server.crt"),
                          "--tls-key-file", str(certs / "server.key"),
                          "--tls-ca-cert-file", str(certs / "ca.crt"),
                          "--tls-auth-clients", "no") as url:
            yield url
    except ServerExited as e:
        pytest.skip(f"{REDIS_SERVER} was built without TLS (it refused --tls-port): {e}")


def with_db(url: str, db: int) -> str:
    base, _, query = url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{db}" + (f"?{query}" if query else "")


def cli(url: str, *args: str, **env: str) -> subprocess.Popen[str]:
    """``pipeline ARGS`` in a process of its own, configured only by the environment."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("CELERY_", "PIPELINE_", "FLOWER_"))}
    environ.update(PIPELINE_REDIS_URL=url, PIPELINE_AGENT_MODULES=AGENT_MODULES, **env)
    return subprocess.Popen([str(PIPELINE), *args], cwd=ROOT,
                            env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(*processes: subprocess.Popen[str]) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each, started together and awaited together."""
    outputs = [p.communicate(timeout=90) for p in processes]
    return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs, strict=True)]


READERS: dict[str, Callable[[redis.Redis, str], Any]] = {
    "string": lambda c, k: c.get(k),
    "hash": lambda c, k: c.hgetall(k),
    "list": lambda c, k: c.lrange(k, 0, -1),
    "set": lambda c, k: c.smembers(k),
    "zset": lambda c, k: c.zrange(k, 0, -1, withscores=True),
    "stream": lambda c, k: c.xrange(k),
}


def dump(client: redis.Redis) -> str:
    """Every key and value in the database, as text."""
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        out.append(f"{key} {kind} {READERS[kind](client, key)}")
    return "\n".join(out)


# -- a password ----------------------------------------------------------------------------

@pytest.mark.workers
def test_a_workflow_runs_through_a_worker_on_a_redis_that_requires_a_password(
    secured: str, secured_cluster: Cluster,
) -> None:
    anonymous = secured.replace(f":{PASSWORD}@", "")
    with pytest.raises(redis.AuthenticationError):  # the server does demand it
        redis.Redis.from_url(anonymous).ping()
    result = secured_cluster.pipeline().start("credit_decision", CREDIT).wait(60)
    assert result.status is RunStatus.SUCCEEDED, result.error
    assert result.output["decision"] == "approved"


@pytest.mark.workers
def test_an_acl_user_barred_from_dangerous_commands_runs_a_workflow(secured: str) -> None:
    """What the README advises: a user of its own, without FLUSHALL, KEYS, CONFIG..."""
    admin = redis.Redis.from_url(secured)
    admin.acl_setuser("pipeline", enabled=True, passwords=[f"+{ACL_PASSWORD}"], keys=["*"],
                      channels=["*"], commands=["+@all", "-@dangerous"])
    url = with_db(secured.replace(f":{PASSWORD}@", f"pipeline:{ACL_PASSWORD}@"), 2)
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis.from_url(url).flushall()
    with workers_on(url) as cluster:
        cluster.worker(concurrency=1)
        result = cluster.pipeline().start("credit_decision", CREDIT).wait(60)
        assert result.status is RunStatus.SUCCEEDED, result.error
    assert not [e for e in admin.acl_log() if e.get("username") == "pipeline"
                and e.get("object") != "flushall"]


def test_a_wrong_or_missing_password_is_one_line_naming_the_url_redacted(secured: str) -> None:
    wrong = secured.replace(PASSWORD, WRONG)
    anonymous = secured.replace(f":{PASSWORD}@", "")
    port = secured.rsplit(":", 1)[1].split("/")[0]
    outcomes = finish(
        cli(wrong, "status", "r-1"),
        cli(wrong, "run", "credit_decision", "--input", GOOD, "--wait"),
        cli(anonymous, "status", "r-1"),
    )
    for code, out, err in outcomes:
        assert (code, out) == (2, ""), err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("error: Redis at redis://") and "refused the credentials" in err
        assert f"127.0.0.1:{port}/0" in err and WRONG not in err and PASSWORD not in err
    assert f"redis://:***@127.0.0.1:{port}/0" in outcomes[0][2]
    with pytest.raises(StoreUnavailable, match=r"redis://:\*\*\*@127\.0\.0\.1") as e:
        Pipeline(settings=Settings.from_env({"PIPELINE_REDIS_URL": wrong,
                                             "PIPELINE_AGENT_MODULES": AGENT_MODULES})
                 ).start("credit_decision", CREDIT)
    assert WRONG not in str(e.value)


@pytest.mark.workers
def test_no_log_output_error_or_stored_entry_shows_the_password(
    secured: str, secured_cluster: Cluster, tmp_path: Path,
) -> None:
    """A worker and every CLI path, the successful and the failing, on the password Redis:
    the password appears nowhere, nor does a wrong one, nor half of one cut by a '/'."""
    port = secured.rsplit(":", 1)[1].split("/")[0]
    wrong = secured.replace(PASSWORD, WRONG)
    lost = secured.replace(f"127.0.0.1:{port}", "127.0.0.1:1")  # nothing listens there
    half, other_half = PASSWORD[:12], PASSWORD[12:]
    unencoded = secured.replace(PASSWORD, f"{half}/{other_half}")
    stray = WorkerProcess(env={"PIPELINE_REDIS_URL": wrong, "CELERY_BROKER_URL": wrong,
                               "CELERY_RESULT_BACKEND": wrong,
                               "PIPELINE_AGENT_MODULES": AGENT_MODULES},
                          concurrency=1, cwd=ROOT).start(wait=False)
    try:
        count = tmp_path / "count.json"
        count.write_text('{"n": 1}')
        ran = finish(cli(secured, "run", "credit_decision", "--input", GOOD, "--wait", "--json"),
                     cli(secured, "run", "saga_fickle", "--input", str(count), "--wait",
                         "--json"))
        assert [code for code, _, _ in ran] == [0, 1], ran
        ok, failed = (json.loads(out)["run_id"] for _, out, _ in ran)
        assert json.loads(ran[1][1])["status"] == "compensated"
        reads = finish(*(cli(secured, *args) for args in (
            ("status", ok), ("status", failed), ("trace", failed), ("trace", ok, "--json"),
            ("inspect", failed), ("history", ok), ("runs",), ("breakers",))))
        assert [code for code, _, _ in reads] == [0] * len(reads), [e for _, _, e in reads]
        assert "ChaosError" in reads[2][1]  # the failure is in the trace: it was looked at
        errors = finish(
            cli(wrong, "trace", failed), cli(lost, "status", ok),
            cli(secured, "run", "credit_decision", "--input", GOOD, CELERY_BROKER_URL=wrong),
            cli(unencoded, "status", ok), cli(secured.replace(f":{PASSWORD}@", "") +
                                              f"?password={PASSWORD}", "status", ok))
        assert [code for code, _, _ in errors] == [2] * len(errors), errors
        assert all(out == "" and len(err.splitlines()) == 1 and err.startswith("error: ")
                   for _, out, err in errors), errors
        assert "cannot enqueue run" in errors[2][2] and "the broker at redis://:***@" in \
            errors[2][2]
        assert "percent-encode the password" in errors[3][2]
        assert "cannot take ?password=" in errors[4][2]
        wait_for(lambda: "Cannot connect to" in stray.tail(), timeout_s=20,
                 message="the worker with a wrong password to report it")
        stray_log = stray.tail(100_000)
        assert f"redis://:**@127.0.0.1:{port}" in stray_log
    finally:
        stray.kill()
    worker_log = secured_cluster.workers[0].tail(1_000_000)
    assert f"redis://:**@127.0.0.1:{port}" in worker_log  # the broker, masked by Celery
    app = secured_cluster.pipeline().app
    inspected = {what: getattr(app.control.inspect(timeout=5, limit=1), what)()
                 for what in ("conf", "stats", "registered")}
    assert all(inspected.values()), inspected
    stored = dump(secured_cluster.redis)
    assert ok in stored and "ChaosError" in stored
    shown = {
        "cli": "\n".join(out + err for _, out, err in ran + reads + errors),
        "worker log": worker_log,
        "worker with the wrong password": stray_log,
        "inspect": json.dumps(inspected),
        "redis": stored,
    }
    for where, text in shown.items():
        for secret in (PASSWORD, WRONG, half, other_half):
            assert secret not in text, f"{secret} shows in the {where}"


def test_urls_hide_their_secrets_even_when_the_password_is_not_encoded() -> None:
    assert redact_url("redis://:ab/cd@h:6379/0?password=x") == "redis://***@h:6379/0?password=***"
    assert redact_url("redis://:ab#cd@h:6379/0") == "redis://***@h:6379/0"
    assert redact_url("rediss://:pw@h:6380/0?ssl_password=key-pass&ssl_ca_certs=/ca.crt") == \
        "rediss://:***@h:6380/0?ssl_password=***&ssl_ca_certs=/ca.crt"
    assert redact_url("redis://h:6379/0?client_name=a@b&password=x") == "<unparseable URL>"
    settings = Settings(redis_url=f"redis://:{PASSWORD}@h/0", broker_url=f"redis://:{PASSWORD}@h/1",
                        archive_uri=f"s3://key:{PASSWORD}@bucket/archive")
    assert PASSWORD not in repr(settings) and "redis://:***@h/1" in repr(settings)
    assert "s3://key:***@bucket/archive" in repr(settings)
    for env in ({"PIPELINE_REDIS_URL": "redis://:s3c/r3t@h:6379/0"},
                {"CELERY_RESULT_BACKEND": "redis://:s3c?r3t@h:6379/0"}):
        with pytest.raises(ConfigurationError, match="percent-encode") as e:
            Settings.from_env(env)
        assert "s3c" not in str(e.value) and "r3t" not in str(e.value)


# -- TLS ------------------------------------------------------------------------------------

@pytest.mark.workers
def test_a_workflow_runs_over_tls_for_state_broker_and_results(tls: str) -> None:
    with workers_on(tls) as cluster:
        worker = cluster.worker()
        p = cluster.pipeline()
        assert p.settings.broker_url.startswith("rediss://")
        result = p.start("credit_decision", CREDIT).wait(60)  # a chord: results over TLS
        assert result.status is RunStatus.SUCCEEDED, result.error
        log = worker.tail(100_000)
        assert "rediss://:**@127.0.0.1" in log and "insecure" not in log and PASSWORD not in log


def test_a_server_whose_certificate_another_ca_signed_is_refused(tls: str, certs: Path) -> None:
    """State, broker and results each verify the certificate: against the CA the URL names,
    else the system's CAs (which never signed this one); nothing is kept of the run."""
    port = int(tls.rsplit(":", 1)[1].split("/")[0])
    state = tls_url(port, certs / "ca.crt", db=1)
    rogue = tls_url(port, certs / "other.crt", db=1)
    bare = f"rediss://:{PASSWORD}@127.0.0.1:{port}/1"  # no CA named: the system's
    for code, out, err in finish(cli(rogue, "status", "r-1"), cli(bare, "status", "r-1")):
        assert (code, out) == (2, ""), err
        assert err.startswith(f"error: cannot reach Redis at rediss://:***@127.0.0.1:{port}/1")
        assert "certificate verify failed" in err and PASSWORD not in err
    for broker, backend in ((rogue, state), (bare, state), (state, bare)):
        settings = Settings(redis_url=state, broker_url=broker, result_backend=backend,
                            agent_modules=tuple(AGENT_MODULES.split(",")))
        p = Pipeline(settings=settings)
        with pytest.raises(BrokerUnavailable) as e:
            p.start("credit_decision", CREDIT)
        assert PASSWORD not in str(e.value)
        if broker != state:
            assert "certificate verify failed" in str(e.value)
        else:  # Celery reports only that it gave up: ask the backend's client why
            with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
                p.app.backend.client.ping()
    assert redis.Redis.from_url(state).dbsize() == 0


# -- Flower ---------------------------------------------------------------------------------

@pytest.mark.workers
def test_flower_on_the_password_redis_wants_credentials_and_shows_no_password(
    secured: str, secured_cluster: Cluster, tmp_path: Path,
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "FLOWER_"))}
    log = tmp_path / "flower.log"
    with open(log, "wb") as out:
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "flower"], cwd=ROOT,
            env={**env, "PIPELINE_REDIS_URL": secured, "PIPELINE_AGENT_MODULES": AGENT_MODULES,
                 "FLOWER_BASIC_AUTH": "ops:correct-horse", "FLOWER_PORT": str(port)},
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_get(f"{url}/api/workers")[0], timeout_s=30,
                 message="flower to listen")
        assert http_get(f"{url}/api/workers")[0] == 401
        status, workers = http_get(f"{url}/api/workers?refresh=1", "ops:correct-horse")
        assert status == 200 and workers, workers
    finally:
        flower.send_signal(signal.SIGTERM)
        try:
            flower.wait(10)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait()
    text = log.read_text(errors="replace")
    assert "Broker: redis://:**@" in text
    assert PASSWORD not in text and PASSWORD not in json.dumps(workers)


def test_flower_refuses_credentials_with_an_empty_password(secured: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "FLOWER_"))}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "config", "flower"], cwd=ROOT,
        env={**env, "PIPELINE_REDIS_URL": secured, "PIPELINE_AGENT_MODULES": AGENT_MODULES,
             "FLOWER_BASIC_AUTH": "ops:correct-horse,admin:", "FLOWER_PORT": str(free_port())},
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "entry 2 of FLOWER_BASIC_AUTH is not user:password" in done.stderr
    assert "correct-horse" not in done.stderr + done.stdout
