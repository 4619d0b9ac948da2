"""Workflows: a graph of agents, checked when built, compiled to a Celery canvas.

``Workflow("w", [a, parallel(b, c, d), e])`` compiles to
``chain(step(a), chord(group(step(b), step(c), step(d)), step(e)))``. Messages
carry references only: each step task receives the version number(s) its upstream
sealed and returns the version it sealed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from celery import Celery
from celery.canvas import Signature

from .agent import Agent, AgentRegistry, agents
from .canvas import compile_route, owed, redrive, send, upstream
from .contracts import Contract, ContractRegistry, check_handoff, contracts, fan_in_schema
from .errors import (
    ContractMismatch,
    InputError,
    RunNotParked,
    WorkflowDefinitionError,
)
from .flow import check_budget, parked_again_on_failure, route_of, workflows
from .route import FlowKind, Route, queues_of
from .state import Budget, RunInfo, StateStore, Version
from .state.version import sealable

__all__ = ["Parallel", "Step", "Workflow", "parallel"]


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


class Workflow:
    """A named, checked sequence of steps and parallel groups."""

    kind = "workflow"

    def __init__(
        self,
        name: str,
        steps: Sequence[str | Agent | Parallel],
        *,
        description: str = "",
        budget: Budget | None = None,
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
        self.budget = check_budget(budget, name)
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

    def enqueue(self, app: Celery, store: StateStore, run_id: str,
                route: Route | None = None) -> None:
        """Send the run's canvas to the broker; a replay's from the stage its ``route``
        starts at, with the version that route says the run starts from."""
        route = route or self.route
        send(app, compile_route(app, route, run_id, start=int(route.start or 0),
                                upstream=route.input_version))

    def replay_route(self, source: Version, *, starting: bool, inherited: str,
                     where: str) -> tuple[Route, list[str]]:
        """A replay from ``source`` (``where`` names it in errors): its route, starting at
        the stage after the one that sealed it (``starting``: a run's version 0, which
        starts where that run started, ``inherited``), and the contracts its first stage
        takes; ``InputError`` when nothing comes after it, or it is one of a parallel
        group (its siblings' outputs would be missing)."""
        stage = int(inherited or 0) if starting else self.stage_of(source.step) + 1
        if stage >= len(self.stages):
            raise InputError(f"{where} is the run's output: nothing comes after it")
        if not starting and len(self.stages[stage - 1]) > 1:
            group = ", ".join(s.agent.name for s in self.stages[stage - 1])
            raise InputError(f"{where} is one of a parallel group ({group}); replay from "
                             "the version that joins them, or from 0")
        return (replace(self.route, start=str(stage)),
                [s.agent.input for s in self.stages[stage]])

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

    def resume(self, app: Celery, store: StateStore, info: RunInfo, output: Any = None,
               step: str | None = None) -> None:
        """Continue a run parked for a person (``Pipeline.resume`` says how): seal ``output``
        for the parked step, or run the parked steps again, and send the rest of the run."""
        run_id, parked = info.run_id, list(info.parked_steps)
        stage = self.stage_of(parked[0])
        members = {s.key: s for s in self.stages[stage]}
        target, form = None, None
        if output is not None:
            if step is None and len(parked) > 1:
                raise InputError(f"run {run_id} has several parked steps "
                                 f"({', '.join(parked)}): name the one the output is for")
            target = members.get(step or parked[0])
            if target is None or target.key not in parked:
                raise InputError(f"step {step!r} of run {run_id} is not parked "
                                 f"(parked: {', '.join(parked)})")
            form = sealable(output, store.max_payload_bytes,
                            f"run {run_id} output for parked step {target.key}")
            self.contract_of(target.agent.output).validate(
                output, side="output", agent=target.agent.name, run_id=run_id)
        running = [k for k in members if k not in parked]
        unsealed = [k for k, v in zip(running, store.sealed_steps(run_id, running), strict=True)
                    if v is None]
        if unsealed:
            raise RunNotParked(f"run {run_id}: steps {', '.join(unsealed)} beside the parked one "
                               "are still running; resume once they have sealed")
        given = self._resumed_upstream(store, info, stage)
        store.resume(run_id, how="output" if output is not None else "rerun")
        with parked_again_on_failure(store, run_id, parked, "the rest of the run"):
            if target is not None:
                parents = given if isinstance(given, list) else [given]
                sealing = store.seal(run_id, step=target.key, agent=target.agent.name,
                                     contract=target.agent.output, payload=output,
                                     parents=parents, final=target.final, worker="person",
                                     form=form)
                if sealing.outcome not in ("new", "sealed"):
                    raise RunNotParked(f"run {run_id} is {sealing.status or 'gone'}; the "
                                       "output was not sealed")
                if len(members) == 1:  # go on from the next stage
                    if target.final:
                        return
                    stage += 1
                    given = self._resumed_upstream(store, info, stage)
            # from the route the run was created with, as the saga and the sweeper do
            send(app, compile_route(app, route_of(info), run_id, start=stage, upstream=given))

    def _resumed_upstream(self, store: StateStore, info: RunInfo,
                          stage: int) -> int | list[int]:
        """What stage ``stage`` of a run receives; refused while a step of the stage
        before it is not sealed."""
        keys = [] if stage == 0 else [s.key for s in self.stages[stage - 1]]
        sealed = dict(zip(keys, store.sealed_steps(info.run_id, keys), strict=True))
        missing = [k for k, v in sealed.items() if v is None]
        if missing and str(stage) != info.replay_start:
            raise RunNotParked(f"run {info.run_id}: steps {missing} are not sealed; cannot "
                               "resume")
        return self.upstream(stage, sealed, replay_start=info.replay_start)

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
