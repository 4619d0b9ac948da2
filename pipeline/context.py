"""What an agent may know about the step it runs in, and whether its run still wants it.

A run can stop while one of its steps runs: a person cancels it, or another step
fails it. The step's output would then be refused at its seal and undone by its
agent's compensation, so there is no point running on. Nothing can stop an agent's
code from outside without risking half-done side effects (a killed process is what
the saga exists to clean up after), so stopping is cooperative: ``ctx.cancelled``
tells the agent, ``ctx.sleep`` waits and wakes early, and ``ctx.raise_if_cancelled``
ends the step as cancelled.

Whether the run stopped is read from the run's record when the agent asks, at most
once every ``CANCEL_CHECK_S``: no thread per step and no round trip for a step that
never asks, and a stop is seen within a second of it by a step that keeps asking.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import redis

from .errors import StepCancelled, StepError
from .keys import RunKeys
from .reads import LineageReads
from .state.version import RunStatus, Version

__all__ = ["CANCEL_CHECK_S", "CancelCheck", "StepContext"]

log = logging.getLogger(__name__)

CANCEL_CHECK_S = 1.0
"""The longest ``ctx.cancelled`` answers from memory before it reads the run's status again."""


class CancelCheck:
    """Whether a run has stopped, read through ``status`` (the run's status, None when the
    run is gone) at most once every ``every_s``; once stopped, always stopped."""

    def __init__(self, status: Callable[[], str | None], *, every_s: float = CANCEL_CHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._status = status
        self._every_s = every_s
        self._clock = clock
        self._checked_at: float | None = None
        self._stopped = ""

    def stopped(self) -> str:
        """'' while the run is live (or its status cannot be read now: the seal still
        refuses a stopped run); else the status it stopped in, 'gone' when it expired."""
        if self._stopped:
            return self._stopped
        now = self._clock()
        if self._checked_at is not None and now - self._checked_at < self._every_s:
            return ""
        self._checked_at = now
        try:
            status = self._status()
        except (redis.RedisError, OSError) as e:
            log.debug("could not read the run's status: %s", e)
            return ""
        if status is None:
            self._stopped = "gone"
        elif not RunStatus(status).is_live:
            self._stopped = status
        return self._stopped


def _run_status(client: redis.Redis, run_id: str) -> str | None:
    status = client.hget(RunKeys(run_id).run, "status")
    return status.decode() if isinstance(status, bytes) else status


@dataclass(frozen=True, slots=True, kw_only=True)
class StepContext:
    """What an agent may know about the step it runs in."""

    run_id: str
    step: str
    agent: str
    attempt: int
    input_versions: tuple[int, ...]
    redis: redis.Redis
    worker: str = ""
    event: str = ""
    """The id of the event this step handles (choreography), else ''."""
    event_type: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    reads: LineageReads | None = None
    """What the step may read of earlier versions (built by the runner); see ``version``."""
    cancel: CancelCheck | None = None
    """Whether the run still wants the step's output; see ``cancelled`` (made on the first
    ask: a step that never asks builds nothing)."""

    @property
    def cancelled(self) -> bool:
        """True once the step's run has stopped: cancelled (``pipeline cancel``) or failed by
        another step. Its output would be discarded at the seal and undone by the agent's
        compensation, so a long step should stop: return early through
        :meth:`raise_if_cancelled`. Read from the run's record when asked, at most once
        every ``CANCEL_CHECK_S`` (a second); a step that never asks pays nothing."""
        return bool(self._cancel_check().stopped())

    def raise_if_cancelled(self) -> None:
        """End the step as cancelled (``StepCancelled``) if its run has stopped: nothing is
        sealed, the breaker does not count it, it is not retried and no fallback stands in;
        the trace shows the call ``cancelled``. Undo what the step began before raising:
        a step that never sealed is not compensated by the saga."""
        status = self._cancel_check().stopped()
        if status:
            raise StepCancelled(f"run {self.run_id} step {self.step} (agent {self.agent}): "
                                f"the run is {status}; the step stops without sealing")

    def sleep(self, seconds: float) -> bool:
        """Sleep ``seconds``, waking early when the run stops; whether it has stopped
        (``time.sleep`` for a step that polls something slow)."""
        deadline = time.monotonic() + seconds
        while not self.cancelled:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, CANCEL_CHECK_S))
        return True

    def _cancel_check(self) -> CancelCheck:
        if self.cancel is None:  # frozen: set once, on the first ask
            object.__setattr__(self, "cancel", CancelCheck(partial(_run_status, self.redis,
                                                                   self.run_id)))
        assert self.cancel is not None
        return self.cancel

    @property
    def run_input(self) -> Any:
        """The run's input (version 0's payload): a copy, recorded as read in the trace."""
        return self._reads().run_input

    def version(self, n: int) -> Version:
        """Sealed version ``n``, digest checked, if the step was made from it (its lineage:
        its inputs and what they were made from); else ``VersionNotInLineage``. The payload
        is a copy; the read is recorded in the step's trace entry."""
        return self._reads().version(n)

    def upstream(self, agent: str) -> Version:
        """The newest version in the step's lineage sealed by ``agent`` (else
        ``VersionNotInLineage``), as :meth:`version` returns it."""
        return self._reads().upstream(agent)

    def _reads(self) -> LineageReads:
        if self.reads is None:
            raise StepError(f"run {self.run_id} step {self.step}: this context was built "
                            "without access to the run's versions")
        return self.reads

    def report_usage(self, *, prompt_tokens: int = 0, completion_tokens: int = 0,
                     model: str = "") -> None:
        """Record what the call cost; it is sealed into the step's trace entry."""
        usage = self.notes.setdefault("usage", {"prompt_tokens": 0, "completion_tokens": 0})
        usage["prompt_tokens"] += int(prompt_tokens)
        usage["completion_tokens"] += int(completion_tokens)
        if model:
            usage["model"] = model

    def remember(self, data: Any) -> None:
        """Record what this step's compensation will need (JSON): it gets it as ``data``."""
        self.redis.hset(RunKeys(self.run_id).undo, self.step, json.dumps(data))
