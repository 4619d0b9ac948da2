"""What every kind of flow (a ``Workflow``, a ``Choreography``) offers, and the one
registry of flows by name: ``pipeline run`` takes either, by name.

A run records its flow's route when it is created (``route.py``); the pipeline's own
work reads a run's route from its record (``route_of``), never from this process's
registry alone, so a worker that lacks a flow can still drive its runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from celery import Celery

from .agent import Agent
from .contracts import Contract
from .errors import BrokerUnavailable, RunNotParked, UnknownWorkflow, WorkflowDefinitionError
from .registry import Registry
from .route import Route, agent_of
from .state import Budget, RunInfo, StateStore, Version

__all__ = ["Flow", "WorkflowRegistry", "known_route", "parked_again_on_failure",
           "recorded_route", "route_of", "workflows"]


class Flow(Protocol):
    """What the client, the saga and the CLI ask of a workflow or a choreography: its
    contracts and shape, its route, how it starts, resumes, replays, is re-driven and
    compensated."""

    name: str
    kind: str
    description: str
    budget: Budget | None
    """What each run may spend unless its start gives its own (``Budget``), or None."""

    @property
    def input_contract(self) -> Contract: ...

    @property
    def output_contract(self) -> Contract: ...

    @property
    def entry_agent(self) -> str: ...

    def contract_of(self, ref: str) -> Contract: ...

    def agents(self) -> list[Agent]: ...

    def shape(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...

    @property
    def route(self) -> Route: ...

    def compensation_stages(self, sealed: dict[str, Version],
                            broken: set[str]) -> list[list[str]]: ...

    def enqueue(self, app: Celery, store: StateStore, run_id: str,
                route: Route | None = None) -> None: ...

    def replay_route(self, source: Version, *, starting: bool, inherited: str,
                     where: str) -> tuple[Route, list[str]]: ...

    def owed(self, store: StateStore, run_id: str) -> list[str]: ...

    def redrive(self, app: Celery, store: StateStore, run_id: str) -> list[str]: ...

    def resume(self, app: Celery, store: StateStore, info: RunInfo, output: Any = None,
               step: str | None = None) -> None: ...


class WorkflowRegistry(Registry[Flow]):
    """Workflows and choreographies by name: one namespace, since ``pipeline run`` takes both."""

    def __init__(self) -> None:
        super().__init__("workflow", UnknownWorkflow)

    def register(self, wf: Flow) -> Flow:
        return self._put(wf.name, wf)


workflows = WorkflowRegistry()
"""The process-wide workflow registry."""


def check_budget(budget: object, flow: str) -> Budget | None:
    """A flow's ``budget``, checked: a ``Budget`` or None."""
    if budget is not None and not isinstance(budget, Budget):
        raise WorkflowDefinitionError(f"flow {flow}: budget must be a pipeline.Budget("
                                      f"tokens=..., cost=...), not {budget!r}")
    return budget


@contextmanager
def parked_again_on_failure(store: StateStore, run_id: str, parked: Sequence[str],
                            what: str) -> Iterator[None]:
    """Around a resume's sending: when it fails, park the steps again so that ``resume``
    can be tried once more (a step sealed meanwhile returns its version when it runs
    again, a delivery is a duplicate), and say so as ``BrokerUnavailable``."""
    try:
        yield
    except RunNotParked:
        raise
    except Exception as e:
        for key in parked:
            store.park(run_id, step=key, agent=agent_of(key),
                       reason=f"resume failed: {type(e).__name__}: {e}")
        raise BrokerUnavailable(f"cannot enqueue {what} of run {run_id}: "
                                f"{type(e).__name__}: {e}; the run is parked again") from e


def route_of(info: RunInfo) -> Route:
    """The route run ``info`` was created with (see ``recorded_route``)."""
    return recorded_route(info.run_id, info.workflow, info.route)


def known_route(info: RunInfo) -> Route | None:
    """``route_of``, or None for a run whose route cannot be known here (one from before
    routes were recorded, of a flow not registered here, or a route this version cannot
    read): its agents' queues are then found without it (``catalog.queue_of``)."""
    try:
        return route_of(info)
    except (UnknownWorkflow, WorkflowDefinitionError):
        return None


def recorded_route(run_id: str, workflow: str, recorded: str) -> Route:
    """The route a run recorded (JSON); a run from before routes were recorded takes its
    flow's, if this process has the flow (else ``UnknownWorkflow``)."""
    if recorded:
        return Route.from_json(recorded, f"run {run_id}")
    return workflows.get(workflow).route
