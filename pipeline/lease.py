"""The worker's heartbeat: the leases of the steps this process runs stay alive while
they run.

A step's open round trip gives its task a lease on the step (``lease_s``, 60 s by
default); the seal removes it. A step that runs longer has its lease renewed here,
every third of the lease, by one daemon thread per process. When the whole worker
is killed, renewals stop, and the sweeper (``sweeper.py``) hands the step's
unacked message out again once the lease has run out: recovery is bounded by the
lease, not by the broker's visibility timeout (an hour by default).

A step that hangs keeps its lease (its process is alive); its time limit ends it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from .errors import StoreError
from .state import StateStore

__all__ = ["Heartbeat", "heartbeat"]

log = logging.getLogger(__name__)

RENEW_FRACTION = 3
"""A lease is renewed once a third of it has passed: two renewals may fail before it runs out."""


@dataclass(slots=True)
class _Held:
    store: StateStore
    task_id: str
    renewed_at: float


class Heartbeat:
    """Renews the leases of the steps held by this process (one thread, started on demand)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], _Held] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def hold(self, store: StateStore, run_id: str, step: str, task_id: str) -> None:
        """The step was opened by ``task_id`` here (its lease starts now)."""
        with self._lock:
            self._held[(run_id, step)] = _Held(store, task_id, time.monotonic())
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                self._start()

    def release(self, run_id: str, step: str) -> None:
        """The step sealed, failed, or stopped here: stop renewing it."""
        with self._lock:
            self._held.pop((run_id, step), None)

    def held(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._held)

    def _start(self) -> None:
        # After a fork (a prefork pool process) the parent's thread is not here.
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="pipeline-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _due(self) -> tuple[list[tuple[tuple[str, str], _Held]], float]:
        """The leases to renew now, and how long to sleep before looking again."""
        now = time.monotonic()
        with self._lock:
            if not self._held:
                return [], 1.0
            every = {k: h.store.lease_s / RENEW_FRACTION for k, h in self._held.items()}
            due = [(k, h) for k, h in self._held.items() if now - h.renewed_at >= every[k]]
            return due, max(0.05, min(every.values()) / 4)

    def _run(self) -> None:
        while True:
            due, pause = self._due()
            for (run_id, step), held in due:
                try:
                    still = held.store.renew_lease(run_id, step, held.task_id)
                except StoreError as e:  # try again at the next beat; the lease has slack
                    log.warning("run %s step %s: could not renew its lease: %s", run_id, step, e)
                    continue
                with self._lock:
                    if not still:  # sealed meanwhile, or another task holds it now
                        self._held.pop((run_id, step), None)
                    elif (run_id, step) in self._held:
                        self._held[(run_id, step)].renewed_at = time.monotonic()
            self._wake.wait(pause)


heartbeat = Heartbeat()
"""The process's heartbeat (the runner holds and releases every step it opens)."""
