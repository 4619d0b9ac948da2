"""What beat has a worker do every ``PIPELINE_SWEEP_INTERVAL_S``: the sweep, then, when
``PIPELINE_ARCHIVE_URI`` is set, a pass of the archiver (by the sweeper that got the sweep's
lock; the archiver has a lock of its own besides)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from . import sweeper
from .settings import Settings
from .state import StateStore

__all__ = ["ARCHIVE_PASS_S", "sweep_and_archive"]

log = logging.getLogger(__name__)

ARCHIVE_PASS_S = 45.0
"""An archive pass starts no batch after this long: the sweep task's time limit is 120 s."""


def sweep_and_archive(app: Celery, store: StateStore, settings: Settings) -> dict[str, Any]:
    """One sweep, then one archive pass; what each did."""
    report = sweeper.sweep(app, store)
    if report.redelivered or report.enqueued or report.nudged or report.redriven \
            or report.stuck:
        log.warning("sweep: %s", report.summary())
    done = report.to_dict()
    if settings.archive_uri and not report.busy:
        # the archive extra, loaded only here: in a pool's child, never before a fork
        from .archive.archiver import Archiver

        archived = Archiver.from_settings(store, settings, max_s=ARCHIVE_PASS_S).run_once()
        if archived.error or archived.refused or archived.expired:
            log.warning("archive: %s", archived.summary())
        done["archive"] = archived.to_dict()
    return done
