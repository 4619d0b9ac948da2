"""The clients the pipeline's classes take from application code (``decoding_client`` in
pipeline/lua.py): one whose replies are ``str`` works, any other is refused when the class
is built, with a message that says what to pass, and without a round trip."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis

from pipeline.breaker import Breaker, BreakerPolicy, BreakerRegistry, BreakerState
from pipeline.errors import CircuitOpen, ConfigurationError, PipelineError
from pipeline.observe.metrics import RunCensus
from pipeline.state import StateStore, connect

TAKES_A_CLIENT: dict[str, Callable[[Any], object]] = {
    "BreakerRegistry": BreakerRegistry,
    "StateStore": StateStore,
    "RunCensus": RunCensus,
}
NOBODY = "redis://127.0.0.1:1/0"  # nothing listens there: building must not connect


@pytest.mark.parametrize("name", list(TAKES_A_CLIENT))
def test_a_client_that_returns_bytes_is_refused_when_built(name: str, redis_url: str) -> None:
    for url in (redis_url, NOBODY):
        with pytest.raises(ConfigurationError) as refused:
            TAKES_A_CLIENT[name](redis.Redis.from_url(url))
        assert isinstance(refused.value, PipelineError)
        assert str(refused.value) == (
            f"{name} needs a Redis client that decodes responses, and this redis.Redis "
            "returns bytes: pass pipeline.state.connect(url), or "
            "redis.Redis(..., decode_responses=True)")


@pytest.mark.parametrize("name", list(TAKES_A_CLIENT))
def test_what_is_not_a_client_is_refused_when_built(name: str, redis_url: str) -> None:
    for thing, kind in [(connect(redis_url).pipeline(), "redis.client.Pipeline"),
                        (redis_url, "builtins.str")]:
        with pytest.raises(ConfigurationError,
                           match=f"^{name} needs a Redis client, not a {kind}: "
                                 r"pass pipeline\.state\.connect\(url\)$"):
            TAKES_A_CLIENT[name](thing)


@pytest.mark.parametrize("name", list(TAKES_A_CLIENT))
def test_a_decoding_client_is_taken_without_a_round_trip(name: str) -> None:
    for client in (connect(NOBODY), redis.Redis.from_url(NOBODY, decode_responses=True)):
        TAKES_A_CLIENT[name](client)  # no ConnectionError: nothing was asked of Redis


def test_a_decoding_client_of_ones_own_works_end_to_end(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    agent = f"t{uuid.uuid4().hex[:8]}"
    policy = BreakerPolicy(failure_threshold=1, reset_timeout_s=60)
    registry = BreakerRegistry(client, url=redis_url)

    assert registry.record(agent, policy, "failure", reason="boom").state is BreakerState.OPEN
    assert registry.snapshot(agent, policy).state is BreakerState.OPEN
    with pytest.raises(CircuitOpen, match=f"agent {agent}'s breaker is open"):
        Breaker(registry, agent, policy).call(lambda: None)
    registry.reset(agent)
    assert Breaker(registry, agent, policy).call(lambda: 42) == 42

    store = StateStore(client, url=redis_url)
    run_id = f"t-{uuid.uuid4()}"
    store.create_run(run_id, workflow="wf", payload={"n": 1}, contract="count@1")
    try:
        assert store.get(run_id, 0).payload == {"n": 1}
    finally:
        store.delete_run(run_id)
    assert isinstance(RunCensus(client).count(), Counter)
