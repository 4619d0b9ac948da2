"""Step hooks: what extends every step without the runner knowing of it.

A hook may queue more Redis calls on the step's two round trips (``open_extra``,
``seal_extra``: the exporter's latency counters ride the seal), refuse a step once
it opened (``after_open``), and see every failure that will not be retried
(``on_failure``, with the store the step uses). Hooks are registered in
:data:`hooks`, once per process (``counters.install_hooks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .agent import Agent
from .state import Opening, StateStore
from .state.store import Extra

__all__ = ["StepHooks", "hooks"]


class StepHooks:
    """No-op hooks; subclass and append to :data:`hooks` to extend every step."""

    def open_extra(self, agent: Agent) -> Sequence[Extra]:
        return ()

    def after_open(self, agent: Agent, opening: Opening, extra: Sequence[Any]) -> None:
        """Raise to refuse the step (for example, an open breaker)."""

    def seal_extra(self, agent: Agent, *, ok: bool, latency_ms: float) -> Sequence[Extra]:
        return ()

    def on_failure(self, agent: Agent, store: StateStore, run_id: str, step: str,
                   exc: BaseException) -> None:
        """Called once for a failure that will not be retried."""


hooks: list[StepHooks] = []
"""The hooks every step of this process runs, in order."""
