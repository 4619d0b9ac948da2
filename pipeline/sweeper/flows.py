"""What each kind of flow does for the sweeper, from its recorded route alone (no agent code).

A run is either a workflow (a Celery canvas compiled from its stages) or a choreography
(deliveries between agents). The sweeper treats both alike through three operations:
send a run that was never enqueued, tell what a run still waits for, and hand out again
what a run that stopped moving owes.
"""

from __future__ import annotations

from celery import Celery

from .. import canvas, choreography
from ..route import FlowKind, Route
from ..state import StateStore

__all__ = ["enqueue", "owed", "redrive_route"]


def enqueue(app: Celery, store: StateStore, route: Route, run_id: str) -> None:
    """Send a run's first messages (a workflow from its first stage, or where a replay starts)."""
    if route.kind is FlowKind.WORKFLOW:  # from the first stage, or where a replay starts
        canvas.send(app, canvas.compile_route(app, route, run_id, start=int(route.start or 0),
                                              upstream=route.input_version))
    else:
        choreography.enqueue(app, store, route, run_id)


def owed(store: StateStore, route: Route, run_id: str) -> list[str]:
    """The steps (or deliveries) the run waits for."""
    if route.kind is FlowKind.WORKFLOW:
        return canvas.owed(store, route, run_id)[1]
    return [key for key, _ in choreography.owed(store, run_id)]


def redrive_route(app: Celery, store: StateStore, route: Route, run_id: str) -> list[str]:
    """Hand out again what the run owes, from its last sealed versions; what was handed out."""
    if route.kind is FlowKind.WORKFLOW:
        return canvas.redrive(app, store, route, run_id)
    return choreography.redrive(app, store, route, run_id)
