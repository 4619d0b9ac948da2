"""Settings read from the environment.

Every setting is read strictly, once, when ``Settings.from_env`` builds them: a value that
cannot be used (not a number, out of range, a chaos spec with an unknown mode) is a
``ConfigurationError`` naming the variable, the value and what is accepted, every such
problem at once. A worker builds them before Celery starts (``pipeline.worker``), so it
refuses to start on a bad value instead of reporting ready and failing every run. A
``Settings`` built in code is checked the same way when it is constructed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import urlsplit

from . import chaos
from .errors import ConfigurationError
from .urls import (
    AMQP_FORMS,
    AMQP_SCHEMES,
    CLUSTER_FORMS,
    CLUSTER_SCHEMES,
    REDIS_FORMS,
    REDIS_SCHEMES,
    check_userinfo,
    is_cluster_url,
    redact_url,
    scheme_of,
)

__all__ = ["DEFAULT_AGENT_MODULES", "DEFAULT_LEASE_S", "DEFAULT_MAX_PAYLOAD_BYTES",
           "DEFAULT_QUEUE", "DEFAULT_REDIS_URL", "DEFAULT_RETENTION_S",
           "DEFAULT_SWEEP_INTERVAL_S", "DEFAULT_VISIBILITY_TIMEOUT_S", "Settings",
           "redact_url"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
DEFAULT_RETENTION_S = 7 * 24 * 3600
DEFAULT_VISIBILITY_TIMEOUT_S = 3600
DEFAULT_LEASE_S = 60
DEFAULT_SWEEP_INTERVAL_S = 15
DEFAULT_ARCHIVED_RETENTION_S = 3600
DEFAULT_ARCHIVE_BATCH = 500
DEFAULT_AGENT_MODULES = ("tasks",)
DEFAULT_QUEUE = "pipeline"
MAX_SECONDS = 10 * 365 * 24 * 3600
"""No duration setting is meant to reach ten years: a larger value is a unit mistake (and
Redis refuses an expiry far enough out)."""
MAX_PAYLOAD_BYTES = 512 * 1024 * 1024
"""Redis's largest string (``proto-max-bulk-len``'s default)."""
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


@dataclass(frozen=True, slots=True)
class WholeNumber:
    """An integer setting: the variable it is read from, the field it fills, its range."""

    variable: str
    field: str
    default: int
    minimum: int
    maximum: int
    unit: str

    @property
    def accepted(self) -> str:
        return (f"expected a whole number of {self.unit} from {self.minimum} to "
                f"{self.maximum} (default {self.default})")

    def read(self, env: Mapping[str, str]) -> int:
        raw = env.get(self.variable)
        if raw is None or raw == "":
            return self.default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigurationError(
                f"{self.variable}={raw!r} is not a whole number; {self.accepted}") from None
        self.check(value, f"{self.variable}={raw!r}")
        return value

    def check(self, value: object, shown: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(f"{shown} is not a whole number; {self.accepted}")
        if not self.minimum <= value <= self.maximum:
            raise ConfigurationError(f"{shown} is out of range; {self.accepted}")


WHOLE_NUMBERS = (
    WholeNumber("PIPELINE_MAX_PAYLOAD_BYTES", "max_payload_bytes", DEFAULT_MAX_PAYLOAD_BYTES,
                1, MAX_PAYLOAD_BYTES, "bytes"),
    WholeNumber("PIPELINE_RETENTION_S", "retention_s", DEFAULT_RETENTION_S, 1, MAX_SECONDS,
                "seconds"),
    WholeNumber("PIPELINE_VISIBILITY_TIMEOUT_S", "visibility_timeout_s",
                DEFAULT_VISIBILITY_TIMEOUT_S, 1, MAX_SECONDS, "seconds"),
    WholeNumber("PIPELINE_LEASE_S", "lease_s", DEFAULT_LEASE_S, 1, MAX_SECONDS, "seconds"),
    WholeNumber("PIPELINE_SWEEP_INTERVAL_S", "sweep_interval_s", DEFAULT_SWEEP_INTERVAL_S,
                1, MAX_SECONDS, "seconds"),
    WholeNumber("PIPELINE_ARCHIVED_RETENTION_S", "archived_retention_s",
                DEFAULT_ARCHIVED_RETENTION_S, 1, MAX_SECONDS, "seconds"),
    WholeNumber("PIPELINE_ARCHIVE_BATCH", "archive_batch", DEFAULT_ARCHIVE_BATCH, 1, 100_000,
                "runs"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    """State, logs, breakers: a Redis, or a Redis Cluster (``redis+cluster://host:port``)."""
    broker_url: str = DEFAULT_REDIS_URL
    """Celery's broker: a plain Redis or RabbitMQ (``amqp://``)."""
    result_backend: str = DEFAULT_REDIS_URL
    """Celery's results: a plain Redis (workflow chords count on it)."""
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    retention_s: int = DEFAULT_RETENTION_S
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    lease_s: int = DEFAULT_LEASE_S
    """How long a message stays held without its worker's heartbeat before the sweeper hands
    it out again (a worker killed whole): recovery is bounded by this, not by the
    visibility timeout."""
    sweep_interval_s: int = DEFAULT_SWEEP_INTERVAL_S
    """How often ``celery beat`` runs the sweeper."""
    agent_modules: tuple[str, ...] = DEFAULT_AGENT_MODULES
    chaos: str = ""
    default_queue: str = DEFAULT_QUEUE
    otel: bool = False
    """PIPELINE_OTEL=1: one OpenTelemetry span per step (the ``otel`` extra)."""
    data_dir: str = ""
    """PIPELINE_DATA_DIR: where the pipeline's processes keep files (beat's schedule);
    default ``$XDG_DATA_HOME/celery-agent-pipeline`` (``~/.local/share/...``), never the
    working directory."""

    archive_uri: str = ""
    """PIPELINE_ARCHIVE_URI: the root of the archive's Delta tables (a path, ``file://``,
    ``s3://``...; the ``archive`` extra); '' (the default) archives nothing."""
    archived_retention_s: int = DEFAULT_ARCHIVED_RETENTION_S
    """How long an archived run stays in Redis after its batch committed (and a run read
    back from the archive, after it was read)."""
    archive_batch: int = DEFAULT_ARCHIVE_BATCH
    """Runs per batch: one commit per table."""

    def __repr__(self) -> str:
        """Every field, the URLs with their secrets redacted: settings end up in logs."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in URL_FIELDS:
            shown[name] = redact_url(shown[name])
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __post_init__(self) -> None:
        """Refuse values no process could run with, however the settings were built."""
        for number in WHOLE_NUMBERS:
            value = getattr(self, number.field)
            number.check(value, f"{number.field}={value!r} ({number.variable})")
        chaos.parse(self.chaos)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings the environment gives; ``ConfigurationError`` naming every variable
        whose value cannot be used, with the value and what is accepted."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []

        def read(field: str, reader: Callable[..., Any], *args: Any) -> None:
            try:
                values[field] = reader(*args)
            except ConfigurationError as e:
                problems.append(str(e))

        read("redis_url", _state_url, env)
        if "redis_url" in values:  # the broker and results default to it
            read("broker_url", _broker_url, env, values["redis_url"])
        if "broker_url" in values:
            read("result_backend", _result_backend, env, values["redis_url"],
                 values["broker_url"])
        for number in WHOLE_NUMBERS:
            read(number.field, number.read, env)
        read("agent_modules", _agent_modules, env)
        read("chaos", _chaos, env)
        read("otel", _flag, env, "PIPELINE_OTEL")
        values["data_dir"] = env.get("PIPELINE_DATA_DIR") or _default_data_dir(env)
        values["archive_uri"] = env.get("PIPELINE_ARCHIVE_URI", "").strip()
        if len(problems) == 1:
            raise ConfigurationError(problems[0])
        if problems:
            raise ConfigurationError(f"{len(problems)} settings cannot be used:\n- "
                                     + "\n- ".join(problems))
        return cls(**values)

    @property
    def beat_schedule_path(self) -> str:
        """Where beat keeps its schedule: under the data directory."""
        return os.path.join(self.data_dir or _default_data_dir(os.environ),
                            "celerybeat-schedule")

    @property
    def broker_is_redis(self) -> bool:
        """Whether Celery's broker is a Redis (else RabbitMQ)."""
        return scheme_of(self.broker_url) in REDIS_SCHEMES

    def with_redis(self, url: str) -> Settings:
        """The same settings with state, broker and results all on ``url`` (a plain Redis)."""
        if is_cluster_url(url):
            raise ConfigurationError(
                f"{redact_url(url)} is a Redis Cluster: Celery's broker and result backend "
                "need a plain Redis; set broker_url and result_backend apart"
            )
        return replace(self, redis_url=url, broker_url=url, result_backend=url)


def _default_data_dir(env: Mapping[str, str]) -> str:
    base = env.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "celery-agent-pipeline")


