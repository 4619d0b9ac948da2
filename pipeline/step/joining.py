"""A chord member's part in its stage's join (the chord joins in the seal: ``join.py``)."""

from __future__ import annotations

from celery import Task

from .. import join
from ..flow import known_route
from ..state import StateStore, rejoin

__all__ = ["after_seal", "join_again"]


def after_seal(task: Task, store: StateStore, run_id: str, step: str,
               joined: tuple[int, ...] | None) -> None:
    """Hand the backend the versions a member's seal joined (``joined``, the seal's
    ``Sealing.joined``): it sends the chord's body once the task returns. A run that
    recorded no route (None: its seal could not tell) joins by the route this process has."""
    if joined is None:
        join_again(task, store, run_id, step, first=True, routeless=True)
    elif joined:
        join.hand_over(task.request, joined)


def join_again(task: Task, store: StateStore, run_id: str, step: str, *,
               first: bool = False, routeless: bool = False) -> None:
    """For a chord member whose step is sealed: join its stage (again) if it must, that
    is, send the body when no step of the next stage was delivered (``rejoin``).
    ``routeless``: the run is known to have recorded no route (its seal said so)."""
    group = join.member_group(task.request)
    if not group:
        return
    versions = None if routeless else rejoin(store, run_id, step, group, first=first)
    if versions is None:  # a run from before routes were recorded: its flow's, if here
        route = known_route(store.run_info(run_id))
        versions = rejoin(store, run_id, step, group, first=first,
                          route=route.to_json() if route is not None else "{}")
    if versions:
        join.hand_over(task.request, versions)
