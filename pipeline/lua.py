"""Lua scripts shipped as package data, called with EVALSHA.

Written by hand rather than with redis-py's ``register_script`` because a
redis-py pipeline that holds ``Script`` objects sends ``SCRIPT EXISTS`` before
every execute: one extra round trip on the step's hot path. Here the SHA is
computed locally, and a script is loaded only when Redis answers NOSCRIPT
(after a restart or ``SCRIPT FLUSH``); only that script is sent again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
from redis.exceptions import NoScriptError

Arg = str | int | float | bytes


class Script:
    """One Lua file and its SHA1."""

    def __init__(self, package: str, filename: str) -> None:
        self.name = filename
        self.source = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()

    def __call__(self, client: redis.Redis, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)


class Batch:
    """Several script calls (and plain commands) sent in one round trip.

    ``execute`` returns one result per queued call, in order. Errors come back
    as exception objects in the list, as with ``raise_on_error=False``; a
    NOSCRIPT error is repaired by loading that script and calling it again.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.pipe = client.pipeline(transaction=False)
        self._calls: list[tuple[Script, Sequence[str], Sequence[Arg]] | None] = []

    def script(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> int:
        self.pipe.evalsha(script.sha, len(keys), *keys, *args)
        self._calls.append((script, keys, args))
        return len(self._calls) - 1

    def command(self, *args: Arg) -> int:
        self.pipe.execute_command(*args)  # type: ignore[no-untyped-call]
        self._calls.append(None)
        return len(self._calls) - 1

    def execute(self) -> list[Any]:
        results = self.pipe.execute(raise_on_error=False)
        for i, (call, result) in enumerate(zip(self._calls, results, strict=True)):
            if call is not None and isinstance(result, NoScriptError):
                script, keys, args = call
                results[i] = script(self.client, keys, args)
        return list(results)
