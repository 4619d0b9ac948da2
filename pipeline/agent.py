"""Agents: what a step executes, its contracts and its policies.

An agent is a plain function ``execute(payload, ctx) -> output`` with an input
and an output contract. It never calls another agent; the workflow hands it
the sealed version it needs. Each agent becomes a Celery task named
``agent.<name>`` on its own queue ``agents.<name>``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from .breaker.policy import DEFAULT_RETRY_LATER_MAX, BreakerPolicy, Fallback
from .errors import TransientAgentError, UnknownAgent
from .route import default_queue, step_task

__all__ = ["Agent", "AgentRegistry", "StepContext", "agent", "agents"]

DEFAULT_MAX_RETRIES = 3
DEFAULT_RETRY_BACKOFF_S = 1.0
DEFAULT_RETRY_BACKOFF_MAX_S = 60.0
DEFAULT_TIME_LIMIT_S = 30.0
DEFAULT_COMPENSATION_RETRIES = 3
DEFAULT_REDELIVERY_ALLOWANCE = 3
"""Deliveries allowed beyond the retries: broker redeliveries after a lost worker."""


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
        from .keys import RunKeys  # the agent module stays free of storage imports

        self.redis.hset(RunKeys(self.run_id).undo, self.step, json.dumps(data))


Execute = Callable[[Any, StepContext], Any]
Compensate = Callable[..., Any]


class Agent:
    """One agent: its code, its contracts and how it is retried and bounded."""

    def __init__(
        self,
        *,
        name: str,
        execute: Execute,
        input: str,
        output: str,
        compensate: Compensate | None = None,
        queue: str | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry_on: tuple[type[BaseException], ...] = (TransientAgentError,),
        retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S,
        retry_backoff_max_s: float = DEFAULT_RETRY_BACKOFF_MAX_S,
        time_limit_s: float = DEFAULT_TIME_LIMIT_S,
        max_deliveries: int | None = None,
        breaker: BreakerPolicy | None = None,
        fallback: Fallback | str = Fallback.FAIL,
        default_output: Any = None,
        retry_later_max: int = DEFAULT_RETRY_LATER_MAX,
        compensation_retries: int = DEFAULT_COMPENSATION_RETRIES,
        on: Sequence[str] = (),
        emits: str | None = None,
        description: str = "",
    ) -> None:
        from .events import (  # events imports nothing of ours
            check_event_type,
            check_not_failure,
            check_pattern,
        )

        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"agent name {name!r} must be letters, digits and underscores")
        if isinstance(on, str):
            on = (on,)
        for pattern in on:
            check_pattern(pattern, f"agent {name}: on")
            check_not_failure(pattern, f"agent {name}: on")
        if emits is not None:
            check_event_type(emits, f"agent {name}: emits")
            check_not_failure(emits, f"agent {name}: emits")
        if time_limit_s <= 0:
            raise ValueError(f"agent {name}: time_limit_s must be positive")
        self.name = name
        self.execute = execute
        self.input = input
        self.output = output
        self.compensate = compensate
        self.queue = queue or default_queue(name)
        self.max_retries = max_retries
        self.retry_on = retry_on
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.time_limit_s = time_limit_s
        self.breaker = breaker or BreakerPolicy()
        self.fallback = Fallback(fallback)
        if self.fallback is Fallback.SKIP and default_output is None:
            raise ValueError(f"agent {name}: fallback 'skip' needs a default_output to seal")
        self.default_output = default_output
        self.retry_later_max = retry_later_max
        self.compensation_retries = compensation_retries
        self.on = tuple(on)
        self.emits = emits
        later = retry_later_max if self.fallback is Fallback.RETRY_LATER else 0
        self.max_deliveries = max_deliveries or (
            max_retries + 1 + later + DEFAULT_REDELIVERY_ALLOWANCE
        )
        if self.max_deliveries < max_retries + later + 1:
            raise ValueError(
                f"agent {name}: max_deliveries {self.max_deliveries} leaves no room for its "
                f"{max_retries + later} retries; it must be at least {max_retries + later + 1}"
            )
        self.description = description or (execute.__doc__ or "").strip().split("\n")[0]

    @property
    def task_name(self) -> str:
        return step_task(self.name)

    def subscribes_to(self, event_type: str) -> str | None:
        """The first of this agent's ``on`` patterns that matches ``event_type``, or None."""
        from .events import matches

        return next((p for p in self.on if matches(p, event_type)), None)

    def compensator(self, fn: Compensate) -> Compensate:
        """Decorator: set the function that undoes this agent's step."""
        self.compensate = fn
        return fn

    def retry_countdown_s(self, retries: int) -> float:
        """Exponential backoff for the n-th retry (0-based), capped."""
        return float(min(self.retry_backoff_s * (2**retries), self.retry_backoff_max_s))

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, {self.input} -> {self.output})"


class AgentRegistry:
    """Agents by name."""

    def __init__(self) -> None:
        self._agents: dict[str, Agent] = {}
        self._routes: dict[str, list[Agent]] = {}

    def register(self, a: Agent) -> Agent:
        existing = self._agents.get(a.name)
        if existing is not None and existing.execute is not a.execute:
            if getattr(existing.execute, "__qualname__", None) != getattr(
                a.execute, "__qualname__", None
            ):
                raise ValueError(f"agent {a.name!r} is already registered")
        self._agents[a.name] = a
        self._routes.clear()
        return a

    def subscribers(self, event_type: str) -> list[Agent]:
        """The agents whose ``on`` matches ``event_type``, by name. Routed once per type
        (every step that publishes asks): the answer changes only when an agent registers."""
        found = self._routes.get(event_type)
        if found is None:
            found = self._routes[event_type] = [a for a in self if a.subscribes_to(event_type)]
        return found

    def get(self, name: str) -> Agent:
        try:
            return self._agents[name]
        except KeyError:
            known = ", ".join(sorted(self._agents)) or "none"
            raise UnknownAgent(f"unknown agent {name!r} (registered: {known})") from None

    def __iter__(self) -> Iterator[Agent]:
        return iter(sorted(self._agents.values(), key=lambda a: a.name))

    def __contains__(self, name: object) -> bool:
        return name in self._agents


agents = AgentRegistry()
"""The process-wide agent registry."""


def agent(
    name: str | None = None, *, input: str, output: str, **policy: Any
) -> Callable[[Execute], Agent]:
    """Decorator: turn ``execute(payload, ctx)`` into a registered :class:`Agent`."""

    def register(fn: Execute) -> Agent:
        return agents.register(
            Agent(name=name or fn.__name__, execute=fn, input=input, output=output, **policy)
        )

    return register
