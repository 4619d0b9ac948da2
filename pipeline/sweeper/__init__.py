"""The sweeper: no run stays stuck (a Celery beat task, and ``pipeline sweep``).

Celery alone loses time, never work, when a whole worker dies: its unacked messages wait
in the broker for the visibility timeout (an hour by default) before anyone runs them
again, and a message lost between the broker's pop and its unacked record is never run
at all. Each pass of ``sweep`` runs four parts, one after the other:

1. **Messages whose worker died** (``redeliver``): every unacked pipeline message that no
   live worker has marked held for the lease is handed out again, the way kombu's own
   restore does it.
2. **Runs created and never enqueued** (``runs``): the client died in between; past the
   lease, their canvas is sent now.
3. **Sagas that stopped moving** (``runs``): their planner is sent again; it plans once
   and dispatches only compensations nobody has claimed.
4. **Runs that stopped moving with no message left** (``stalled``): re-driven from their
   last sealed versions, and compensated when re-driving did not help.

RabbitMQ hands a dead consumer's messages out again when its connection drops, so parts
1 and 4 are for a Redis broker only. One sweeper runs at a time across the fleet: a pass
that finds the lock held does nothing and says so (``SweepReport.busy``). What each kind
of flow does, from its recorded route alone, is in ``flows``; the report in ``common``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery

from ..keys import SWEEP_LOCK
from ..names import SWEEP_TASK
from ..state import StateStore, translate_errors
from .common import BATCH as BATCH
from .common import MAX_REDRIVES as MAX_REDRIVES
from .common import Redelivered, SweepReport
from .redeliver import redeliver_silent
from .runs import enqueue_forgotten, nudge_sagas
from .stalled import SCAN_LIMIT as SCAN_LIMIT
from .stalled import redrive_stalled

__all__ = ["SWEEP_TASK", "Redelivered", "SweepReport", "sweep"]

log = logging.getLogger(__name__)

_Part = Callable[[Celery, StateStore, float, SweepReport], None]


def sweep(app: Celery, store: StateStore, *, lease_s: float | None = None) -> SweepReport:
    """One pass of all four parts; one sweeper at a time across the fleet."""
    lease_s = store.lease_s if lease_s is None else lease_s
    report = SweepReport()
    lock = store.redis.lock(SWEEP_LOCK, timeout=lock_ttl_s(lease_s), blocking=False)
    with translate_errors(store.url):
        if not lock.acquire(token=uuid.uuid4().hex):
            report.busy = True
            return report
    redis_broker = app.pipeline_settings.broker_is_redis
    parts: list[_Part] = [*([redeliver_silent] if redis_broker else []), enqueue_forgotten,
                          nudge_sagas, *([redrive_stalled] if redis_broker else [])]
    try:
        for part in parts:
            part(app, store, lease_s, report)
            _renew(lock)
    finally:
        try:
            lock.release()
        except Exception:  # noqa: BLE001 - it expires by itself
            log.warning("the sweep lock could not be released; it expires by itself")
    return report


def lock_ttl_s(lease_s: float) -> float:
    """How long the sweep lock lives unless renewed (after each part of a pass).

    Short, because the sweeper may be killed with its worker (beat's sweep runs on
    whichever worker serves the ``pipeline`` queue): a lock that outlived a dead sweeper
    by minutes stopped every recovery for that long. Two sweeps that do overlap, after
    a part ran longer than this, do no harm: a message is handed out again by one
    transaction (the second finds it gone), and every step and delivery runs once.
    """
    return max(5.0, min(float(lease_s), 30.0))


def _renew(lock: Any) -> None:
    try:
        lock.reacquire()
    except Exception:  # noqa: BLE001 - it expired meanwhile: the pass goes on regardless
        log.warning("the sweep lock expired during a pass; another sweeper may overlap it")
