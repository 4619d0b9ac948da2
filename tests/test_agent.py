"""The ``@agent`` decorator: an explicit, documented signature that mirrors ``Agent``, and
options refused when the module is imported, with what is allowed. Pure logic: agents go to
a registry of their own, never the process's."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline import (
    Agent,
    BreakerPolicy,
    DefinitionError,
    Fallback,
    FallbackOn,
    StepContext,
    TransientAgentError,
    agent,
    agents,
)
from pipeline.agent import AgentRegistry

CONTRACTS = {"input": "count@1", "output": "count@1"}


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentRegistry]:
    """What ``@agent`` registers into for one test, instead of the process-wide registry."""
    own = AgentRegistry()
    # the module, not the decorator that `pipeline.agent` names once the package is imported
    monkeypatch.setattr(importlib.import_module("pipeline.agent"), "agents", own)
    yield own


def triage(ticket: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Mark a ticket urgent when something is down."""
    return ticket


def test_the_decorator_takes_every_option_an_agent_takes_with_the_same_defaults() -> None:
    options = dict(inspect.signature(agent).parameters)
    init = dict(inspect.signature(Agent.__init__).parameters)
    del init["self"], init["execute"]
    assert list(options) == list(init)
    assert options.pop("name").default is None  # the function's name, by default
    for name, p in options.items():
        assert p.default == init[name].default, name
        assert p.annotation == init[name].annotation, name
    assert all(p.kind is p.KEYWORD_ONLY for p in options.values())
    assert not any(p.kind is p.VAR_KEYWORD for p in options.values())


def test_every_option_of_the_decorator_is_documented() -> None:
    doc = inspect.getdoc(agent) or ""
    undocumented = [n for n in inspect.signature(agent).parameters
                    if not re.search(rf"^\s+{n}: \S", doc, re.MULTILINE)]
    assert undocumented == []
    assert "default_output" in doc and "skip" in doc


def test_the_decorator_registers_the_agent_with_its_options(registry: AgentRegistry) -> None:
    policy = BreakerPolicy(failure_threshold=2, window=4, min_calls=2)
    made = agent(time_limit_s=5, max_retries=1, retry_backoff_s=0.5, breaker=policy,
                 fallback="skip", default_output={"n": 0}, on=["ticket.opened"],
                 emits="ticket.triaged", **CONTRACTS)(triage)
    assert registry.get("triage") is made and "triage" not in agents
    assert (made.name, made.queue, made.task_name) == ("triage", "agents.triage",
                                                        "agent.triage")
    assert (made.time_limit_s, made.max_retries, made.retry_backoff_s) == (5, 1, 0.5)
    assert made.breaker is policy and made.fallback is Fallback.SKIP
    assert made.default_output == {"n": 0}
    assert (made.on, made.emits) == (("ticket.opened",), "ticket.triaged")
    assert made.description == "Mark a ticket urgent when something is down."


def test_the_decorator_takes_a_name_of_its_own(registry: AgentRegistry) -> None:
    made = agent("ticket_triage", **CONTRACTS)(triage)
    assert made.name == "ticket_triage" and "ticket_triage" in registry


def test_a_misspelt_fallback_names_the_valid_choices(registry: AgentRegistry) -> None:
    with pytest.raises(ValueError) as info:
        agent(fallback="skipp", **CONTRACTS)(triage)  # type: ignore[arg-type]
    assert str(info.value) == ("fallback 'skipp' for agent triage is not one of: "
                               "fail, skip, cached, park, retry_later")
    assert "triage" not in registry


@pytest.mark.parametrize("fallback", [*Fallback, *(f.value for f in Fallback)])
def test_a_fallback_is_taken_by_its_name_or_as_the_enum(fallback: Any) -> None:
    a = Agent(name="a", execute=triage, fallback=fallback, default_output={"n": 0}, **CONTRACTS)
    assert a.fallback is Fallback(fallback)


def test_skip_without_a_default_output_is_refused() -> None:
    with pytest.raises(ValueError, match="agent a: fallback 'skip' needs a default_output"):
        Agent(name="a", execute=triage, fallback="skip", **CONTRACTS)


