"""The worker's heartbeat: every message a live worker holds is marked held in Redis.

A worker's main process knows every task message it holds (``celery.worker.state.
requests``: waiting for an ETA, reserved, running). Every third of the lease
(``PIPELINE_LEASE_S``, 60 s) one thread in that process marks them held until
now + the lease (``pipeline:held``, one round trip whatever their number). When
the whole worker dies the marks run out, and the sweeper (``sweeper.py``) hands
out again any of its messages still unacked in the broker: recovery is bounded by
the lease, not by the broker's visibility timeout (an hour by default).

Liveness is the worker's, not the step's: a retry waiting for its countdown, a
message prefetched behind a busy pool and a step running for an hour are all
held while their worker lives. A step that hangs keeps being held (its worker is
alive); its time limit ends it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down
from celery.worker import state  # the worker's own bookkeeping, in this process

from .errors import StoreError
from .state import StateStore

__all__ = ["WorkerHeartbeat"]

log = logging.getLogger(__name__)

RENEW_FRACTION = 3
"""Marks are renewed every third of the lease: two beats may fail before any runs out."""


class WorkerHeartbeat:
    """Marks the messages this worker holds as held, until stopped (one daemon thread)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> WorkerHeartbeat:
        self._thread = threading.Thread(target=self._run, name="pipeline-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def beat(self) -> int:
        """Mark every message this worker holds now; how many."""
        held = [task_id for task_id in list(state.requests) if task_id]
        if held:
            self.store.hold(held)
        return len(held)

    def _run(self) -> None:
        every = self.store.lease_s / RENEW_FRACTION
        while not self._stop.is_set():
            try:
                self.beat()
            except StoreError as e:  # the next beat tries again; the lease has slack
                log.warning("heartbeat: could not mark this worker's messages held: %s", e)
            except Exception:  # noqa: BLE001 - never let the thread die silently
                log.exception("heartbeat: unexpected error")
            self._stop.wait(every)


def install(app: Celery, store_of: Callable[[Celery], StateStore]) -> None:
    """Start the heartbeat when a worker of ``app`` is ready (in its main process), stop it
    when the worker shuts down. ``store_of`` gives the app's store (``app.store_for``)."""
    running: list[WorkerHeartbeat] = []

    def started(sender: object = None, **_: object) -> None:
        if getattr(sender, "app", app) is not app or running:
            return
        running.append(WorkerHeartbeat(store_of(app)).start())

    def stopping(**_: object) -> None:
        while running:
            running.pop().stop()

    worker_ready.connect(started, weak=False)
    worker_shutting_down.connect(stopping, weak=False)
