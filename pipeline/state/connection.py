"""Connecting to the state's Redis, and what its errors become: ``StoreUnavailable``
(unreachable: worth retrying) or ``StoreError`` (the server refused the command)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from ..errors import StoreUnavailable, TransientStoreError
from ..lua import Client
from ..urls import cluster_node_url, is_cluster_url, redact_url

__all__ = ["CLIENT_OPTIONS", "connect", "translate_errors", "url_of"]


CLIENT_OPTIONS: dict[str, Any] = {
    "decode_responses": True,
    "socket_connect_timeout": 5,
    "socket_timeout": 30,
    "health_check_interval": 30,
}
"""Timeouts a worker can live with (an XREAD BLOCK stays well under the socket timeout)."""


def connect(url: str) -> Client:
    """A client for the pipeline's state: a ``RedisCluster`` for ``redis+cluster://``.

    A plain Redis client connects on first use; a cluster client asks the node
    the URL names for the cluster's slot table at once, so an unreachable
    cluster raises ``StoreUnavailable`` here.
    """
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **CLIENT_OPTIONS)
    with translate_errors(url):
        return RedisCluster.from_url(cluster_node_url(url), **CLIENT_OPTIONS)


@contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Turn redis-py connection errors into ``StoreUnavailable`` naming the URL."""
    try:
        yield
    except redis.AuthenticationError as e:
        raise StoreUnavailable(f"Redis at {redact_url(url)} refused the credentials: {e}") from e
    except (redis.ConnectionError, redis.TimeoutError, RedisClusterException) as e:
        raise StoreUnavailable(
            f"cannot reach Redis at {redact_url(url)}: {e}; is it running, and is "
            "PIPELINE_REDIS_URL right?"
        ) from e
    except redis.RedisError as e:  # read-only replica, OOM, MISCONF, NOPERM...
        if isinstance(e, redis.exceptions.ClusterDownError):  # a failover under way
            raise StoreUnavailable(f"Redis Cluster at {redact_url(url)} is down: {e}") from e
        raise TransientStoreError(f"Redis at {redact_url(url)} refused the command: {e}") from e


def url_of(client: Client) -> str:
    """Where ``client`` points, for error messages (no credentials in it)."""
    if isinstance(client, RedisCluster):
        node = client.get_default_node()  # type: ignore[no-untyped-call]
        return f"redis+cluster://{node.host}:{node.port}"
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    scheme = "rediss" if kw.get("ssl") or "ssl_cert_reqs" in kw else "redis"
    return f"{scheme}://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
