"""Immutable, versioned run state in Redis streams."""

from .budget import Budget, Spending
from .connection import connect, translate_errors
from .joins import rejoin
from .replies import Created, Opening, OpeningOutcome, Sealing, SealingOutcome
from .store import StateStore
from .version import (
    RunInfo,
    RunStatus,
    Version,
    canonical_json,
    digest_of,
    input_digest,
    input_payload,
)

__all__ = [
    "Budget",
    "Created",
    "Opening",
    "OpeningOutcome",
    "RunInfo",
    "RunStatus",
    "Sealing",
    "SealingOutcome",
    "Spending",
    "StateStore",
    "Version",
    "canonical_json",
    "connect",
    "digest_of",
    "input_digest",
    "input_payload",
    "rejoin",
    "translate_errors",
]
