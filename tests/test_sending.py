"""Sending a task: its message and its task-sent event go in one round trip, and a send
whose round trip fails (the broker went away) is sent again with the app's retry policy
once the broker is back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from pipeline.app import create_app
from pipeline.embedded import EmbeddedRedis
from pipeline.names import SWEEP_TASK
from tests.conftest import settings_for

QUEUE = "pipeline"


@pytest.fixture
def broker() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


def calls(client: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in client.info("commandstats").items()}


def test_a_task_is_its_message_and_its_sent_event_and_nothing_else(
        broker: EmbeddedRedis) -> None:
    """Both in one round trip (counted in ``make bench`` and ``tests/test_bench.py``)."""
    app = create_app(settings_for(broker.url))
    app.send_task(SWEEP_TASK, queue=QUEUE, ignore_result=True)  # connections made, routes read
    client = redis.Redis.from_url(broker.url)
    events = client.pubsub()
    events.psubscribe("*celeryev*")
    assert events.get_message(timeout=1) is not None  # the subscription's confirmation
    before = calls(client)
    app.send_task(SWEEP_TASK, queue=QUEUE, ignore_result=True)
    after = calls(client)
    assert client.llen(QUEUE) == 2
    event = events.get_message(timeout=5)
    assert event is not None and event["channel"].endswith(b"celeryev/task.sent")
    sent = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert sent == {"lpush": 1, "publish": 1, "info": 1}
    events.close()
    client.close()


def test_a_send_that_fails_with_the_broker_down_is_sent_again_once_it_is_back(
        broker: EmbeddedRedis) -> None:
    app = create_app(settings_for(broker.url))  # a worker's app: it retries publishing
    app.send_task(SWEEP_TASK, queue=QUEUE, ignore_result=True)  # connected, the broker up
    assert broker.process is not None
    broker.process.terminate()
    broker.process.wait(timeout=10)
    back = threading.Timer(1.5, broker.restart)
    back.start()
    started = time.monotonic()
    app.send_task(SWEEP_TASK, queue=QUEUE, ignore_result=True)
    took = time.monotonic() - started
    back.join()
    assert took >= 1.0, "sent while the broker was down?"
    # a broker without persistence came back empty: the second message alone is there
    assert redis.Redis.from_url(broker.url).llen(QUEUE) == 1
