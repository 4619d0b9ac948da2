"""What application code calls: start a workflow, wait for it, read its history."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import replace
from typing import Any

from celery import Celery

from . import catalog, saga
from .app import create_app
from .breaker import BreakerRegistry
from .choreography import redeliver
from .contracts import Contract
from .errors import (
    BrokerUnavailable,
    IdempotencyConflict,
    InputError,
    PipelineError,
    RunNotLive,
    RunNotParked,
)
from .flow import Flow, known_route, workflows
from .keys import RunKeys
from .route import EDIT_STEP
from .run import Run, RunResult
from .settings import Settings, redact_url
from .state import Budget, RunStatus, StateStore, Version, translate_errors
from .state.replays import link_replay, unlink_replay
from .state.version import Sealable, sealable

__all__ = ["Pipeline", "Run", "RunResult"]

IDEMPOTENCY_NAMESPACE = uuid.UUID("5b0c43a4-6f5e-4d8e-9a55-2f3f1c7c9e11")
ENQUEUE_GRACE_S = 30.0
"""How long a run that was created but not enqueued belongs to the start that created it."""
MAX_IDEMPOTENCY_KEY_CHARS = 256
"""The longest idempotency key ``start`` takes (it is kept in the run's record)."""


def check_idempotency_key(key: str) -> None:
    """``InputError`` unless ``key`` is a non-empty string of at most
    ``MAX_IDEMPOTENCY_KEY_CHARS`` characters that UTF-8 can carry."""
    if not isinstance(key, str) or not key:
        raise InputError(f"idempotency key {key!r} must be a non-empty string")
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InputError(
            f"idempotency key is {len(key):,} characters, over the limit of "
            f"{MAX_IDEMPOTENCY_KEY_CHARS}; use a hash of it"
        )
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"idempotency key {key!r} is not UTF-8 text: {e.reason} "
                         f"at position {e.start}") from None


