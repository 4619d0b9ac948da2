"""What the benchmark scripts share: a Redis to measure against, results on disk."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from pipeline.embedded import EmbeddedRedis, answers

RESULTS = Path(os.environ.get("PIPELINE_BENCH_RESULTS",
                              Path(__file__).parent / "results.json"))
BENCH_DB = int(os.environ.get("BENCH_REDIS_DB", "15"))


@contextmanager
def bench_redis() -> Iterator[str]:
    """PIPELINE_BENCH_REDIS_URL, else the local Redis, else an embedded one; db BENCH_DB."""
    url = os.environ.get("PIPELINE_BENCH_REDIS_URL")
    if url:
        yield url
        return
    local = f"redis://127.0.0.1:6379/{BENCH_DB}"
    if answers(local):
        redis.Redis.from_url(local).flushdb()
        yield local
        redis.Redis.from_url(local).flushdb()
        return
    with EmbeddedRedis() as server:
        yield server.url


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "system": platform.system()}


def save(section: str, data: dict[str, Any]) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[section] = {**data, "machine": machine()}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def median(values: list[float]) -> float:
    return statistics.median(values)
