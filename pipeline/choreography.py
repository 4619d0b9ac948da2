"""Choreography: agents that react to events instead of being called (DESIGN section 9).

``Choreography("research_report", start="research.requested",
terminal=["report.completed"], input="research_question@1")`` declares a flow;
the agents declare what they react to (``on=["research.*"]``) and what they
publish (``emits="research.completed"``). Adding an agent is subscribing it:
nothing else changes.

A run's events and deliveries are recorded in Redis, so every flow can be
explained after the fact. Publishing records the event (id, type, cause,
version) and one ``dispatched`` delivery per subscriber, then sends one Celery
task per subscriber on its queue. Delivery is at least once; handling is once
per (event, subscriber): the delivery is the step key ``<event>:<agent>``, the
first task to open it claims it, and any other task delivering it is recorded
``duplicate`` and does nothing. A delivery ends in the same round trip that
seals its output (``emit.lua``, queued behind ``seal.lua``), which also
publishes what the agent emits; the run succeeds when a terminal event has
been published and no delivery is outstanding. A handler that fails for good
publishes ``<agent>.failed`` and the saga compensates, newest first, what was
sealed.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from celery import Celery, Task

from . import catalog, saga
from .agent import Agent, AgentRegistry, agents
from .contracts import Contract, ContractRegistry, check_handoff, contracts
from .errors import (
    ContractMismatch,
    InputError,
    RunNotParked,
    WorkflowDefinitionError,
)
from .events import check_event_type, failure_event
from .flow import parked_again_on_failure, workflows
from .keys import RunKeys
from .lua import Batch, Script
from .names import ERRBACK_TASK, default_queue, step_task
from .route import FlowKind, Route, newest_first, queues_of
from .state import RunInfo, StateStore, Version, translate_errors
from .state.store import Extra
from .state.version import Sealable, sealable

__all__ = ["Choreography", "Delivery", "Handover", "dispatch", "fail_delivery", "publish"]

log = logging.getLogger(__name__)

EMIT = Script("pipeline.state", "emit.lua")
RECLAIM = Script("pipeline.state", "reclaim.lua")
START = "start"
"""The publisher key of a run's starting event."""
CLIENT = "client"
HANDOVER_RETRIES = 8
HANDOVER_BACKOFF_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Handover:
    """What ``emit.lua`` answered: an event to dispatch, or how the run stands."""

    outcome: str  # published | again | succeeded | compensating | done | missing | unsealed
    event: str = ""
    version: int = -1
    subscribers: tuple[str, ...] = ()
    event_type: str = ""
    reason: str = ""  # why the saga began (compensating)

    @classmethod
    def from_reply(cls, reply: Sequence[Any]) -> Handover:
        if reply[0] in ("published", "again"):
            return cls(reply[0], str(reply[1]), int(reply[3]), tuple(reply[4:]), str(reply[2]))
        if reply[0] == "succeeded":
            return cls("succeeded", version=int(reply[1]))
        if reply[0] == "compensating":  # the call began the saga
            return cls("compensating", reason=str(reply[1]))
        return cls(str(reply[0]))


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
        except ValueError as e:
            raise WorkflowDefinitionError(str(e)) from None
        self.name = name
        self.start_event = start
        self.terminal = tuple(terminal)
        self.input = input
        self.description = description
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