def test_fallback_on_is_the_refusal_alone_by_default() -> None:
    a = Agent(name="a", execute=triage, fallback="skip", default_output={"n": 0}, **CONTRACTS)
    assert a.fallback_on is FallbackOn.REFUSAL


@pytest.mark.parametrize("fallback", ["skip", "cached", "park"])
def test_fallback_on_failure_takes_skip_cached_or_park(fallback: Any) -> None:
    a = Agent(name="a", execute=triage, fallback=fallback, fallback_on="failure",
              default_output={"n": 0}, **CONTRACTS)
    assert (a.fallback, a.fallback_on) == (Fallback(fallback), FallbackOn.FAILURE)


def test_a_misspelt_fallback_on_names_the_valid_choices(registry: AgentRegistry) -> None:
    with pytest.raises(ValueError) as info:
        agent(fallback="skip", fallback_on="error", default_output={"n": 0},  # type: ignore[arg-type]
              **CONTRACTS)(triage)
    assert str(info.value) == ("fallback_on 'error' for agent triage is not one of: "
                               "refusal, failure")
    assert "triage" not in registry


@pytest.mark.parametrize(("fallback", "tail"), [
    ("fail", "not 'fail'"), ("retry_later", "its retries already ran: raise max_retries")])
def test_fallback_on_failure_refuses_fail_and_retry_later(fallback: Any, tail: str) -> None:
    with pytest.raises(ValueError, match=r"agent a: fallback_on 'failure' takes fallback 'skip', "
                                         rf"'cached' or 'park', .*{re.escape(tail)}"):
        Agent(name="a", execute=triage, fallback=fallback, fallback_on="failure", **CONTRACTS)


def test_a_default_output_may_be_computed_from_the_input() -> None:
    def half(ticket: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        return {"n": ticket["n"] // 2}

    a = Agent(name="a", execute=triage, fallback="skip", default_output=half, **CONTRACTS)
    assert a.default_output is half


def test_an_unknown_option_is_refused() -> None:
    with pytest.raises(TypeError, match="fallbak"):
        agent(fallbak="skip", **CONTRACTS)  # type: ignore[call-arg]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("time_limit_s", 0, "agent a: time_limit_s must be seconds > 0, not 0"),
    ("time_limit_s", "30", "agent a: time_limit_s must be seconds > 0, not '30'"),
    ("max_retries", -1, "agent a: max_retries must be a whole number >= 0, not -1"),
    ("max_retries", 2.5, "agent a: max_retries must be a whole number >= 0, not 2.5"),
    ("retry_later_max", True, "agent a: retry_later_max must be a whole number >= 0"),
    ("compensation_retries", -2, "agent a: compensation_retries must be a whole number"),
    ("retry_backoff_s", -1.0, "agent a: retry_backoff_s must be seconds >= 0, not -1.0"),
    ("retry_backoff_max_s", "1m", "agent a: retry_backoff_max_s must be seconds >= 0"),
])
def test_a_bad_number_names_the_agent_the_option_and_what_it_takes(
    option: str, value: Any, message: str
) -> None:
    with pytest.raises(DefinitionError, match=re.escape(message)):
        Agent(name="a", execute=triage, **CONTRACTS, **{option: value})


@pytest.mark.parametrize("retry_on", [TransientAgentError, [TransientAgentError], ("timeout",)])
def test_retry_on_must_be_a_tuple_of_exception_classes(retry_on: Any) -> None:
    with pytest.raises(DefinitionError, match=r"agent a: retry_on must be a tuple of exception "):
        Agent(name="a", execute=triage, retry_on=retry_on, **CONTRACTS)


def test_a_breaker_must_be_a_breaker_policy() -> None:
    with pytest.raises(DefinitionError, match="agent a: breaker must be a BreakerPolicy"):
        Agent(name="a", execute=triage, breaker={"failure_threshold": 3},  # type: ignore[arg-type]
              **CONTRACTS)


def test_zero_retries_and_no_backoff_are_allowed() -> None:
    a = Agent(name="a", execute=triage, max_retries=0, retry_backoff_s=0, compensation_retries=0,
              retry_later_max=0, **CONTRACTS)
    assert (a.max_retries, a.retry_countdown_s(0), a.max_deliveries) == (0, 0.0, 4)
