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

from celery import Celery, chain, chord, group
from celery.canvas import Signature

from .agent import Agent, AgentRegistry, agents
from .contracts import Contract, ContractRegistry, check_handoff, contracts, fan_in_schema
from .errors import ContractMismatch, UnknownWorkflow, WorkflowDefinitionError

if TYPE_CHECKING:
    from .state import StateStore, Version

__all__ = ["Flow", "Parallel", "Step", "Workflow", "WorkflowRegistry", "parallel", "workflows"]

ERRBACK_TASK = "pipeline.run_failed"


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
            if step.agent.default_output is not None:  # what the `skip` fallback seals
                output.validate(step.agent.default_output, side="default output",
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
        by_stage: dict[int, list[str]] = {}
        for step in set(sealed) | broken:
            by_stage.setdefault(self.stage_of(step), []).append(step)
        return [sorted(by_stage[i]) for i in sorted(by_stage, reverse=True)]

    def enqueue(self, app: Celery, store: StateStore, run_id: str) -> None:
        """Send the run's canvas to the broker."""
        send(app, self.compile(app, run_id))

    def owed(self, store: StateStore, run_id: str) -> list[str]:
        """The steps the run waits for: those not sealed of its first stage with any."""
        return self._owed(store, run_id)[1]

    def _owed(self, store: StateStore, run_id: str) -> tuple[int, list[str], int | list[int]]:
        """(stage, its steps not sealed, what the stage receives); stage -1 when all sealed."""
        replay_start = store.run_info(run_id).replay_start
        keys = [s.key for s in self.steps()]
        sealed = dict(zip(keys, store.sealed_steps(run_id, keys), strict=True))
        for i in range(int(replay_start or 0), len(self.stages)):
            todo = [s.key for s in self.stages[i] if sealed[s.key] is None]
            if todo:
                return i, todo, self.upstream(i, sealed, replay_start=replay_start)
        return -1, [], 0

    def upstream(self, stage: int, sealed: Mapping[str, int | None], *,
                 replay_start: str = "") -> int | list[int]:
        """What stage ``stage`` receives: version 0 at the workflow's start (or where a
        replay started), else the versions its upstream stage sealed (``sealed``: step key
        -> version; the caller makes sure they are all there)."""
        if stage == 0 or str(stage) == replay_start:
            return 0
        versions = [v for v in (sealed.get(s.key) for s in self.stages[stage - 1])
                    if v is not None]
        return versions[0] if len(versions) == 1 else versions

    def redrive(self, app: Celery, store: StateStore, run_id: str) -> list[str]:
        """Send the run's canvas again from its first stage with a step not sealed, fed the
        versions its upstream sealed; the step keys it hands out (none when all sealed).

        For a run that stopped moving with none of its messages left in the broker (the
        sweeper): a message lost between the broker's pop and its unacked record, or a
        chord whose join counted a redelivered member twice. A step sealed meanwhile
        returns its version; the new chord counts its own members.
        """
        stage, todo, upstream = self._owed(store, run_id)
        if todo:
            send(app, self.compile(app, run_id, start=stage, upstream=upstream))
        return todo

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
        """The canvas for one run: chains for sequence, chords for fan-out/fan-in.

        The first step(s) receive version 0, the run's input; to resume a run,
        ``start`` names the stage to begin at and ``upstream`` what it receives. One errback with
        the ``(request, exc, traceback)`` signature is linked to every step's
        own signature: ``chord.link_error`` would clone it immutable, and an
        immutable errback is called without the request, exception and traceback.
        """
        parts: list[Signature] = []
        for i, stage in enumerate(self.stages[start:], start):
            first = upstream if i == start else None
            sigs = [self._signature(app, run_id, s, upstream=first, joined=len(stage) > 1)
                    for s in stage]
            if len(sigs) == 1:
                previous = parts[-1] if parts else None
                if isinstance(previous, group):
                    parts[-1] = chord(previous, sigs[0], app=app)
                else:
                    parts.append(sigs[0])
            else:
                parts.append(group(sigs, app=app))
        canvas: Signature = parts[0] if len(parts) == 1 else chain(*parts, app=app)
        return canvas

    @staticmethod
    def _signature(
        app: Celery, run_id: str, step: Step, *, upstream: int | list[int] | None, joined: bool
    ) -> Signature:
        """One step's task. Only a chord member's result is stored (the chord
        joins on it); every other step ignores its Celery result, since the
        sealed version is the result. That saves a backend write per step and
        keeps the client from subscribing to each run's result channel."""
        kwargs: dict[str, Any] = {"run_id": run_id, "step": step.key}
        if step.final:
            kwargs["final"] = True
        sig = app.signature(
            step.agent.task_name,
            args=() if upstream is None else (upstream,),
            kwargs=kwargs,
            queue=step.agent.queue,
            ignore_result=not joined,
        )
        sig.link_error(app.signature(ERRBACK_TASK))
        return sig

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


def send(app: Celery, canvas: Signature) -> None:
    """Send a canvas, and stop listening for results nobody will read.

    Sending subscribes the sender to the result channel of every task whose result is
    stored (a chord's members, which the chord joins on) and keeps their AsyncResults
    pending in the app. The client waits on the run's log, never on those results: left
    alone, a long-lived client would hold three subscriptions per run, for ever.
    """
    result = canvas.apply_async()
    backend = app.backend
    if not hasattr(backend, "remove_pending_result"):  # a backend without subscriptions
        return
    todo: list[Any] = [result]
    while todo:
        r = todo.pop()
        if r is None:
            continue
        todo += list(getattr(r, "results", None) or [])  # a group's members
        todo.append(getattr(r, "parent", None))
        if getattr(r, "id", None) and not getattr(r, "results", None):
            backend.remove_pending_result(r)


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
