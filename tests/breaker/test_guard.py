"""``Breaker``: the shared breaker around any call, against a real Redis: what it
admits and refuses, how outcomes count, and that a closed breaker costs one round
trip a call."""

from __future__ import annotations

import time
import uuid

import pytest

from pipeline.breaker import Breaker, BreakerPolicy, BreakerRegistry, BreakerState
from pipeline.errors import CircuitOpen, ConfigurationError, StoreUnavailable
from pipeline.state import connect
from tests.conftest import socket_writes, wait_for


class Upstream503(Exception):
    pass


class NotFound(Exception):
    pass


class Upstream:
    """A remote service that answers, or fails, as told; counts the calls that reached it."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing = False

    def __call__(self, value: int = 0) -> int:
        self.calls += 1
        if self.failing:
            raise Upstream503("503 from upstream")
        return value * 2


@pytest.fixture
def registry(redis_url: str) -> BreakerRegistry:
    return BreakerRegistry(connect(redis_url), url=redis_url)


def new_agent() -> str:
    return f"g{uuid.uuid4().hex[:8]}"


def test_a_guarded_call_returns_its_result_and_failures_open_the_breaker_for_everyone(
        registry: BreakerRegistry, redis_url: str) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=3, reset_timeout_s=30)
    guard, upstream = Breaker(registry, agent, policy), Upstream()
    assert guard.call(upstream, 21) == 42
    upstream.failing = True
    for _ in range(3):
        with pytest.raises(Upstream503):
            guard.call(upstream)
    assert upstream.calls == 4
    with pytest.raises(CircuitOpen, match=rf"agent {agent}'s breaker is open \(half-open in "):
        guard.call(upstream)
    assert upstream.calls == 4  # refused: the upstream never saw the call
    # another process, with its own client, is refused at its first call
    elsewhere = Breaker(BreakerRegistry(connect(redis_url)), agent, policy)
    with pytest.raises(CircuitOpen):
        elsewhere.call(upstream)
    snap = registry.snapshot(agent, policy)
    assert (snap.state, snap.successes, snap.failures, snap.rejected) == (
        BreakerState.OPEN, 1, 3, 2)
    [opened] = registry.transitions(agent)
    assert opened["reason"] == "3 consecutive failures, last: Upstream503: 503 from upstream"


def test_a_breaker_opened_elsewhere_lets_through_at_most_one_more_call_here(
        registry: BreakerRegistry, redis_url: str) -> None:
    """The price of one round trip a call, bounded: this process learns of the open
    breaker from the reply to the call it already let through, and refuses the next."""
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=2, reset_timeout_s=30)
    here, upstream = Breaker(registry, agent, policy), Upstream()
    here.call(upstream)  # this process now knows the breaker as closed
    there = Breaker(BreakerRegistry(connect(redis_url)), agent, policy)
    broken = Upstream()
    broken.failing = True
    for _ in range(2):
        with pytest.raises(Upstream503):
            there.call(broken)
    assert registry.snapshot(agent, policy).state is BreakerState.OPEN
    here.call(upstream)  # admitted on what this process knew; counted, not judged
    with pytest.raises(CircuitOpen):
        here.call(upstream)
    assert upstream.calls == 2
    snap = registry.snapshot(agent, policy)
    assert (snap.state, snap.successes, snap.failures) == (BreakerState.OPEN, 2, 2)
    assert [(t["from"], t["to"]) for t in registry.transitions(agent)] == [("closed", "open")]


def test_with_no_freshness_every_call_asks_first_and_sees_an_open_breaker_at_once(
        registry: BreakerRegistry, redis_url: str) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=1, reset_timeout_s=30)
    strict, upstream = Breaker(registry, agent, policy, fresh_s=0.0), Upstream()
    strict.call(upstream)
    registry.force_open(agent)
    with pytest.raises(CircuitOpen, match=r"\(forced open until reset\)"):
        strict.call(upstream)
    assert upstream.calls == 1


def test_news_of_a_closed_breaker_goes_stale_after_fresh_s(
        registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=1, reset_timeout_s=30)
    guard, upstream = Breaker(registry, agent, policy, fresh_s=0.2), Upstream()
    guard.call(upstream)
    registry.force_open(agent)
    started = time.monotonic()

    def refused() -> bool:
        try:
            guard.call(upstream)
        except CircuitOpen:
            return True
        return False

    wait_for(refused, timeout_s=5.0, message="the guard to notice the forced open breaker")
    assert time.monotonic() - started < 5.0
    # every call it let through before noticing was admitted as closed, and counted
    assert registry.snapshot(agent, policy).successes == upstream.calls


def test_half_open_admits_the_probe_and_its_success_closes_the_breaker(
        registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=1, reset_timeout_s=0.2)
    guard, upstream = Breaker(registry, agent, policy), Upstream()
    upstream.failing = True
    with pytest.raises(Upstream503):
        guard.call(upstream)
    upstream.failing = False

    def probed() -> int | None:
        try:
            return guard.call(upstream, 5)
        except CircuitOpen:
            return None

    assert wait_for(probed, timeout_s=5.0, message="a probe to be admitted") == 10
    assert registry.snapshot(agent, policy).state is BreakerState.CLOSED
    assert [(t["from"], t["to"]) for t in registry.transitions(agent)] == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_a_failed_probe_opens_the_breaker_again(registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=1, reset_timeout_s=0.2)
    guard, upstream = Breaker(registry, agent, policy), Upstream()
    upstream.failing = True

    def failed_probe() -> bool:
        try:
            guard.call(upstream)
        except CircuitOpen:
            return False
        except Upstream503:
            return registry.snapshot(agent, policy).state is BreakerState.OPEN
        return False

    with pytest.raises(Upstream503):
        guard.call(upstream)
    wait_for(failed_probe, timeout_s=5.0, message="a probe to fail")
    assert [(t["from"], t["to"]) for t in registry.transitions(agent)] == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "open")]


def test_excluded_errors_do_not_count_and_slow_successes_do(
        registry: BreakerRegistry) -> None:
    agent = new_agent()
    policy = BreakerPolicy(failure_threshold=2, excluded=(NotFound,), slow_call_s=0.05)
    guard = Breaker(registry, agent, policy)

    def not_found() -> None:
        raise NotFound("no such order")

    for _ in range(5):
        with pytest.raises(NotFound):
            guard.call(not_found)
    assert registry.snapshot(agent, policy).state is BreakerState.CLOSED
    assert guard.call(time.sleep, 0.08) is None
    assert guard.call(time.sleep, 0.08) is None
    snap = registry.snapshot(agent, policy)
    assert (snap.state, snap.failures) == (BreakerState.OPEN, 2)
    assert registry.transitions(agent)[-1]["reason"].startswith(
        "2 consecutive failures, last: slow call: ")


def test_a_configuration_error_in_a_guarded_call_is_never_counted(
        registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=1)
    guard = Breaker(registry, agent, policy)

    def misconfigured() -> None:
        raise ConfigurationError("PAYMENTS_URL is not set")

    for _ in range(3):
        with pytest.raises(ConfigurationError):
            guard.call(misconfigured)
    snap = registry.snapshot(agent, policy)
    assert (snap.state, snap.failures, snap.consecutive_failures) == (BreakerState.CLOSED, 0, 0)


def test_the_breaker_decorates_a_function(registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=1, reset_timeout_s=30)
    guard = Breaker(registry, agent, policy)

    @guard
    def charge(amount: int, *, currency: str = "EUR") -> str:
        """Charge a card."""
        return f"{amount} {currency}"

    assert charge(5, currency="USD") == "5 USD"
    assert charge.__name__ == "charge" and charge.__doc__ == "Charge a card."
    assert registry.snapshot(agent, policy).successes == 1


def test_a_closed_breaker_costs_one_round_trip_a_call(registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy()
    guard, upstream = Breaker(registry, agent, policy), Upstream()
    registry.redis.ping()  # the connection's handshake is not the breaker's
    with socket_writes() as writes:
        for _ in range(10):
            guard.call(upstream)
    assert upstream.calls == 10
    assert len(writes) == 11  # ask once, then one record a call, its reply admitting the next
    assert registry.snapshot(agent, policy).successes == 10


def test_without_redis_nothing_is_called_and_the_error_names_the_redis() -> None:
    url = "redis://:hunter2@127.0.0.1:1/0"
    guard = Breaker(BreakerRegistry(connect(url), url=url), new_agent(), BreakerPolicy())
    upstream = Upstream()
    with pytest.raises(StoreUnavailable,
                       match=r"cannot reach Redis at redis://:\*\*\*@127\.0\.0\.1:1/0") as e:
        guard.call(upstream)
    assert upstream.calls == 0 and "hunter2" not in str(e.value)
