"""The sealed version and the run's record."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..contracts import printable
from ..errors import ContractViolation, IntegrityError, PayloadTooLarge
from .budget import Spending

INPUT_STEP = "input"


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    CANCELLED = "cancelled"
    """Cancelled by hand, and everything it had sealed compensated."""
    WAITING_FOR_HUMAN = "waiting_for_human"

    @property
    def is_live(self) -> bool:
        """Steps may still open and seal."""
        return self in (RunStatus.RUNNING, RunStatus.WAITING_FOR_HUMAN)

    @property
    def is_final(self) -> bool:
        return self not in (RunStatus.RUNNING, RunStatus.COMPENSATING,
                            RunStatus.WAITING_FOR_HUMAN)


MAX_DEPTH = 100
"""The deepest nesting of arrays and objects a sealed payload may have.

Python's JSON parser gives up at a depth that depends on how deep its caller's
stack already is: a payload that one process encodes could fail to load in a
worker. A fixed limit, far below that, refuses such payloads before they reach
Redis, the same everywhere.
"""


def _encode(payload: Any, where: str = "") -> tuple[str, bytes]:
    """Canonical JSON text of a payload and its UTF-8 bytes, each made once."""
    prefix = f"{where}: " if where else ""
    try:
        text = json.dumps(
            payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text, text.encode("utf-8")
    except RecursionError:
        raise _too_deep(payload, prefix) from None
    except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
        raise ContractViolation(
            f"{prefix}payload is not JSON: {e}", errors={"<payload>": [f"not JSON: {e}"]}
        ) from None


def _deep_path(value: Any, depth: int = 1) -> list[Any] | None:
    """The path to the first array or object nested deeper than ``MAX_DEPTH``, if any.

    Recurses at most ``MAX_DEPTH`` + 1 levels, however deep ``value`` is.
    """
    if not isinstance(value, dict | list | tuple):
        return None
    if depth > MAX_DEPTH:
        return []
    children = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in children:
        found = _deep_path(child, depth + 1)
        if found is not None:
            return [key, *found]
    return None


def _too_deep(payload: Any, prefix: str) -> ContractViolation:
    path = _deep_path(payload) or []  # [] if the depth is in something that is not JSON
    shown = ".".join(printable(str(p)) for p in path[:8]) + ("..." if len(path) > 8 else "")
    field = printable(str(path[0])) if path else "<root>"
    return ContractViolation(
        f"{prefix}payload is nested more than {MAX_DEPTH} levels deep"
        + (f" (at {shown})" if shown else "")
        + "; flatten it, or store it elsewhere and seal a reference to it",
        errors={field: [f"nested more than {MAX_DEPTH} levels deep"]},
    )


def canonical_json(payload: Any) -> str:
    """The one JSON text of a payload that its digest is taken over.

    Raises ``ContractViolation`` when the payload is not JSON (a set, a NaN,
    a lone surrogate that UTF-8 cannot carry, nesting Python cannot walk).
    """
    return _encode(payload)[0]


def digest_of(canonical: str) -> str:
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Sealable:
    """A payload ready to seal: its canonical text and digest, serialized and hashed once."""

    text: str
    digest: str


def sealable(payload: Any, limit: int, where: str) -> Sealable:
    """Check that ``payload`` is JSON, within ``limit`` bytes and ``MAX_DEPTH`` levels.

    ``PayloadTooLarge`` when it is too big; ``ContractViolation`` when it is not
    JSON or nested too deeply. Each message starts with ``where``.
    """
    text, data = _encode(payload, where)
    if len(data) > limit:
        raise PayloadTooLarge(
            f"{where}: payload is {len(data):,} bytes of canonical JSON, over the limit of "
            f"{limit:,} bytes (PIPELINE_MAX_PAYLOAD_BYTES); store large data elsewhere and "
            "seal a reference to it"
        )
    # Nesting is never deeper than the number of brackets: most payloads stop here.
    if text.count("[") + text.count("{") > MAX_DEPTH and _deep_path(payload) is not None:
        raise _too_deep(payload, f"{where}: ")
    return Sealable(text, hashlib.sha256(data).hexdigest())


def made_by(agent: str | None) -> str:
    """Who made a version, in an error's words: ``agent credit_score``, or ``the run's
    input`` for version 0, which no agent made (its ``agent`` is empty)."""
    return f"agent {agent}" if agent else "the run's input"


@dataclass(frozen=True, slots=True)
class Version:
    """One sealed version of a run's state. Never changed once sealed."""

    run_id: str
    version: int
    parents: tuple[int, ...]
    agent: str
    contract: str
    payload: Any
    digest: str
    created_at: float
    step: str
    degraded: bool = False

    @classmethod
    def from_entry(cls, run_id: str, fields: dict[str, str]) -> Version:
        """Build from a stream entry, checking its digest first."""
        version = int(fields["version"])
        raw = fields["payload"]
        digest = digest_of(raw)
        if digest != fields["digest"]:
            raise IntegrityError(
                f"run {run_id} version {version} ({made_by(fields.get('agent'))}): "
                f"digest mismatch: sealed {fields['digest'][:12]}…, payload hashes to "
                f"{digest[:12]}…; the entry was changed outside the pipeline and cannot be trusted"
            )
        return cls(
            run_id=run_id,
            version=version,
            parents=tuple(json.loads(fields["parents"])),
            agent=fields["agent"],
            contract=fields["contract"],
            payload=json.loads(raw),
            digest=digest,
            created_at=int(fields["created_at"]) / 1000.0,
            step=fields["step"],
            degraded=fields.get("degraded") == "1",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "version": self.version,
            "parents": list(self.parents),
            "agent": self.agent,
            "contract": self.contract,
            "payload": self.payload,
            "digest": self.digest,
            "created_at": self.created_at,
            "step": self.step,
            "degraded": self.degraded,
        }


