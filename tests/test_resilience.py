"""Failures around the step: Redis lost mid-step, a chord member that fails,
the hard time limit, a result backend down at start, unsafe policies."""

from __future__ import annotations

import dataclasses
import select
import socket
import threading
from urllib.parse import urlsplit

import pytest

from pipeline import RunStatus
from pipeline.app import create_app
from pipeline.client import Pipeline
from pipeline.errors import ConfigurationError
from tests.agents import EXECUTIONS_KEY
from tests.conftest import Cluster, settings_for, wait_for


class TcpProxy:
    """A loopback TCP forwarder that can be cut (connections dropped, new ones
    refused) and restored on the same port: a Redis outage as a worker sees it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            assert self.listener is not None
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            self.listener.close()
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            return


def test_a_step_that_loses_redis_is_retried_and_the_run_succeeds(cluster: Cluster) -> None:
    parts = urlsplit(cluster.url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    state_url = f"redis://127.0.0.1:{proxy.port}{parts.path}"
    worker = cluster.worker(PIPELINE_REDIS_URL=state_url)  # broker and results direct
    run = cluster.pipeline().start("slow_counting", {"n": 1, "sleep_s": 1.5})
    wait_for(lambda: any(e["event"] == "step.started" for e in run.store.log(run.run_id)),
             message="the step to open")
    proxy.cut()  # while the agent works: its seal cannot reach Redis
    wait_for(lambda: "retry: Retry in" in worker.tail(20000), message="the step's retry")
    proxy.restore()

    result = run.wait(30)
    assert result.status is RunStatus.SUCCEEDED and result.output == {"n": 2}
    assert [v.version for v in run.history()] == [0, 1]
    started = [e for e in run.store.log(run.run_id) if e["event"] == "step.started"]
    assert len(started) == 2  # executed again after the outage, sealed once
    assert cluster.redis.get(EXECUTIONS_KEY.format(run_id=run.run_id,
                                                   agent="slow_increment")) == "2"


def test_a_failed_chord_member_is_blamed_not_the_join(cluster: Cluster) -> None:
    cluster.worker(PIPELINE_MAX_PAYLOAD_BYTES="64")
    run = cluster.pipeline().start("fanning", {"n": 3})
    result = run.wait(30)
    info = run.info()
    assert result.status is RunStatus.COMPENSATED  # `double` had sealed
    assert info.failed_agent == "bloat"
    assert info.error is not None and info.error.startswith("PayloadTooLarge")
    failed = [e for e in run.store.log(run.run_id) if e["event"] == "step.failed"]
    assert [(e["agent"], e["error_type"]) for e in failed] == [("bloat", "PayloadTooLarge")]
    assert "join" not in {v.agent for v in run.history()}


def test_the_hard_time_limit_fails_the_run_and_is_logged(cluster: Cluster) -> None:
    cluster.worker()
    run = cluster.pipeline().start("stubborning", {"n": 1})
    result = run.wait(30)  # the soft limit (1 s) is ignored; the hard one (6 s) kills it
    info = run.info()
    assert result.status is RunStatus.FAILED and info.failed_agent == "stubborn"
    assert info.error is not None and info.error.startswith("TimeLimitExceeded")
    failed = [e for e in run.store.log(run.run_id) if e["event"] == "step.failed"]
    assert [(e["agent"], e["error_type"]) for e in failed] == [("stubborn", "TimeLimitExceeded")]


def test_a_result_backend_down_at_start_does_not_stop_the_run(cluster: Cluster) -> None:
    """A chord of steps joins in the seal: sending one stores nothing on the result
    backend (no chord size, no member results), so the run starts without it."""
    settings = dataclasses.replace(settings_for(cluster.url),
                                   result_backend="redis://:pw@127.0.0.1:1/0")
    p = Pipeline(settings=settings)
    run = p.start("fanning", {"n": 1})
    assert run.info().status is RunStatus.RUNNING
    assert cluster.redis.llen("agents.double") == 1 and cluster.redis.llen("agents.bloat") == 1
    assert not cluster.redis.zscore("pipeline:unenqueued", run.run_id)


def test_an_agent_policy_longer_than_half_the_visibility_timeout_is_refused(
    redis_url: str,
) -> None:
    # credit agents: 10 s limit + 5 s grace + 60 s retry backoff, doubled > 100 s
    with pytest.raises(ConfigurationError, match="visibility timeout"):
        create_app(settings_for(redis_url, visibility_timeout_s=100))
