"""What the state's scripts answer, parsed: a run created, a step opened, a step sealed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .version import Version

__all__ = ["Created", "Opening", "OpeningOutcome", "Sealing", "SealingOutcome"]


class OpeningOutcome(StrEnum):
    """What opening a step found (``open_step.lua``)."""

    OPEN = "open"
    """Run it: its inputs are read."""
    SEALED = "sealed"
    """Sealed already (a redelivery): its version, nothing to do."""
    MISSING = "missing"
    """The run is gone (expired, or never was)."""
    ABORTED = "aborted"
    """The run is no longer live (failing, compensating, finished)."""
    EXHAUSTED = "exhausted"
    """Delivered more times than allowed: a crash loop."""
    NOVERSION = "noversion"
    """An input version does not exist."""
    DUPLICATE = "duplicate"
    """An event delivery another task holds, or that ended."""
    UNKNOWN = "unknown"
    """An event delivery that was never published."""
    OVER_BUDGET = "over_budget"
    """Its estimate would cross the run's budget (``over_budget``: kind, budget, spent,
    reserved, estimate): not run."""


class SealingOutcome(StrEnum):
    """What sealing a step did (``seal.lua``)."""

    NEW = "new"
    SEALED = "sealed"
    """Sealed before, by this step key: its version, nothing written."""
    MISSING = "missing"
    ABORTED = "aborted"
    """The run is no longer live: nothing sealed."""


@dataclass(frozen=True, slots=True)
class Created:
    run_id: str
    created: bool
    workflow: str
    input_digest: str
    enqueued: bool = False
    age_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Opening:
    """What opening a step found: its outcome, and what goes with it."""

    outcome: OpeningOutcome
    inputs: tuple[Version, ...] = ()
    sealed_version: int | None = None
    handover: bool = False  # sealed, and its handover (choreography) may not have happened
    status: str | None = None
    deliveries: int = 0
    opened_at: float = 0.0
    missing_version: int | None = None
    extra: tuple[Any, ...] = ()
    over_budget: tuple[str, ...] = ()

    @classmethod
    def from_reply(cls, run_id: str, reply: Sequence[Any], extra: tuple[Any, ...]) -> Opening:
        """Parse ``open_step.lua``'s reply (``extra``: what the hooks queued behind it)."""
        outcome = OpeningOutcome(reply[0])
        if outcome is OpeningOutcome.OPEN:
            inputs = tuple(Version.from_entry(run_id, _pairs(f)) for f in reply[3:])
            return cls(outcome, inputs=inputs, deliveries=int(reply[1]),
                       opened_at=int(reply[2]) / 1000.0, extra=extra)
        if outcome is OpeningOutcome.SEALED:
            return cls(outcome, sealed_version=int(reply[1]), handover=reply[2] == "1",
                       extra=extra)
        if outcome in (OpeningOutcome.DUPLICATE, OpeningOutcome.ABORTED):
            return cls(outcome, status=reply[1], extra=extra)
        if outcome is OpeningOutcome.EXHAUSTED:
            return cls(outcome, deliveries=int(reply[1]), extra=extra)
        if outcome is OpeningOutcome.NOVERSION:
            return cls(outcome, missing_version=int(reply[1]), extra=extra)
        if outcome is OpeningOutcome.OVER_BUDGET:
            return cls(outcome, over_budget=tuple(reply[1:]), extra=extra)
        return cls(outcome, extra=extra)


@dataclass(frozen=True, slots=True)
class Sealing:
    """What sealing a step did: its outcome, and what goes with it."""

    outcome: SealingOutcome
    version: int | None = None
    status: str | None = None
    extra: tuple[Any, ...] = ()
    joined: tuple[int, ...] | None = ()
    """The versions of the stage this seal completed, in stage order, when it joined a
    chord (see ``StateStore.seal``); else empty; None for a chord member of a run that
    recorded no route (the seal could not tell: ``pipeline.state.rejoin`` can)."""

    @classmethod
    def from_reply(cls, reply: Sequence[Any], extra: tuple[Any, ...]) -> Sealing:
        """Parse ``seal.lua``'s reply (``extra``: what the hooks queued behind it)."""
        outcome = SealingOutcome(reply[0])
        if outcome is SealingOutcome.NEW:
            return cls(outcome, version=int(reply[1]), extra=extra, joined=versions(reply[3]))
        if outcome is SealingOutcome.SEALED:
            return cls(outcome, version=int(reply[1]), extra=extra)
        if outcome is SealingOutcome.ABORTED:
            return cls(outcome, status=reply[1], extra=extra)
        return cls(outcome, extra=extra)


def versions(joined: str) -> tuple[int, ...] | None:
    """Comma-separated version numbers (a join's, from a script) as ints; None for '?'."""
    if joined == "?":
        return None
    return tuple(int(v) for v in joined.split(",")) if joined else ()


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))
