"""The deployment's Celery app: the package's own (``pipeline.worker``), so that
``celery -A config worker`` and ``celery -A pipeline.worker worker`` are the same worker.

``celery -A config worker`` serves every agent queue (``agents.<name>``) and the
``pipeline`` queue; ``-Q agents.credit_score`` narrows a pool to one agent.
Environment: PIPELINE_REDIS_URL, CELERY_BROKER_URL, CELERY_RESULT_BACKEND,
PIPELINE_AGENT_MODULES (default ``tasks``), PIPELINE_CHAOS, PIPELINE_MAX_PAYLOAD_BYTES,
PIPELINE_RETENTION_S, PIPELINE_VISIBILITY_TIMEOUT_S.
"""

from __future__ import annotations

from pipeline.worker import app, settings

__all__ = ["app", "settings"]
