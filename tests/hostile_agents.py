"""An agent whose output can be nested too deeply or be too big, for tests/test_hostile.py
(``PIPELINE_AGENT_MODULES=tasks,tests.agents,tests.hostile_agents``)."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields, validate

from pipeline import StepContext, Workflow, agent, contract


@contract("grow_request", 1)
class GrowRequest(Schema):
    blob = fields.Raw(required=True)
    wrap = fields.Integer(validate=validate.Range(min=0, max=1000))
    repeat = fields.Integer(validate=validate.Range(min=1, max=10_000_000))


@contract("blob", 1)
class Blob(Schema):
    blob = fields.Raw(required=True)


@agent(input="grow_request@1", output="blob@1", time_limit_s=10, max_retries=0)
def grow(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Repeat a string blob ``repeat`` times, then wrap the blob in ``wrap`` more arrays."""
    blob = payload["blob"]
    if isinstance(blob, str):
        blob = blob * payload.get("repeat", 1)
    for _ in range(payload.get("wrap", 0)):
        blob = [blob]
    return {"blob": blob}


growing = Workflow("growing", [grow])
