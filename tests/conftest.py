"""Fixtures: a real Redis and real Celery worker processes; never eager mode.

Redis: PIPELINE_TEST_REDIS_URL when set, else the local Redis at
127.0.0.1:6379 if it answers, else an embedded one started for the session.
The tests own two database indexes, PIPELINE_TEST_REDIS_DB (default 13) and
the next one, and clean only those.

- ``pipeline`` / ``shared_worker``: one worker pool for the session on the
  first database, serving every queue; tests on it use their own runs and
  never flush the database while the worker runs (kombu keeps its queue
  bindings there).
- ``cluster``: a fresh second database per test with workers the test starts
  itself (a subset of queues, chaos settings, kills).
"""

from __future__ import annotations

import base64
import gc
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from pipeline import Pipeline
from pipeline.app import create_app
from pipeline.embedded import EmbeddedRedis, answers
from pipeline.local import WorkerProcess
from pipeline.settings import Settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT_MODULES = "tasks,tests.agents"
TEST_DB = int(os.environ.get("PIPELINE_TEST_REDIS_DB", "13"))
LOCAL_REDIS = "redis://127.0.0.1:6379/0"


def with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def redis_base_url() -> Iterator[str]:
    configured = os.environ.get("PIPELINE_TEST_REDIS_URL")
    if configured:
        yield configured
    elif answers(LOCAL_REDIS):
        yield LOCAL_REDIS
    else:  # append-only, as a deployment's Redis should be (docker-compose.yml)
        with EmbeddedRedis(appendonly=True) as server:
            yield server.url
            # Celery's AsyncResult objects unsubscribe from their result channel
            # when collected: let that happen while the server still answers.
            gc.collect()


def _db_url(base: str, offset: int) -> str:
    path = urlsplit(base).path.strip("/")
    db = int(path) if path and os.environ.get("PIPELINE_TEST_REDIS_URL") else TEST_DB
    return with_db(base, db + offset)


@pytest.fixture(scope="session")
def redis_url(redis_base_url: str) -> str:
    """The first test database, flushed once at the start of the session."""
    url = _db_url(redis_base_url, 0)
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="session")
def second_redis_url(redis_base_url: str) -> str:
    return _db_url(redis_base_url, 1)


@pytest.fixture(scope="session")
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def settings_for(url: str, **overrides: object) -> Settings:
    return Settings(
        redis_url=url,
        broker_url=url,
        result_backend=url,
        agent_modules=tuple(AGENT_MODULES.split(",")),
        **overrides,  # type: ignore[arg-type]
    )


def worker_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "PIPELINE_REDIS_URL": url,
        "CELERY_BROKER_URL": url,
        "CELERY_RESULT_BACKEND": url,
        "PIPELINE_AGENT_MODULES": AGENT_MODULES,
        "PIPELINE_CHAOS": "",
        **extra,
    }


@pytest.fixture(scope="session")
def shared_worker(redis_url: str) -> Iterator[WorkerProcess]:
    w = WorkerProcess(env=worker_env(redis_url), concurrency=2, cwd=ROOT, name="shared")
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def pipeline(redis_url: str, shared_worker: WorkerProcess) -> Pipeline:
    """A client on the first database, with a worker pool serving every queue."""
    settings = settings_for(redis_url)
    return Pipeline(settings=settings, app=create_app(settings))


@pytest.fixture(scope="session")
def client_only(redis_url: str) -> Pipeline:
    """A client on the first database without requiring workers (nothing runs)."""
    settings = settings_for(redis_url)
    return Pipeline(settings=settings, app=create_app(settings))


@dataclass
class Cluster:
    """A private database with workers a test starts and stops itself."""

    url: str
    workers: list[WorkerProcess] = field(default_factory=list)
    _pipeline: Pipeline | None = None

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def pipeline(self, **overrides: object) -> Pipeline:
        if overrides:
            settings = settings_for(self.url, **overrides)
            return Pipeline(settings=settings, app=create_app(settings))
        if self._pipeline is None:
            settings = settings_for(self.url)
            self._pipeline = Pipeline(settings=settings, app=create_app(settings))
        return self._pipeline

    def worker(self, *, queues: tuple[str, ...] = (), concurrency: int = 2,
               start: bool = True, **env: str) -> WorkerProcess:
        w = WorkerProcess(env=worker_env(self.url, **env), queues=queues,
                          concurrency=concurrency, cwd=ROOT)
        self.workers.append(w)
        return w.start() if start else w


@pytest.fixture
def cluster(second_redis_url: str) -> Iterator[Cluster]:
    client = redis.Redis.from_url(second_redis_url)
    client.flushdb()
    c = Cluster(second_redis_url)
    yield c
    for w in c.workers:
        w.kill()
    client.flushdb()
    client.close()


def wait_for(condition: Callable[[], object], timeout_s: float = 20.0,
             message: str = "condition") -> object:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")


def http_get(url: str, auth: str | None = None) -> tuple[int, Any]:
    """GET ``url`` with basic auth ``user:password``: (status, JSON body or None); status 0
    when nothing listens."""
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, None
    except OSError:
        return 0, None


@contextmanager
def socket_writes() -> Iterator[list[Any]]:
    """Every write redis-py makes to a socket meanwhile, in this process: one per round trip
    (a pipelined batch is one write)."""
    writes: list[Any] = []
    connection = redis.connection.AbstractConnection
    send = connection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        writes.append(command)
        send(self, command, check_health)

    connection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield writes
    finally:
        connection.send_packed_command = send  # type: ignore[method-assign]
