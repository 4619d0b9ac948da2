"""Named limits on a real Redis: GCRA for requests and tokens on server time, reservations
settled once against what a call used, concurrency leases that run out when their holder
dies, and ``Limiter.call`` waiting as long as the limit says."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from pipeline import (
    DefinitionError,
    Limit,
    Limiter,
    RateLimited,
    Throttled,
    UnknownLimit,
    limit,
    limits,
)
from pipeline.state import connect
from tests.conftest import ROOT, wait_for
from tests.test_cli import invoke


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = connect(redis_url)
    yield c  # type: ignore[misc]
    c.close()


def fresh(**sides: float) -> Limit:
    """A limit no other test draws on."""
    return Limit(name=f"test:{uuid.uuid4().hex[:8]}", **sides)  # type: ignore[arg-type]


def lease() -> str:
    return uuid.uuid4().hex


@pytest.mark.parametrize(("name", "sides", "wrong"), [
    ("a{b}", {"concurrency": 1}, "braces"),
    ("", {"concurrency": 1}, "non-empty"),
    ("x", {}, "give requests_per_minute"),
    ("x", {"requests_per_minute": 0}, "requests_per_minute=0"),
    ("x", {"requests_per_minute": 0.5}, "one call a minute at least"),
    ("x", {"tokens_per_minute": float("inf")}, "tokens_per_minute=inf"),
    ("x", {"concurrency": True}, "concurrency=True"),
    ("x", {"concurrency": 0}, "concurrency=0"),
    ("x", {"concurrency": 2, "burst": 1}, "with a requests_per_minute"),
    ("x", {"requests_per_minute": 60, "burst": 0}, "burst=0"),
    ("x", {"requests_per_minute": 60, "price_per_1k_prompt": -1}, "price_per_1k_prompt=-1"),
])
def test_a_bad_limit_is_refused_when_defined_naming_what(name: str, sides: dict[str, float],
                                                          wrong: str) -> None:
    with pytest.raises(DefinitionError, match=wrong):
        Limit(name=name, **sides)  # type: ignore[arg-type]


def test_a_limit_defined_twice_must_be_defined_alike() -> None:
    name = f"test:twice:{uuid.uuid4().hex[:8]}"
    first = limit(name, requests_per_minute=10)
    assert limit(name, requests_per_minute=10) == first and limits.get(name) is first
    with pytest.raises(DefinitionError, match="defined twice"):
        limit(name, requests_per_minute=11)
    with pytest.raises(UnknownLimit, match=name):
        Limiter(connect("redis://127.0.0.1:1/0"), "test:nobody-defined-this")


def test_requests_pass_a_windows_worth_at_once_then_one_each_interval(
        client: redis.Redis) -> None:
    lim = Limiter(client, fresh(requests_per_minute=3))  # one each 20 s, three at once
    assert all(lim.acquire(lease()).admitted for _ in range(3))
    refused = lim.acquire(lease())
    assert not refused.admitted and refused.reason == "requests"
    assert 17.0 <= refused.wait_s <= 20.0  # 20 s less the time since the first


def test_a_burst_of_one_spaces_every_request_by_the_interval(client: redis.Redis) -> None:
    lim = Limiter(client, fresh(requests_per_minute=600, burst=1))  # one each 100 ms
    assert lim.acquire(lease()).admitted
    refused = lim.acquire(lease())
    assert not refused.admitted and refused.reason == "requests"
    assert 0.05 <= refused.wait_s <= 0.1
    time.sleep(refused.wait_s)
    assert lim.acquire(lease()).admitted


def test_a_lease_admitted_again_is_charged_once(client: redis.Redis) -> None:
    lim = Limiter(client, fresh(requests_per_minute=1))
    held = lease()
    assert lim.acquire(held).admitted and lim.acquire(held).admitted
    assert lim.acquire(lease()).reason == "requests"


def test_tokens_reserved_are_settled_against_what_the_call_used(client: redis.Redis) -> None:
    """1,000 tokens a minute (60 ms a token): two calls of 600 do not fit a minute; the
    first used 100, its 500 come back, and the second fits."""
    lim = Limiter(client, fresh(tokens_per_minute=1000))
    first = lease()
    assert lim.acquire(first, tokens=600).admitted
    refused = lim.acquire(lease(), tokens=600)
    assert not refused.admitted and refused.reason == "tokens"
    assert 10.0 <= refused.wait_s <= 12.0  # (600 + 600 - 1000) x 60 ms, less time gone by
    assert lim.settle(first, tokens=100)
    assert not lim.settle(first, tokens=100)  # once
    assert lim.acquire(lease(), tokens=600).admitted


def test_a_call_that_used_more_than_it_reserved_leaves_a_debt_later_calls_wait_out(
        client: redis.Redis) -> None:
    lim = Limiter(client, fresh(tokens_per_minute=1000))
    held = lease()
    assert lim.acquire(held, tokens=100).admitted
    assert lim.settle(held, tokens=2100)  # 2,000 over: two minutes of tokens
    refused = lim.acquire(lease(), tokens=1)
    assert refused.reason == "tokens" and 64.0 <= refused.wait_s <= 66.1  # 126.06 s - 60 s


def test_a_refund_never_moves_the_limit_before_now(client: redis.Redis) -> None:
    lim = Limiter(client, fresh(tokens_per_minute=1000))
    held = lease()
    assert lim.acquire(held, tokens=1000).admitted  # the whole minute
    assert lim.settle(held, tokens=0)  # all of it back: the limit is empty, not in credit
    assert lim.acquire(lease(), tokens=1000).admitted
    assert lim.acquire(lease(), tokens=1).reason == "tokens"


def test_a_call_larger_than_the_window_can_never_pass(client: redis.Redis) -> None:
    lim = Limiter(client, fresh(tokens_per_minute=1000))
    assert lim.acquire(lease(), tokens=1001).never
    with pytest.raises(Throttled, match="can never pass") as e:
        lim.call(lambda: None, tokens=1001)
    assert e.value.reason == "tokens"


def test_concurrency_slots_come_back_when_settled_or_when_their_lease_runs_out(
        client: redis.Redis) -> None:
    lim = Limiter(client, fresh(concurrency=2), lease_s=0.5)
    a, b = lease(), lease()
    assert lim.acquire(a).admitted
    held_at = time.monotonic()
    assert lim.acquire(b).admitted
    refused = lim.acquire(lease())
    assert refused.reason == "concurrency" and 0 < refused.wait_s <= 0.5
    assert lim.settle(a)
    assert lim.acquire(lease()).admitted  # a's slot
    wait_for(lambda: lim.acquire(lease()).admitted, timeout_s=5,
             message="b's lease to run out")
    assert time.monotonic() - held_at >= 0.4  # b held its slot until its lease ran out
    assert not lim.settle(b)  # nothing left to settle


def test_the_slot_of_a_process_killed_holding_it_comes_back_within_the_lease(
        redis_url: str, client: redis.Redis) -> None:
    name = f"test:kill:{uuid.uuid4().hex[:8]}"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from pipeline import Limit, Limiter\n"
         "from pipeline.state import connect\n"
         f"lim = Limiter(connect({redis_url!r}), Limit(name={name!r}, concurrency=1), "
         "lease_s=1.0)\n"
         "assert lim.acquire('held').admitted\n"
         "print('held', flush=True)\n"
         "time.sleep(60)\n"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lim = Limiter(client, Limit(name=name, concurrency=1), lease_s=1.0)
        assert lim.acquire(lease()).reason == "concurrency"
        holder.kill()
        holder.wait(10)
        started = time.monotonic()
        wait_for(lambda: lim.acquire(lease()).admitted, timeout_s=5,
                 message="the killed holder's slot to come back")
        assert time.monotonic() - started <= 3.0  # the lease is 1 s: not for ever
    finally:
        holder.kill()
        holder.wait(10)


def test_call_waits_as_long_as_the_limit_says_and_settles_what_was_used(
        client: redis.Redis) -> None:
    """60,000 tokens a minute (1 ms a token), the minute spent: a call of 300 waits ~0.3 s;
    it used none, so its 300 come back for the next call (and no more)."""
    lim = Limiter(client, fresh(tokens_per_minute=60_000))
    assert lim.acquire(lease(), tokens=60_000).admitted
    started = time.monotonic()
    assert lim.call(lambda x: x * 2, 21, tokens=300, usage=lambda _: 0) == 42
    assert time.monotonic() - started >= 0.25
    assert lim.acquire(lease(), tokens=300).admitted  # the 300 it did not use
    assert lim.acquire(lease(), tokens=30_000).reason == "tokens"  # and no more
    with pytest.raises(Throttled, match="past max_wait_s") as e:
        Limiter(client, lim.limit, max_wait_s=0.05).call(lambda: None, tokens=300)
    assert e.value.reason == "tokens" and e.value.wait_s > 0.05


def test_a_call_that_raises_is_settled_with_its_estimate(client: redis.Redis) -> None:
    lim = Limiter(client, fresh(concurrency=1, tokens_per_minute=1000))

    def fails() -> None:
        raise RuntimeError("the model answered 500")

    with pytest.raises(RuntimeError):
        lim.call(fails, tokens=400)
    assert lim.acquire(lease(), tokens=600).admitted  # its slot is back: 400 + 600 fit
    assert lim.acquire(lease(), tokens=1).reason in ("concurrency", "tokens")


# -- after the API's 429s ----------------------------------------------------------------------


def test_a_limit_slowed_by_429s_still_admits_a_call_when_it_is_empty(
        client: redis.Redis) -> None:
    """Halved twice, one request at once costs four intervals: more than the burst, yet an
    empty limit lets it through (else it would refuse everything, and never recover)."""
    lim = Limiter(client, fresh(requests_per_minute=600, burst=1))
    for _ in range(2):
        lim.settle(lease(), outcome="limited", retry_after_s=0.001)
        client.hset(lim._keys[0], "decreased_at", 0)  # the next 429 halves it again
    assert client.hget(lim._keys[0], "factor") == "0.25"
    time.sleep(0.01)
    assert lim.acquire(lease()).admitted
    refused = lim.acquire(lease())
    assert not refused.admitted and 0.3 <= refused.wait_s <= 0.4  # 100 ms / 0.25


def test_a_refund_at_a_slowed_limit_gives_back_what_was_charged(client: redis.Redis) -> None:
    """At half speed a reservation costs twice the time; a call that never ran gives all
    of it back, so the next call of the same size passes at once."""
    lim = Limiter(client, fresh(tokens_per_minute=600))  # 100 ms a token
    lim.settle(lease(), outcome="limited", retry_after_s=0.001)
    time.sleep(0.01)
    first = lease()
    assert lim.acquire(first, tokens=250).admitted  # 50 s of the window, at half speed
    assert not lim.acquire(lease(), tokens=250).admitted
    assert lim.settle(first, tokens=0, cancel=True)
    assert lim.acquire(lease(), tokens=250).admitted


def test_a_429_never_shortens_the_life_of_a_limit_with_long_leases(client: redis.Redis) -> None:
    lim = Limiter(client, fresh(concurrency=2), lease_s=305)
    assert lim.acquire(lease()).admitted
    lim.settle(lease(), outcome="limited", retry_after_s=1)
    assert client.pttl(lim._keys[0]) > 300_000


def test_a_429_without_retry_after_waits_and_limiter_call_gives_up_at_max_wait(
        client: redis.Redis) -> None:
    """An API that answers 429 for ever, without a Retry-After: each call waits a second
    (no tight loop on the API), and ``call`` raises Throttled past max_wait_s."""
    lim = Limiter(client, fresh(concurrency=4), max_wait_s=2.5)
    calls = []

    def refuses() -> None:
        calls.append(time.monotonic())
        raise RateLimited("429 Too Many Requests")

    with pytest.raises(Throttled, match="rate_limited"):
        lim.call(refuses)
    assert 2 <= len(calls) <= 3
    assert all(b - a >= 0.9 for a, b in zip(calls, calls[1:], strict=False))


def test_the_reservations_of_leases_that_ran_out_are_dropped(client: redis.Redis) -> None:
    lim = Limiter(client, fresh(concurrency=5, tokens_per_minute=100_000), lease_s=0.05)
    dead = lease()
    assert lim.acquire(dead, tokens=500).admitted
    time.sleep(0.1)  # its holder died: the lease runs out
    assert lim.acquire(lease(), tokens=10).admitted  # trims what ran out
    assert client.hget(lim._keys[2], dead) is None
    assert not lim.settle(dead, tokens=500)  # nothing left to settle


DRAWER = """
import sys, threading, time
from pipeline import Limit, Limiter
from pipeline.state import connect
url, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
lim = Limiter(connect(url), Limit(name=name, requests_per_minute=600))
admitted = [0] * 8
print("ready", flush=True)
sys.stdin.readline()  # go
end = time.monotonic() + seconds
def draw(i):
    while time.monotonic() < end:
        if lim.acquire(f"{i}-{time.monotonic_ns()}").admitted:
            admitted[i] += 1
