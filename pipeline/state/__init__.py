"""Immutable, versioned run state in Redis streams."""

from .store import Created, Opening, Sealing, StateStore, connect, translate_errors
from .version import RunInfo, RunStatus, Version, canonical_json, digest_of

__all__ = [
    "Created",
    "Opening",
    "RunInfo",
    "RunStatus",
    "Sealing",
    "StateStore",
    "Version",
    "canonical_json",
    "connect",
    "digest_of",
    "translate_errors",
]
