"""The deployment's Celery app: ``celery -A config worker`` / ``celery -A config flower``."""

from .celery import app, settings

__all__ = ["app", "settings"]
