"""Workflows: a bad graph fails when it is built, never mid-run; a good one compiles
to a chain of chords, carrying references only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, chain
from celery.canvas import Signature, _chord
from marshmallow import Schema, fields

import tasks  # noqa: F401  (registers the credit and research workflows)
import tests.agents  # noqa: F401  (registers the counting workflow)
from pipeline import Agent, Workflow, parallel, workflows
from pipeline.agent import agents
from pipeline.app import create_app
from pipeline.contracts import ContractRegistry, compatibility_problems, contracts, fan_in_schema
from pipeline.errors import (
    ContractMismatch,
    UnknownAgent,
    UnknownContract,
    UnknownWorkflow,
    WorkflowDefinitionError,
)
from pipeline.names import ERRBACK_TASK
from tests.conftest import settings_for

PARALLEL = ("income_verification", "risk_assessment", "fraud_detection")


# -- throwaway contracts, in a private registry so the global one stays as shipped -----


class Point(Schema):
    x = fields.Integer(required=True)
    y = fields.Integer(required=True)


class OnlyX(Schema):
    x = fields.Integer(required=True)


class Point3(Schema):
    x = fields.Integer(required=True)
    y = fields.Integer(required=True)
    z = fields.Integer(required=True)


class MaybeY(Schema):
    x = fields.Integer(required=True)
    y = fields.Integer()


class TextX(Schema):
    x = fields.String(required=True)
    y = fields.Integer(required=True)


class Wrapped(Schema):
    p = fields.Nested(Point, required=True)


class WrappedX(Schema):
    p = fields.Nested(OnlyX, required=True)


class TwoAssessments(Schema):
    income_verification = fields.Raw(required=True)
    risk_assessment = fields.Raw(required=True)


class JoinedPoints(Schema):
    wf_left = fields.Nested(Point, required=True)
    wf_right = fields.Nested(Point, required=True)


@pytest.fixture
def registry() -> ContractRegistry:
    """Every shipped contract plus the throwaway ones above, as ``wf_<name>@1``."""
    reg = ContractRegistry()
    for c in contracts:
        reg.register(c.name, c.version, c.schema)
    for schema in (Point, OnlyX, Point3, MaybeY, TextX, Wrapped, WrappedX, TwoAssessments,
                   JoinedPoints):
        reg.register(f"wf_{schema.__name__.lower()}", 1, schema)
    return reg


def same(payload: Any, ctx: Any) -> Any:
    """Hand the payload on."""
    return payload


def make(name: str, input: str, output: str) -> Agent:
    """An agent that is not registered anywhere: workflows take Agent objects directly."""
    return Agent(name=name, execute=same, input=input, output=output)


def build(registry: ContractRegistry, steps: list[Any], name: str = "wf_test") -> Workflow:
    return Workflow(name, steps, contract_registry=registry, register=False)


# -- eager failures -----------------------------------------------------------------


def test_unknown_agent_fails_at_construction() -> None:
    with pytest.raises(UnknownAgent, match="'no_such_agent'"):
        Workflow("wf_unknown_agent", ["credit_score", "no_such_agent"], register=False)


def test_unknown_agent_inside_a_parallel_group_fails_at_construction() -> None:
    with pytest.raises(UnknownAgent, match="'ghost'"):
        Workflow("wf_unknown_parallel", ["credit_score", parallel("risk_assessment", "ghost"),
                                         "final_approval"], register=False)


def test_agent_with_unknown_input_contract_fails_at_construction(
    registry: ContractRegistry,
) -> None:
    with pytest.raises(UnknownContract, match="'wf_nowhere@1'"):
        build(registry, [make("wf_src", "wf_point@1", "wf_point@1"),
                         make("wf_dst", "wf_nowhere@1", "wf_point@1")])


def test_first_agent_with_unknown_input_contract_fails_at_construction(
    registry: ContractRegistry,
) -> None:
    with pytest.raises(UnknownContract, match="'wf_nowhere@1'"):
        build(registry, [make("wf_src", "wf_nowhere@1", "wf_point@1")])


@pytest.mark.parametrize("position", ["first", "last", "only"])
def test_agent_with_unknown_output_contract_fails_at_construction(
    registry: ContractRegistry, position: str
) -> None:
    odd = make("wf_odd", "wf_point@1", "wf_nowhere@1")
    plain = make("wf_plain", "wf_point@1", "wf_point@1")
    steps = {"first": [odd, plain], "last": [plain, odd], "only": [odd]}[position]
    with pytest.raises(UnknownContract, match="'wf_nowhere@1'"):
        build(registry, steps)


def test_missing_required_field_is_a_contract_mismatch_naming_the_field(
    registry: ContractRegistry,
) -> None:
    with pytest.raises(ContractMismatch) as info:
        build(registry, [make("wf_src", "wf_point@1", "wf_point@1"),
                         make("wf_dst", "wf_point3@1", "wf_point@1")])
    message = str(info.value)
    assert "z: required by the consumer but not produced" in message
    assert "wf_point3@1 does not accept what wf_point@1 produces" in message
    assert "step 1:wf_dst" in message


def test_optional_output_field_required_downstream_is_a_contract_mismatch(
    registry: ContractRegistry,
) -> None:
    with pytest.raises(ContractMismatch, match="y: required by the consumer but optional for"):
        build(registry, [make("wf_src", "wf_point@1", "wf_maybey@1"),
                         make("wf_dst", "wf_point@1", "wf_point@1")])


def test_extra_output_field_refused_downstream_is_a_contract_mismatch(
    registry: ContractRegistry,
) -> None:
    with pytest.raises(ContractMismatch, match="y: produced but unknown to the consumer"):
        build(registry, [make("wf_src", "wf_point@1", "wf_point@1"),
                         make("wf_dst", "wf_onlyx@1", "wf_point@1")])


def test_field_of_another_type_is_a_contract_mismatch(registry: ContractRegistry) -> None:
    with pytest.raises(ContractMismatch, match="x: produced as Integer, expected String"):
        build(registry, [make("wf_src", "wf_point@1", "wf_point@1"),
                         make("wf_dst", "wf_textx@1", "wf_point@1")])


def test_mismatch_inside_a_nested_object_names_the_dotted_path(
    registry: ContractRegistry,
) -> None:
    with pytest.raises(ContractMismatch, match=r"p\.y: produced but unknown to the consumer"):
        build(registry, [make("wf_src", "wf_point@1", "wf_wrapped@1"),
                         make("wf_dst", "wf_wrappedx@1", "wf_point@1")])


def test_neighbours_whose_contracts_line_up_build_a_workflow(registry: ContractRegistry) -> None:
    wf = build(registry, [make("wf_src", "wf_point@1", "wf_onlyx@1"),
                          make("wf_dst", "wf_maybey@1", "wf_maybey@1")])
    assert wf.input_contract.ref == "wf_point@1"
    assert wf.output_contract.ref == "wf_maybey@1"
    assert wf.shape() == "wf_src -> wf_dst"


def test_first_parallel_agents_expecting_different_inputs_are_refused(
    registry: ContractRegistry,
) -> None:
    with pytest.raises(ContractMismatch, match="wf_onlyx@1, wf_point@1"):
        build(registry, [parallel(make("wf_a", "wf_point@1", "wf_point@1"),
                                  make("wf_b", "wf_onlyx@1", "wf_point@1")),
                         make("wf_join", "wf_joinedpoints@1", "wf_point@1")])


def test_empty_workflow_is_refused() -> None:
    with pytest.raises(WorkflowDefinitionError, match="no steps"):
        Workflow("wf_empty", [], register=False)


def test_workflow_without_a_name_is_refused() -> None:
    with pytest.raises(WorkflowDefinitionError, match="needs a name"):
        Workflow("", ["increment"], register=False)


def test_empty_parallel_group_is_refused() -> None:
    with pytest.raises(WorkflowDefinitionError, match="empty parallel"):
        Workflow("wf_empty_group", ["increment", parallel(), "double"], register=False)


def test_parallel_group_right_after_a_parallel_group_is_refused() -> None:
    with pytest.raises(WorkflowDefinitionError, match="follows another parallel group"):
        Workflow("wf_two_groups", ["credit_score", parallel(*PARALLEL),
                                   parallel("final_approval", "credit_score"),
                                   "final_approval"], register=False)


def test_workflow_ending_in_a_parallel_group_is_refused() -> None:
    with pytest.raises(WorkflowDefinitionError, match="ends in a parallel group"):
        Workflow("wf_open_end", ["credit_score", parallel(*PARALLEL)], register=False)


def test_same_agent_twice_in_one_parallel_group_is_refused() -> None:
    with pytest.raises(WorkflowDefinitionError, match="same agent twice"):
        Workflow("wf_twice", ["credit_score",
                              parallel("risk_assessment", "fraud_detection", "risk_assessment"),
                              "final_approval"], register=False)


def test_workflow_built_without_register_stays_out_of_the_registry() -> None:
    Workflow("wf_private", ["increment", "double"], register=False)
    with pytest.raises(UnknownWorkflow, match="'wf_private'"):
        workflows.get("wf_private")


def test_shipped_workflows_are_registered_with_their_contracts() -> None:
    credit = workflows.get("credit_decision")
    assert credit.input_contract.ref == "credit_application@1"
    assert credit.output_contract.ref == "credit_decision@1"
    assert credit.shape() == (
        "credit_score -> (income_verification | risk_assessment | fraud_detection) "
        "-> final_approval")
    assert workflows.get("research_chain").shape() == "research -> analysis -> report"
    assert workflows.get("counting").shape() == "increment -> double"


# -- fan-in ---------------------------------------------------------------------------


def test_credit_fan_in_contract_accepts_what_the_parallel_agents_produce() -> None:
    credit = workflows.get("credit_decision")
    final = credit.stages[-1][0]
    assert final.agent.name == "final_approval" and final.final
    assert final.fan_in == PARALLEL
    produced = fan_in_schema(
        {name: contracts.get(agents.get(name).output).schema for name in PARALLEL})
    assert compatibility_problems(produced, contracts.get("credit_assessments@1").schema) == []


def test_fan_in_contract_missing_a_parallel_agent_is_refused(registry: ContractRegistry) -> None:
    join = make("wf_join_two", "wf_twoassessments@1", "credit_decision@1")
    with pytest.raises(ContractMismatch) as info:
        build(registry, ["credit_score", parallel(*PARALLEL), join])
    assert "fraud_detection: produced but unknown to the consumer" in str(info.value)


def test_fan_in_needing_an_agent_that_is_not_in_the_group_is_refused(
    registry: ContractRegistry,
) -> None:
    with pytest.raises(ContractMismatch) as info:
        build(registry, ["credit_score", parallel("income_verification", "risk_assessment"),
                         "final_approval"])
    assert "fraud_detection: required by the consumer but not produced" in str(info.value)


def test_fan_in_of_matching_outputs_builds(registry: ContractRegistry) -> None:
    wf = build(registry, [parallel(make("wf_left", "wf_point@1", "wf_point@1"),
                                   make("wf_right", "wf_point@1", "wf_point@1")),
                          make("wf_join", "wf_joinedpoints@1", "wf_point@1")])
    assert [s.key for s in wf.steps()] == ["0.0:wf_left", "0.1:wf_right", "1:wf_join"]
    assert wf.stages[-1][0].fan_in == ("wf_left", "wf_right")


# -- compile ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app() -> Celery:
    """An app for compiling canvases; compiling never connects to Redis."""
    return create_app(settings_for("redis://127.0.0.1:6379/13"))


def signatures(canvas: Signature) -> Iterator[Signature]:
    """Every task signature in a canvas, in order."""
    if isinstance(canvas, chain):
        for part in canvas.tasks:
            yield from signatures(part)
    elif isinstance(canvas, _chord):
        for part in canvas.tasks:
            yield from signatures(part)
        yield from signatures(canvas.body)
    else:
        yield canvas


def test_credit_workflow_compiles_to_step_then_chord_of_three_into_final(app: Celery) -> None:
    canvas = workflows.get("credit_decision").compile(app, "run-7")
    assert isinstance(canvas, chain)
    first, joined = canvas.tasks
    assert first.task == "agent.credit_score"
    assert first.args == (0,)
    assert first.kwargs == {"run_id": "run-7", "step": "0:credit_score"}
    assert first.options["queue"] == "agents.credit_score"
    assert isinstance(joined, _chord)
    assert [s.task for s in joined.tasks] == [f"agent.{n}" for n in PARALLEL]
    assert [s.options["queue"] for s in joined.tasks] == [f"agents.{n}" for n in PARALLEL]
    assert all(s.args == () for s in joined.tasks)
    assert [s.kwargs["step"] for s in joined.tasks] == [
        "1.0:income_verification", "1.1:risk_assessment", "1.2:fraud_detection"]
    body = joined.body
    assert body.task == "agent.final_approval"
    assert body.kwargs == {"run_id": "run-7", "step": "2:final_approval", "final": True}
    assert body.options["queue"] == "agents.final_approval"


@pytest.mark.parametrize("name", ["credit_decision", "research_chain", "counting"])
def test_every_step_of_a_compiled_workflow_links_the_run_failed_errback(
    app: Celery, name: str
) -> None:
    sigs = list(signatures(workflows.get(name).compile(app, "run-e")))
    assert len(sigs) == len(list(workflows.get(name).steps()))
    for sig in sigs:
        errbacks = sig.options.get("link_error") or []
        assert [e["task"] for e in errbacks] == [ERRBACK_TASK], sig
    assert ERRBACK_TASK in app.tasks


@pytest.mark.parametrize("name", ["credit_decision", "research_chain", "counting"])
def test_compiled_steps_carry_references_never_payloads(app: Celery, name: str) -> None:
    sigs = list(signatures(workflows.get(name).compile(app, "run-r")))
    for sig in sigs:
        assert set(sig.kwargs) <= {"run_id", "step", "final"}, sig
        assert sig.kwargs["run_id"] == "run-r"
        assert sig.args in ((), (0,))
        assert sig.task in app.tasks, f"{sig.task} has no task for a worker to run"
    assert [s.kwargs.get("final", False) for s in sigs] == [False] * (len(sigs) - 1) + [True]


def test_a_sequential_workflow_compiles_to_a_chain_fed_version_zero(app: Celery) -> None:
    canvas = workflows.get("counting").compile(app, "run-c")
    assert isinstance(canvas, chain)
    assert [(s.task, s.args, s.options["queue"]) for s in canvas.tasks] == [
        ("agent.increment", (0,), "agents.increment"),
        ("agent.double", (), "agents.double"),
    ]


def test_a_one_agent_workflow_compiles_to_one_final_step(app: Celery) -> None:
    canvas = Workflow("wf_single", ["increment"], register=False).compile(app, "run-1")
    assert canvas.task == "agent.increment"
    assert canvas.args == (0,)
    assert canvas.kwargs == {"run_id": "run-1", "step": "0:increment", "final": True}


def test_a_workflow_opening_in_parallel_feeds_every_member_version_zero(
    app: Celery, registry: ContractRegistry
) -> None:
    wf = build(registry, [parallel(make("wf_left", "wf_point@1", "wf_point@1"),
                                   make("wf_right", "wf_point@1", "wf_point@1")),
                          make("wf_join", "wf_joinedpoints@1", "wf_point@1")])
    canvas = wf.compile(app, "run-p")
    assert isinstance(canvas, _chord)
    assert [(s.kwargs["step"], s.args) for s in canvas.tasks] == [
        ("0.0:wf_left", (0,)), ("0.1:wf_right", (0,))]
    assert canvas.body.args == () and canvas.body.kwargs["final"] is True
