"""Guarded calls per second: this project's Redis breaker against pybreaker's.

Both guard the same call on the same Redis, in one process, in alternating
rounds (machines are shared and noisy: read the ratio, not the absolute
figures). Two loads:

- **one caller, a no-op call**: the breaker's own cost and nothing else.
  ``guard`` is ``Breaker.call`` (one ``record`` script a call while closed, its
  reply admitting the next call); ``registry`` asks ``acquire`` before every
  call (two scripts); ``in step`` is how a pipeline step pays for it, the
  ``acquire`` riding the step's open round trip and the ``record`` its seal
  round trip (``bare step``: the same two round trips without the breaker);
  ``pybreaker`` is ``CircuitBreaker`` with ``CircuitRedisStorage`` (a GET and a
  SET a call, not atomic across processes).
- **concurrent callers, a remote call**: ``--threads`` threads each calling a
  function that waits ``--call-ms`` (an HTTP request to a model, say), as a
  threaded worker or a web server would. pybreaker holds its lock for the
  whole call, so one process admits one call at a time.

Usage: python -m bench.breakers [--calls N] [--rounds R] [--threads T] [--call-ms M]
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from collections.abc import Callable

import pybreaker
import redis

from bench.common import bench_redis, median, save
from pipeline.breaker import Breaker, BreakerPolicy, BreakerRegistry
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


def ours_guard(client: redis.Redis) -> Callable[[], None]:
    breaker = Breaker(BreakerRegistry(client), f"bench{uuid.uuid4().hex[:6]}", POLICY)

    def call() -> None:
        breaker.call(noop)

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


def concurrent_rate(guarded: Callable[[Callable[[], None]], None], threads: int,
                    call_s: float, duration_s: float) -> float:
    """Guarded calls per second with ``threads`` callers, each call waiting ``call_s``."""
    done = [0] * threads
    stop = time.perf_counter() + duration_s

    def remote() -> None:
        time.sleep(call_s)

    def caller(i: int) -> None:
        while time.perf_counter() < stop:
            guarded(remote)
            done[i] += 1

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / (time.perf_counter() - start)


def single_caller(url: str, calls: int, rounds: int) -> dict[str, float]:
    ours = connect(url)  # the pipeline's client: text replies
    theirs = redis.Redis.from_url(url)  # pybreaker decodes bytes itself
    kinds = {"guard": ours_guard(ours), "registry": ours_standalone(ours),
             "in step": ours_in_step(ours), "bare step": bare_step(ours),
             "pybreaker": pybreaker_call(theirs)}
    for call in kinds.values():
        rate(call, 50)  # warm up: scripts loaded, connections open
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(rounds):
        for name, call in kinds.items():
            rates[name].append(rate(call, calls))
    return {name: median(r) for name, r in rates.items()}


def concurrent(url: str, threads: int, call_ms: float, rounds: int,
               duration_s: float) -> dict[str, float]:
    ours = Breaker(BreakerRegistry(connect(url)), f"bench{uuid.uuid4().hex[:6]}", POLICY)
    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, redis.Redis.from_url(url),
                                            namespace=f"bench{uuid.uuid4().hex[:6]}")
    theirs = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60, state_storage=storage)
    kinds: dict[str, Callable[[Callable[[], None]], None]] = {
        "guard": ours.call, "pybreaker": theirs.call}
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(rounds):
        for name, guarded in kinds.items():
            rates[name].append(concurrent_rate(guarded, threads, call_ms / 1000, duration_s))
    return {name: median(r) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--call-ms", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=1.0,
                        help="seconds each concurrent round lasts")
    args = parser.parse_args()
    with bench_redis() as url:
        med = single_caller(url, args.calls, args.rounds)
        many = concurrent(url, args.threads, args.call_ms, args.rounds, args.duration)
    print(f"{'one caller, no-op call':<24} {'calls/s':>9}  {'vs pybreaker':>12}")
    for name, value in med.items():
        print(f"{name:<24} {value:>9,.0f}  {value / med['pybreaker']:>11.2f}x")
    added_us = (1 / med["in step"] - 1 / med["bare step"]) * 1e6
    pybreaker_us = 1e6 / med["pybreaker"]
    print(f"in a step the breaker adds {added_us:.0f} us (no round trip); pybreaker costs "
          f"{pybreaker_us:.0f} us a call: {pybreaker_us / added_us:.1f}x as much")
    ceiling = args.threads / (args.call_ms / 1000)
    print(f"{args.threads} callers, {args.call_ms:g} ms call   {'calls/s':>9}  "
          f"{'vs pybreaker':>12}   (at most {ceiling:,.0f})")
    for name, value in many.items():
        print(f"{name:<24} {value:>9,.0f}  {value / many['pybreaker']:>11.2f}x")
    save("breakers", {"calls_per_round": args.calls, "rounds": args.rounds,
                      "calls_per_s": med,
                      "ratio_guard_vs_pybreaker": med["guard"] / med["pybreaker"],
                      "ratio_registry_vs_pybreaker": med["registry"] / med["pybreaker"],
                      "in_step_added_us": added_us, "pybreaker_us_per_call": pybreaker_us,
                      "in_step_cost_ratio": pybreaker_us / added_us,
                      "concurrent": {"threads": args.threads, "call_ms": args.call_ms,
                                     "duration_s": args.duration, "ceiling": ceiling,
                                     "calls_per_s": many,
                                     "ratio_guard_vs_pybreaker":
                                         many["guard"] / many["pybreaker"]}})


if __name__ == "__main__":
    main()
