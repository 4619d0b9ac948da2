"""A run's route: what a worker without the flow's agents reads to plan, dispatch and
re-drive. Pure logic, plus the route the credit and research flows record."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import tasks  # noqa: F401 - registers the example flows
from pipeline.errors import WorkflowDefinitionError
from pipeline.flow import workflows
from pipeline.route import FlowKind, Route, queues_of

CREDIT = Route(kind=FlowKind.WORKFLOW,
               stages=(("0:a",), ("1.0:b", "1.1:c"), ("2:d",)),
               queues={"a": "agents.a", "b": "fast", "c": "agents.c", "d": "agents.d"})


def version(n: int) -> SimpleNamespace:
    return SimpleNamespace(version=n)


def test_a_route_survives_json_exactly() -> None:
    chore = Route(kind=FlowKind.CHOREOGRAPHY, queues={"research": "agents.research"},
                  start="research.requested", subscribers=("research",),
                  terminal=("report.completed",))
    for route in (CREDIT, chore):
        assert Route.from_json(route.to_json()) == route


def test_a_workflows_compensation_is_grouped_by_stage_newest_first() -> None:
    sealed = {"0:a": version(1), "1.0:b": version(2), "1.1:c": version(3)}
    assert CREDIT.compensation_stages(sealed, {"2:d"}) == [["2:d"], ["1.0:b", "1.1:c"], ["0:a"]]


def test_a_step_the_route_does_not_hold_is_compensated_first_alone() -> None:
    sealed = {"0:a": version(1), "9:ghost": version(2)}
    assert CREDIT.compensation_stages(sealed, set()) == [["9:ghost"], ["0:a"]]


def test_a_choreographys_compensation_is_newest_sealed_first_broken_before_all() -> None:
    chore = Route(kind=FlowKind.CHOREOGRAPHY, start="x.y")
    sealed = {"e1:r": version(1), "e2:a": version(3), "e2:b": version(2)}
    assert chore.compensation_stages(sealed, {"e3:c"}) == [["e3:c"], ["e2:a"], ["e2:b"],
                                                          ["e1:r"]]


def test_a_queue_comes_from_the_route_else_it_is_the_agents_default() -> None:
    assert CREDIT.queue_of("b") == "fast"
    assert CREDIT.queue_of("y") == "agents.y"
    assert queues_of([("a", "agents.a"), ("b", "fast")]) == {"b": "fast"}


@pytest.mark.parametrize("text", ["", "[]", '{"kind": "dag"}', '{"kind": "workflow", '
                                  '"stages": [[1]]}', '{"kind": "workflow", "stages": ["ab"]}'])
def test_a_route_that_is_not_one_is_refused_by_name(text: str) -> None:
    with pytest.raises(WorkflowDefinitionError, match="run r1: not a recorded route"):
        Route.from_json(text, "run r1")


def test_the_example_flows_record_their_stages_and_queues() -> None:
    credit = workflows.get("credit_decision").route
    assert credit.stages == (("0:credit_score",),
                             ("1.0:income_verification", "1.1:risk_assessment",
                              "1.2:fraud_detection"),
                             ("2:final_approval",))
    assert credit.queue_of("fraud_detection") == "agents.fraud_detection"
    assert len(credit.to_json()) < 200  # kept in every run's record
    research = workflows.get("research_report").route
    assert research.kind is FlowKind.CHOREOGRAPHY
    assert research.start == "research.requested" and research.subscribers == ("research",)
    assert research.queue_of("audit") == "agents.audit"
