"""A step that undoes its own attempt: its output will never be sealed (the run stopped
while it ran, or the output broke its contract), yet its side effects happened."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from ..agent import Agent
from ..errors import StoreError
from ..keys import RunKeys
from ..saga import SELF_COMPENSATED, CompensationContext, dead_letter
from ..state import StateStore, Version, input_payload
from .trace import note

__all__ = ["compensate_self"]

log = logging.getLogger(__name__)


def compensate_self(agent: Agent, store: StateStore, run_id: str, step: str,
                    inputs: Sequence[Version], output: Any, attempt: int, *,
                    claim: bool = False) -> None:
    """Undo a step whose output will never be sealed, now, in this worker.

    With ``claim``, first take the step's compensation from the saga, which
    also owes it when its planner found the step in the log: whichever of the
    two claims it first (``HSETNX`` on ``c:<step>``) undoes it.
    """
    if agent.compensate is None:
        return
    if claim and not store.redis.hsetnx(RunKeys(run_id).saga, f"c:{step}", SELF_COMPENSATED):
        return  # the saga compensates it, or has

    data = store.redis.hget(RunKeys(run_id).undo, step)
    ctx = CompensationContext(
        run_id=run_id, step=step, agent=agent.name,
        input=input_payload(inputs, len(inputs) > 1),
        input_versions=tuple(v.version for v in inputs), output=output, version=None,
        data=json.loads(data) if data else None, attempt=attempt, redis=store.redis,
    )
    try:
        agent.compensate(ctx)
    except Exception as e:
        note(store, run_id, "step.self_compensation_failed", step=step, agent=agent.name,
             error=f"{type(e).__name__}: {e}"[:2000])
        try:
            dead_letter(store, run_id, step, agent.name, f"{type(e).__name__}: {e}")
        except StoreError:
            log.warning("run %s: could not dead-letter %s's self-compensation", run_id, step)
        return
    note(store, run_id, "step.self_compensated", step=step, agent=agent.name)
