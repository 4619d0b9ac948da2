"""Bare Celery as a user configures it by default: the second baseline of ``bench.overhead``.

Its own Celery app, with nothing of the pipeline's settings: Celery's defaults (JSON,
a prefetch multiplier of 4, results stored for every task) and ``task_acks_late`` on,
as a user who cares about a worker dying would set it. The same canvas as
``bench.noop_agents.bare_credit`` (``chain(task, chord(group(3 tasks), task))``), on a
queue of its own, served by a worker of its own (``celery -A bench.default_app worker``)
with the same pool; so the comparison does not rest on the baseline sharing the
pipeline's app, prefetch and result settings.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, chain, chord, group
from celery.canvas import Signature

QUEUE = "bench.default"
TASK = "bench.default.bare"

app = Celery("bench_default", broker=os.environ.get("CELERY_BROKER_URL"),
             backend=os.environ.get("CELERY_RESULT_BACKEND"))
app.conf.task_acks_late = True
app.conf.task_default_queue = QUEUE


@app.task(name=TASK)
def bare(upstream: Any = None, *, run_id: str, step: str) -> int:
    """Return at once: a plain Celery task in an agent's place."""
    return 1


def default_credit(run_id: str) -> Signature:
    """The credit workflow's shape, as a user writes it with this app."""
    def step(name: str, **kwargs: Any) -> Signature:
        return bare.s(run_id=run_id, step=name, **kwargs)

    return chain(step("0:score", upstream=0),
                 chord(group([step(f"1.{i}:member") for i in range(3)], app=app),
                       step("2:approval"), app=app), app=app)


class DefaultKind:
    """The default-configured baseline, measured as ``bench.common.BareKind`` is."""

    name = "bare celery, defaults"

    def __init__(self, broker_url: str) -> None:
        app.conf.broker_url = broker_url
        app.conf.result_backend = broker_url

    def start(self) -> Any:
        return default_credit(os.urandom(8).hex()).apply_async()

    def wait(self, handle: Any) -> None:
        handle.get(timeout=120.0)
