"""Beat's scheduler: Celery's persistent one, whose file lives under the data directory.

``celery -A pipeline.worker beat`` (or ``pipeline worker --beat``) keeps its schedule in
``PIPELINE_DATA_DIR`` (``Settings.beat_schedule_path``), not in the working directory where
Celery would leave ``celerybeat-schedule*`` files; the directory is made when beat starts.
"""

from __future__ import annotations

import os

from celery.beat import PersistentScheduler

__all__ = ["Scheduler"]


class Scheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler, its file's directory made first."""

    def setup_schedule(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.schedule_filename)), exist_ok=True)
        super().setup_schedule()
