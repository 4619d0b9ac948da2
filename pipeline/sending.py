"""Sending a task in one round trip: its message and its ``task-sent`` event together.

With ``task_send_sent_event`` (Flower's view of tasks before a worker has them) Celery
publishes every task twice on a Redis broker, the message (``LPUSH``) and then its event
(``PUBLISH``), each its own round trip. kombu 5.7's ``Producer.batch`` buffers a
producer's publishes in one Redis pipeline; Celery does not use it. This app's AMQP sends
each task inside a batch of its own: the two commands go in one round trip, in the same
order. A broker without batches (RabbitMQ) publishes as before.

A batch is written without kombu's publish retry. When its write fails, delivery is
uncertain (kombu's ``BatchPublishError``): the task is then sent again the plain way,
with the app's retry policy, so a worker still rides out a broker restart. The message
may then be there twice; every message of a run is idempotent by its step key, as any
redelivered message is.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP as CeleryAMQP
from kombu.exceptions import BatchPublishError

__all__ = ["AMQP"]


class AMQP(CeleryAMQP):  # type: ignore[misc]
    """Celery's AMQP, sending each task's message and its event in one round trip."""

    def _create_task_sender(self) -> Any:  # Celery builds send_task_message with it
        send = super()._create_task_sender()

        def send_task_message(producer: Any, name: str, message: Any, **kwargs: Any) -> Any:
            try:
                with producer.batch():  # inside a caller's batch, it joins that one
                    return send(producer, name, message, **kwargs)
            except BatchPublishError:
                return send(producer, name, message, **kwargs)

        return send_task_message
