"""research -> analysis -> report: the talk's second example, with its semantic rule.

The research output contract refuses findings whose confidence is below 0.7:
low-quality data is caught at the handoff, not three agents downstream.
"""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from pipeline import StepContext, Workflow, agent, contract

MIN_CONFIDENCE = 0.7


@contract("research_request", 1)
class ResearchRequest(Schema):
    topic = fields.String(required=True, validate=validate.Length(min=1, max=500))
    sources = fields.List(fields.String(validate=validate.Length(min=1)), required=True,
                          validate=validate.Length(min=1, max=50))


class Finding(Schema):
    claim = fields.String(required=True)
    source = fields.String(required=True)


@contract("research_findings", 1)
class ResearchFindings(Schema):
    topic = fields.String(required=True)
    findings = fields.List(fields.Nested(Finding), required=True)
    confidence = fields.Float(required=True, validate=validate.Range(min=0.0, max=1.0))
    sources = fields.List(fields.String(), required=True)

    @validates_schema
    def confident_enough(self, data: dict[str, Any], **_: object) -> None:
        if data["confidence"] < MIN_CONFIDENCE:
            raise ValidationError(
                f"confidence {data['confidence']:.2f} is below {MIN_CONFIDENCE}", "confidence"
            )


@contract("analysis", 1)
class Analysis(Schema):
    topic = fields.String(required=True)
    summary = fields.String(required=True)
    supported_claims = fields.Integer(required=True, validate=validate.Range(min=0))
    confidence = fields.Float(required=True)


@contract("report", 1)
class Report(Schema):
    title = fields.String(required=True)
    body = fields.String(required=True)


@agent(input="research_request@1", output="research_findings@1")
def research(request: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Gather one finding per source; confidence grows with the number of sources."""
    sources = request["sources"]
    return {
        "topic": request["topic"],
        "findings": [{"claim": f"{request['topic']} per {s}", "source": s} for s in sources],
        "confidence": round(min(1.0, 0.5 + 0.1 * len(sources)), 2),
        "sources": sources,
    }


@agent(input="research_findings@1", output="analysis@1")
def analysis(findings: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Summarise the findings."""
    n = len(findings["findings"])
    return {
        "topic": findings["topic"],
        "summary": f"{n} sources agree on {findings['topic']}",
        "supported_claims": n,
        "confidence": findings["confidence"],
    }


@agent(input="analysis@1", output="report@1")
def report(result: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Write the report."""
    return {
        "title": f"Report: {result['topic']}",
        "body": f"{result['summary']} (confidence {result['confidence']:.0%}).",
    }


research_report = Workflow("research_report", [research, analysis, report],
                           description="The talk's research -> analysis -> report flow.")
