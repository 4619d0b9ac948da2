"""The URLs the pipeline is given: which kind of server each names (Redis, a Redis
Cluster, RabbitMQ), the TLS options they imply, and how they are shown with every
password hidden (``redact_url``: in logs, errors and ``repr``)."""

from __future__ import annotations

import re
import ssl
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigurationError

__all__ = ["AMQP_FORMS", "AMQP_SCHEMES", "CLUSTER_FORMS", "CLUSTER_SCHEMES", "REDIS_FORMS",
           "REDIS_SCHEMES", "check_userinfo",
           "cluster_node_url", "is_cluster_url", "redact_url", "scheme_of", "tls_options"]

REDIS_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
"""PIPELINE_REDIS_URL only: a Redis Cluster, reached through any one of its nodes."""
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
"""CELERY_BROKER_URL only: RabbitMQ."""

REDIS_FORMS = "redis://host:port/db (rediss:// for TLS, unix:// for a socket)"
CLUSTER_FORMS = "redis+cluster://host:port for a Redis Cluster (rediss+cluster:// for TLS)"
AMQP_FORMS = "amqp://user:password@host:5672/vhost for RabbitMQ (amqps:// for TLS)"


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return scheme_of(url) in CLUSTER_SCHEMES


def cluster_node_url(url: str) -> str:
    """The ``redis://`` (or ``rediss://``) URL of the node a cluster URL names."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.removesuffix("+cluster"), parts.netloc, parts.path,
                       parts.query, parts.fragment))


def tls_options(url: str) -> dict[str, object] | None:
    """Celery's TLS options (``broker_use_ssl``, ``redis_backend_use_ssl``) for a Redis URL.

    A ``rediss://`` URL verifies the server's certificate, as redis-py does for the
    state: against ``ssl_ca_certs`` when the URL names it, else the system's CAs.
    Left alone, kombu would not verify at all and Celery's result backend would refuse
    the URL. ``ssl_*`` parameters in the URL take precedence (``ssl_cert_reqs=none``
    turns verification off, knowingly).
    """
    if scheme_of(url) != "rediss":
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def scheme_of(url: str) -> str:
    return urlsplit(url).scheme.lower()


def _after_host(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + parts.query + parts.fragment


def check_userinfo(name: str, url: str) -> None:
    """An ``@`` after the host means a password whose ``/``, ``?`` or ``#`` was not
    percent-encoded: the URL would be read with part of the password as its host or
    path, and drivers' errors would show it."""
    if "@" in _after_host(url):
        raise ConfigurationError(
            f"{name} has an '@' after its host: percent-encode the password's '/', '?', '#' "
            "and '@' (urllib.parse.quote(password, safe='')), or use %40 for an '@' in a "
            "query parameter"
        )


SECRET_QUERY_KEYS = frozenset({"password", "pass", "passwd", "secret", "token", "auth"})
_HOST = re.compile(r"(?:[\w.-]+|\[[0-9A-Fa-f:.]+\])(?::\d+)?")
SECRET_QUERY_SUFFIXES = ("password", "passwd", "secret", "token")
"""And any key ending so (``ssl_password``)."""


def _secret_key(key: str) -> bool:
    key = key.lower()
    return key in SECRET_QUERY_KEYS or key.endswith(SECRET_QUERY_SUFFIXES)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (in the user part, and in query
    parameters such as ``?password=``), safe for logs and errors.

    Fails closed: an ``@`` after the host (a password whose ``/``, ``?`` or ``#`` was
    not percent-encoded) hides everything before the last ``@``.
    """
    try:
        parts = urlsplit(url)
        if "@" in _after_host(url):
            tail = redact_url(f"{parts.scheme}://{url.rpartition('@')[2]}")
            if not _HOST.fullmatch(urlsplit(tail).netloc):
                return "<unparseable URL>"
            return tail.replace("://", "://***@", 1)
        password = parts.password
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:  # a port that is not a number, say: show nothing of it
        return "<unparseable URL>"
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:***@{host}"
    query = "&".join(
        f"{k}=***" if _secret_key(k) else (f"{k}={v}" if v or "=" in item else k)
        for item in parts.query.split("&") if item
        for k, _, v in [item.partition("=")]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
