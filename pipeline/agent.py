"""Agents: what a step executes, its contracts and its policies.

An agent is a plain function ``execute(payload, ctx) -> output`` with an input
and an output contract. It never calls another agent; the workflow hands it
the sealed version it needs. Each agent becomes a Celery task named
``agent.<name>`` on its own queue ``agents.<name>``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

from .breaker.policy import DEFAULT_RETRY_LATER_MAX, BreakerPolicy, Fallback, FallbackOn
from .context import StepContext
from .errors import ConfigurationError, DefinitionError, TransientAgentError, UnknownAgent
from .events import check_event_type, check_not_failure, check_pattern, matches
from .names import default_queue, step_task
from .registry import Registry

__all__ = ["Agent", "AgentRegistry", "StepContext", "agent", "agents", "import_agent_modules"]

log = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 3
DEFAULT_RETRY_BACKOFF_S = 1.0
DEFAULT_RETRY_BACKOFF_MAX_S = 60.0
DEFAULT_TIME_LIMIT_S = 30.0
DEFAULT_COMPENSATION_RETRIES = 3
DEFAULT_REDELIVERY_ALLOWANCE = 3
"""Deliveries allowed beyond the retries: broker redeliveries after a lost worker."""


Execute = Callable[[Any, StepContext], Any]
Compensate = Callable[..., Any]
FallbackName = Literal["fail", "skip", "cached", "park", "retry_later"]
"""The values of :class:`Fallback`, as ``agent(fallback=...)`` takes them."""
FallbackOnName = Literal["refusal", "failure"]
"""The values of :class:`FallbackOn`, as ``agent(fallback_on=...)`` takes them."""
EstimateTokens = Callable[[Any], int]
"""``estimate_tokens(input_payload) -> tokens`` a call is expected to use."""
DEFAULT_LIMIT_WAIT_MAX_S = 600.0
"""How long a step may wait for its limits, in all, before its agent's fallback applies."""
DefaultOutput = Callable[[Any, StepContext], Any]
"""``default_output(input_payload, ctx) -> output``: a stand-in computed from the step's input."""


class Agent:
    """One agent: its code, its contracts and how it is retried and bounded.

    ``execute`` is the function the step runs; every other parameter is described
    by :func:`agent`, the decorator that builds and registers one.
    """

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
        fallback: Fallback | FallbackName = Fallback.FAIL,
        fallback_on: FallbackOn | FallbackOnName = FallbackOn.REFUSAL,
        default_output: Any = None,
        retry_later_max: int = DEFAULT_RETRY_LATER_MAX,
        compensation_retries: int = DEFAULT_COMPENSATION_RETRIES,
        on: Sequence[str] = (),
        emits: str | None = None,
        description: str = "",
        limits: Sequence[str] = (),
        estimate_tokens: int | EstimateTokens = 0,
        limit_wait_max_s: float = DEFAULT_LIMIT_WAIT_MAX_S,
    ) -> None:
        if not name or not name.replace("_", "").isalnum():
            raise DefinitionError(f"agent name {name!r} must be letters, digits and underscores")
        if isinstance(on, str):
            on = (on,)
        for pattern in on:
            check_pattern(pattern, f"agent {name}: on")
            check_not_failure(pattern, f"agent {name}: on")
        if emits is not None:
            check_event_type(emits, f"agent {name}: emits")
            check_not_failure(emits, f"agent {name}: emits")
        _check_policy(name, retry_on=retry_on, breaker=breaker, time_limit_s=time_limit_s,
                      max_retries=max_retries, retry_later_max=retry_later_max,
                      compensation_retries=compensation_retries,
                      retry_backoff_s=retry_backoff_s, retry_backoff_max_s=retry_backoff_max_s)
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
        self.fallback = _fallback(name, fallback)
        self.fallback_on = _fallback_on(name, fallback_on, self.fallback)
        if self.fallback is Fallback.SKIP and default_output is None:
            raise DefinitionError(f"agent {name}: fallback 'skip' needs a default_output to seal")
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
            raise DefinitionError(
                f"agent {name}: max_deliveries {self.max_deliveries} leaves no room for its "
                f"{max_retries + later} retries; it must be at least {max_retries + later + 1}"
            )
        self.description = description or (execute.__doc__ or "").strip().split("\n")[0]
        self.limits, self.estimate_tokens = _check_limits(
            name, limits, estimate_tokens, limit_wait_max_s)
        self.limit_wait_max_s = float(limit_wait_max_s)

    def estimate(self, payload: Any) -> int:
        """The tokens a call on ``payload`` is expected to use (reserved before it runs)."""
        if callable(self.estimate_tokens):
            return max(0, int(self.estimate_tokens(payload)))
        return self.estimate_tokens

    @property
    def task_name(self) -> str:
        """The Celery task that runs this agent's steps: ``agent.<name>``."""
        return step_task(self.name)

    def subscribes_to(self, event_type: str) -> str | None:
        """The first of this agent's ``on`` patterns that matches ``event_type``, or None."""
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


