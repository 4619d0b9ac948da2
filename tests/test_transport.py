"""The broker transport: kombu's Redis transport, publishing through one client per
connection pool instead of a new ``redis.Redis`` per message (the rest of the suite runs
every message through it)."""

from __future__ import annotations

import json

import redis

from pipeline.app import create_app
from pipeline.settings import Settings
from pipeline.transport import Channel, Transport
from tests.conftest import settings_for


def test_a_redis_broker_publishes_through_one_client_per_pool(redis_url: str) -> None:
    app = create_app(settings_for(redis_url))
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        given = redis.Redis.from_url(redis_url)
        with channel.conn_or_acquire(given) as client:
            assert client is given  # a client handed in is used as it is
        channel._pool = None  # what a reconnect does: the channel makes a new pool
        with channel.conn_or_acquire() as after:
            assert after is not first and after.connection_pool is channel.pool


def test_messages_published_through_it_reach_their_queue(redis_url: str) -> None:
    app = create_app(settings_for(redis_url))
    queue = "test.transport"
    with app.producer_or_acquire() as producer:
        for n in range(3):
            producer.publish({"n": n}, routing_key=queue, serializer="json")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        messages = [json.loads(m) for m in client.lrange(queue, 0, -1)]
        assert len(messages) == 3
        assert {m["properties"]["delivery_info"]["routing_key"] for m in messages} == {queue}
    finally:
        client.delete(queue)


def test_a_rabbitmq_broker_keeps_kombus_own_transport(redis_url: str) -> None:
    app = create_app(Settings(redis_url=redis_url, result_backend=redis_url,
                              broker_url="amqp://guest:guest@127.0.0.1:5672//",
                              agent_modules=("tests.agents",)))
    assert app.conf.broker_transport is None
