"""The worker's message consumer: a step for an agent this worker does not know goes back.

Pools run different agent modules during a rolling deploy, or when they are split by
queue, and a pool may be told to consume a queue (``-Q agents.fraud_detection``) whose
agent it does not import. Celery's own answer to a message for a task it does not know
is to drop it and mark it failed (``NotRegistered``): for a pipeline run that is a lost
step, and the run stops. Here an ``agent.<name>`` or ``compensate.<name>`` message this
worker cannot run is returned to its queue for a worker that knows the agent, and:

- if nothing this worker runs is routed to that queue, the worker stops consuming it
  (it would only take the message again);
- else (a queue shared with agents it knows) the message is held a moment first (a second,
  or a quarter of the lease if that is shorter, so the sweeper never finds it unheld), so
  two such workers do not bounce it between them as fast as the broker allows; meanwhile it
  takes one of the worker's prefetch slots;
- the run's trace says so once per worker and message (``message.returned``: task,
  queue, worker, why), so a run waiting for a worker that knows its agent is visible.

Any other unknown task keeps Celery's behaviour. A message whose body cannot be read goes
back all the same (only a JSON body is ever decoded here) and never stops the worker.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from .app import store_for
from .names import AGENT_TASK_PREFIXES

__all__ = ["Consumer", "RETURN_DELAY_S"]

log = logging.getLogger(__name__)

RETURN_DELAY_S = 1.0
"""How long a message for an unknown agent is held before it goes back to a queue this
worker keeps consuming (one it shares with agents it knows)."""
NOTED_MAX = 10_000
"""Messages remembered as noted in their run's trace (so a bounce is logged once)."""


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, but a message for an agent this worker lacks goes back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._noted: OrderedDict[str, None] = OrderedDict()

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        headers = message.headers or {}
        name = str(headers.get("task", ""))
        if not name.startswith(AGENT_TASK_PREFIXES):
            super().on_unknown_task(body, message, exc)
            return
        queue = str((message.delivery_info or {}).get("routing_key") or "")
        stopped = bool(queue) and queue not in self._queues_of_known_tasks()
        if stopped:
            self.cancel_task_queue(queue)
            _return(message)
        else:
            lease_s = float(self.app.pipeline_settings.lease_s)
            self.timer.call_after(min(RETURN_DELAY_S, lease_s / 4), _return, (message,))
        try:
            self._note(message, name, str(headers.get("id", "")), queue, stopped)
        except Exception:  # noqa: BLE001 - the message is back in the broker regardless
            log.exception("%s[%s]: could not say why it went back", name, headers.get("id"))

    def _queues_of_known_tasks(self) -> set[str]:
        """The queues the tasks registered here are routed to (the default one included)."""
        routes = self.app.conf.task_routes
        routes = routes if isinstance(routes, dict) else {}  # a list of routers: none known
        queues = {str(r.get("queue")) for r in routes.values() if isinstance(r, dict)}
        return queues | {str(self.app.conf.task_default_queue)}

    def _note(self, message: Any, task: str, task_id: str, queue: str, stopped: bool) -> None:
        """Say in the run's trace, once per message, why its step is not running here."""
        if task_id in self._noted:
            return
        self._noted[task_id] = None
        while len(self._noted) > NOTED_MAX:
            self._noted.popitem(last=False)
        agent = task.split(".", 1)[1]
        reason = (f"agent {agent} is not registered in this worker (PIPELINE_AGENT_MODULES); "
                  f"the message went back to {queue or 'its queue'} for a worker that knows it")
        if stopped:
            reason += f", and this worker stopped consuming {queue}"
        log.warning("%s[%s]: %s", task, task_id, reason)
        where = _run_and_step(message)
        if where is None:
            return  # not one of a run's messages: the log line above is all there is
        run_id, step = where
        try:
            store_for(self.app).note(run_id, "message.returned", task=task, task_id=task_id,
                                     step=step, agent=agent, queue=queue,
                                     worker=str(self.hostname), reason=reason)
        except Exception as e:  # noqa: BLE001 - the message is back in the broker regardless
            log.warning("run %s: could not note the returned message: %s", run_id, e)


def _return(message: Any) -> None:
    try:
        message.requeue()
    except Exception as e:  # noqa: BLE001 - unacked, it is restored with the connection
        log.warning("could not return message %s to the broker: %s",
                    (message.headers or {}).get("id"), e)


def _run_and_step(message: Any) -> tuple[str, str] | None:
    """(run id, step) of a pipeline message with a JSON body, else None. A step names its
    run in kwargs, a compensation in args (``compensate.<agent>(run_id, step)``)."""
    if message.content_type != "application/json":
        return None
    try:
        args, kwargs, _embed = message.decode()
        run_id = kwargs.get("run_id") or args[0]
        step = kwargs.get("step") or (args[1] if len(args) > 1 else "")
    except Exception:  # noqa: BLE001 - whatever the body holds, it is not one of ours
        return None
    if not isinstance(run_id, str) or not isinstance(step, str):
        return None
    return run_id, step
