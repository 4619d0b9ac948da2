"""The fleet's agent catalog: cards a worker publishes, read by a process without the
agents' code."""

from __future__ import annotations

import redis

import tasks  # noqa: F401 - registers the example agents
from pipeline.agent import AgentRegistry, agents
from pipeline.catalog import AgentCard, known_agents, publish, read
from pipeline.keys import AGENT_CATALOG


def test_a_card_carries_what_a_process_without_the_agent_needs() -> None:
    income = agents.get("income_verification")
    card = AgentCard.from_json(AgentCard.of(income, worker="w1").to_json())
    assert card is not None
    assert (card.name, card.queue, card.compensates, card.fallback, card.worker) == (
        "income_verification", "agents.income_verification", True, "cached", "w1")
    policy = income.breaker
    assert card.policy.failure_threshold == policy.failure_threshold
    assert card.policy.reset_timeout_s == policy.reset_timeout_s
    assert card.breaker["excluded"] == [e.__name__ for e in policy.excluded]


def test_a_card_another_version_wrote_is_read_or_skipped_never_fatal(
        rclient: redis.Redis) -> None:
    rclient.delete(AGENT_CATALOG)
    assert publish(rclient, [agents.get("credit_score"), agents.get("audit")], worker="w") == 2
    rclient.hset(AGENT_CATALOG, "future", '{"name": "future", "queue": "q", "input": "i@1", '
                 '"output": "o@1", "compensates": false, "shiny": 1}')
    rclient.hset(AGENT_CATALOG, "garbled", "{not json")
    cards = read(rclient)
    # (a worker of the suite may publish its own cards meanwhile: only these are ours)
    assert {"audit", "credit_score", "future"} <= set(cards) and "garbled" not in cards
    assert cards["audit"].on == ("*.completed",) and cards["future"].queue == "q"
    known = known_agents(rclient, AgentRegistry())  # a process that imports no agent
    assert "credit_score" in known and known["credit_score"].compensates
    rclient.hdel(AGENT_CATALOG, "future", "garbled")