class Pipeline:
    """The entry point: ``Pipeline.from_env().start("credit_decision", payload)``."""

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        app: Celery | None = None,
        store: StateStore | None = None,
    ) -> None:
        """A client on ``settings`` (default: from the environment), with the Celery
        ``app`` and the state ``store`` made from them unless given. Building the app
        imports the agent modules; ``ConfigurationError`` when one cannot be imported
        or a setting is invalid; ``StoreUnavailable`` for a Redis Cluster that does not
        answer (a plain Redis is first reached when a method needs it)."""
        self.settings = settings or Settings.from_env()
        self.app = app or create_app(self.settings, fail_fast=True)
        self.store = store or StateStore.from_settings(self.settings)
        self.breakers = BreakerRegistry(self.store.redis, url=self.store.url)

    @classmethod
    def from_env(cls, *, agents_required: bool = True) -> Pipeline:
        """A client configured from the environment (``Settings.from_env``). Without
        ``agents_required`` an agent module that cannot be imported is skipped: enough to
        read, cancel and compensate runs, which need no agent code. ``ConfigurationError``
        for a missing module or an invalid setting."""
        settings = Settings.from_env()
        app = create_app(settings, fail_fast=True, agents_required=agents_required)
        return cls(settings=settings, app=app)

    def workflow(self, name: str) -> Flow:
        """The registered workflow or choreography ``name``; ``UnknownWorkflow`` if none."""
        return workflows.get(name)

    def redeliver(self, run_id: str, event_id: str) -> list[str]:
        """Send event ``event_id`` of a run to its subscribers again; the subscribers.

        Deliveries are at least once and handling once per (event, subscriber):
        a subscriber that handled it records a ``duplicate`` and does nothing.
        ``InputError`` when the run has no such event or it is a failure event (the
        saga's).
        """
        route = known_route(self.store.run_info(run_id))
        return redeliver(self.app, self.store, run_id, event_id,
                         queue_of=catalog.resolver(self.store.redis, route))

    def start(
        self, workflow: str | Flow, payload: Any, idempotency_key: str | None = None, *,
        budget: Budget | None = None,
    ) -> Run:
        """Check ``payload`` against the workflow's input contract, then enqueue the run.

        Bad input raises a ``PipelineError`` and nothing is written or enqueued:
        ``UnknownWorkflow``, ``InputError`` (a bad idempotency key),
        ``ContractViolation`` (the contract refuses it, or it is not JSON),
        ``PayloadTooLarge``. The same idempotency key (for the same workflow) returns
        the same run; reusing it with another payload raises ``IdempotencyConflict``.
        ``budget`` bounds what the run's steps may spend (a ``Budget`` of tokens and/or
        cost), instead of the workflow's own: a step that would cross it does not run, and
        the run fails with ``BudgetExceeded``.
        ``StoreUnavailable`` when Redis cannot be reached, ``BrokerUnavailable`` when
        the run cannot be enqueued (nothing of it is kept).
        """
        wf = workflows.get(workflow) if isinstance(workflow, str) else workflow
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        if budget is not None and not isinstance(budget, Budget):
            raise InputError(f"budget must be a pipeline.Budget(tokens=..., cost=...), "
                             f"not {budget!r}")
        form = sealable(payload, self.store.max_payload_bytes, f"input of workflow {wf.name}")
        contract: Contract = wf.input_contract
        contract.validate(payload, side="input", agent=wf.entry_agent)
        run_id = (
            self.run_id_for(wf.name, idempotency_key)
            if idempotency_key is not None
            else str(uuid.uuid4())
        )
        created = self.store.create_run(
            run_id,
            workflow=wf.name,
            payload=payload,
            contract=contract.ref,
            idempotency_key=idempotency_key,
            form=form,
            route=wf.route.to_json(),
            budget=budget or wf.budget,
        )
        if not created.created:
            if created.workflow != wf.name or created.input_digest != form.digest:
                raise IdempotencyConflict(
                    f"idempotency key {idempotency_key!r} already started run {run_id} of "
                    f"workflow {created.workflow} with a different payload; use a new key for "
                    "new input"
                )
            if created.enqueued or created.age_s < ENQUEUE_GRACE_S:
                return Run(self, run_id)
            # The first start died between creating the run and enqueuing it:
            # enqueue now. Were both to enqueue, every step is still sealed
            # once per step key.
        tracing: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if self.settings.otel:  # the span every step of the run descends from
            from .observe import otel  # the `otel` extra, only when tracing is on

            tracing = otel.run_span(wf.name, run_id)
        with tracing:
            try:
                wf.enqueue(self.app, self.store, run_id)
            except PipelineError:  # Redis, for a choreography's starting event
                if created.created:
                    with contextlib.suppress(PipelineError):
                        self.store.delete_run(run_id)
                raise
            except Exception as e:  # kombu's, redis-py's, or Celery's backend RuntimeError
                if created.created:
                    self.store.delete_run(run_id)
                raise BrokerUnavailable(
                    f"cannot enqueue run {run_id}: the broker at "
                    f"{redact_url(self.settings.broker_url)} or the result backend at "
                    f"{redact_url(self.settings.result_backend)} failed "
                    f"({type(e).__name__}: {e}); "
                    + ("nothing was kept" if created.created
                       else "start it again with the same key")
                ) from e
        self.store.mark_enqueued(run_id)
        return Run(self, run_id)

    def resume(self, run_id: str, output: Any = None, *, step: str | None = None) -> Run:
        """Continue a run parked for a person (the ``park`` fallback).

        Without ``output`` the parked step(s) run again (the breaker may have
        closed); with it, ``output`` is checked against the parked step's
        output contract and sealed as that step's version (name the step when
        several are parked), and the run goes on. Raises ``RunNotFound`` for no
        such run; ``RunNotParked`` when the run is not waiting, or while siblings
        of a parked parallel step still run (they would otherwise run twice);
        ``InputError`` when ``step`` is not a parked step or several are parked and
        none is named; ``ContractViolation``/``PayloadTooLarge`` for a bad
        ``output``; ``BrokerUnavailable`` when the rest cannot be enqueued (the run
        is parked again, so resuming can be tried once more).
        """
        info = self.store.run_info(run_id)
        parked_keys = list(info.parked_steps)
        if info.status is not RunStatus.WAITING_FOR_HUMAN or not parked_keys:
            raise RunNotParked(
                f"run {run_id} is {info.status.value}, not waiting_for_human: nothing to resume"
            )
        workflows.get(info.workflow).resume(self.app, self.store, info, output, step)
        return Run(self, run_id)

    def replay(self, run_id: str, from_version: int, *, edit: Any = None,
               author: str = "") -> Run:
        """Start a new run from sealed version ``from_version`` of ``run_id`` (a fork).

        The new run's version 0 is that version (same payload, same digest); it runs
        what came after it: the workflow's next stage, or the subscribers of the event its
        agent publishes. Both runs' records name each other. Nothing before the version
        runs again.

        With ``edit`` (a person's correction of that version's payload), the edit is
        checked against the version's contract and against what comes next, and sealed
        as the new run's version 1, whose parent is version 0 (the copy of the source
        version), by ``author`` (``replay.edited`` in the trace); what comes next
        receives the edit. A saga never undoes an edit: nothing executed it.

        Raises ``RunNotFound``/``VersionNotFound`` when there is no such run or version;
        ``InputError`` when nothing comes after the version (the run's output, an agent
        that publishes nothing) or it is a member of a parallel group (replay from the
        version that joins them); ``ContractViolation`` when what comes next refuses
        it; ``BrokerUnavailable`` when the replay cannot be enqueued (nothing is kept).
        """
        info = self.store.run_info(run_id)
        flow = workflows.get(info.workflow)
        source = self.store.get(run_id, from_version)  # digest checked
        where = f"run {run_id} version {from_version} ({source.agent or 'the input'})"
        # Version 0 of a replay (and a person's edit of it) is where that replay started,
        # not the workflow's start.
        starting = from_version == 0 or source.step == EDIT_STEP
        inherited = info.replay_start if starting else ""
        payload = source.payload if edit is None else edit
        form = None if edit is None else sealable(
            edit, self.store.max_payload_bytes, f"edit of {where}")
        if edit is not None:  # what the version's producer promised, checked of the edit
            flow.contract_of(source.contract).validate(edit, side="edit", agent=where,
                                                       run_id=run_id, version=from_version)
        route, consumers = flow.replay_route(source, starting=starting, inherited=inherited,
                                             where=where)
        # the replay starts from its version 0, or from the edit sealed as its version 1
        route = replace(route, input_version=0 if edit is None else 1)
        for ref in consumers:  # what the first replayed step will check, checked now
            flow.contract_of(ref).validate(payload, side="input", agent=where,
                                           run_id=run_id, version=from_version)
        new_id = str(uuid.uuid4())
        self.store.create_run(new_id, workflow=flow.name, payload=source.payload,
                              contract=source.contract, route=route.to_json(),
                              budget=info.spending.budget if info.spending else flow.budget)
        if form is not None:
            self._seal_edit(new_id, source, edit, form, author)
        link_replay(self.store, run_id, from_version, new_id, route.start)
        tracing: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if self.settings.otel:  # the replay is a run of its own: its own trace
            from .observe import otel  # the `otel` extra, only when tracing is on

            tracing = otel.run_span(flow.name, new_id)
        try:
            with tracing:
                flow.enqueue(self.app, self.store, new_id, route=route)
        except Exception as e:
            with contextlib.suppress(PipelineError):  # nothing half-made is left behind
                self.store.delete_run(new_id)
                unlink_replay(self.store, run_id, new_id)
            if isinstance(e, PipelineError):
                raise
            raise BrokerUnavailable(f"cannot enqueue replay {new_id} of run {run_id}: "
                                    f"{type(e).__name__}: {e}; nothing was kept") from e
        self.store.mark_enqueued(new_id)
        return Run(self, new_id)

    def _seal_edit(self, run_id: str, source: Version, edit: Any, form: Sealable,
                   author: str) -> None:
        """Seal a person's edit of a replay's starting version as its version 1."""
        try:
            sealing = self.store.seal(run_id, step=EDIT_STEP, agent=source.agent,
                                      contract=source.contract, payload=edit, parents=[0],
                                      worker=f"person:{author}" if author else "person",
                                      form=form)
            if sealing.version != 1:
                raise RunNotLive(f"replay {run_id}: the edit was not sealed as version 1 "
                                 f"({sealing.outcome})")
            self.store.note(run_id, "replay.edited", version=1, author=author or "-",
                            agent=source.agent, source_digest=source.digest,
                            digest=form.digest)
        except Exception:
            with contextlib.suppress(PipelineError):  # nothing half-made is left behind
                self.store.delete_run(run_id)
            raise

    def cancel(self, run_id: str, reason: str = "cancelled by hand") -> Run:
        """Stop a live run: no step seals from now on, a step still running sees
        ``ctx.cancelled`` and may stop early, and a saga undoes, newest first, every step
        it sealed (``reason`` is logged). Returns at once; ``wait`` on the run for it to
        end ``cancelled`` (``compensation_failed`` if an undo failed for good:
        ``compensate`` re-drives it). ``RunNotFound`` for no such run, ``RunNotLive``
        when it has ended or is being compensated already."""
        if not saga.start(self.app, self.store, run_id, reason=reason, cancelled=True):
            status = self.store.run_info(run_id).status.value
            raise RunNotLive(f"run {run_id} is {status}: there is nothing to cancel")
        return Run(self, run_id)

    def compensate(self, run_id: str) -> Run:
        """Re-drive a ``compensation_failed`` run: compensate only what is still owed.

        Returns at once. ``RunNotFound`` for no such run, ``RunNotLive`` when the run
        is not ``compensation_failed``."""
        saga.redrive(self.app, self.store, run_id)
        return Run(self, run_id)

    @staticmethod
    def run_id_for(workflow: str, idempotency_key: str) -> str:
        """The run id that ``start`` gives a workflow and idempotency key."""
        return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{workflow}\x00{idempotency_key}"))

    def run(self, run_id: str) -> Run:
        """A handle on an existing run, in Redis or in the archive; raises ``RunNotFound``
        when there is none."""
        if not self.recall(run_id):
            self.store.run_info(run_id)
        return Run(self, run_id)

    def recall(self, run_id: str) -> bool:
        """Bring run ``run_id`` back to Redis from the archive (``PIPELINE_ARCHIVE_URI``) when
        Redis no longer has it; True when it did. False without an archive."""
        if not self.settings.archive_uri:
            return False
        with translate_errors(self.store.url):  # before the extra: a run in Redis needs none
            if self.store.redis.exists(RunKeys(run_id).run):
                return False
        from .archive.recall import recall  # the archive extra: only with an archive

        return recall(self.store, self.settings.archive_uri, run_id,
                      seconds=self.settings.archived_retention_s)
