"""One agent on the queue ``agents.shared``, and nothing else: a pool that imports only this
module consumes that queue but does not know ``shared_booked`` (tests.agents), which runs on
it too. It must give that agent's messages back, and keep consuming the queue."""

from __future__ import annotations

from typing import Any

from pipeline import StepContext, agent
from tests.quick_agents import QUICK


@agent(input="quick_count@1", output="quick_count@1", queue="agents.shared", **QUICK)
def shared_neighbour(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Add one (never run by the tests: it only routes this module's pool to the queue)."""
    return {"n": payload["n"] + 1}
