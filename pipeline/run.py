"""A handle on one run: its record, its versions, its result, and waiting for it to end."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .errors import RunNotFound, WaitTimeout
from .state import RunInfo, RunStatus, StateStore, Version

__all__ = ["DEFAULT_WAIT_TIMEOUT_S", "Run", "RunResult"]

DEFAULT_WAIT_TIMEOUT_S = 60.0
WAIT_BLOCK_MS = 1000
FINAL_EVENTS = frozenset(f"run.{s.value}" for s in RunStatus if s.is_final)
"""The log entries a run ends with (every final status is logged as ``run.<status>``)."""


class Client(Protocol):
    """What a handle needs of the client it came from (a ``Pipeline``)."""

    store: StateStore

    def recall(self, run_id: str) -> bool: ...


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended: its ``status``, its ``output`` (the payload of version
    ``version``, the run's output; None unless one was sealed), the ``error`` that
    failed it, and ``degraded`` when a breaker's fallback stood in for an agent."""

    status: RunStatus
    output: Any
    version: int
    run_id: str = ""
    error: str | None = None
    degraded: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data, the status as its string value."""
        return {
            "run_id": self.run_id,
            "status": self.status.value,
            "version": self.version,
            "output": self.output,
            "error": self.error,
            "degraded": self.degraded,
        }


class Run:
    """A handle on one run of a workflow."""

    def __init__(self, pipeline: Client, run_id: str) -> None:
        """A handle on run ``run_id``, unchecked (``Pipeline.run`` checks it exists)."""
        self.pipeline = pipeline
        self.run_id = run_id

    @property
    def store(self) -> StateStore:
        """The state store of the client this handle came from."""
        return self.pipeline.store

    def info(self) -> RunInfo:
        """The run's record now (status, head version, times, route, replay links);
        ``RunNotFound`` when it expired (and is not in the archive)."""
        return self._read(lambda: self.store.run_info(self.run_id))

    def status(self) -> RunStatus:
        """The run's status now; ``RunNotFound`` when it expired."""
        return self.info().status

    def history(self) -> list[Version]:
        """Every sealed version, oldest first, digests checked (``IntegrityError`` for
        one that does not match its payload)."""
        return self._read(lambda: self.store.history(self.run_id))

    def lineage(self, version: int | None = None) -> list[Version]:
        """The versions ``version`` (default: the latest) was made from, newest first;
        ``VersionNotFound`` when the run has no such version."""
        head = self.info().head if version is None else version
        return self._read(lambda: self.store.lineage(self.run_id, head))

    def result(self) -> RunResult:
        """How the run stands now, without waiting: a live run's result has its live
        status and no output yet."""
        return self._result_of(self.info())

    def _read(self, read: Callable[[], T]) -> T:
        """What ``read`` reads of the run, from the archive when Redis no longer has it."""
        try:
            return read()
        except RunNotFound:
            if not self.pipeline.recall(self.run_id):
                raise
            return read()

    def _result_of(self, info: RunInfo) -> RunResult:
        output = None
        if (v := info.output_version) is not None:
            output = self._read(lambda: self.store.get(self.run_id, v)).payload
        return RunResult(
            status=info.status,
            output=output,
            version=info.output_version if info.output_version is not None else info.head,
            run_id=self.run_id,
            error=info.error,
            degraded=info.degraded,
        )

    def wait(self, timeout: float = DEFAULT_WAIT_TIMEOUT_S) -> RunResult:
        """Block until the run reaches a final status; ``WaitTimeout`` after ``timeout`` s.

        Waits on the run's log stream (XREAD BLOCK), so it wakes as soon as
        something happens instead of polling.
        """
        deadline = time.monotonic() + timeout
        last = "0-0"
        info = self.info()
        while not info.status.is_final:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                raise WaitTimeout(
                    f"run {self.run_id} is still {info.status.value} after {timeout:g}s "
                    f"(head version {info.head})"
                )
            last, happened = self.store.wait_events(self.run_id, last,
                                                    min(remaining_ms, WAIT_BLOCK_MS))
            # Only the entry a run ends with changes the answer: steps starting and
            # sealing do not need the run's record read again.
            if not happened or any(e in FINAL_EVENTS for e in happened):
                info = self.info()
        return self._result_of(info)  # the record read last: final, it changes no more

    def __repr__(self) -> str:
        return f"Run({self.run_id!r})"