class Delivery:
    """One event delivery's dealings with the ledger, inside a step (the runner's helper)."""

    def __init__(self, agent: Agent, *, run_id: str, step: str, event: str) -> None:
        self.agent = agent
        self.run_id = run_id
        self.step = step
        self.event = event

    def seal_extra(self, store: StateStore, task_id: str) -> Extra:
        """Queue ``emit.lua`` behind the seal: end this delivery and publish what it emits."""
        a = self.agent
        subs = [s.name for s in agents.subscribers(a.emits)] if a.emits else []

        def emit(batch: Batch) -> int:
            return batch.script(EMIT, RunKeys(self.run_id).all(), _emit_args(
                delivery=self.step, outcome="handled", task_id=task_id, source=self.step,
                event_type=a.emits or "", publisher=a.name, cause=self.event, version="",
                terminal=(), failure=False, retention_s=store.retention_s,
                subscribers=subs))

        return emit

    def hand_over(self, app: Celery, store: StateStore, reply: Any) -> Handover:
        """Dispatch what the delivery published; enqueue the saga's planner if it stalled."""
        if isinstance(reply, Exception):
            raise reply
        handover = Handover.from_reply(reply)
        follow_up(app, store, self.run_id, handover)
        return handover

    def hand_over_or_retry(self, task: Task, store: StateStore, reply: Any) -> None:
        """Hand over; if sending fails (the broker, Redis), retry the task: the retry opens
        the step as sealed by this task and sends what nobody has picked up. A delivery
        that was handled is never failed, and so never compensated, for a broker blip."""
        try:
            self.hand_over(task.app, store, reply)
        except Exception as e:
            retries = int(task.request.retries or 0)
            if retries >= HANDOVER_RETRIES:
                raise
            log.warning("run %s: %s sealed, handing over failed (%s); retrying", self.run_id,
                        self.step, e)
            raise task.retry(exc=e, countdown=float(min(2**retries, HANDOVER_BACKOFF_MAX_S)),
                             max_retries=HANDOVER_RETRIES) from e

    def hand_over_again(self, task: Task, store: StateStore, task_id: str) -> None:
        """A redelivered handler whose step is sealed: finish its handover (idempotent)."""
        batch = Batch(store.redis)
        index = self.seal_extra(store, task_id)(batch)
        with translate_errors(store.url):
            reply = batch.execute()[index]
        self.hand_over_or_retry(task, store, reply)

    def release(self, store: StateStore, task_id: str) -> None:
        """Give up this task's claim (the run parked): a resume hands the delivery out again."""
        with translate_errors(store.url):
            key = RunKeys(self.run_id).ledger
            if store.redis.hget(key, self.step) == f"running:{task_id}":
                store.redis.hset(key, self.step, "dispatched")


def _emit_args(*, delivery: str, outcome: str, task_id: str, source: str, event_type: str,
               publisher: str, cause: str, version: str, terminal: Sequence[str], failure: bool,
               retention_s: int, subscribers: Sequence[str]) -> list[str | int]:
    return [delivery, outcome, task_id, source, event_type, publisher, cause, version,
            ",".join(terminal), "1" if failure else "0", retention_s, *subscribers]


def publish(store: StateStore, run_id: str, *, source: str, event_type: str, publisher: str,
            version: int, subscribers: Sequence[str], terminal: Sequence[str] = ()) -> Handover:
    """Record an event outside any delivery (a run's start), once per ``source``;
    ``terminal`` (with the start) names the event types that end the run."""
    with translate_errors(store.url):
        reply = EMIT(store.redis, RunKeys(run_id).all(), _emit_args(
            delivery="", outcome="", task_id="", source=source, event_type=event_type,
            publisher=publisher, cause="", version=str(version), terminal=terminal,
            failure=False, retention_s=store.retention_s, subscribers=subscribers))
    return Handover.from_reply(reply)


def enqueue(app: Celery, store: StateStore, route: Route, run_id: str) -> None:
    """Publish the run's starting event (once: ``route.start`` to ``route.subscribers``)
    and dispatch its deliveries. Needs no agent code: a worker that imports none of the
    flow's agents enqueues a run its client forgot from the run's recorded route."""
    handover = publish(store, run_id, source=START, event_type=route.start,
                       publisher=CLIENT, version=route.input_version,
                       subscribers=route.subscribers, terminal=route.terminal)
    follow_up(app, store, run_id, handover, queue_of=catalog.resolver(store.redis, route))


def owed(store: StateStore, run_id: str) -> list[tuple[str, str]]:
    """(delivery, its ledger state) of every delivery the run's ledger still owes (never
    claimed, or claimed and not ended), oldest event first."""
    with translate_errors(store.url):
        ledger = store.redis.hgetall(RunKeys(run_id).ledger)
    found = [(str(k), str(v)) for k, v in ledger.items()
             if str(v).partition(":")[0] in ("dispatched", "running")]
    return sorted(found, key=lambda kv: (int(kv[0].split(":")[0].lstrip("e") or 0), kv[0]))


