"""Guarded calls per second: this project's Redis breaker against pybreaker's.

Both guard the same no-op call on the same Redis, in one process, in
alternating rounds (machines are shared and noisy: read the ratio, not the
absolute figures). Three ways of ours are measured:

- ``registry``: a guarded call standing alone: one ``acquire`` and one
  ``record`` script, two round trips, both atomic on server time;
- ``in step``: how a pipeline step pays for it: the ``acquire`` rides in the
  step's open round trip and the ``record`` in its seal round trip, so the
  figure is two round trips that would happen anyway, carrying the breaker;
- ``pybreaker``: ``CircuitBreaker`` with ``CircuitRedisStorage``, whose state
  is read and written with separate commands (not atomic across processes).

Usage: python -m bench.breakers [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable

import pybreaker
import redis

from bench.common import bench_redis, median, save
from pipeline.breaker import BreakerPolicy, BreakerRegistry
from pipeline.lua import Batch
from pipeline.state import connect

POLICY = BreakerPolicy(failure_threshold=5, reset_timeout_s=60)


def noop() -> None:
    return None


def ours_standalone(client: redis.Redis) -> Callable[[], None]:
    registry = BreakerRegistry(client)
    agent = f"bench{uuid.uuid4().hex[:6]}"

    def call() -> None:
        permit = registry.acquire(agent, POLICY, "lease")
        noop()
        registry.record(agent, POLICY, "success", permit.lease)

    return call


def ours_in_step(client: redis.Redis) -> Callable[[], None]:
    registry = BreakerRegistry(client)
    agent = f"bench{uuid.uuid4().hex[:6]}"

    def call() -> None:
        opening = Batch(client)
        opening.command("PING")  # stands in for the step's own open script
        registry.queue_acquire(opening, agent, POLICY, "lease", 30.0)
        permit = registry.permit(opening.execute()[1], "lease")
        noop()
        sealing = Batch(client)
        sealing.command("PING")  # stands in for the step's own seal script
        registry.queue_record(sealing, agent, POLICY, "success", permit.lease)
        sealing.execute()

    return call


def bare_step(client: redis.Redis) -> Callable[[], None]:
    """The same two round trips without the breaker: what `in step` adds to."""

    def call() -> None:
        opening = Batch(client)
        opening.command("PING")
        opening.execute()
        noop()
        sealing = Batch(client)
        sealing.command("PING")
        sealing.execute()

    return call


def pybreaker_call(client: redis.Redis) -> Callable[[], None]:
    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client,
                                            namespace=f"bench{uuid.uuid4().hex[:6]}")
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60, state_storage=storage)

    def call() -> None:
        breaker.call(noop)

    return call


def rate(call: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return calls / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with bench_redis() as url:
        ours = connect(url)  # the pipeline's client: text replies
        theirs = redis.Redis.from_url(url)  # pybreaker decodes bytes itself
        calls = {"registry": ours_standalone(ours), "in step": ours_in_step(ours),
                 "bare step": bare_step(ours), "pybreaker": pybreaker_call(theirs)}
        for call in calls.values():
            rate(call, 50)  # warm up: scripts loaded, connections open
        rates: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                rates[name].append(rate(call, args.calls))
    med = {name: median(r) for name, r in rates.items()}
    print(f"{'guarded call':<12} {'calls/s':>9}  {'vs pybreaker':>12}")
    for name, value in med.items():
        print(f"{name:<12} {value:>9,.0f}  {value / med['pybreaker']:>11.2f}x")
    added_us = (1 / med["in step"] - 1 / med["bare step"]) * 1e6
    pybreaker_us = 1e6 / med["pybreaker"]
    print(f"in a step the breaker adds {added_us:.0f} us (no round trip); pybreaker costs "
          f"{pybreaker_us:.0f} us a call: {pybreaker_us / added_us:.1f}x as much")
    save("breakers", {"calls_per_round": args.calls, "rounds": args.rounds,
                      "calls_per_s": med,
                      "ratio_registry_vs_pybreaker": med["registry"] / med["pybreaker"],
                      "in_step_added_us": added_us, "pybreaker_us_per_call": pybreaker_us,
                      "in_step_cost_ratio": pybreaker_us / added_us})


if __name__ == "__main__":
    main()
