"""Step hooks: what extends every step without the runner knowing of it.

A hook may queue more Redis calls on the step's two round trips (``open_extra``,
``seal_extra``: the exporter's latency counters ride the seal), refuse a step once
it opened (``after_open``), and see every failure that will not be retried
(``on_failure``, with the store the step uses). Hooks belong to a Celery app, as
dramatiq's middleware belongs to its broker: ``add_hook(app, hook)`` (the app adds the
exporter's counters, ``counters.install_hooks``), and the steps of that app's tasks
run them, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .agent import Agent
from .state import Opening, StateStore
from .state.store import Extra

__all__ = ["StepHooks", "add_hook", "hooks_of"]

APP_ATTRIBUTE = "pipeline_hooks"


class StepHooks:
    """No-op hooks; subclass and give an app one (``add_hook``) to extend its steps."""

    def open_extra(self, agent: Agent) -> Sequence[Extra]:
        return ()

    def after_open(self, agent: Agent, opening: Opening, extra: Sequence[Any]) -> None:
        """Raise to refuse the step (for example, an open breaker)."""

    def seal_extra(self, agent: Agent, *, ok: bool, latency_ms: float) -> Sequence[Extra]:
        return ()

    def on_failure(self, agent: Agent, store: StateStore, run_id: str, step: str,
                   exc: BaseException) -> None:
        """Called once for a failure that will not be retried."""


def hooks_of(app: object) -> list[StepHooks]:
    """The step hooks of ``app``, in order (none for an app that was given none)."""
    found: list[StepHooks] = getattr(app, APP_ATTRIBUTE, None) or []
    return found


def add_hook(app: object, hook: StepHooks) -> None:
    """Give ``app``'s steps ``hook``, after the others; once per kind of hook."""
    found = hooks_of(app)
    if not any(type(h) is type(hook) for h in found):
        setattr(app, APP_ATTRIBUTE, [*found, hook])
