"""A subscriber added to the research flow by deploying one more module, touching nothing else
(``PIPELINE_AGENT_MODULES=tasks,tests.agents,tests.extra_subscriber``)."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields

from pipeline import StepContext, agent, contract


@contract("word_count", 1)
class WordCount(Schema):
    words = fields.Integer(required=True)


@agent(input="audit_event@1", output="word_count@1", on=["analysis.ready"], time_limit_s=5,
       max_retries=0)
def word_counter(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Count the words of an analysis."""
    return {"words": len(str(payload.get("summary", "")).split())}
