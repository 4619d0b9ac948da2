"""The delivery ledger of a choreographed run, read back: ``pipeline events`` and ``explain``.

Everything here is derived from the run's log (one XRANGE) and its ledger hash;
nothing is kept twice. A delivery's state is one of:

- ``dispatched``: sent, not picked up yet;
- ``running``: a worker claimed it and has not finished;
- ``handled``: its output is sealed (``version``);
- ``failed``: it failed for good (``error``; a contract violation names its
  contract and fields), and published ``<agent>.failed``;
- ``duplicate``: the same delivery came again and did nothing (one row each);
- ``discarded``: it finished after the run stopped; nothing was sealed and it
  undid its own work;
- ``cancelled``: it saw the run stop while it ran, and stopped without sealing;
- ``skipped``: it arrived after the run stopped, and did nothing;
- ``parked``: its agent's breaker was open and the run waits for a person;
- ``unrouted``: the event had no subscriber (one row, agent ``-``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from ..agent import Agent
from ..catalog import AgentCard
from ..errors import UnknownAgent
from ..events import matches
from ..keys import RunKeys
from ..state import StateStore, translate_errors

__all__ = ["DeliveryView", "EventView", "Explanation", "events", "explain"]

ENDED = {"delivery.handled": "handled", "delivery.failed": "failed",
         "step.discarded": "discarded", "step.cancelled": "cancelled",
         "step.skipped": "skipped"}


@dataclass(slots=True)
class DeliveryView:
    agent: str
    step: str
    state: str
    attempts: int = 0
    latency_ms: float | None = None
    version: int | None = None
    worker: str = ""
    error: str = ""
    contract: str = ""
    fields: list[str] = field(default_factory=list)
    task_id: str = ""
    compensation: str = ""  # done | dead | self: how the saga (or the step itself) undid it


@dataclass(slots=True)
class EventView:
    event_id: str
    type: str
    cause: str
    version: int
    publisher: str
    at: int
    subscribers: list[str]
    terminal: bool
    failure: bool
    deliveries: list[DeliveryView] = field(default_factory=list)

    @property
    def unrouted(self) -> bool:
        return not self.subscribers and not self.terminal and not self.failure

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "unrouted": self.unrouted}


def events(store: StateStore, run_id: str) -> list[EventView]:
    """Every event of the run, oldest first, each with every delivery made of it."""
    log = store.log(run_id)
    with translate_errors(store.url):
        ledger = cast(dict[str, str], store.redis.hgetall(RunKeys(run_id).ledger))
    return event_views(log, ledger, store.run_info(run_id).parked_steps)


def event_views(log: Sequence[dict[str, str]], ledger: dict[str, str],
                parked_steps: Sequence[str]) -> list[EventView]:
    """The events of a run's ``log``, with their deliveries, from what was read of it."""
    parked = set(parked_steps)
    out: list[EventView] = []
    by_id: dict[str, EventView] = {}
    for e in log:
        if e.get("event") != "event.published":
            continue
        view = EventView(
            event_id=e["event_id"], type=e["type"], cause=e.get("cause", ""),
            version=int(e.get("version") or -1), publisher=e.get("publisher", ""),
            at=int(e["at"]), subscribers=[s for s in e.get("subscribers", "").split(",") if s],
            terminal=e.get("terminal") == "1", failure=e.get("failure") == "1",
        )
        out.append(view)
        by_id[view.event_id] = view
    for view in out:
        for agent in view.subscribers:
            step = f"{view.event_id}:{agent}"
            view.deliveries += _deliveries(view, agent, step, log, ledger.get(step, ""),
                                           step in parked)
        if view.unrouted:
            view.deliveries.append(DeliveryView(agent="-", step="", state="unrouted"))
    return out


def _deliveries(event: EventView, agent: str, step: str, log: Sequence[dict[str, str]],
                ledger_state: str, parked: bool) -> list[DeliveryView]:
    mine = [e for e in log if e.get("step") == step]
    view = DeliveryView(agent=agent, step=step, state="dispatched")
    if ledger_state.startswith("running:"):
        view.state = "running"
    if parked:
        view.state = "parked"
    duplicates = []
    for e in mine:
        kind = e.get("event", "")
        if kind == "step.started":
            view.attempts += 1
            view.worker = e.get("worker", "")
            view.task_id = e.get("task_id", "")
        elif kind == "step.sealed":
            view.version = int(e["version"])
        elif kind == "step.failed":
            view.error = f"{e.get('error_type', '')}: {e.get('error', '')}"
            view.contract = e.get("contract", "")
            view.fields = [f for f in e.get("fields", "").split(",") if f]
        elif kind in ENDED and view.state not in ("handled", "failed"):
            view.state = ENDED[kind]
            view.latency_ms = float(int(e["at"]) - event.at)
        elif kind in ("compensation.done", "compensation.dead"):
            view.compensation = kind.split(".")[1]
        elif kind == "step.self_compensated":
            view.compensation = "self"
        elif kind == "delivery.duplicate":
            duplicates.append(DeliveryView(
                agent=agent, step=step, state="duplicate", worker=e.get("worker", ""),
                task_id=e.get("task_id", ""), latency_ms=float(int(e["at"]) - event.at)))
    return [view, *duplicates]


