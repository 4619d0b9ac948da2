"""Event types and subscription patterns (choreography).

An event type is dot-separated segments of letters, digits, ``_`` and ``-``:
``research.completed``. A pattern is the same, where a segment may be ``*``,
standing for exactly one segment: ``research.*``, ``*.completed``.
"""

from __future__ import annotations

import re

from .errors import DefinitionError

__all__ = ["check_event_type", "check_not_failure", "check_pattern", "failure_event",
           "matches"]

_SEGMENT = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_EVENT_TYPE_LEN = 200


def _check(text: str, where: str, *, wildcards: bool) -> None:
    if not isinstance(text, str) or not text or len(text) > MAX_EVENT_TYPE_LEN:
        raise DefinitionError(f"{where}: {text!r} is not an event type (1 to "
                         f"{MAX_EVENT_TYPE_LEN} characters)")
    for segment in text.split("."):
        if segment == "*" and wildcards:
            continue
        if not _SEGMENT.match(segment):
            allowed = "letters, digits, '_' and '-'" + (", or '*' alone" if wildcards else "")
            raise DefinitionError(f"{where}: {text!r} has a segment {segment!r}; segments are "
                             f"{allowed}, separated by dots")


def check_event_type(event_type: str, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``event_type`` is a concrete type."""
    _check(event_type, where, wildcards=False)


def check_pattern(pattern: str, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``pattern`` is a type or a pattern."""
    _check(pattern, where, wildcards=True)


def check_not_failure(event_type: str, where: str) -> None:
    """``<x>.failed`` is reserved for failure events, which go to the saga, never to agents."""
    if event_type.rsplit(".", 1)[-1] == FAILED:
        raise DefinitionError(f"{where}: {event_type!r} ends in '.{FAILED}', which is reserved: a "
                         "handler that fails publishes <agent>.failed and the saga, not an "
                         "agent, handles it")


def matches(pattern: str, event_type: str) -> bool:
    """Whether ``pattern`` matches ``event_type``: ``*`` is one whole segment."""
    want, have = pattern.split("."), event_type.split(".")
    return len(want) == len(have) and all(w in ("*", h) for w, h in zip(want, have, strict=True))


FAILED = "failed"


def failure_event(agent: str) -> str:
    """The event a handler that failed for good publishes: ``<agent>.failed``."""
    return f"{agent}.{FAILED}"
