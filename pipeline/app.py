"""The Celery app: DESIGN section 10's settings, one task per agent, the errback."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import ChordError
from kombu import Queue

from .agent import Agent, agents
from .errors import ConfigurationError
from .runner import run_step
from .settings import Settings
from .state import RunStatus, StateStore
from .workflow import ERRBACK_TASK

__all__ = ["create_app", "import_agent_modules", "store_for"]

log = logging.getLogger(__name__)

HARD_TIME_LIMIT_GRACE_S = 5.0
"""Seconds between an agent's soft time limit (the step fails cleanly) and the hard kill."""

_stores: dict[int, StateStore] = {}


def import_agent_modules(modules: tuple[str, ...]) -> None:
    """Import the modules that define agents, contracts and workflows."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigurationError(
                f"cannot import agent module {name!r} ({e}); set PIPELINE_AGENT_MODULES to the "
                "modules that define your agents, and run from the directory that holds them"
            ) from e


def create_app(settings: Settings | None = None, *, main: str = "pipeline") -> Celery:
    """A Celery app serving every registered agent, configured for correctness.

    Imports ``settings.agent_modules`` first so that every agent has its task
    and its queue: ``celery -A config worker`` serves them all, ``-Q`` narrows.
    """
    settings = settings or Settings.from_env()
    import_agent_modules(settings.agent_modules)
    app = Celery(main, broker=settings.broker_url, backend=settings.result_backend)
    app.conf.update(
        # JSON only: pickle is remote code execution for anyone who can write to the broker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A worker killed mid-step does not lose the step; the step key makes a rerun safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_deduplicate_successful_tasks=True,
        task_allow_error_cb_on_chord_header=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.default_queue,
        task_queues=[Queue(settings.default_queue)]
        + [Queue(q) for q in sorted({a.queue for a in agents})],
        task_routes={a.task_name: {"queue": a.queue} for a in agents},
        task_send_sent_event=True,
        worker_send_task_events=True,
        result_expires=24 * 3600,
        worker_hijack_root_logger=False,
    )
    app.pipeline_settings = settings
    for a in agents:
        _bind_agent(app, a, settings)
    # Not bound: Celery passes (request, exc, traceback) only to an errback
    # whose function is not a bound partial; a bound one gets just a task id.
    def run_failed_errback(request: Any, exc: BaseException, traceback: Any) -> None:
        run_failed(store_for(app), request, exc)

    app.task(name=ERRBACK_TASK, ignore_result=True, shared=False)(run_failed_errback)
    return app


def store_for(app: Celery) -> StateStore:
    """The process's state store for ``app`` (one connection pool per process)."""
    store = _stores.get(id(app))
    if store is None:
        store = _stores[id(app)] = StateStore.from_settings(app.pipeline_settings)
    return store


def _bind_agent(app: Celery, a: Agent, settings: Settings) -> None:
    if a.time_limit_s + HARD_TIME_LIMIT_GRACE_S >= settings.visibility_timeout_s:
        raise ConfigurationError(
            f"agent {a.name}: time limit {a.time_limit_s:g}s must stay well below the broker's "
            f"visibility timeout ({settings.visibility_timeout_s}s), or a running step is "
            "delivered twice (celery/celery#5935)"
        )

    def step(self: Task, upstream: Any, *, run_id: str, step: str, final: bool = False) -> int:
        return run_step(
            self, a, store_for(self.app), upstream,
            run_id=run_id, step=step, final=final, chaos_spec=settings.chaos,
        )

    step.__doc__ = a.description or f"Run agent {a.name} as one step of a workflow."
    app.task(
        name=a.task_name,
        shared=False,
        bind=True,
        soft_time_limit=a.time_limit_s,
        time_limit=a.time_limit_s + HARD_TIME_LIMIT_GRACE_S,
        max_retries=a.max_retries,
    )(step)


def run_failed(store: StateStore, request: Any, exc: BaseException) -> None:
    """Errback of every workflow canvas: the run has failed for good.

    Celery may call it several times for one run (once per failed chord
    member, and again for the chord's body); the status change in Redis
    happens once. A chord body's call carries only a ``ChordError``, so the
    run's error is then taken from the failure the runner logged. The saga
    issue replaces this with compensation.
    """
    kwargs = getattr(request, "kwargs", None) or {}
    run_id = kwargs.get("run_id")
    if not run_id:
        log.error("errback called for a task without a run id: %s", getattr(request, "task", "?"))
        return
    agent = str(getattr(request, "task", "") or "").removeprefix("agent.")
    error = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ChordError):
        failed = [e for e in store.log(run_id) if e.get("event") == "step.failed"]
        if failed:
            agent = failed[-1]["agent"]
            error = f"{failed[-1]['error_type']}: {failed[-1]['error']}"
    store.finish(run_id, RunStatus.FAILED, error=error[:2000], agent=agent)