def redrive(app: Celery, store: StateStore, route: Route, run_id: str) -> list[str]:
    """Hand out again every delivery the run's ledger still owes; the delivery keys.

    For a run that stopped moving with none of its messages left in the broker (the
    sweeper). A delivery never claimed goes out as a new task. One claimed by a task whose
    message is gone is claimed for the new task first (in one script), so the new task
    opens it as its own, and finishes its handover if it had sealed; the old task, should
    it turn up after all, is a duplicate. Queues come from the run's route, so this needs
    no agent code.
    """
    handed = []
    for key, state in owed(store, run_id):
        event_id, name = key.split(":", 1)
        task_id = str(uuid.uuid4())
        if state.startswith("running:"):
            with translate_errors(store.url):
                moved = RECLAIM(store.redis, [RunKeys(run_id).ledger],
                                [key, state, f"running:{task_id}"])
            if not moved:
                continue  # it moved on meanwhile: nothing is owed there any more
        event = event_record(store, run_id, event_id)
        dispatch(app, run_id, Handover("again", event_id, int(event["version"]), (name,),
                                       str(event["type"])), task_ids={name: task_id},
                 queue_of=catalog.resolver(store.redis, route))
        handed.append(key)
    return handed


def follow_up(app: Celery, store: StateStore, run_id: str, handover: Handover,
              queue_of: Callable[[str], str] | None = None) -> None:
    """Send what a publication owes: its deliveries, or the planner of the saga it began."""
    if handover.outcome in ("published", "again"):
        dispatch(app, run_id, handover, queue_of=queue_of)
    elif handover.outcome == "compensating":
        saga.start(app, store, run_id, reason=handover.reason)


def dispatch(app: Celery, run_id: str, handover: Handover,
             task_ids: Mapping[str, str] | None = None,
             queue_of: Callable[[str], str] | None = None) -> None:
    """Send one task per subscriber, on its queue, carrying the event id and its version
    (under the task id ``task_ids`` gives a subscriber, else a new one). ``queue_of`` finds
    a subscriber's queue (``catalog.resolver``: the run's route, this process, the fleet);
    without it, the subscriber's queue here, else ``agents.<name>``."""
    for name in handover.subscribers:
        queue = queue_of(name) if queue_of is not None else (
            agents.get(name).queue if name in agents else default_queue(name))
        sig = app.signature(
            step_task(name), args=(handover.version,),
            kwargs={"run_id": run_id, "step": f"{handover.event}:{name}",
                    "event": handover.event, "event_type": handover.event_type},
            queue=queue, ignore_result=True,
        )
        sig.link_error(app.signature(ERRBACK_TASK))
        sig.apply_async(task_id=(task_ids or {}).get(name))


def fail_delivery(store: StateStore, run_id: str, step: str, agent: str, task_id: str,
                  reason: str) -> Handover:
    """Record a delivery that failed for good, publish ``<agent>.failed`` and begin the
    saga, in one script (no sibling can end the run in between)."""
    cause = step.split(":", 1)[0]
    with translate_errors(store.url):
        reply = EMIT(store.redis, RunKeys(run_id).all(), _emit_args(
            delivery=step, outcome="failed", task_id=task_id, source=f"{step}#failed",
            event_type=failure_event(agent), publisher=agent, cause=cause, version="",
            terminal=(), failure=True, retention_s=store.retention_s,
            subscribers=(reason[:2000],)))
    return Handover.from_reply(reply)


def event_record(store: StateStore, run_id: str, event_id: str) -> dict[str, Any]:
    with translate_errors(store.url):
        raw = store.redis.hget(RunKeys(run_id).events, event_id)
    if raw is None:
        raise InputError(f"run {run_id} has no event {event_id!r}")
    event: dict[str, Any] = json.loads(raw)
    return event


def redeliver(app: Celery, store: StateStore, run_id: str, event_id: str,
              queue_of: Callable[[str], str] | None = None) -> list[str]:
    """Send an event's deliveries again, to every subscriber (an operator's at-least-once).

    Handling stays once per (event, subscriber): a delivery handled before is
    recorded ``duplicate`` and does nothing.
    """
    event = event_record(store, run_id, event_id)
    subs = tuple(str(s) for s in event.get("subscribers", []))
    if event.get("failure"):
        raise InputError(f"event {event_id} of run {run_id} is a failure event, handled by "
                         "the saga: there is nothing to redeliver")
    dispatch(app, run_id, Handover("again", event_id, int(event["version"]), subs,
                                   str(event["type"])), queue_of=queue_of)
    return list(subs)
