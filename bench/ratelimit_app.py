"""The same task twice, limited to one global rate two ways: Celery's ``rate_limit`` (a
token bucket each worker keeps for itself) and this project's ``Limiter`` (one limit in
Redis for the whole fleet). Served by ``bench.limiters``'s workers
(``celery -A bench.ratelimit_app worker``); each call records Redis server time.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

from pipeline import Limiter, limit
from pipeline.state import connect

QUEUE = "bench.ratelimit"
RATE_PER_S = 20
TIMES_KEY = "bench:ratelimit:{kind}"
"""List of the server times (ms) at which the calls of one kind ran."""
GLOBAL = limit("bench:global", requests_per_minute=RATE_PER_S * 60, burst=1)

app = Celery("bench_ratelimit", broker=os.environ.get("CELERY_BROKER_URL"))
app.conf.task_default_queue = QUEUE
app.conf.task_ignore_result = True
app.conf.accept_content = ["json"]

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = connect(os.environ["PIPELINE_REDIS_URL"])  # type: ignore[assignment]
    assert _client is not None
    return _client


def _record(kind: str) -> None:
    seconds, micros = _redis().time()
    _redis().rpush(TIMES_KEY.format(kind=kind), seconds * 1000 + micros / 1000)


@app.task(name="bench.ratelimit.celery", rate_limit=f"{RATE_PER_S}/s")
def celery_limited() -> None:
    """Celery's per-worker token bucket holds it back."""
    _record("celery")


@app.task(name="bench.ratelimit.ours")
def ours_limited() -> None:
    """The fleet's limit in Redis holds it back."""
    Limiter(_redis(), GLOBAL, max_wait_s=600).call(_record, "ours")
