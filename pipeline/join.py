"""Chords that join in the seal: the pipeline's Celery result backend.

A workflow's parallel stage is a Celery chord, ``chord(group(b, c, d), e)``, and the
canvas stays one. What changes is who counts the members. Celery's Redis backend stores
every member's result and counts them in a join script of its own (five keys a chord, a
round trip to set its size, one a member, and more to read the results and clean up);
the pipeline already knows, in the script that seals a member, whether its siblings are
sealed. So here:

- the seal of the member that completes its stage joins it, atomically and exactly once,
  and returns the stage's versions (``StateStore.seal``, ``group``);
- this backend's ``on_chord_part_return`` sends the chord's body with those versions,
  and nothing else: no chord size is set, no member stores a Celery result (members run
  with ``ignore_result``), no result channel is subscribed to;
- a member's message delivered again after its seal (its worker died before the body
  went out, or a resume or re-drive sent a complete stage again) joins again if no step
  of the next stage was delivered yet (``pipeline.state.rejoin``); the body is
  idempotent by its step key, and the sweeper re-drives a run whose body never went;
- a failing member fails the run through its own errback, as any step does.

Every other chord (one whose tasks are not the pipeline's steps) keeps Celery's Redis
behaviour. ``install`` makes it an app's backend class, on the app's ``result_backend``
URL: Celery shows and logs that Redis URL as for its own backend, and the setting (or
``CELERY_RESULT_BACKEND``, which Celery reads over any setting) stays a plain Redis URL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from celery import Celery, states
from celery.backends.redis import RedisBackend
from celery.canvas import maybe_signature

from .names import AGENT_TASK_PREFIX

__all__ = ["Backend", "hand_over", "install", "joins_in_seal", "member_group", "unwatched"]

log = logging.getLogger(__name__)

UNWATCHED_MAX = 10_000
"""Member ids kept waiting for their wait to be skipped (``add_pending_result``); one left
behind (its chord's send failed) goes when there are this many."""
JOINED = "pipeline_joined"
"""The request attribute the step sets to the versions its seal joined (``hand_over``)."""


def install(app: Celery) -> None:
    """Make ``Backend`` ``app``'s result backend, keeping results on its ``result_backend``."""
    app.backend_cls = Backend


def joins_in_seal(app: Celery) -> bool:
    """Whether ``app``'s chords of steps join in the seal (its backend is this one)."""
    return isinstance(app.backend, Backend)


@contextmanager
def unwatched(app: Celery) -> Iterator[None]:
    """While sending a canvas of steps from this thread, subscribe to none of its results
    (Celery subscribes to every member of a group it freezes; no step stores a result)."""
    backend = app.backend
    if not isinstance(backend, Backend):
        yield
        return
    backend._sending += 1  # an app's backend is one per thread: this thread's sends
    try:
        yield
    finally:
        backend._sending -= 1


def member_group(request: Any) -> str:
    """The Celery group id of the chord whose member ``request`` is, else ''."""
    return str(request.group or "") if getattr(request, "chord", None) else ""


def hand_over(request: Any, versions: Iterable[int]) -> None:
    """Tell the backend that this member joined its stage: send the body with ``versions``
    once the task returns."""
    setattr(request, JOINED, [int(v) for v in versions])


def _is_step(task: Any) -> bool:
    """Whether a signature (or its dict) is one of the pipeline's steps, or a group,
    chain or chord of them."""
    if not isinstance(task, Mapping):
        return False
    if str(task.get("task") or "").startswith(AGENT_TASK_PREFIX):
        return True
    kwargs = task.get("kwargs") or {}
    nested = list(kwargs.get("tasks") or ()) + [kwargs.get("header"), kwargs.get("body")]
    return any(_is_step(t) for t in nested if t is not None)


class Backend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend, with the pipeline's chords joined in the seal."""

    def __init__(self, *args: Any, url: str | None = None, **kwargs: Any) -> None:
        if url is None:  # made from the app's backend class: its result_backend URL
            url = str(kwargs["app"].conf.result_backend)
        super().__init__(*args, url=url, **kwargs)
        self._joined_in_seal: set[str] = set()  # group ids, until their size is skipped
        self._unwatched: set[str] = set()  # member task ids, until their wait is skipped
        self._sending = 0  # inside ``unwatched``

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> Any:
        if _is_step(body):  # set_chord_size comes next, for the same group: skip it
            group_id, members = header_result_args
            self._joined_in_seal.add(str(group_id))
            if isinstance(members, list | tuple):  # and nobody waits for a member
                if len(self._unwatched) > UNWATCHED_MAX:  # a send that failed left some
                    self._unwatched.clear()
                self._unwatched.update(str(m.id) for m in members)
            return None
        return super().apply_chord(header_result_args, body, **kwargs)

    def add_pending_result(self, result: Any, weak: bool = False,
                           start_drainer: bool = True) -> Any:
        """Sending a group waits for each member's result (a ready barrier nothing reads),
        subscribing to its result channel: not for the members of a chord of steps, which
        store no result."""
        if self._sending:
            return result
        if str(result.id) in self._unwatched:
            self._unwatched.discard(str(result.id))
            return result
        return super().add_pending_result(result, weak=weak, start_drainer=start_drainer)

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        if group_id in self._joined_in_seal:
            self._joined_in_seal.discard(group_id)
            return
        super().set_chord_size(group_id, chord_size)

    def on_chord_part_return(self, request: Any, state: str, result: Any,
                             propagate: Any = None, **kwargs: Any) -> None:
        if not (str(getattr(request, "task", "") or "").startswith(AGENT_TASK_PREFIX)
                and (getattr(request, "kwargs", None) or {}).get("run_id")):
            super().on_chord_part_return(request, state, result, propagate, **kwargs)
            return
        versions = getattr(request, JOINED, None)
        if state != states.SUCCESS or not versions:
            return  # not the member that joined; a failure fails the run by its errback
        body = maybe_signature(request.chord, app=self.app)
        try:
            body.apply_async((versions,))
        except Exception as e:  # noqa: BLE001 - the sweeper sends it: the run is stalled
            log.warning("run %s: could not send the body of the stage step %s joined (%s); "
                        "the sweeper re-drives the run", request.kwargs["run_id"],
                        request.kwargs.get("step"), e)
