"""The fleet's agent catalog: what each worker's agents are, published in Redis.

A process that imports none of the agent modules (the ``pipeline`` queue's pool, an
operator's laptop running ``pipeline breakers`` or ``pipeline verify``) still needs a few
facts about agents: their queue, whether they have a compensation, what they react to,
their breaker settings. Every worker publishes a card per agent it serves when it is
ready (``pipeline:agents``, one hash field per agent, JSON), in one command. During a
rolling deploy two versions of an agent may publish different cards: the last worker to
start wins. Routing a run never depends on this: a run records its agents' queues in its
route when it is created; the catalog is for the facts a route does not carry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from .agent import Agent, AgentRegistry, agents
from .breaker.policy import BreakerPolicy, Fallback
from .keys import AGENT_CATALOG
from .names import default_queue
from .route import Route

__all__ = ["AgentCard", "card", "known_agents", "publish", "queue_of", "read", "resolver"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentCard:
    """The facts about one agent that a process without its code may need."""

    name: str
    queue: str
    input: str
    output: str
    compensates: bool
    on: tuple[str, ...] = ()
    emits: str | None = None
    fallback: str = Fallback.FAIL.value
    fallback_on: str = "refusal"
    max_retries: int = 0
    compensation_retries: int = 0
    time_limit_s: float = 0.0
    breaker: dict[str, Any] = field(default_factory=dict)
    """The breaker policy's settings (``excluded`` as exception names)."""
    worker: str = ""
    published_at: float = 0.0

    @classmethod
    def of(cls, a: Agent, *, worker: str = "", published_at: float = 0.0) -> AgentCard:
        policy = {k: v for k, v in asdict(a.breaker).items() if k != "excluded"}
        policy["excluded"] = [e.__name__ for e in a.breaker.excluded]
        return cls(name=a.name, queue=a.queue, input=a.input, output=a.output,
                   compensates=a.compensate is not None, on=a.on, emits=a.emits,
                   fallback=a.fallback.value, fallback_on=a.fallback_on.value,
                   max_retries=a.max_retries,
                   compensation_retries=a.compensation_retries, time_limit_s=a.time_limit_s,
                   breaker=policy, worker=worker, published_at=published_at)

    @property
    def policy(self) -> BreakerPolicy:
        """The breaker policy the card describes (its ``excluded`` left out: only the
        agent's own process can tell an exception's class)."""
        settings = {k: v for k, v in self.breaker.items()
                    if k in BreakerPolicy.__dataclass_fields__ and k != "excluded"}
        try:
            return BreakerPolicy(**settings)
        except (TypeError, ValueError):
            return BreakerPolicy()

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> AgentCard | None:
        """The card, or None for one this version cannot read (another version's)."""
        try:
            data = json.loads(text)
            data["on"] = tuple(data.get("on", ()))
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            return cls(**known)
        except (ValueError, TypeError, KeyError):
            return None


def publish(client: redis.Redis, agents: Iterable[Agent], *, worker: str = "") -> int:
    """Publish a card for each of ``agents`` (one command); how many."""
    now = time.time()
    fields: list[str] = []
    for a in agents:
        fields += [a.name, AgentCard.of(a, worker=worker, published_at=now).to_json()]
    if fields:
        client.hset(AGENT_CATALOG, items=fields)
    return len(fields) // 2


def read(client: redis.Redis) -> dict[str, AgentCard]:
    """Every readable card in the catalog, by agent name."""
    cards = {}
    for name, text in client.hgetall(AGENT_CATALOG).items():
        found = AgentCard.from_json(str(text))
        if found is not None:
            cards[str(name)] = found
    return cards


def card(client: redis.Redis, name: str) -> AgentCard | None:
    """The card of agent ``name``, if a worker published one this version can read."""
    text = client.hget(AGENT_CATALOG, name)
    return None if text is None else AgentCard.from_json(str(text))


def queue_of(client: redis.Redis, agent: str, route: Route | None = None) -> str:
    """Where ``agent``'s steps and compensations go: as the run's route records it (for the
    flow's own agents), else as this process has the agent, else as a worker of the fleet
    published it, else ``agents.<name>``."""
    if route is not None and route.holds(agent):
        return route.queue_of(agent)
    if agent in agents:
        return agents.get(agent).queue
    found = card(client, agent)
    return found.queue if found is not None else default_queue(agent)


def resolver(client: redis.Redis, route: Route | None = None) -> Callable[[str], str]:
    """``queue_of`` for one run: agent name -> its queue."""
    return lambda agent: queue_of(client, agent, route)


def known_agents(client: redis.Redis, registry: AgentRegistry) -> dict[str, AgentCard]:
    """Every agent this process or the fleet knows, by name: this process's own agents
    as they are here, the rest as their workers published them."""
    found = read(client)
    found.update({a.name: AgentCard.of(a) for a in registry})
    return dict(sorted(found.items()))
