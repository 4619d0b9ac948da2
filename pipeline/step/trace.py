"""What a step writes to its run's trace besides its seal: the fields of a failed or
retried call, and notes that never hide the failure they log."""

from __future__ import annotations

import logging

from ..context import StepContext
from ..errors import ContractViolation, StoreError
from ..state import StateStore

__all__ = ["ctx_fields", "failure_fields", "note"]

log = logging.getLogger(__name__)


def ctx_fields(ctx: StepContext | None) -> dict[str, str | int]:
    """For the step's trace entry: the token usage the agent reported (a failed call costs
    too) and the earlier versions it read (``read=0,2``)."""
    if ctx is None:
        return {}
    usage = ctx.notes.get("usage") or {}
    fields = {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "model") if k in usage}
    return {**fields, **(ctx.reads.trace_fields() if ctx.reads is not None else {})}


def failure_fields(agent: str, step: str, exc: BaseException,
                   attempt: int) -> dict[str, str | int | float]:
    """The trace fields of a failed call (a broken contract names itself and its fields)."""
    fields: dict[str, str | int | float] = {
        "step": step,
        "agent": agent,
        "attempt": attempt,
        "error_type": type(exc).__name__,
        "error": str(exc)[:2000],
    }
    if isinstance(exc, ContractViolation):
        fields["contract"] = exc.contract
        fields["side"] = exc.side
        fields["fields"] = ",".join(exc.field_paths)
    return fields


def note(store: StateStore, run_id: str, event: str, **fields: str | int | float) -> None:
    """Log to the run's trace; a failure to log never hides the failure being logged."""
    try:
        store.note(run_id, event, **fields)
    except StoreError as e:
        log.warning("run %s: could not log %s: %s", run_id, event, e)
