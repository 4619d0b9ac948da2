"""A run's route: what the pipeline's own work must know of its flow, recorded in the run.

A fleet is mixed: during a rolling deploy, or with pools split by queue, the
worker that plans a saga, re-drives a stopped run or enqueues a forgotten one
may import none of the run's agent modules. So the client that creates a run
records its route in the run's record (``route``, JSON, in the script that
creates it), and that work reads it from there, never from the local registries:

- a workflow's stages, as step keys (``<stage>:<agent>``, ``<stage>.<j>:<agent>``
  for a parallel member; the last stage's one step is the run's output);
- a choreography's start event, the agents subscribed to it and its terminal
  event types;
- the queue of every agent of the flow that does not run on its default queue
  ``agents.<name>`` (``agent.<name>`` runs on it, and so does ``compensate.<name>``).

The route is plain data: building a canvas or a delivery from it needs no agent
code. A run created before routes were recorded has none; its flow, if this
process has it, gives one (``Workflow.route``, ``Choreography.route``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import WorkflowDefinitionError
from .names import default_queue

__all__ = ["EDIT_STEP", "FlowKind", "Route", "agent_of", "newest_first", "queues_of"]


class FlowKind(StrEnum):
    WORKFLOW = "workflow"
    CHOREOGRAPHY = "choreography"


EDIT_STEP = "edit"
"""The step key of a person's edit of a replay's starting version (``replay --edit``):
nothing executed it, so nothing compensates it."""


def agent_of(step: str) -> str:
    """The agent of a step key (``<stage or event>:<agent>``)."""
    return step.rsplit(":", 1)[-1]


def queues_of(agents: Iterable[tuple[str, str]]) -> dict[str, str]:
    """What a route records of these (agent, queue) pairs: the queues that are not the
    agent's default (the others go without saying, and each run's record stays small)."""
    return {name: queue for name, queue in agents if queue != default_queue(name)}


def newest_first(sealed: Mapping[str, Any], broken: set[str]) -> list[list[str]]:
    """One step a stage, in reverse order of sealing (``sealed``: step key -> its
    version, which has ``.version``); steps whose output broke its contract (never
    sealed) first."""
    order = sorted(sealed, key=lambda step: sealed[step].version, reverse=True)
    return [[step] for step in sorted(broken - set(sealed))] + [[s] for s in order]


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """What a run's flow looks like to the pipeline's own work (see the module docstring)."""

    kind: FlowKind
    stages: tuple[tuple[str, ...], ...] = ()
    """A workflow's step keys, stage by stage."""
    queues: Mapping[str, str] = field(default_factory=dict)
    """Agent name -> its queue, for the agents that do not run on ``agents.<name>``."""
    start: str = ""
    """Where the run starts: a choreography's start event type; for a workflow replayed
    from a sealed version, the stage it starts at ('' for the first)."""
    subscribers: tuple[str, ...] = ()
    """The agents subscribed to ``start`` where the run was created."""
    agents: tuple[str, ...] = ()
    """A choreography's agents where the run was created (a workflow's are in its stages);
    a subscriber deployed later is not among them, and its queue is found elsewhere."""
    terminal: tuple[str, ...] = ()
    """A choreography's terminal event types."""
    input_version: int = 0
    """The version the run's first step receives: 0, its input; 1 for a replay whose
    starting version a person edited (version 1 is the edit, its parent version 0)."""

    def holds(self, agent: str) -> bool:
        """Whether ``agent`` is one of the flow's agents as the run's creator knew them."""
        if self.kind is FlowKind.WORKFLOW:
            return any(agent_of(step) == agent for stage in self.stages for step in stage)
        return agent in self.agents or agent in self.queues

    def queue_of(self, agent: str) -> str:
        """The queue of ``agent``: the one recorded here, else its default ``agents.<name>``
        (for an agent the route ``holds``; for another, ask ``catalog.queue_of``)."""
        return self.queues.get(agent) or default_queue(agent)

    def stage_of(self, step: str) -> int:
        """The index of the workflow stage that holds ``step``."""
        for i, stage in enumerate(self.stages):
            if step in stage:
                return i
        raise WorkflowDefinitionError(f"the route has no step {step!r}")

    def compensation_stages(self, sealed: Mapping[str, Any], broken: set[str]) -> list[list[str]]:
        """The steps to undo, newest first: a workflow's grouped by stage (a stage's steps
        are undone side by side), a choreography's one at a time in reverse order of
        sealing. A step the route does not hold (it cannot be placed) goes first, alone."""
        if self.kind is FlowKind.CHOREOGRAPHY:
            return newest_first(sealed, broken)
        by_stage: dict[int, list[str]] = {}
        strays = []
        for step in set(sealed) | broken:
            try:
                by_stage.setdefault(self.stage_of(step), []).append(step)
            except WorkflowDefinitionError:
                strays.append([step])
        return sorted(strays) + [sorted(by_stage[i]) for i in sorted(by_stage, reverse=True)]

    def to_json(self) -> str:
        data: dict[str, Any] = {"kind": self.kind.value,
                                "queues": dict(sorted(self.queues.items()))}
        if self.input_version:
            data["input_version"] = self.input_version
        if self.kind is FlowKind.WORKFLOW:
            data["stages"] = [list(stage) for stage in self.stages]
            if self.start:
                data["start"] = self.start
        else:
            data |= {"start": self.start, "subscribers": list(self.subscribers),
                     "agents": list(self.agents), "terminal": list(self.terminal)}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: str = "") -> Route:
        """Parse a recorded route; ``WorkflowDefinitionError`` naming ``where`` if it is
        not one."""
        try:
            data = json.loads(text)
            return cls(
                kind=FlowKind(data["kind"]),
                stages=tuple(tuple(_strings(s)) for s in data.get("stages", ())),
                queues={str(k): str(v) for k, v in dict(data.get("queues", {})).items()},
                start=str(data.get("start", "")),
                subscribers=tuple(_strings(data.get("subscribers", ()))),
                agents=tuple(_strings(data.get("agents", ()))),
                terminal=tuple(_strings(data.get("terminal", ()))),
                input_version=int(data.get("input_version", 0)),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise WorkflowDefinitionError(
                f"{where or 'route'}: not a recorded route ({e})") from None


def _strings(items: Sequence[Any]) -> list[str]:
    if isinstance(items, str) or not all(isinstance(i, str) for i in items):
        raise TypeError(f"expected a list of strings, got {items!r}")
    return list(items)
