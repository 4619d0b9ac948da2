"""The Celery app: its settings (JSON only, acks late, the queues), one task per agent,
the errback that begins a failed run's saga, and the pipeline's own tasks."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any

from celery import Celery, Task
from celery.signals import task_postrun, worker_ready
from kombu import Queue

from . import catalog, chaos, choreography, counters, housekeeping, join, lease, saga
from .agent import Agent, agents, import_agent_modules
from .breaker import BreakerRegistry, Fallback
from .errors import ConfigurationError, StoreError, TransientStoreError
from .events import failure_event
from .flow import workflows
from .limits import limits
from .names import (
    COMPENSATE_RUN_TASK,
    ERRBACK_TASK,
    FINISH_TASK,
    SWEEP_TASK,
    agent_of_task,
    compensate_task,
)
from .settings import Settings
from .state import RunStatus, StateStore
from .step import HARD_TIME_LIMIT_GRACE_S, STORE_RETRY_BACKOFF_MAX_S, run_step
from .urls import tls_options

__all__ = ["check_chaos_agents", "create_app", "store_for"]

log = logging.getLogger(__name__)


CLIENT_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                       "interval_max": 0.5}
WORKER_PUBLISH_RETRY_POLICY = {"max_retries": 12, "interval_start": 0, "interval_step": 0.5,
                               "interval_max": 2.0}
"""A worker sending the next step, a retry or a compensation rides out a broker restart or
failover of about 20 s (Celery's default gives up after 0.6 s, and the step then fails
although nothing was wrong with it). Clients keep the default: they are told at once."""
MAIN_PROCESS_FAILURES = ("TimeLimitExceeded", "WorkerLostError")


def check_chaos_agents(settings: Settings) -> None:
    """Refuse a ``PIPELINE_CHAOS`` rule whose agent name is a typo of a registered one.

    A name no module of this process registers, and close to none, may be an agent of
    another pool (pools may import different agent modules): it is said in the log, not
    refused, and fires only on the pools that run that agent.
    """
    names = {a.name for a in agents}
    for name in chaos.check_agents(settings.chaos, names):
        log.warning("PIPELINE_CHAOS names agent %r, which no module of this process "
                    "registers (PIPELINE_AGENT_MODULES=%s): it fires only on pools that "
                    "import it", name, ",".join(settings.agent_modules))


def restore_sweep(visibility_timeout_s: int) -> dict[str, int]:
    """How often a worker looks for messages a killed worker left unacked.

    kombu sweeps every ``unacked_restore_interval`` x ``unacked_restore_throttle``
    seconds (10 x 10 by default), and hands out only messages older than the
    visibility timeout: with a short timeout, the sweep would bound recovery
    instead. Sweep at least every tenth of the timeout (kombu's default from
    1000 s up).
    """
    every = max(1, min(100, visibility_timeout_s // 10))
    interval = min(10, every)
    return {"unacked_restore_interval": interval, "unacked_restore_throttle": every // interval}


def broker_options(settings: Settings) -> dict[str, Any]:
    """Transport options for the broker ``settings`` names.

    Redis: the visibility timeout (a message unacked that long is handed out
    again) and the sweep that restores a dead worker's messages. RabbitMQ has
    neither: it requeues a dead worker's messages when its connection drops, and
    closes the channel of a consumer that holds a message unacked longer than
    its ``consumer_timeout`` (30 min by default), requeueing it. With
    ``task_acks_late`` a message stays unacked while its step runs and through
    its retry countdown, so set PIPELINE_VISIBILITY_TIMEOUT_S to the broker's
    consumer timeout: every agent's worst case then stays under half of it.
    Publisher confirms make ``start`` return only once RabbitMQ holds the run's
    first message.
    """
    if settings.broker_is_redis:
        return {"visibility_timeout": settings.visibility_timeout_s,
                **restore_sweep(settings.visibility_timeout_s)}
    return {"confirm_publish": True}


def create_app(
    settings: Settings | None = None, *, main: str = "pipeline", fail_fast: bool = False,
    agents_required: bool = True,
) -> Celery:
    """A Celery app serving every registered agent, configured for correctness.

    Imports ``settings.agent_modules`` first so that every agent has its task
    and its queue: ``celery -A config worker`` serves them all, ``-Q`` narrows.
    ``fail_fast`` (for clients) gives up on an unreachable result backend after
    about a second instead of Celery's twenty retries. Without ``agents_required``
    (an operator's commands) a module that cannot be imported is skipped.
    """
    settings = settings or Settings.from_env()  # every value checked: refused before ready
    import_agent_modules(settings.agent_modules, required=agents_required)
    if agents_required:
        check_chaos_agents(settings)
    for flow in workflows:  # every subscriber is known now: check the event flows
        if isinstance(flow, choreography.Choreography) and agents_required:
            flow.check()
    # a task's message and its task-sent event in one round trip (sending.py)
    app = Celery(main, broker=settings.broker_url, backend=settings.result_backend,
                 amqp="pipeline.sending:AMQP")
    join.install(app)  # Celery's Redis result backend, with a chord of steps joined in the seal
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
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.default_queue,
        task_queues=[Queue(settings.default_queue)]
        + [Queue(q) for q in sorted({a.queue for a in agents})],
        task_routes={
            **{a.task_name: {"queue": a.queue} for a in agents},
            **{compensate_task(a.name): {"queue": a.queue} for a in agents},
        },
        task_send_sent_event=True,
        # A step for an agent this worker does not import goes back to the broker for a
        # worker that does (Celery would drop it): pools may run different agent modules.
        worker_consumer="pipeline.consumer:Consumer",
        worker_send_task_events=True,
        result_expires=24 * 3600,
        worker_hijack_root_logger=False,
        # `celery -A config beat` runs the sweeper; a sweep nobody picked up in time is
        # dropped (the next one is already due), so a fleet that was down is not flooded.
        # beat's schedule under the data directory, never in the working directory
        beat_schedule_filename=settings.beat_schedule_path,
        beat_scheduler="pipeline.beat:Scheduler",  # makes that directory first
        beat_schedule={"pipeline-sweep": {
            "task": SWEEP_TASK, "schedule": float(settings.sweep_interval_s),
            "options": {"expires": float(settings.sweep_interval_s),
                        "queue": settings.default_queue},
        }},
    )
    # rediss://: verify the server's certificate (kombu would not, by default).
    if (broker_tls := tls_options(settings.broker_url)) is not None:
        app.conf.broker_use_ssl = broker_tls
    if (backend_tls := tls_options(settings.result_backend)) is not None:
        app.conf.redis_backend_use_ssl = backend_tls
    if fail_fast:
        app.conf.result_backend_transport_options = {"retry_policy": CLIENT_RETRY_POLICY}
    else:
        app.conf.task_publish_retry_policy = WORKER_PUBLISH_RETRY_POLICY
    app.pipeline_settings = settings
    counters.install_hooks(app)
    lease.install(app, store_for)  # a worker's main process marks what it holds (the sweeper)

    def release_subscriptions(sender: Any = None, **_: Any) -> None:
        if sender is not None and getattr(sender, "app", None) is app:
            release_result_subscriptions(app)

    task_postrun.connect(release_subscriptions, weak=False)

    def publish_agents(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", app) is not app:
            return
        try:  # the fleet's catalog: what a process without these agents' code may need
            catalog.publish(store_for(app).redis, agents,
                            worker=str(getattr(sender, "hostname", "")))
        except Exception as e:  # noqa: BLE001 - a worker without its card still works
            log.warning("could not publish this worker's agents to the catalog: %s", e)

    worker_ready.connect(publish_agents, weak=False)
    if settings.otel:
        from .observe import otel  # the `otel` extra

        otel.install(app)
    for a in agents:
        _bind_agent(app, a, settings)
    # Not bound: Celery passes (request, exc, traceback) only to an errback
    # whose function is not a bound partial; a bound one gets just a task id.
    def run_failed_errback(request: Any, exc: BaseException, traceback: Any) -> None:
        kwargs = getattr(request, "kwargs", None) or {}
        if not kwargs.get("run_id"):
            log.error("errback for a task without a run id: %s", getattr(request, "task", "?"))
            return
        failure = (
            kwargs["run_id"],
            str(kwargs.get("step", "")),
            agent_of_task(str(getattr(request, "task", "") or "")),
            type(exc).__name__,
            str(exc),
            f"{getattr(request, 'id', '')}:{getattr(request, 'retries', 0) or 0}",
            str(kwargs.get("event", "")),
        )
        try:
            record_failure(app, store_for(app), *failure)
        except StoreError as e:
            # Celery only logs an errback's exception: hand the work to a task
            # that retries, so a Redis blip cannot leave the run running.
            log.warning("run %s: failing it later, Redis is unavailable: %s", failure[0], e)
            app.send_task(FINISH_TASK, args=failure, countdown=1)

    def finish_run(run_id: str, step: str, agent: str, exc_type: str, error: str,
                   lease: str = "", event: str = "") -> None:
        record_failure(app, store_for(app), run_id, step, agent, exc_type, error, lease, event)

    def compensate_run_task(run_id: str, redrive: bool = False) -> None:
        try:
            saga.compensate_run(app, store_for(app), run_id, redrive)
        except StoreError:
            raise  # retried with backoff (autoretry_for)
        except Exception as e:
            # Said in the run's trace, not only in this worker's log: `pipeline inspect`
            # shows why the saga stopped; the sweeper nudges it again after the lease.
            with contextlib.suppress(StoreError):
                store_for(app).note_once(run_id, "saga.error", task=COMPENSATE_RUN_TASK,
                                    error=f"{type(e).__name__}: {e}"[:2000],
                                    reason="planning or dispatching the compensation failed; "
                                           "the sweeper sends the planner again")
            raise

    def sweep_task() -> dict[str, Any]:
        return housekeeping.sweep_and_archive(app, store_for(app), settings)

    app.task(name=ERRBACK_TASK, ignore_result=True, shared=False)(run_failed_errback)
    app.task(name=SWEEP_TASK, ignore_result=True, shared=False,
             soft_time_limit=120, time_limit=130)(sweep_task)
    app.task(
        name=COMPENSATE_RUN_TASK, ignore_result=True, shared=False,
        autoretry_for=(TransientStoreError,), retry_backoff=True, retry_backoff_max=30,
        max_retries=20,
    )(compensate_run_task)
    app.task(
        name=FINISH_TASK, ignore_result=True, shared=False, autoretry_for=(TransientStoreError,),
        retry_backoff=True, retry_backoff_max=30, max_retries=20,
    )(finish_run)
    return app


class CompensationTask(Task):  # type: ignore[misc]
    """A compensation that failed outside the agent's code (Redis, its hard time limit)
    is recorded dead, so the saga goes on instead of waiting for it forever."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        run_id, step = args[0], args[1]
        detail = f"{type(exc).__name__}: {exc}"[:2000]
        try:
            saga.give_up_or_record(self.app, store_for(self.app), run_id, step,
                                   agent_of_task(self.name), "dead", detail)
        except Exception:  # noqa: BLE001 - nothing more can be done from here
            log.exception("run %s: could not record the failed compensation of %s",
                          run_id, step)


def release_result_subscriptions(app: Celery) -> None:
    """Unsubscribe from every task result channel this process listens to.

    A worker that continues a chain into a chord builds the chord's GroupResult, which
    subscribes to its members' result channels (Redis result backend; celery/celery#4824,
    #4761) that nothing reads: a long-lived worker gathers three subscriptions a run,
    and their messages pile up in its socket. Nothing here waits on a Celery result
    (clients wait on the run's log, chords join in the backend), so after each task
    every subscription goes.
    """
    consumer = getattr(app.backend, "result_consumer", None)
    keys = list(getattr(consumer, "subscribed_to", None) or ())
    if consumer is None or not keys:
        return
    prefix = app.backend.task_keyprefix
    prefix = prefix.decode() if isinstance(prefix, bytes) else str(prefix)
    for key in keys:
        name = key.decode() if isinstance(key, bytes) else str(key)
        consumer.cancel_for(name.removeprefix(prefix))


def store_for(app: Celery) -> StateStore:
    """The state store of ``app`` (one connection pool per app and process)."""
    store: StateStore | None = getattr(app, "_pipeline_store", None)
    if store is None:
        store = StateStore.from_settings(app.pipeline_settings)
        app._pipeline_store = store
    return store


def _bind_agent(app: Celery, a: Agent, settings: Settings) -> None:
    # A message stays unacked through its retry countdown and its run, and the
    # broker hands it out again after the visibility timeout: keep the worst
    # case under half of it (celery/celery#5935, kombu#337).
    later_s = a.breaker.reset_timeout_s if a.fallback is Fallback.RETRY_LATER else 0.0
    worst_s = (a.time_limit_s + HARD_TIME_LIMIT_GRACE_S
               + max(a.retry_backoff_max_s, STORE_RETRY_BACKOFF_MAX_S, later_s))
    if worst_s * 2 > settings.visibility_timeout_s:
        raise ConfigurationError(
            f"agent {a.name}: time limit {a.time_limit_s:g}s plus the longest retry countdown "
            f"must stay under half the broker's visibility timeout "
            f"({settings.visibility_timeout_s}s, PIPELINE_VISIBILITY_TIMEOUT_S), or a step is "
            "delivered twice while it waits or runs (celery/celery#5935)"
        )

    limits.require(a.limits, f"agent {a.name}")

    def step(self: Task, upstream: Any, *, run_id: str, step: str, final: bool = False,
             refused: int = 0, event: str = "", event_type: str = "") -> int:
        return run_step(
            self, a, store_for(self.app), upstream,
            run_id=run_id, step=step, final=final, event=event, event_type=event_type,
            chaos_spec=settings.chaos,
        )

    def compensate(self: Task, run_id: str, step: str) -> None:
        saga.compensate_step(self.app, self, store_for(self.app), a, run_id, step)

    compensate.__doc__ = f"Undo a step of agent {a.name} (saga)."
    app.task(
        name=compensate_task(a.name), shared=False, bind=True, ignore_result=True,
        base=CompensationTask, soft_time_limit=a.time_limit_s,
        time_limit=a.time_limit_s + HARD_TIME_LIMIT_GRACE_S,
        autoretry_for=(TransientStoreError,), retry_backoff=True, retry_backoff_max=30,
        max_retries=max(a.compensation_retries, 8),
    )(compensate)
    step.__doc__ = a.description or f"Run agent {a.name} as one step of a workflow."
    app.task(
        name=a.task_name,
        shared=False,
        bind=True,
        soft_time_limit=a.time_limit_s,
        time_limit=a.time_limit_s + HARD_TIME_LIMIT_GRACE_S,
        max_retries=a.max_retries,
    )(step)


def record_failure(
    app: Celery, store: StateStore, run_id: str, step: str, agent: str, exc_type: str,
    error: str, lease: str = "", event: str = "",
) -> None:
    """The run has failed for good: start its compensation, once, naming the agent to blame.

    Celery may report one failure several times: once per failed chord member
    and again for the chord's body, whose ``ChordError`` names the member by
    task id; the runner logged each step's task id when it opened, so the
    member is found there. Failures raised in the worker's main process (the
    hard time limit) never reached the runner, so they are logged here. A
    failed event delivery (``event``) also publishes ``<agent>.failed``.
    """
    if exc_type == "ChordError":
        agent, exc_type, error = _chord_member(store, run_id, error) or (agent, exc_type, error)
    elif exc_type in MAIN_PROCESS_FAILURES and store.run_info(run_id).status is RunStatus.RUNNING:
        store.note(run_id, "step.failed", step=step, agent=agent, error_type=exc_type,
                   error=error[:2000])
        # The runner never saw it: count it on the breaker, with the agent's policy as this
        # process has it, else as the fleet's catalog does (a pool without the agent).
        known = agents.get(agent) if agent in agents else catalog.card(store.redis, agent)
        policy = known.breaker if isinstance(known, Agent) else known.policy if known else None
        if policy is not None and policy.enabled:
            BreakerRegistry(store.redis, url=store.url).record(
                agent, policy, "failure", lease, f"{exc_type}: {error}")
    reason = f"{exc_type}: {error}"
    if event:  # the failure event begins the saga; start() enqueues its planner
        choreography.fail_delivery(store, run_id, step, agent, lease.rsplit(":", 1)[0], reason)
        reason = f"{failure_event(agent)}: {reason}"
    saga.start(app, store, run_id, reason=reason[:2000], agent=agent)


def _chord_member(store: StateStore, run_id: str, error: str) -> tuple[str, str, str] | None:
    """(agent, error type, error) of the chord member a ``ChordError`` names."""
    match = re.search(r"Dependency (\S+) raised (\w+)", error)
    if match is None:
        return None
    log_entries = store.log(run_id)
    opened = next((e for e in log_entries if e.get("task_id") == match.group(1)), None)
    if opened is None:
        return None
    failed = [e for e in log_entries
              if e.get("event") == "step.failed" and e.get("step") == opened["step"]]
    if failed:
        return opened["agent"], failed[-1]["error_type"], failed[-1]["error"]
    return opened["agent"], match.group(2), error.split(" raised ", 1)[1]
