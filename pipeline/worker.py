"""The Celery app of the installed package: ``celery -A pipeline.worker worker``.

Run from your own project: it reads its settings from the environment
(``PIPELINE_REDIS_URL``, ``CELERY_BROKER_URL``, ...) and imports the modules that define
your agents, contracts and workflows from ``PIPELINE_AGENT_MODULES``, a comma-separated
list of module names (``support.agents,billing``), found from the working directory (as
``celery -A`` finds its app) or installed. ``-Q`` narrows a pool to some queues; ``pipeline
worker`` is the same with the pipeline's defaults, ``celery -A pipeline.worker beat`` runs
the sweeper's schedule and ``pipeline flower`` serves Flower with authentication.

Every setting is checked when this module is imported, before Celery starts: a value that
cannot be used (``PIPELINE_LEASE_S=0``, ``PIPELINE_CHAOS=sentimnt=eror:1``) stops the worker
with a ``ConfigurationError`` naming the variable, the value and what is accepted.
"""

from __future__ import annotations

import os
import sys

from .app import create_app
from .settings import Settings

__all__ = ["app", "settings"]

if os.getcwd() not in sys.path:  # agent modules are found from the working directory
    sys.path.insert(0, os.getcwd())

settings = Settings.from_env()
app = create_app(settings)