URL_FIELDS = ("redis_url", "broker_url", "result_backend", "archive_uri")


def _state_url(env: Mapping[str, str]) -> str:
    name = "PIPELINE_REDIS_URL"
    url = env.get(name) or DEFAULT_REDIS_URL
    check_userinfo(name, url)
    scheme = scheme_of(url)
    if scheme in CLUSTER_SCHEMES:
        parts = urlsplit(url)
        if not parts.hostname or parts.path.strip("/") not in ("", "0"):
            raise ConfigurationError(
                f"{name}={redact_url(url)}: a cluster URL names one node, "
                "redis+cluster://[user:password@]host:port, and no database but 0"
            )
        return url
    if scheme not in REDIS_SCHEMES:
        raise ConfigurationError(
            f"{name}={redact_url(url)} is not a Redis URL; expected {REDIS_FORMS}, or "
            f"{CLUSTER_FORMS}"
        )
    return url


def _broker_url(env: Mapping[str, str], redis_url: str) -> str:
    name = "CELERY_BROKER_URL"
    url = env.get(name)
    if not url:
        if is_cluster_url(redis_url):
            raise ConfigurationError(
                f"PIPELINE_REDIS_URL={redact_url(redis_url)} is a Redis Cluster, which Celery "
                f"cannot use as its broker: set {name} to a plain Redis, {REDIS_FORMS}, or "
                f"to {AMQP_FORMS}"
            )
        _check_broker_password(redis_url, f"PIPELINE_REDIS_URL={redact_url(redis_url)} (the "
                                          f"broker too, {name} being unset)")
        return redis_url
    check_userinfo(name, url)
    scheme = scheme_of(url)
    if scheme in CLUSTER_SCHEMES:
        raise ConfigurationError(
            f"{name}={redact_url(url)}: Celery cannot use a Redis Cluster as its broker; "
            f"expected a plain Redis, {REDIS_FORMS}, or {AMQP_FORMS}"
        )
    if scheme not in REDIS_SCHEMES + AMQP_SCHEMES:
        raise ConfigurationError(
            f"{name}={redact_url(url)} is not a Redis or RabbitMQ URL; expected "
            f"{REDIS_FORMS}, or {AMQP_FORMS}"
        )
    _check_broker_password(url, f"{name}={redact_url(url)}")
    return url