class AgentRegistry(Registry["Agent"]):
    """Agents by name."""

    def __init__(self) -> None:
        super().__init__("agent", UnknownAgent)
        self._routes: dict[str, list[Agent]] = {}

    def register(self, a: Agent) -> Agent:
        existing = self._find(a.name)
        if existing is not None and existing.execute is not a.execute:
            if getattr(existing.execute, "__qualname__", None) != getattr(
                a.execute, "__qualname__", None
            ):
                raise DefinitionError(f"agent {a.name!r} is already registered")
        self._routes.clear()
        return self._put(a.name, a)

    def subscribers(self, event_type: str) -> list[Agent]:
        """The agents whose ``on`` matches ``event_type``, by name. Routed once per type
        (every step that publishes asks): the answer changes only when an agent registers."""
        found = self._routes.get(event_type)
        if found is None:
            found = self._routes[event_type] = [a for a in self if a.subscribes_to(event_type)]
        return found


agents = AgentRegistry()
"""The process-wide agent registry."""


def agent(
    name: str | None = None,
    *,
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
    fallback: Fallback | FallbackName = Fallback.FAIL,
    fallback_on: FallbackOn | FallbackOnName = FallbackOn.REFUSAL,
    default_output: Any = None,
    retry_later_max: int = DEFAULT_RETRY_LATER_MAX,
    compensation_retries: int = DEFAULT_COMPENSATION_RETRIES,
    on: Sequence[str] = (),
    emits: str | None = None,
    description: str = "",
    limits: Sequence[str] = (),
    estimate_tokens: int | EstimateTokens = 0,
    limit_wait_max_s: float = DEFAULT_LIMIT_WAIT_MAX_S,
) -> Callable[[Execute], Agent]:
    """Decorator: turn ``execute(payload, ctx)`` into a registered :class:`Agent`.

    The agent runs as the Celery task ``agent.<name>``. A bad value raises
    ``ValueError`` (or ``TypeError``) when the module is imported, naming the
    agent and what is allowed.

    Args:
        name: the agent's name, letters, digits and underscores (default: the
            function's name).
        input: the contract ``name@version`` its payload must satisfy.
        output: the contract ``name@version`` its return value must satisfy.
        compensate: ``undo(ctx)``, run with a ``CompensationContext`` when the run
            is compensated after this step sealed; must be idempotent. Or set it
            later with ``@the_agent.compensator``.
        queue: the Celery queue its steps go to (default ``agents.<name>``).
        max_retries: retries after the first attempt for an exception in
            ``retry_on`` (default 3).
        retry_on: exception classes worth a retry (default
            ``(TransientAgentError,)``); any other exception fails the step at once.
        retry_backoff_s: the first retry's delay in seconds, doubled for each
            next one (default 1.0).
        retry_backoff_max_s: the longest delay between retries, in seconds
            (default 60.0).
        time_limit_s: how long one attempt may run, in seconds (default 30.0). It
            plus the longest retry delay must stay under half the broker's
            visibility timeout, or ``create_app`` refuses the agent.
        max_deliveries: how many times a step may be delivered before it fails as a
            crash loop (default: the first attempt, every retry and every
            ``retry_later`` wait, plus 3 redeliveries after a lost worker).
        breaker: the agent's circuit breaker settings (default ``BreakerPolicy()``).
        fallback: what a step does when the breaker refuses it: ``"fail"``
            (default; the step fails with ``CircuitOpen``), ``"skip"`` (seal
            ``default_output``), ``"cached"`` (seal the last good output for the
            same input), ``"park"`` (wait for ``pipeline resume``) or
            ``"retry_later"`` (retry when the breaker may half-open).
        fallback_on: when the fallback applies: ``"refusal"`` (default; only when
            the breaker refuses the call) or ``"failure"`` (also when the agent's
            call fails for good in a way the breaker counts: its error after its
            retries, its time limit, an output that breaks its contract, whose
            attempt is compensated at once). The failure is still counted and
            traced. ``"failure"`` takes ``"skip"``, ``"cached"`` or ``"park"``
            (``"retry_later"`` would repeat retries already spent).
        default_output: the output sealed, marked degraded, when ``fallback`` is
            ``"skip"`` (required then): a constant, which a workflow that uses the
            agent checks against ``output`` when it is built, or a function
            ``(input_payload, ctx) -> output``, checked when it is called (an output
            that breaks the contract fails the step as a contract violation).
        retry_later_max: how many times ``"retry_later"`` waits for the breaker
            before the step fails (default 5).
        compensation_retries: retries of a failing compensation, with the same
            backoff, before it goes to the dead-letter stream (default 3).
        on: event type patterns the agent reacts to in a choreography
            (``"research.completed"``, ``"*.completed"``).
        emits: the event type it publishes when a step of it seals (choreography).
        description: one line on what the agent does, the docstring of its Celery
            task (default: the first line of the function's docstring).
        limits: names of limits (``pipeline.limit``) every call draws on: a step waits
            for all of them before it runs, and is retried after the wait they compute
            (not counted as a retry, nor on the breaker).
        estimate_tokens: the tokens a call is expected to use, reserved against its
            limits (and its run's budget) before it runs and settled against what it
            reports (``ctx.report_usage``): a whole number, or a function of the input
            payload (which costs the step one more round trip, after its input is read).
        limit_wait_max_s: how long a step may wait for its limits in all before its
            ``fallback`` applies (``"fail"``: the step fails with ``Throttled``);
            default 600.
    """

    def register(fn: Execute) -> Agent:
        return agents.register(Agent(
            name=name or fn.__name__, execute=fn, input=input, output=output,
            compensate=compensate, queue=queue, max_retries=max_retries, retry_on=retry_on,
            retry_backoff_s=retry_backoff_s, retry_backoff_max_s=retry_backoff_max_s,
            time_limit_s=time_limit_s, max_deliveries=max_deliveries, breaker=breaker,
            fallback=fallback, fallback_on=fallback_on, default_output=default_output,
            retry_later_max=retry_later_max,
            compensation_retries=compensation_retries, on=on, emits=emits,
            description=description, limits=limits, estimate_tokens=estimate_tokens,
            limit_wait_max_s=limit_wait_max_s,
        ))

    return register


