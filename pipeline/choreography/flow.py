"""A choreography: where an event flow starts, which events end it, checked when built;
how its runs start, resume, replay, are re-driven and compensated."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from celery import Celery

from .. import catalog
from ..agent import Agent, AgentRegistry, agents
from ..contracts import Contract, ContractRegistry, check_handoff, contracts
from ..errors import (
    ContractMismatch,
    DefinitionError,
    InputError,
    RunNotParked,
    WorkflowDefinitionError,
)
from ..events import check_event_type
from ..flow import check_budget, parked_again_on_failure, workflows
from ..route import FlowKind, Route, newest_first, queues_of
from ..state import Budget, RunInfo, StateStore, Version
from ..state.version import Sealable, sealable
from .delivery import Delivery
from .publishing import CLIENT, Handover, dispatch, enqueue, event_record, owed, redrive

__all__ = ["Choreography"]


class Choreography:
    """A named event flow: where it starts, which events end it. Checked by :meth:`check`."""

    kind = "choreography"

    def __init__(
        self,
        name: str,
        *,
        start: str,
        terminal: Sequence[str],
        input: str,
        description: str = "",
        budget: Budget | None = None,
        agent_registry: AgentRegistry = agents,
        contract_registry: ContractRegistry = contracts,
        register: bool = True,
    ) -> None:
        if not name:
            raise WorkflowDefinitionError("a choreography needs a name")
        if isinstance(terminal, str):
            terminal = (terminal,)
        if not terminal:
            raise WorkflowDefinitionError(f"choreography {name}: no terminal event type")
        try:
            check_event_type(start, f"choreography {name}: start")
            for t in terminal:
                check_event_type(t, f"choreography {name}: terminal")
        except DefinitionError as e:
            raise WorkflowDefinitionError(str(e)) from None
        self.name = name
        self.start_event = start
        self.terminal = tuple(terminal)
        self.input = input
        self.description = description
        self.budget = check_budget(budget, name)
        self._agents = agent_registry
        self._contracts = contract_registry
        contract_registry.get(input)  # UnknownContract now, not at the first run
        if register:
            workflows.register(self)

    # -- routing ----------------------------------------------------------------

    def subscribers(self, event_type: str) -> list[Agent]:
        """The registered agents whose ``on`` matches ``event_type``, by name."""
        return self._agents.subscribers(event_type)

    def edges(self) -> Iterator[tuple[str, Agent]]:
        """(event type, subscriber) for every event the flow can publish, from the start."""
        seen_events: set[str] = set()
        todo = [self.start_event]
        while todo:
            event = todo.pop(0)
            if event in seen_events:
                continue
            seen_events.add(event)
            for a in self.subscribers(event):
                yield event, a
                if a.emits is not None:
                    todo.append(a.emits)

    def check(self) -> None:
        """Refuse a flow that cannot work: no subscriber for the start, a handoff whose
        contracts do not line up, a cycle, or a terminal event nothing publishes."""
        edges = list(self.edges())
        if not any(event == self.start_event for event, _ in edges):
            raise WorkflowDefinitionError(
                f"choreography {self.name}: no agent subscribes to its start event "
                f"{self.start_event!r}; give one `on=[{self.start_event!r}]`"
            )
        producers: dict[str, list[Agent]] = {}
        for _, a in edges:
            if a.emits is not None:
                producers.setdefault(a.emits, []).append(a)
        for event, a in edges:
            consumer = self._contracts.get(a.input)
            sources = ([(CLIENT, self._contracts.get(self.input))] if event == self.start_event
                       else [(p.name, self._contracts.get(p.output)) for p in producers[event]])
            for publisher, produced in sources:
                check_handoff(produced, consumer,
                              f"choreography {self.name}, event {event} from {publisher} to "
                              f"{a.name}")
        self._check_acyclic(edges)
        published = set(producers)
        if not published & set(self.terminal):
            raise WorkflowDefinitionError(
                f"choreography {self.name}: no agent reachable from {self.start_event!r} "
                f"publishes a terminal event ({', '.join(self.terminal)}); the run could "
                "never end"
            )
        outputs = {p.output for t in self.terminal for p in producers.get(t, [])}
        if len(outputs) > 1:
            raise ContractMismatch(
                f"choreography {self.name}: its terminal events carry different contracts "
                f"({', '.join(sorted(outputs))}); a run's output has one contract"
            )

    def _check_acyclic(self, edges: list[tuple[str, Agent]]) -> None:
        following: dict[str, list[str]] = {}
        for event, a in edges:
            if a.emits is not None:
                following.setdefault(event, []).append(a.emits)

        def visit(event: str, path: list[str]) -> None:
            if event in path:
                loop = " -> ".join(path[path.index(event):] + [event])
                raise WorkflowDefinitionError(
                    f"choreography {self.name}: events loop ({loop}); every run would "
                    "publish forever"
                )
            for nxt in following.get(event, []):
                visit(nxt, path + [event])

        visit(self.start_event, [])

    # -- facts (what the client, the saga and the CLI ask of any flow) -----------------

    @property
    def input_contract(self) -> Contract:
        return self._contracts.get(self.input)

    @property
    def output_contract(self) -> Contract:
        for t in self.terminal:
            for _, a in self.edges():
                if a.emits == t:
                    return self._contracts.get(a.output)
        raise WorkflowDefinitionError(f"choreography {self.name}: nothing publishes "
                                      f"{', '.join(self.terminal)}")

    @property
    def entry_agent(self) -> str:
        """Who the run's input is for (named in a refused input's error)."""
        return ",".join(a.name for a in self.subscribers(self.start_event)) or self.name

    def contract_of(self, ref: str) -> Contract:
        return self._contracts.get(ref)

    def agents(self) -> list[Agent]:
        found: dict[str, Agent] = {}
        for _, a in self.edges():
            found.setdefault(a.name, a)
        return list(found.values())

    def shape(self) -> str:
        """``research.requested -> research; research.completed -> analysis, audit; ...``."""
        by_event: dict[str, list[str]] = {}
        for event, a in self.edges():
            by_event.setdefault(event, []).append(a.name)
        routes = "; ".join(f"{e} -> {', '.join(names)}" for e, names in by_event.items())
        return f"{routes}; ends at {' | '.join(self.terminal)}"

    def describe(self) -> dict[str, Any]:
        return {
            "workflow": self.name,
            "kind": self.kind,
            "shape": self.shape(),
            "start": self.start_event,
            "terminal": list(self.terminal),
            "subscriptions": [{"agent": a.name, "on": list(a.on), "emits": a.emits}
                              for a in self.agents()],
            "input_contract": self.input_contract.ref,
            "output_contract": self.output_contract.ref,
            "description": self.description,
        }

    @property
    def route(self) -> Route:
        """What the pipeline's own work needs of this flow, recorded in each run: the
        start event's subscribers (as registered now) and every agent's queue."""
        return Route(kind=FlowKind.CHOREOGRAPHY,
                     queues=queues_of((a.name, a.queue) for a in self.agents()),
                     agents=tuple(a.name for a in self.agents()),
                     start=self.start_event,
                     subscribers=tuple(a.name for a in self.subscribers(self.start_event)),
                     terminal=self.terminal)

    def compensation_stages(self, sealed: dict[str, Version], broken: set[str]) -> list[list[str]]:
        """Newest first, one step a stage: the reverse of the order they were sealed.
        Steps whose output broke its contract (never sealed) come first."""
        return newest_first(sealed, broken)

    # -- running ------------------------------------------------------------------

    def enqueue(self, app: Celery, store: StateStore, run_id: str,
                route: Route | None = None) -> None:
        """Publish the run's starting event (once) and dispatch its deliveries; a replay's
        ``route`` starts at another event."""
        enqueue(app, store, route or self.route, run_id)

    def replay_route(self, source: Version, *, starting: bool, inherited: str,
                     where: str) -> tuple[Route, list[str]]:
        """A replay from ``source`` (``where`` names it in errors): its route, starting at
        the event its agent publishes (``starting``: a run's version 0, which starts at
        the event that run started at, ``inherited``), and the contracts its subscribers
        take; ``InputError`` when nothing comes after it."""
        event_type = inherited or self.start_event
        if not starting:
            publisher = self._agents.get(source.agent) if source.agent in self._agents else None
            if publisher is None or not publisher.emits:
                raise InputError(f"{where}: its agent publishes nothing, so nothing comes "
                                 "after it to replay")
            if publisher.emits in self.terminal:
                raise InputError(f"{where} is the run's output ({publisher.emits} ends the "
                                 "run): nothing comes after it")
            event_type = publisher.emits
        subscribers = self.subscribers(event_type)
        if not subscribers:
            raise InputError(f"{where}: no agent subscribes to {event_type}")
        route = replace(self.route, start=event_type,
                        subscribers=tuple(a.name for a in subscribers))
        return route, [a.input for a in subscribers]

    def owed(self, store: StateStore, run_id: str) -> list[str]:
        """The deliveries the run's ledger still owes (see the module function ``owed``)."""
        return [key for key, _ in owed(store, run_id)]

    def redrive(self, app: Celery, store: StateStore, run_id: str) -> list[str]:
        """Hand out again every delivery the run's ledger still owes (see the module
        function ``redrive``)."""
        return redrive(app, store, self.route, run_id)

    def resume(self, app: Celery, store: StateStore, info: RunInfo, output: Any = None,
               step: str | None = None) -> None:
        """Continue a run whose deliveries parked: seal ``output`` for one of them (named by
        ``step`` when several parked) and publish what its agent emits; every other parked
        delivery (all of them, without ``output``) is handed out again."""
        run_id, parked = info.run_id, list(info.parked_steps)
        if step is not None and step not in parked:
            raise InputError(f"delivery {step!r} of run {run_id} is not parked "
                             f"(parked: {', '.join(parked) or 'none'})")
        target, form = None, None
        if output is not None:
            if step is None and len(parked) != 1:
                raise InputError(f"run {run_id} has several parked deliveries "
                                 f"({', '.join(parked)}): name the one the output is for")
            target = step or parked[0]
            form = sealable(output, store.max_payload_bytes,
                            f"run {run_id} output for parked delivery {target}")
            self._contracts.get(self._agents.get(target.split(":", 1)[1]).output).validate(
                output, side="output", agent=target.split(":", 1)[1], run_id=run_id)
        store.resume(run_id, how="output" if output is not None else "rerun")
        queue_of = catalog.resolver(store.redis, self.route)
        with parked_again_on_failure(store, run_id, parked, "the parked deliveries"):
            for key in parked:
                event_id, name = key.split(":", 1)
                event = event_record(store, run_id, event_id)
                if key == target:
                    assert form is not None
                    self._seal_for(app, store, run_id, key, output, int(event["version"]),
                                   form)
                else:
                    dispatch(app, run_id, Handover(
                        "again", event_id, int(event["version"]), (name,), str(event["type"])),
                        queue_of=queue_of)

    def _seal_for(self, app: Celery, store: StateStore, run_id: str, key: str, output: Any,
                  version: int, form: Sealable) -> None:
        """Seal a person's output for a parked delivery and publish what its agent emits."""
        event_id, name = key.split(":", 1)
        a = self._agents.get(name)
        delivery = Delivery(a, run_id=run_id, step=key, event=event_id)
        sealing = store.seal(run_id, step=key, agent=name, contract=a.output, payload=output,
                             parents=[version], worker="person", form=form,
                             extra=[delivery.seal_extra(store, "person")])
        if sealing.outcome not in ("new", "sealed"):
            raise RunNotParked(f"run {run_id} is {sealing.status or 'gone'}; the output was "
                               "not sealed")
        delivery.hand_over(app, store, sealing.extra[-1])

    def __repr__(self) -> str:
        return f"Choreography({self.name!r}, {self.start_event} -> {'|'.join(self.terminal)})"