threads = [threading.Thread(target=draw, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(sum(admitted), flush=True)
"""


def server_ms(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds * 1000 + micros / 1000


def test_four_processes_of_eight_threads_get_what_gcra_allows_within_one_call(
        redis_url: str, client: redis.Redis) -> None:
    """600 requests a minute: a minute's worth (600) at once, then one each 100 ms. 32
    threads in 4 processes draw for 2 s; from the server's clock before the first call and
    after the last, GCRA allows 600 + elapsed / 100 ms."""
    name = f"test:gcra:{uuid.uuid4().hex[:8]}"
    drawers = [subprocess.Popen([sys.executable, "-c", DRAWER, redis_url, name, "2"],
                                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True) for _ in range(4)]
    try:
        for d in drawers:
            assert d.stdout is not None and d.stdout.readline().strip() == "ready"
        began = server_ms(client)
        for d in drawers:
            assert d.stdin is not None
            d.stdin.write("go\n")
            d.stdin.flush()
        counts = [int(d.communicate(timeout=30)[0].strip()) for d in drawers]
        ended = server_ms(client)
    finally:
        for d in drawers:
            d.kill()
            d.wait(10)
    allowed = 600 + (ended - began) / 100.0
    admitted = sum(counts)
    assert admitted <= allowed + 1, (counts, allowed)
    assert admitted >= 0.95 * allowed, (counts, allowed)
    assert all(c > 0 for c in counts)  # every process drew on the one limit


def test_pipeline_limits_shows_each_limit_drawn_on_as_it_stands(
        redis_url: str, client: redis.Redis) -> None:
    shown = fresh(requests_per_minute=2, tokens_per_minute=1000, concurrency=3)
    lim = Limiter(client, shown)
    held = lease()
    assert lim.acquire(held, tokens=400).admitted
    assert lim.acquire(lease(), tokens=100).admitted
    assert lim.acquire(lease(), tokens=100).reason == "requests"  # two a minute: refused
    assert lim.settle(held, tokens=2000)  # 1,600 over: a debt
    result = invoke(redis_url, "limits", "--json")
    assert result.exit_code == 0, result.output
    state = next(s for s in json.loads(result.output) if s["name"] == shown.name)
    assert (state["requests_per_minute"], state["tokens_per_minute"], state["concurrency"]) \
        == (2, 1000, 3)
    assert round(state["requests_in_window"]) == 2
    assert state["in_flight"] == 1 and state["tokens_reserved"] == 100
    assert round(state["tokens_in_window"]) == 1000  # the whole minute, and more owed
    assert 64.0 <= state["debt_s"] <= 66.0  # 2,100 tokens at 60 ms: 126 s, 60 s a window
    assert state["throttled"] == 1 and 29.0 <= state["throttled_s"] <= 30.0
    table = invoke(redis_url, "limits")
    assert table.exit_code == 0 and shown.name in table.output, table.output