def _fallback(name: str, value: str) -> Fallback:
    try:
        return Fallback(value)
    except ValueError:
        choices = ", ".join(f.value for f in Fallback)
        raise DefinitionError(f"fallback {value!r} for agent {name} is not one of: "
                              f"{choices}") from None


def _fallback_on(name: str, value: str, fallback: Fallback) -> FallbackOn:
    try:
        on = FallbackOn(value)
    except ValueError:
        choices = ", ".join(f.value for f in FallbackOn)
        raise DefinitionError(f"fallback_on {value!r} for agent {name} is not one of: "
                         f"{choices}") from None
    if on is FallbackOn.FAILURE and fallback in (Fallback.FAIL, Fallback.RETRY_LATER):
        raise DefinitionError(
            f"agent {name}: fallback_on 'failure' takes fallback 'skip', 'cached' or 'park', "
            f"not {fallback.value!r}"
            + (" (its retries already ran: raise max_retries instead)"
               if fallback is Fallback.RETRY_LATER else "")
        )
    return on


def import_agent_modules(modules: tuple[str, ...], *, required: bool = True) -> None:
    """Import the modules that define agents, contracts and workflows. Not ``required``
    (an operator's command, which reads what it needs from Redis), a module that cannot
    be imported is skipped."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            if not required:
                log.info("agent module %r not imported (%s): reading agents from Redis", name, e)
                continue
            raise ConfigurationError(
                f"cannot import agent module {name!r} ({e}); set PIPELINE_AGENT_MODULES to the "
                "modules that define your agents, and run from the directory that holds them"
            ) from e


def _check_policy(name: str, *, retry_on: object, breaker: object, time_limit_s: float,
                  max_retries: int, retry_later_max: int, compensation_retries: int,
                  retry_backoff_s: float, retry_backoff_max_s: float) -> None:
    """``DefinitionError`` naming the agent, the option and what it takes."""
    if not _is_number(time_limit_s) or time_limit_s <= 0:
        raise DefinitionError(f"agent {name}: time_limit_s must be seconds > 0, "
                              f"not {time_limit_s!r}")
    counts = {"max_retries": max_retries, "retry_later_max": retry_later_max,
              "compensation_retries": compensation_retries}
    for option, n in counts.items():
        if not _is_number(n) or not isinstance(n, int) or n < 0:
            raise DefinitionError(f"agent {name}: {option} must be a whole number >= 0, not {n!r}")
    delays = {"retry_backoff_s": retry_backoff_s, "retry_backoff_max_s": retry_backoff_max_s}
    for option, s in delays.items():
        if not _is_number(s) or s < 0:
            raise DefinitionError(f"agent {name}: {option} must be seconds >= 0, not {s!r}")
    if not isinstance(retry_on, tuple) or not all(
        isinstance(e, type) and issubclass(e, BaseException) for e in retry_on
    ):
        raise DefinitionError(f"agent {name}: retry_on must be a tuple of exception classes, "
                        f"such as (TransientAgentError,), not {retry_on!r}")
    if breaker is not None and not isinstance(breaker, BreakerPolicy):
        raise DefinitionError(f"agent {name}: breaker must be a BreakerPolicy, not {breaker!r}")


def _check_limits(name: str, limits: object, estimate: object,
                  wait_max_s: object) -> tuple[tuple[str, ...], int | EstimateTokens]:
    if isinstance(limits, str):
        limits = (limits,)
    if not isinstance(limits, Sequence) or not all(
            isinstance(n, str) and n and n == n.strip() and "{" not in n and "}" not in n
            for n in limits):
        raise DefinitionError(f"agent {name}: limits must be names of limits, such as "
                              f"('openai:gpt-4o',), not {limits!r}")
    if not callable(estimate) and (not _is_number(estimate) or not isinstance(estimate, int)
                                   or estimate < 0):
        raise DefinitionError(f"agent {name}: estimate_tokens must be a whole number >= 0 or "
                              f"a function of the input payload, not {estimate!r}")
    if not _is_number(wait_max_s) or wait_max_s < 0:  # type: ignore[operator]
        raise DefinitionError(f"agent {name}: limit_wait_max_s must be seconds >= 0, "
                              f"not {wait_max_s!r}")
    return tuple(dict.fromkeys(limits)), estimate


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
