"""``pipeline.testing.run_agent``: one agent run as a step runs it, without Celery, both
contracts checked (the plugin's fixtures are run from a user's project by
tests/test_own_project.py)."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from pipeline import ContractViolation, StepContext, agent
from pipeline.testing import run_agent
from tests.agents import EXECUTIONS_KEY  # and its agents and contracts, registered


@agent("t_echo_input", input="count@1", output="count@1")
def t_echo_input(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """The run's input, read through the context, plus one."""
    return {"n": ctx.run_input["n"] + 1}


@agent("t_broken", input="count@1", output="count@1")
def t_broken(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """An output its contract refuses."""
    return {"n": "many"}


def test_run_agent_runs_a_registered_agent_by_name_with_a_real_redis(
    rclient: redis.Redis,
) -> None:
    assert run_agent("increment", {"n": 41}, redis_client=rclient, run_id="t-run") == {"n": 42}
    assert rclient.get(EXECUTIONS_KEY.format(run_id="t-run", agent="increment")) == "1"


def test_the_context_reads_the_payload_as_the_runs_input() -> None:
    assert run_agent(t_echo_input, {"n": 1}) == {"n": 2}


def test_an_input_that_breaks_the_contract_is_refused_before_the_agent_runs() -> None:
    with pytest.raises(ContractViolation) as refused:
        run_agent(t_broken, {"n": "one"})
    assert (refused.value.side, refused.value.field_paths) == ("input", ["n"])


def test_an_output_that_breaks_the_contract_names_the_agent_and_the_field() -> None:
    with pytest.raises(ContractViolation) as refused:
        run_agent(t_broken, {"n": 1})
    assert (refused.value.side, refused.value.field_paths) == ("output", ["n"])
    assert "t_broken" in str(refused.value)