@dataclass(frozen=True, slots=True)
class RunInfo:
    """The run's record: a projection of its log kept for quick reads."""

    run_id: str
    workflow: str
    status: RunStatus
    head: int
    created_at: float
    updated_at: float
    finished_at: float | None
    output_version: int | None
    error: str | None
    failed_agent: str | None
    input_contract: str
    idempotency_key: str | None
    degraded: bool = False
    parked_steps: tuple[str, ...] = ()
    replay_of: str = ""
    """``<run>@<version>``: this run was replayed from that sealed version."""
    replays: tuple[str, ...] = ()
    """Runs replayed from this one."""
    replay_start: str = ""
    """Where a replay started: a workflow's stage index, or a choreography's event type."""
    route: str = ""
    """The run's route as JSON (``pipeline.route.Route``), '' for a run from before routes."""
    throttled_ms: int = 0
    """How long its steps waited for their limits, in all (every ``step.throttled``)."""
    spending: Spending | None = None
    """Its budget and what its steps spent and reserved of it; None without a budget."""

    @property
    def parked_step(self) -> str | None:
        """The first step parked for a person (see ``parked_steps`` for all)."""
        return self.parked_steps[0] if self.parked_steps else None

    @classmethod
    def from_hash(cls, run_id: str, h: dict[str, str]) -> RunInfo:
        def ms(name: str) -> float | None:
            return int(h[name]) / 1000.0 if h.get(name) else None

        return cls(
            run_id=run_id,
            workflow=h["workflow"],
            status=RunStatus(h["status"]),
            head=int(h["head"]),
            created_at=ms("created_at") or 0.0,
            updated_at=ms("updated_at") or 0.0,
            finished_at=ms("finished_at"),
            output_version=int(h["output_version"]) if h.get("output_version") else None,
            error=h.get("error") or None,
            failed_agent=h.get("failed_agent") or None,
            input_contract=h.get("input_contract", ""),
            idempotency_key=h.get("idempotency_key") or None,
            degraded=h.get("degraded") == "1",
            parked_steps=tuple(s for s in h.get("parked_steps", "").split(",") if s),
            replay_of=h.get("replay_of", ""),
            replays=tuple(sorted(k.removeprefix("replay:") for k in h if k.startswith("replay:"))),
            replay_start=h.get("replay_start", ""),
            route=h.get("route", ""),
            throttled_ms=int(h.get("throttled_ms") or 0),
            spending=Spending.from_hash(h),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "status": self.status.value,
            "head": self.head,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "output_version": self.output_version,
            "error": self.error,
            "failed_agent": self.failed_agent,
            "input_contract": self.input_contract,
            "idempotency_key": self.idempotency_key,
            "degraded": self.degraded,
            "parked_step": self.parked_step,
            "replay_of": self.replay_of or None,
            "replays": list(self.replays),
            "parked_steps": list(self.parked_steps),
            "throttled_ms": self.throttled_ms,
            "budget": self.spending.to_dict() if self.spending else None,
        }


def input_digest(inputs: Sequence[Version], fan_in: bool) -> str:
    """The digest of what a step is given (the ``cached`` fallback keys its outputs by it)."""
    if not fan_in:
        return inputs[0].digest
    return digest_of(canonical_json({v.agent: v.payload for v in inputs}))


def input_payload(inputs: Sequence[Version], fan_in: bool) -> Any:
    """What the agent is given: the upstream's payload, or a fan-in's mapping by agent."""
    if fan_in:
        return {v.agent: v.payload for v in inputs}
    return inputs[0].payload
