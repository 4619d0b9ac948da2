"""Settings from the environment and the Celery app built from them.

``celery -A config worker`` serves every agent queue (``agents.<name>``) and the
``pipeline`` queue; ``-Q agents.credit_score`` narrows a pool to one agent.
Environment: PIPELINE_REDIS_URL, CELERY_BROKER_URL, CELERY_RESULT_BACKEND,
PIPELINE_AGENT_MODULES (default ``tasks``), PIPELINE_CHAOS, PIPELINE_MAX_PAYLOAD_BYTES,
PIPELINE_RETENTION_S, PIPELINE_VISIBILITY_TIMEOUT_S.
"""

from __future__ import annotations

from pipeline.app import create_app
from pipeline.settings import Settings

settings = Settings.from_env()
app = create_app(settings, main="config")
