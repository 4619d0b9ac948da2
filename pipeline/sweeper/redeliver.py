"""Hand out again the messages of workers that died whole (Redis broker only).

Celery alone loses time, never work, when a whole worker dies: its unacked messages
wait in the broker for the visibility timeout (an hour by default) before anyone runs
them again. Here every unacked message of a pipeline task in kombu's Redis ``unacked``
hash is looked at. One that no live worker has marked held for ``lease_s`` (every
worker's main process marks what it holds, running, reserved or waiting for an ETA, in
the ``HELD`` sorted set) and that was delivered (or came due) longer ago than that is
handed out again, the way kombu's own restore does it: one transaction takes it out of
the unacked set and puts it back on its queue once. The step key makes a step's rerun
safe, a compensation is claimed by its task id, and a step delivered too often fails as
a crash loop and is compensated.

Only the pipeline's own messages are read (a user's tasks in the same broker are left
alone), and their bodies only as JSON. RabbitMQ hands a dead consumer's messages out
again itself when its connection drops, so this is for a Redis broker only.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery

from ..errors import StoreError
from ..keys import HELD
from ..names import is_pipeline_task
from ..state import StateStore, translate_errors
from .common import Redelivered, SweepReport, text

__all__ = ["Message", "broker", "read", "redeliver_silent", "unacked"]

log = logging.getLogger(__package__)  # the sweeper's one logger, whichever part logs


@dataclass(frozen=True, slots=True)
class Message:
    """One of the pipeline's messages in the broker, as far as the sweeper reads it."""

    tag: str
    task: str
    task_id: str
    kwargs: dict[str, Any]
    due: float  # when it was delivered, or its ETA if later (epoch seconds)


def redeliver_silent(app: Celery, store: StateStore, lease_s: float,
                     report: SweepReport) -> None:
    """Hand out again each unacked message that no live worker holds."""
    with broker(app) as (channel, client):
        _redeliver_from(store, channel, client, lease_s, report)


@contextmanager
def broker(app: Celery) -> Iterator[tuple[Any, Any]]:
    """kombu's Redis channel and a client of its connection pool."""
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        with channel.conn_or_acquire() as client:
            yield channel, client


def _redeliver_from(store: StateStore, channel: Any, client: Any, lease_s: float,
                    report: SweepReport) -> None:
    now = time.time()
    messages = list(unacked(client, channel))
    report.unacked = len(messages)
    old = [m for m in messages if now - m.due >= lease_s]  # younger: too recent to tell
    if not old:
        return
    with translate_errors(store.url):  # two round trips a pass, however many messages
        seconds, micros = store.redis.time()
        marks = store.redis.zmscore(HELD, [m.task_id for m in old])
    now_ms = seconds * 1000 + micros // 1000
    for message, held in zip(old, marks, strict=True):
        why = _why_stuck(message, held, now_ms, lease_s, now)
        if why is None:
            continue
        silent_s, reason = why
        channel.qos.restore_by_tag(message.tag, client=client)
        run_id = str(message.kwargs.get("run_id", ""))
        step = str(message.kwargs.get("step", ""))
        report.redelivered.append(Redelivered(message.task, message.task_id, run_id, step,
                                              round(silent_s, 1), reason))
        log.warning("sweeper: handed out %s %s again (run %s %s): %s", message.task,
                    message.task_id, run_id, step, reason)
        if run_id:
            try:
                store.note(run_id, "step.redelivered", step=step, task_id=message.task_id,
                           silent_s=round(silent_s, 1), reason=reason)
            except StoreError:
                pass


def unacked(client: Any, channel: Any) -> Iterator[Message]:
    """The pipeline's messages kombu holds unacked (its ``unacked`` hash: a few per worker)."""
    delivered = {text(tag): score for tag, score in
                 client.zrange(channel.unacked_index_key, 0, -1, withscores=True)}
    for raw_tag, raw in client.hgetall(channel.unacked_key).items():
        tag = text(raw_tag)
        try:
            message = read(tag, json.loads(text(raw))[0], delivered.get(tag, time.time()))
        except (ValueError, KeyError, IndexError, TypeError) as e:
            log.warning("sweeper: unacked message %s is not one it can read: %s", tag, e)
            continue
        if message is not None:
            yield message


def read(tag: str, payload: dict[str, Any], delivered: float) -> Message | None:
    """One of the pipeline's messages (None for anyone else's)."""
    headers = payload.get("headers") or {}
    task, task_id = str(headers.get("task", "")), str(headers.get("id", ""))
    if not is_pipeline_task(task):  # a user's own tasks in the same broker are not ours
        return None
    due = delivered
    eta = headers.get("eta")
    if eta:
        due = max(due, datetime.fromisoformat(str(eta)).timestamp())
    return Message(tag, task, task_id, _kwargs(payload), due)


def _kwargs(payload: dict[str, Any]) -> dict[str, Any]:
    """The task's keyword arguments (and its positional ones as ``args``), read as JSON only:
    a message of any other content type is never decoded here."""
    if payload.get("content-type") != "application/json":
        return {}
    body = payload.get("body", "")
    if (payload.get("properties") or {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, kwargs, _ = json.loads(body)
    out = dict(kwargs)
    if args and "run_id" not in out:  # compensate.<agent>(run_id, step), compensate_run(run_id)
        out["run_id"] = args[0]
        if len(args) > 1 and isinstance(args[1], str):
            out["step"] = args[1]
    return out


def _why_stuck(message: Message, held: float | None, now_ms: int, lease_s: float,
               now: float) -> tuple[float, str] | None:
    """(seconds silent, why) when no live worker holds ``message`` (``held``: until when
    one last marked it held, by Redis's clock), else None."""
    if held is not None and held > now_ms:
        return None  # its worker is alive (it marks what it holds every third of the lease)
    if held is not None:
        silent = (now_ms - held) / 1000.0 + lease_s
        return silent, (f"unacked, and no live worker has held it for {silent:.0f}s "
                        f"(lease {lease_s:g}s): its worker is gone")
    waited = now - message.due
    return waited, (f"unacked {waited:.0f}s after its delivery, and no live worker ever held "
                    "it: its worker is gone")
