"""Rate limiters: this project's ``Limiter`` against the ``limits`` library, and against
Celery's own ``rate_limit`` across two workers.

- **calls per second, one caller, a no-op call**, on the same Redis in alternating rounds
  (read the ratios): ``acquire`` (one script: GCRA on server time, admission only, as
  ``limits`` ``hit`` is), ``acquire + settle`` (two: what ``Limiter.call`` does, a
  concurrency slot and a token reservation settled), ``in step`` (what a pipeline step pays:
  the acquire rides its open round trip and the settle its seal's, ``bare step`` the same
  two round trips without them), and ``limits`` with its ``MovingWindowRateLimiter`` on
  ``RedisStorage`` (one script).
- **one global rate, two workers**: the same task limited to 20 calls a second, run by two
  ``celery worker`` processes of two pool processes each: the most calls in any one second
  against the 20 intended, and the mean rate over the whole batch. Celery's ``rate_limit``
  is a token bucket per worker ("a per worker instance rate limit, and not a global rate
  limit"), so two workers go twice as fast while their buckets last; ours is one limit in
  Redis for the fleet (``burst=1``: evenly spaced).

Usage: python -m bench.limiters [--calls N] [--rounds R] [--tasks T] [--quick]
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import limits
import limits.storage
import limits.strategies
import redis

from bench.common import bench_redis, median, save, table, worker
from bench.ratelimit_app import QUEUE, RATE_PER_S, TIMES_KEY, celery_limited, ours_limited
from bench.ratelimit_app import app as ratelimit_app
from pipeline import Limit, Limiter
from pipeline.lua import Batch
from pipeline.state import connect

HUGE = 10**9
"""A rate no bench reaches: every call is admitted, and what is measured is the cost."""


def unbound(client: redis.Redis, *, every_side: bool = True) -> Limiter:
    """A limit of its own that never binds: requests (and tokens and concurrency)."""
    more: dict[str, Any] = {"tokens_per_minute": HUGE, "concurrency": 10**6} if every_side \
        else {}
    return Limiter(client, Limit(name=f"bench:{uuid.uuid4().hex[:6]}",
                                 requests_per_minute=HUGE, **more))


def ours_acquire(client: redis.Redis) -> Callable[[], None]:
    limiter = unbound(client, every_side=False)
    return lambda: None if limiter.acquire(uuid.uuid4().hex).admitted else None


def ours_call(client: redis.Redis) -> Callable[[], None]:
    limiter = unbound(client)

    def call() -> None:
        lease = uuid.uuid4().hex
        limiter.acquire(lease, tokens=100)
        limiter.settle(lease, tokens=80)

    return call


def ours_in_step(client: redis.Redis) -> Callable[[], None]:
    limiter = unbound(client)

    def call() -> None:
        lease = uuid.uuid4().hex
        opening = Batch(client)
        opening.command("PING")  # stands in for the step's own open script
        limiter.queue_acquire(opening, lease, tokens=100)
        opening.execute()
        sealing = Batch(client)
        sealing.command("PING")  # stands in for the step's own seal script
        limiter.queue_settle(sealing, lease, tokens=80, outcome="ok")
        sealing.execute()

    return call


def bare_step(client: redis.Redis) -> Callable[[], None]:
    def call() -> None:
        for _ in range(2):
            batch = Batch(client)
            batch.command("PING")
            batch.execute()

    return call


def limits_moving_window(url: str) -> Callable[[], None]:
    storage = limits.storage.storage_from_string(url.replace("redis://", "redis://", 1))
    limiter = limits.strategies.MovingWindowRateLimiter(storage)
    item = limits.RateLimitItemPerMinute(HUGE)
    key = uuid.uuid4().hex[:6]
    return lambda: None if limiter.hit(item, "bench", key) else None


def rate(call: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return calls / (time.perf_counter() - start)


def calls_per_second(url: str, calls: int, rounds: int) -> dict[str, Any]:
    client = connect(url)
    kinds = {"acquire": ours_acquire(client), "acquire + settle": ours_call(client),
             "in step": ours_in_step(client), "bare step": bare_step(client),
             "limits moving window": limits_moving_window(url)}
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
        for name in order:
            kinds[name]()  # warm: scripts loaded, connections open
            rates[name].append(rate(kinds[name], calls))
    med = {k: median(v) for k, v in rates.items()}
    return {"calls": calls, "rounds": rounds, "calls_per_s": med,
            "ratio_acquire_vs_limits": med["acquire"] / med["limits moving window"],
            "ratio_call_vs_limits": med["acquire + settle"] / med["limits moving window"],
            "ratio_in_step_vs_bare_step": med["in step"] / med["bare step"]}


def busiest_second(times_ms: Sequence[float]) -> int:
    """The most calls in any one second (sorted times, ms)."""
    most, first = 0, 0
    for last, t in enumerate(times_ms):
        while t - times_ms[first] >= 1000:
            first += 1
        most = max(most, last - first + 1)
    return most


def global_rate(url: str, tasks: int) -> dict[str, Any]:
    """The rate two workers reach on one task limited to RATE_PER_S, each way."""
    client = connect(url)
    ratelimit_app.conf.broker_url = url
    env = {"PIPELINE_REDIS_URL": url, "CELERY_BROKER_URL": url, "PIPELINE_CHAOS": "",
           "PIPELINE_OTEL": ""}
    out: dict[str, Any] = {"intended_per_s": RATE_PER_S, "tasks": tasks, "workers": 2,
                           "pool": 2}
    for kind, task in (("celery", celery_limited), ("ours", ours_limited)):
        key = TIMES_KEY.format(kind=kind)
        client.delete(key)
        workers = [worker(env, concurrency=2, queues=[QUEUE], app="bench.ratelimit_app")
                   for _ in range(2)]
        for w in workers:
            w.start()
        try:
            for _ in range(tasks):
                task.apply_async()
            deadline = time.monotonic() + tasks / RATE_PER_S * 3 + 60
            while client.llen(key) < tasks:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind}: {client.llen(key)} of {tasks} calls ran")
                time.sleep(0.05)
        finally:
            for w in workers:
                w.stop()
        times = sorted(float(t) for t in client.lrange(key, 0, -1))
        mean = (len(times) - 1) / ((times[-1] - times[0]) / 1000)
        peak = busiest_second(times)
        out[kind] = {"per_s": mean, "peak_per_s": peak, "over_intended": peak / RATE_PER_S,
                     "mean_of_intended": mean / RATE_PER_S}
        client.delete(key)
    return out


def report(r: dict[str, Any]) -> str:
    c, g = r["calls_per_second"], r["global_rate"]
    rows = [[name, f"{v:,.0f}"] for name, v in c["calls_per_s"].items()]
    rows += [["acquire / limits", f"{c['ratio_acquire_vs_limits']:.2f}x"],
             ["acquire + settle / limits", f"{c['ratio_call_vs_limits']:.2f}x"],
             ["in step / bare step", f"{c['ratio_in_step_vs_bare_step']:.2f}x"]]
    rates = [[f"{name}", f"{g[name]['peak_per_s']}", f"{g[name]['over_intended']:.2f}x",
              f"{g[name]['per_s']:.1f}"] for name in ("celery", "ours")]
    return "\n".join([
        f"limiter calls per second, one caller, {c['rounds']} alternating rounds of "
        f"{c['calls']}",
        table(["", "calls/s"], rows),
        f"one global rate of {g['intended_per_s']}/s, {g['tasks']} tasks, 2 workers of 2 "
        "pool processes",
        table(["", "busiest second", "of intended", "mean calls/s"], rates)])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="a tiny size, for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.rounds, args.tasks = 20, 1, 10
    with bench_redis() as url:
        result = {"calls_per_second": calls_per_second(url, args.calls, args.rounds),
                  "global_rate": global_rate(url, args.tasks)}
    print(report(result))
    save("limiters", result)


if __name__ == "__main__":
    main()
