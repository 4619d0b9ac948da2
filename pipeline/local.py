"""Celery worker processes started from Python: for ``pipeline demo`` and the tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from .errors import ConfigurationError

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class WorkerProcess:
    """A real ``celery -A <app> worker`` subprocess with its own log file."""

    def __init__(
        self,
        *,
        app: str = "config",
        env: Mapping[str, str] | None = None,
        queues: Sequence[str] = (),
        concurrency: int = 2,
        name: str | None = None,
        cwd: str | None = None,
        loglevel: str = "INFO",
    ) -> None:
        self.app = app
        self.env = {**os.environ, **(env or {})}
        self.queues = list(queues)
        self.concurrency = concurrency
        self.name = name or f"w{uuid.uuid4().hex[:8]}"
        self.cwd = cwd
        self.loglevel = loglevel
        self.logfile = Path(tempfile.mkdtemp(prefix="pipeline-worker-")) / "worker.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "celery", "-A", self.app, "worker",
            "--pool", "prefork", "--concurrency", str(self.concurrency),
            "--hostname", f"{self.name}@%h",
            "--loglevel", self.loglevel, "--logfile", str(self.logfile),
            "--without-mingle", "--without-gossip",
        ]
        if self.queues:
            cmd += ["--queues", ",".join(self.queues)]
        return cmd

    def start(self, wait: bool = True) -> WorkerProcess:
        self._stderr = open(self.logfile.with_suffix(".err"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.kill()  # never leave a half-started pool behind
                raise
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ConfigurationError(f"worker {self.name} exited at start:\n{self.tail()}")
            if self.logfile.exists() and " ready." in self.logfile.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise ConfigurationError(f"worker {self.name} not ready after {timeout_s}s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        out = ""
        for path in (self.logfile, self.logfile.with_suffix(".err")):
            if path.exists():
                out += path.read_text(errors="replace")[-chars:]
        return out

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        """Warm shutdown (SIGTERM: finish what runs), then SIGKILL if it hangs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self._clean()

    def kill(self) -> None:
        """SIGKILL the worker's main process and its pool children."""
        if self.process is None:
            return
        children = _children(self.process.pid)
        self.process.kill()
        self.process.wait()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._clean()

    def _clean(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
        shutil.rmtree(self.logfile.parent, ignore_errors=True)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class FlowerProcess:
    """``celery -A <app> flower`` with basic auth, on a loopback port, read from the
    project directory (where ``flowerconfig.py`` refuses to run without credentials)."""

    def __init__(self, *, env: Mapping[str, str], credentials: str, port: int,
                 cwd: str | None = None, app: str = "config") -> None:
        self.port = port
        self.credentials = credentials
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = [sys.executable, "-m", "celery", "-A", app, "flower"]
        self.env = {**os.environ, **env, "FLOWER_BASIC_AUTH": credentials,
                    "FLOWER_PORT": str(port), "FLOWER_ADDRESS": "127.0.0.1"}
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None

    def start(self) -> FlowerProcess:
        # Its log goes to a file, read only if it fails to start: a pipe nobody reads would
        # fill up as Flower logs its requests (a demo held open for a long look) and block it.
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self.log)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")
                raise ConfigurationError(f"flower exited at start: {err[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise ConfigurationError(f"flower not listening on {self.url} after "
                                 f"{READY_TIMEOUT_S:g}s")

    def stop(self) -> None:
        if self.process is None:
            return
        _terminate(self.process)
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self) -> FlowerProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class BeatProcess:
    """``celery -A <app> beat``: sends the sweeper's task every PIPELINE_SWEEP_INTERVAL_S
    (its schedule file in a directory of its own, removed when it stops)."""

    def __init__(self, *, env: Mapping[str, str], cwd: str | None = None,
                 app: str = "config") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pipeline-beat-"))
        self.logfile = self.dir / "beat.log"
        self.cmd = [sys.executable, "-m", "celery", "-A", app, "beat", "--loglevel", "INFO",
                    "--schedule", str(self.dir / "schedule"), "--logfile", str(self.logfile),
                    "--pidfile", str(self.dir / "beat.pid")]
        self.env = {**os.environ, **env}
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BeatProcess:
        self.process = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigurationError(f"celery beat exited at start:\n{self.tail()}")
            if "beat: Starting" in self.tail():
                return self
            time.sleep(0.05)
        self.stop()
        raise ConfigurationError(f"celery beat did not start after {READY_TIMEOUT_S:g}s")

    def tail(self, chars: int = 3000) -> str:
        return self.logfile.read_text(errors="replace")[-chars:] if self.logfile.exists() \
            else ""

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> BeatProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a warm shutdown), then SIGKILL if it does not end in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _children(pid: int) -> list[int]:
    try:
        out = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in out.split()]
