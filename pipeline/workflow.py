"""Workflows: a graph of agents, checked when built, compiled to a Celery canvas.

``Workflow("w", [a, parallel(b, c, d), e])`` compiles to
``chain(step(a), chord(group(step(b), step(c), step(d)), step(e)))`` (DESIGN
section 6). Messages carry references only: each step task receives the
version number(s) its upstream sealed and returns the version it sealed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from celery import Celery
from celery.canvas import Signature

from .agent import Agent, AgentRegistry, agents
from .canvas import compile_route, owed, redrive, send, upstream
from .contracts import Contract, ContractRegistry, check_handoff, contracts, fan_in_schema
from .errors import ContractMismatch, UnknownWorkflow, WorkflowDefinitionError
from .route import ERRBACK_TASK, FlowKind, Route, queues_of

if TYPE_CHECKING:
    from .state import RunInfo, StateStore, Version

__all__ = ["ERRBACK_TASK", "Flow", "Parallel", "Step", "Workflow", "WorkflowRegistry", "parallel",
           "known_route", "route_of", "send", "workflows"]


@dataclass(frozen=True, slots=True)
class Parallel:
    """Agents that run side by side on the same input; the next step joins them."""

    agents: tuple[str | Agent, ...]


def parallel(*members: str | Agent) -> Parallel:
    return Parallel(tuple(members))


@dataclass(frozen=True, slots=True)
class Step:
    """One agent at one place in a workflow."""

    key: str
    agent: Agent
    fan_in: tuple[str, ...] = ()  # the agents whose outputs this step joins
    final: bool = False


class Flow(Protocol):
    """What the client, the saga and the CLI ask of a workflow or a choreography."""

    name: str
    kind: str
    description: str

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

    def enqueue(self, app: Celery, store: StateStore, run_id: str) -> None: ...

    def owed(self, store: StateStore, run_id: str) -> list[str]: ...

    def redrive(self, app: Celery, store: StateStore, run_id: str) -> list[str]: ...


class Workflow:
    """A named, checked sequence of steps and parallel groups."""

    kind = "workflow"

    def __init__(
        self,
        name: str,
        steps: Sequence[str | Agent | Parallel],
        *,
        description: str = "",
        agent_registry: AgentRegistry = agents,
        contract_registry: ContractRegistry = contracts,
        register: bool = True,
    ) -> None:
        if not name:
            raise WorkflowDefinitionError("a workflow needs a name")
        if not steps:
            raise WorkflowDefinitionError(f"workflow {name}: no steps")
        self.name = name
        self.description = description
        self._contracts = contract_registry
        self.stages: list[list[Step]] = []
        previous: list[Agent] = []
        for i, item in enumerate(steps):
            members = item.agents if isinstance(item, Parallel) else (item,)
            resolved = [m if isinstance(m, Agent) else agent_registry.get(m) for m in members]
            if not resolved:
                raise WorkflowDefinitionError(f"workflow {name}: step {i} is an empty parallel()")
            names = [a.name for a in resolved]
            if len(set(names)) != len(names):
                raise WorkflowDefinitionError(
                    f"workflow {name}: step {i} runs the same agent twice in parallel: {names}"
                )
            if len(resolved) > 1 and len(previous) > 1:
                raise WorkflowDefinitionError(
                    f"workflow {name}: step {i} follows another parallel group; put one agent "
                    "between them to join the first group"
                )
            fan_in = tuple(p.name for p in previous) if len(previous) > 1 else ()
            stage = [
                Step(key=f"{i}.{j}:{a.name}" if len(resolved) > 1 else f"{i}:{a.name}",
                     agent=a, fan_in=fan_in)
                for j, a in enumerate(resolved)
            ]
            self.stages.append(stage)
            previous = resolved
        if len(self.stages[-1]) > 1:
            raise WorkflowDefinitionError(
                f"workflow {name}: it ends in a parallel group; end it with one agent whose "
                "output is the run's output"
            )
        last = self.stages[-1][0]
        self.stages[-1][0] = Step(key=last.key, agent=last.agent, fan_in=last.fan_in, final=True)
        self._check_contracts()
        self.route = Route(kind=FlowKind.WORKFLOW,
                           stages=tuple(tuple(s.key for s in stage) for stage in self.stages),
                           queues=queues_of((s.agent.name, s.agent.queue)
                                            for s in self.steps()))
        """What the pipeline's own work needs of this workflow, recorded in each run."""
        if register:
            workflows.register(self)

    # -- checks -----------------------------------------------------------------

    def _check_contracts(self) -> None:
        first = {self._contracts.get(s.agent.input).ref for s in self.stages[0]}
        if len(first) > 1:
            raise ContractMismatch(
                f"workflow {self.name}: the first parallel agents expect different inputs "
                f"({', '.join(sorted(first))}); they all receive the run's input"
            )
        for before, after in zip(self.stages, self.stages[1:], strict=False):
            for step in after:
                consumer = self._contracts.get(step.agent.input)
                where = f"workflow {self.name}, step {step.key}"
                if step.fan_in:
                    producers = {s.agent.name: self._contracts.get(s.agent.output) for s in before}
                    joined = Contract(
                        f"fan-in({','.join(producers)})",
                        1,
                        fan_in_schema({n: c.schema for n, c in producers.items()}),
                    )
                    check_handoff(joined, consumer, where)
                else:
                    check_handoff(self._contracts.get(before[0].agent.output), consumer, where)
        for step in self.steps():  # every output, the last step's too
            output = self._contracts.get(step.agent.output)
            default = step.agent.default_output  # what the `skip` fallback seals
            if default is not None and not callable(default):  # a function's: when called
                output.validate(default, side="default output",
                                agent=step.agent.name)

    # -- facts ------------------------------------------------------------------

    def contract_of(self, ref: str) -> Contract:
        return self._contracts.get(ref)

    @property
    def input_contract(self) -> Contract:
        return self._contracts.get(self.stages[0][0].agent.input)

    @property
    def output_contract(self) -> Contract:
        return self._contracts.get(self.stages[-1][0].agent.output)

    def stage_of(self, step_key: str) -> int:
        """The index of the stage that holds ``step_key``."""
        for i, stage in enumerate(self.stages):
            if any(s.key == step_key for s in stage):
                return i
        raise WorkflowDefinitionError(f"workflow {self.name} has no step {step_key!r}")

    @property
    def entry_agent(self) -> str:
        """Who the run's input is for (named in a refused input's error)."""
        return self.stages[0][0].agent.name

    def compensation_stages(self, sealed: dict[str, Version], broken: set[str]) -> list[list[str]]:
        """The steps to undo, grouped by stage, newest stage first; a stage's steps
        are compensated side by side."""
        return self.route.compensation_stages(sealed, broken)

    def enqueue(self, app: Celery, store: StateStore, run_id: str) -> None:
        """Send the run's canvas to the broker."""
        send(app, self.compile(app, run_id))

    def owed(self, store: StateStore, run_id: str) -> list[str]:
        """The steps the run waits for: those not sealed of its first stage with any."""
        return owed(store, self.route, run_id)[1]

    def upstream(self, stage: int, sealed: Mapping[str, int | None], *,
                 replay_start: str = "") -> int | list[int]:
        """What stage ``stage`` receives (see the module function ``upstream``)."""
        return upstream(self.route, stage, sealed, replay_start=replay_start)

    def redrive(self, app: Celery, store: StateStore, run_id: str) -> list[str]:
        """Send the run's canvas again from its first stage with a step not sealed (see
        the module function ``redrive``)."""
        return redrive(app, store, self.route, run_id)

    def steps(self) -> Iterator[Step]:
        for stage in self.stages:
            yield from stage

    def agents(self) -> list[Agent]:
        return [s.agent for s in self.steps()]

    def shape(self) -> str:
        """``a -> (b | c | d) -> e``."""
        parts = []
        for stage in self.stages:
            names = [s.agent.name for s in stage]
            parts.append(names[0] if len(names) == 1 else "(" + " | ".join(names) + ")")
        return " -> ".join(parts)

    # -- compilation ------------------------------------------------------------

    def compile(
        self, app: Celery, run_id: str, *, start: int = 0, upstream: int | list[int] = 0
    ) -> Signature:
        """The canvas for one run (see the module function ``compile_route``)."""
        return compile_route(app, self.route, run_id, start=start, upstream=upstream)

    def describe(self) -> dict[str, Any]:
        return {
            "workflow": self.name,
            "kind": self.kind,
            "shape": self.shape(),
            "input_contract": self.input_contract.ref,
            "output_contract": self.output_contract.ref,
            "description": self.description,
        }

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, {self.shape()})"


class WorkflowRegistry:
    """Workflows and choreographies by name: one namespace, since ``pipeline run`` takes both."""

    def __init__(self) -> None:
        self._by_name: dict[str, Flow] = {}

    def register(self, wf: Flow) -> Flow:
        self._by_name[wf.name] = wf
        return wf

    def get(self, name: str) -> Flow:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise UnknownWorkflow(f"unknown workflow {name!r} (registered: {known})") from None

    def __iter__(self) -> Iterator[Flow]:
        return iter(sorted(self._by_name.values(), key=lambda w: w.name))


workflows = WorkflowRegistry()
"""The process-wide workflow registry."""


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
