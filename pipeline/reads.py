"""A step's reads of earlier versions: the run's input and its own lineage.

A step is handed only its direct upstream. Through its context it may also read
the run's input and any version its inputs were made from, transitively. Nothing
else: a parallel sibling's version, or one sealed later, may or may not exist when
the step runs, and reading it would make the step depend on timing.

Every version is read once per step (digest checked by the reader), the lineage is
walked on the first read only, and every payload handed out is a fresh deep copy,
so an agent that mutates what it read changes nothing another read returns. The
versions handed out are recorded in the step's trace entry (``read=0,2``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from .errors import VersionNotInLineage
from .state.version import Version

__all__ = ["LineageReads"]

ReadVersion = Callable[[int], Version]
"""``read(n) -> Version``: version n of the step's run, digest checked (``StateStore.get``)."""


class LineageReads:
    """Read access to the versions a step was made from, built by the runner per step."""

    def __init__(self, read: ReadVersion, *, run_id: str, step: str,
                 inputs: Sequence[Version]) -> None:
        """``inputs``: the step's input versions, already read when it opened."""
        self._read = read
        self._run_id = run_id
        self._step = step
        self._inputs = tuple(v.version for v in inputs)
        self._versions: dict[int, Version] = {v.version: v for v in inputs}
        self._lineage: tuple[int, ...] | None = None
        self.read: set[int] = set()
        """The versions handed to the agent, for the step's trace entry."""

    @property
    def run_input(self) -> Any:
        """The run's input: version 0's payload (a replay's own version 0)."""
        return self.version(0).payload

    def version(self, n: int) -> Version:
        """Sealed version ``n``, if the step's inputs were made from it (or are it)."""
        if n not in self.lineage():
            raise VersionNotInLineage(
                f"run {self._run_id} step {self._step}: version {n} is not in the step's "
                f"lineage (its inputs {_listed(self._inputs)} were made from versions "
                f"{_listed(self.lineage())}); a version outside it could be a parallel "
                "sibling's or a later one, so reading it would depend on timing: make it an "
                "input of the step instead"
            )
        return self._hand_out(self._get(n))

    def upstream(self, agent: str) -> Version:
        """The newest version in the step's lineage sealed by ``agent``."""
        for n in self.lineage():  # newest first
            v = self._get(n)
            if v.agent == agent:
                return self._hand_out(v)
        raise VersionNotInLineage(
            f"run {self._run_id} step {self._step}: no version in the step's lineage "
            f"({_listed(self.lineage())}) was sealed by agent {agent!r}; only the agents "
            "upstream of a step can be read"
        )

    def lineage(self) -> tuple[int, ...]:
        """The step's inputs and every version they were made from, newest first."""
        if self._lineage is None:
            seen: set[int] = set()
            todo = list(self._inputs)
            while todo:
                n = todo.pop()
                if n not in seen:
                    seen.add(n)
                    todo += [p for p in self._get(n).parents if p not in seen]
            self._lineage = tuple(sorted(seen, reverse=True))
        return self._lineage

    def trace_fields(self) -> dict[str, str]:
        """``{"read": "0,2"}`` when the agent read earlier versions, else nothing."""
        return {"read": ",".join(map(str, sorted(self.read)))} if self.read else {}

    def _get(self, n: int) -> Version:
        v = self._versions.get(n)
        if v is None:
            v = self._versions[n] = self._read(n)
        return v

    def _hand_out(self, v: Version) -> Version:
        self.read.add(v.version)
        return dataclasses.replace(v, payload=copy.deepcopy(v.payload))


def _listed(versions: Sequence[int]) -> str:
    return ",".join(map(str, versions)) or "none"
