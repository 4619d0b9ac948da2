"""The end of the ``dangling`` flow, imported by the test client but not by the workers: the
worker that publishes ``dangle.next`` does not know its subscriber (a deployment skew)."""

from __future__ import annotations

from typing import Any

from pipeline import StepContext, agent
from pipeline.choreography import Choreography


@agent(input="count@1", output="count@1", on=["dangle.next"], emits="dangle.done",
       time_limit_s=5, max_retries=0)
def dangle_last(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """End the flow."""
    return {"n": payload["n"]}


dangling = Choreography("dangling", start="dangle.requested", terminal=["dangle.done"],
                        input="count@1")
