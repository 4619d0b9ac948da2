"""Lua scripts shipped as package data, called with EVALSHA.

Written by hand rather than with redis-py's ``register_script`` because a
redis-py pipeline that holds ``Script`` objects sends ``SCRIPT EXISTS`` before
every execute: one extra round trip on the step's hot path. Here the SHA is
computed locally, and a script is loaded only when Redis answers NOSCRIPT
(after a restart or ``SCRIPT FLUSH``); only that script is sent again.

On a Redis Cluster every script touches the keys of one slot (one hash tag),
and a batch may hold calls for several slots: each call goes to the node that
owns its first key, every node's share is written before any reply is read,
and a redirection (MOVED, ASK) is followed for that call alone. A script
missing on one node is loaded on every primary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
from redis.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException

from .errors import ConfigurationError, StoreUnavailable

Arg = str | int | float | bytes

Client = redis.Redis | RedisCluster
"""What the pipeline keeps its state on: a Redis, or a Redis Cluster."""


def decoding_client(client: object, owner: str) -> Client:
    """``client`` itself if it is a Redis or Redis Cluster client whose replies are ``str``
    (``decode_responses=True``, as ``pipeline.state.connect`` builds them); else a
    ``ConfigurationError`` that names ``owner`` and says what to pass.

    Read from the client's own settings: no round trip.
    """
    if isinstance(client, redis.client.Pipeline | ClusterPipeline) \
            or not isinstance(client, redis.Redis | RedisCluster):
        raise ConfigurationError(
            f"{owner} needs a Redis client, not a {type(client).__module__}."
            f"{type(client).__qualname__}: pass pipeline.state.connect(url)")
    kwargs = client.get_connection_kwargs()
    if not kwargs.get("decode_responses"):
        kind = "RedisCluster" if isinstance(client, RedisCluster) else "redis.Redis"
        raise ConfigurationError(
            f"{owner} needs a Redis client that decodes responses, and this {kind} returns "
            f"bytes: pass pipeline.state.connect(url), or {kind}(..., decode_responses=True)")
    return client


def route(client: Client, key: str) -> dict[str, Any]:
    """Keyword arguments that send a command about ``key`` straight to its node.

    Nothing for a plain Redis. On a cluster, the node that owns the key's slot
    in the client's slot table: without it, redis-py asks a server where an
    EVALSHA or an XREAD goes (``COMMAND GETKEYS``), a round trip per call.
    A MOVED or ASK reply is still followed.
    """
    if isinstance(client, RedisCluster):
        try:
            return {"target_nodes": client.get_node_from_key(key)}  # type: ignore[no-untyped-call]
        except RedisClusterException as e:  # no node serves the slot: a failover, say
            raise StoreUnavailable(f"no Redis Cluster node serves the slot of {key!r} "
                                   f"right now: {e}") from e
    return {}


class Script:
    """One Lua file and its SHA1; ``include`` names files whose functions it uses, put
    before it (Redis scripts cannot load one another): of the same package, or of another
    as ``package:file``."""

    def __init__(self, package: str, filename: str, *, include: Sequence[str] = ()) -> None:
        self.name = filename

        def read(name: str) -> str:
            where, _, file = name.rpartition(":")
            return resources.files(where or package).joinpath(file).read_text(encoding="utf-8")

        self.source = "".join(read(name) for name in (*include, filename))
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()

    def __call__(self, client: Client, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)  # on a cluster: on every primary
            return client.evalsha(self.sha, len(keys), *keys, *args)


def checked(reply: Any) -> Any:
    """One call's reply from ``Batch.execute``, or its error raised (errors come back as
    exception objects there)."""
    if isinstance(reply, Exception):
        raise reply
    return reply


class Batch:
    """Several script calls (and plain commands) sent in one round trip.

    ``execute`` returns one result per queued call, in order. Errors come back
    as exception objects in the list, as with ``raise_on_error=False``; a
    NOSCRIPT error is repaired by loading that script and calling it again.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.pipe = client.pipeline(transaction=False)
        self._calls: list[tuple[Script, Sequence[str], Sequence[Arg]] | None] = []

    def script(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> int:
        where = route(self.client, keys[0]) if keys else {}
        self.pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args, **where)
        self._calls.append((script, keys, args))
        return len(self._calls) - 1

    def command(self, *args: Arg) -> int:
        self.pipe.execute_command(*args)
        self._calls.append(None)
        return len(self._calls) - 1

    def execute(self) -> list[Any]:
        results = self.pipe.execute(raise_on_error=False)
        for i, (call, result) in enumerate(zip(self._calls, results, strict=True)):
            if call is not None and isinstance(result, NoScriptError):
                script, keys, args = call
                results[i] = script(self.client, keys, args)
        return list(results)
