"""A workflow's canvas, built from the run's route alone (no agent code).

``parallel(b, c, d)`` followed by ``e`` is a chord; a sequence is a chain:
``chain(step(a), chord(group(step(b), step(c), step(d)), step(e)))``. Messages carry
references only: each step task receives the version number(s) its upstream sealed and
returns the version it sealed. Since the canvas needs only step keys and queues, a
worker that imports none of a workflow's agents can send it: a re-drive, a run its
client forgot, a resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Celery, chain, chord, group
from celery.canvas import Signature

from .join import joins_in_seal, unwatched
from .names import ERRBACK_TASK, step_task
from .route import Route, agent_of
from .state import StateStore

__all__ = ["compile_route", "owed", "redrive", "send", "upstream"]


def compile_route(
    app: Celery, route: Route, run_id: str, *, start: int = 0, upstream: int | list[int] = 0
) -> Signature:
    """The canvas for one run: chains for sequence, chords for fan-out/fan-in.

    Built from the run's route alone (step keys and queues), so a worker that imports
    none of the workflow's agents can send it (a re-drive, a forgotten run). The first
    step(s) receive version 0, the run's input; to resume a run, ``start`` names the
    stage to begin at and ``upstream`` what it receives. One errback with the
    ``(request, exc, traceback)`` signature is linked to every step's own signature:
    ``chord.link_error`` would clone it immutable, and an immutable errback is called
    without the request, exception and traceback.
    """
    parts: list[Signature] = []
    last = len(route.stages) - 1
    store_results = not joins_in_seal(app)  # a chord joins on its members' results
    for i, stage in enumerate(route.stages[start:], start):
        first = upstream if i == start else None
        sigs = [_signature(app, route, run_id, key, upstream=first,
                           store_result=store_results and len(stage) > 1, final=i == last)
                for key in stage]
        if len(sigs) == 1:
            previous = parts[-1] if parts else None
            if isinstance(previous, group):
                parts[-1] = chord(previous, sigs[0], app=app)
            else:
                parts.append(sigs[0])
        else:
            parts.append(group(sigs, app=app))
    canvas: Signature = parts[0] if len(parts) == 1 else chain(*parts, app=app)
    return canvas


def _signature(app: Celery, route: Route, run_id: str, key: str, *,
               upstream: int | list[int] | None, store_result: bool,
               final: bool) -> Signature:
    """One step's task. No step stores its Celery result: the sealed version is the
    result, and a chord of steps joins in the seal (``join.py``). Only an app whose
    backend is not the pipeline's stores its members' results, for Celery's join. That
    saves a backend write per step and keeps the client from subscribing to each run's
    result channel."""
    kwargs: dict[str, Any] = {"run_id": run_id, "step": key}
    if final:
        kwargs["final"] = True
    agent = agent_of(key)
    sig = app.signature(
        step_task(agent),
        args=() if upstream is None else (upstream,),
        kwargs=kwargs,
        queue=route.queue_of(agent),
        ignore_result=not store_result,
    )
    sig.link_error(app.signature(ERRBACK_TASK))
    return sig


def owed(store: StateStore, route: Route, run_id: str) -> tuple[int, list[str], int | list[int]]:
    """(stage, its steps not sealed, what the stage receives) of the run's first stage with
    a step not sealed; stage -1 when all are sealed."""
    replay_start = store.run_info(run_id).replay_start
    keys = [key for stage in route.stages for key in stage]
    sealed = dict(zip(keys, store.sealed_steps(run_id, keys), strict=True))
    for i in range(int(replay_start or 0), len(route.stages)):
        todo = [key for key in route.stages[i] if sealed[key] is None]
        if todo:
            return i, todo, upstream(route, i, sealed, replay_start=replay_start)
    return -1, [], 0


def upstream(route: Route, stage: int, sealed: Mapping[str, int | None], *,
             replay_start: str = "") -> int | list[int]:
    """What stage ``stage`` receives: the run's input version at the workflow's start (or
    where a replay started: version 0, or 1 when a person edited it), else the versions its
    upstream stage sealed (``sealed``: step key -> version; the caller makes sure they are
    all there)."""
    if stage == 0 or str(stage) == replay_start:
        return route.input_version
    versions = [v for v in (sealed.get(key) for key in route.stages[stage - 1]) if v is not None]
    return versions[0] if len(versions) == 1 else versions


def redrive(app: Celery, store: StateStore, route: Route, run_id: str) -> list[str]:
    """Send the run's canvas again from its first stage with a step not sealed, fed the
    versions its upstream sealed; the step keys it hands out (none when all sealed).

    For a run that stopped moving with none of its messages left in the broker (the
    sweeper): a message lost between the broker's pop and its unacked record, or a chord
    whose join counted a redelivered member twice. A step sealed meanwhile returns its
    version; the new chord counts its own members.
    """
    stage, todo, fed = owed(store, route, run_id)
    if todo:
        send(app, compile_route(app, route, run_id, start=stage, upstream=fed))
    return todo


def send(app: Celery, canvas: Signature) -> None:
    """Send a canvas, and listen for none of its results.

    Celery's sending subscribes the sender to the result channel of every member of a
    group it freezes, and keeps their AsyncResults pending in the app. The client waits
    on the run's log, never on those results: left alone, a long-lived client would hold
    three subscriptions per run, for ever. With the pipeline's backend no step stores a
    result, and nothing is subscribed to (``join.unwatched``); with another, the
    subscriptions are dropped once the canvas is sent.
    """
    if joins_in_seal(app):  # no step stores a result: subscribe to none
        with unwatched(app):
            canvas.apply_async()
        return
    result = canvas.apply_async()
    backend = app.backend
    if not hasattr(backend, "remove_pending_result"):  # a backend without subscriptions
        return
    todo: list[Any] = [result]
    while todo:
        r = todo.pop()
        if r is None:
            continue
        todo += list(getattr(r, "results", None) or [])  # a group's members
        todo.append(getattr(r, "parent", None))
        if getattr(r, "id", None) and not getattr(r, "results", None):
            backend.remove_pending_result(r)
