"""What undoing one step is given, and where an undo that failed for good goes: the
pieces both the saga and a step that undoes its own attempt use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from ..keys import DEAD_LETTERS, RunKeys
from ..state import StateStore, translate_errors

__all__ = ["DEAD_LETTERS_MAXLEN", "SELF_COMPENSATED", "CompensationContext", "dead_letter"]

DEAD_LETTERS_MAXLEN = 100_000
SELF_COMPENSATED = "self"
"""``c:<step>`` in the saga hash of a step that claimed its own compensation."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CompensationContext:
    """What an agent's ``compensate`` receives to undo its step.

    ``output`` is the sealed output (``version`` its number), or the output
    that broke the contract (``version`` None); ``data`` is what the agent
    recorded at execute time with ``ctx.remember``. Compensations must be
    idempotent: a worker killed mid-compensation runs it again.
    """

    run_id: str
    step: str
    agent: str
    input: Any
    input_versions: tuple[int, ...]
    output: Any
    version: int | None
    data: Any
    attempt: int
    redis: redis.Redis


def dead_letter(store: StateStore, run_id: str, step: str, agent: str, error: str) -> None:
    """Add a compensation that failed for good to ``pipeline:dead`` for a person."""
    with translate_errors(store.url):
        version = store.redis.hget(RunKeys(run_id).steps, step) or ""
        store.redis.xadd(DEAD_LETTERS, {"run_id": run_id, "step": step, "agent": agent,
                                        "version": version, "error": error[:2000]},
                         maxlen=DEAD_LETTERS_MAXLEN, approximate=True)