def _check_broker_password(url: str, shown: str) -> None:
    """kombu cannot take a Redis password as ``?password=`` (it fails on the first send)."""
    query = urlsplit(url).query
    if scheme_of(url) in REDIS_SCHEMES and any(
            item.partition("=")[0].lower() == "password" for item in query.split("&")):
        raise ConfigurationError(
            f"{shown}: Celery's Redis broker cannot take ?password=; put the password in the "
            "URL's user part instead, redis://:password@host:port/db"
        )


def _result_backend(env: Mapping[str, str], redis_url: str, broker_url: str) -> str:
    """A plain Redis: chords count on it (RabbitMQ's ``rpc://`` has no chords)."""
    name = "CELERY_RESULT_BACKEND"
    url = env.get(name)
    if not url:
        if not is_cluster_url(redis_url):
            return redis_url
        if scheme_of(broker_url) in REDIS_SCHEMES:
            return broker_url
        raise ConfigurationError(
            f"PIPELINE_REDIS_URL={redact_url(redis_url)} is a Redis Cluster and the broker is "
            f"RabbitMQ: set {name} to a plain Redis, {REDIS_FORMS} (chords need it)"
        )
    check_userinfo(name, url)
    if scheme_of(url) not in REDIS_SCHEMES:
        raise ConfigurationError(
            f"{name}={redact_url(url)} is not a plain Redis URL; expected {REDIS_FORMS}. "
            "Results stay on a Redis whatever the broker (workflow chords count on it), and "
            "Celery cannot keep them on a Redis Cluster"
        )
    return url


def _agent_modules(env: Mapping[str, str]) -> tuple[str, ...]:
    name = "PIPELINE_AGENT_MODULES"
    raw = env.get(name)
    if raw is None:
        return DEFAULT_AGENT_MODULES
    modules = tuple(m.strip() for m in raw.split(",") if m.strip())
    for module in modules:
        if not all(part.isidentifier() for part in module.split(".")):
            raise ConfigurationError(
                f"{name}={raw!r}: {module!r} is not a module name; expected module names "
                "separated by commas, such as support.agents,billing (empty: no agents)"
            )
    return modules


def _chaos(env: Mapping[str, str]) -> str:
    spec = env.get(chaos.VARIABLE, "")
    chaos.parse(spec)  # a ConfigurationError naming the part it cannot read
    return spec


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "")
    word = raw.strip().lower()
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise ConfigurationError(
            f"{name}={raw!r} is neither on nor off; expected {', '.join(TRUE_WORDS)} (on) or "
            f"{', '.join(FALSE_WORDS[:-1])} or empty (off, the default)"
        )
    return word in TRUE_WORDS