@dataclass(slots=True)
class Explanation:
    """Why an agent did or did not react in a run."""

    agent: str
    on: list[str]
    emits: str | None
    input_contract: str
    reacted: bool
    summary: str
    events: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def explain(store: StateStore, run_id: str, name: str,
            known: Agent | AgentCard | None) -> Explanation:
    """Which of ``name``'s subscriptions matched which events, and each delivery's fate
    (``known``: the agent, or its card in the fleet's catalog, when either is known)."""
    views = events(store, run_id)
    status = store.run_info(run_id).status.value
    routed_to = {v.event_id for v in views if name in v.subscribers}
    if known is None and not routed_to:
        raise UnknownAgent(f"agent {name!r} is not known here or to the fleet, and no event of run "
                           f"{run_id} was routed to it")
    patterns = list(known.on) if known else []
    rows: list[dict[str, Any]] = []
    for v in views:
        matched = next((p for p in patterns if matches(p, v.type)), None)
        routed = v.event_id in routed_to
        if not matched and not routed:
            rows.append({"event_id": v.event_id, "type": v.type, "matched": None,
                         "routed": False, "deliveries": [], "why": "no subscription matches"})
            continue
        deliveries = [d for d in v.deliveries if d.agent == name]
        rows.append({"event_id": v.event_id, "type": v.type, "matched": matched,
                     "routed": routed, "deliveries": [asdict(d) for d in deliveries],
                     "why": _why(v, matched, routed, deliveries, views, status)})
    handled = [r for r in rows if any(d["state"] == "handled" for d in r["deliveries"])]
    relevant = [r for r in rows if r["matched"] or r["routed"]]
    if handled:
        summary = (f"{name} reacted to {len(handled)} event(s): "
                   + ", ".join(f"{r['event_id']} {r['type']}" for r in handled))
    elif relevant:
        summary = f"{name} did not complete a reaction: " + "; ".join(
            f"{r['event_id']} {r['type']}: {r['why']}" for r in relevant)
    elif not patterns:
        summary = f"{name} subscribes to nothing here (no `on=` patterns)"
    else:
        summary = (f"{name} never reacted: none of this run's events ("
                   + ", ".join(sorted({v.type for v in views}))
                   + f") matches its subscriptions ({', '.join(patterns)})")
    return Explanation(agent=name, on=patterns, emits=known.emits if known else None,
                       input_contract=known.input if known else "", reacted=bool(handled),
                       summary=summary, events=rows)


def _why(event: EventView, matched: str | None, routed: bool,
         deliveries: Sequence[DeliveryView], views: Sequence[EventView], status: str) -> str:
    if matched and not routed:
        return (f"matches {matched!r}, but {event.publisher} did not route it here "
                f"(routed to: {', '.join(event.subscribers) or 'nobody'}): the publishing "
                "worker did not have this subscription when it published")
    first = deliveries[0] if deliveries else None
    dups = sum(d.state == "duplicate" for d in deliveries)
    tail = f"; {dups} duplicate deliver{'y' if dups == 1 else 'ies'} did nothing" if dups else ""
    how = f"matches {matched!r}" if matched else "was routed here"
    if first is None:
        return f"{how}, but no delivery is recorded"
    undone = {"done": "; compensated by the saga", "dead": "; its compensation failed "
              "(dead-lettered)"}.get(first.compensation, "")
    if first.state == "handled":
        return (f"{how}: handled in {first.latency_ms:.0f} ms after {first.attempts} "
                f"attempt(s), sealed as version {first.version}{undone}{tail}")
    if first.state == "failed":
        where = (f"contract {first.contract} refused field(s) {', '.join(first.fields)}: "
                 if first.contract else "")
        failure = next((v for v in views if v.failure and v.cause == event.event_id
                        and v.publisher == first.agent), None)
        published = (f"; it published {failure.event_id} {failure.type} and the run is "
                     f"{status}" if failure else "")
        return f"{how}: failed after {first.attempts} attempt(s): {where}{first.error}" \
               f"{published}{tail}"
    ended = status not in ("running", "waiting_for_human")
    return {
        "dispatched": f"{how}: dispatched, never picked up before the run ended ({status})"
        if ended else f"{how}: dispatched, not picked up yet (is a worker serving its queue?)",
        "running": f"{how}: running on {first.worker or 'a worker'} ({first.attempts} "
                   "attempt(s) so far)",
        "discarded": f"{how}: it finished after the run had stopped; nothing was sealed and "
                     "it undid its own work",
        "cancelled": f"{how}: it saw the run stop while it ran and stopped without sealing",
        "skipped": f"{how}: it arrived after the run had stopped and did nothing",
        "parked": f"{how}: its breaker was open and the run waits for `pipeline resume`",
    }.get(first.state, f"{how}: {first.state}") + tail
