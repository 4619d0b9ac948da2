"""Settings read from the environment (DESIGN section 11)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigurationError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
DEFAULT_RETENTION_S = 7 * 24 * 3600
DEFAULT_VISIBILITY_TIMEOUT_S = 3600
DEFAULT_AGENT_MODULES = ("tasks",)
DEFAULT_QUEUE = "pipeline"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str = DEFAULT_REDIS_URL
    result_backend: str = DEFAULT_REDIS_URL
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    retention_s: int = DEFAULT_RETENTION_S
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    agent_modules: tuple[str, ...] = DEFAULT_AGENT_MODULES
    chaos: str = ""
    default_queue: str = DEFAULT_QUEUE
    otel: bool = False
    """PIPELINE_OTEL=1: one OpenTelemetry span per step (the ``otel`` extra)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        redis_url = _redis_url(env, "PIPELINE_REDIS_URL", DEFAULT_REDIS_URL)
        modules = env.get("PIPELINE_AGENT_MODULES")
        return cls(
            redis_url=redis_url,
            broker_url=_redis_url(env, "CELERY_BROKER_URL", redis_url),
            result_backend=_redis_url(env, "CELERY_RESULT_BACKEND", redis_url),
            max_payload_bytes=_int(env, "PIPELINE_MAX_PAYLOAD_BYTES", DEFAULT_MAX_PAYLOAD_BYTES),
            retention_s=_int(env, "PIPELINE_RETENTION_S", DEFAULT_RETENTION_S),
            visibility_timeout_s=_int(
                env, "PIPELINE_VISIBILITY_TIMEOUT_S", DEFAULT_VISIBILITY_TIMEOUT_S
            ),
            agent_modules=(
                tuple(m.strip() for m in modules.split(",") if m.strip())
                if modules is not None
                else DEFAULT_AGENT_MODULES
            ),
            chaos=env.get("PIPELINE_CHAOS", ""),
            otel=env.get("PIPELINE_OTEL", "").strip().lower() in ("1", "true", "yes", "on"),
        )

    def with_redis(self, url: str) -> Settings:
        """The same settings with state, broker and results all on ``url``."""
        return replace(self, redis_url=url, broker_url=url, result_backend=url)


REDIS_SCHEMES = ("redis", "rediss", "unix")


def _redis_url(env: Mapping[str, str], name: str, default: str) -> str:
    url = env.get(name) or default
    if urlsplit(url).scheme not in REDIS_SCHEMES:
        raise ConfigurationError(
            f"{name}={redact_url(url)} is not a Redis URL; expected redis://host:port/db "
            "(rediss:// for TLS, unix:// for a socket)"
        )
    return url


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not an integer") from None
    if value <= 0:
        raise ConfigurationError(f"{name}={raw!r} must be positive")
    return value


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
