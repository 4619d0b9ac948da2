"""One registry shape for agents, contracts and flows: things by name, one per process.

Each kind keeps its own rules for what may be registered (an agent's name taken by
other code, a contract's schema changed under the same version); what they share is
here: look one up (an unknown name is an error that lists the known ones), list them
in a stable order, ask whether one is known.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import PipelineError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Things of one kind by name."""

    def __init__(self, kind: str, unknown: type[PipelineError],
                 order: Callable[[T], Any] | None = None) -> None:
        """``kind`` names them in errors (``unknown agent 'x'``); ``unknown`` is raised for
        a name not registered; ``order`` sorts them when listed (by name without it)."""
        self._kind = kind
        self._unknown = unknown
        self._order = order
        self._by_name: dict[str, T] = {}

    def _put(self, name: str, item: T) -> T:
        self._by_name[name] = item
        return item

    def _find(self, name: str) -> T | None:
        return self._by_name.get(name)

    def get(self, name: str) -> T:
        """The one registered as ``name``; else the kind's ``unknown`` error."""
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise self._unknown(f"unknown {self._kind} {name!r} (registered: {known})") \
                from None

    def __iter__(self) -> Iterator[T]:
        if self._order is None:
            return iter(v for _, v in sorted(self._by_name.items()))
        return iter(sorted(self._by_name.values(), key=self._order))

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)
