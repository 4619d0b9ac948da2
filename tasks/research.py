"""research -> analysis -> report: the talk's second example, choreographed.

``research`` answers ``research.requested`` by ranking the passages of a small
corpus (``tasks/corpus``) against the question and publishes
``research.completed`` with findings, a confidence, sources and a timestamp.
``analysis`` reacts to it, and its input contract refuses confidence below
0.7: low-quality research is stopped at the handoff, not three agents
downstream. ``report`` reacts to ``analysis.ready`` and publishes
``report.completed``, which ends the run. ``audit`` subscribes to
``*.completed`` and was added without touching the others.

Each agent reports the words it read and wrote as token usage, and leaves a
side effect its compensation undoes (the talk's saga): research caches what it
gathered, analysis writes a draft recommendation, report publishes the report,
audit appends to the run's audit trail (undone by a retraction, as audits are).

The same agents also run orchestrated, as the workflow ``research_chain``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, validate, validates_schema

from pipeline import Agent, Budget, StepContext, Workflow, agent, contract, limit
from pipeline.choreography import Choreography
from pipeline.saga import CompensationContext

from . import retrieval

MIN_CONFIDENCE = 0.7
MODEL = "bm25-extractive"
"""What the token usage is attributed to: the agents rank and extract, no LLM."""
CACHE_KEY = "research:cache:{run_id}"
DRAFTS_KEY = "research:drafts"
REPORTS_KEY = "research:reports"
AUDIT_KEY = "research:audit:{run_id}"
CACHE_TTL_S = 24 * 3600


@contract("research_question", 1)
class ResearchQuestion(Schema):
    question = fields.String(required=True, validate=validate.Length(min=3, max=500))
    max_passages = fields.Integer(validate=validate.Range(min=1, max=10))


class Finding(Schema):
    passage = fields.String(required=True)
    source = fields.String(required=True)
    score = fields.Float(required=True, validate=validate.Range(min=0))


@contract("research_findings", 1)
class ResearchFindings(Schema):
    """What research publishes: any confidence; the consumer decides what it accepts."""

    question = fields.String(required=True)
    findings = fields.List(fields.Nested(Finding), required=True)
    confidence = fields.Float(required=True, validate=validate.Range(min=0.0, max=1.0))
    sources = fields.List(fields.String(), required=True)
    retrieved_at = fields.DateTime(required=True)


@contract("confident_findings", 1)
class ConfidentFindings(ResearchFindings):
    """What analysis accepts: research findings with a confidence of at least 0.7."""

    @validates_schema
    def confident_enough(self, data: dict[str, Any], **_: object) -> None:
        if data["confidence"] < MIN_CONFIDENCE:
            raise ValidationError(
                f"confidence {data['confidence']:.2f} is below {MIN_CONFIDENCE}", "confidence"
            )


class KeyPoint(Schema):
    point = fields.String(required=True)
    sources = fields.List(fields.String(), required=True, validate=validate.Length(min=1))


@contract("analysis", 1)
class Analysis(Schema):
    question = fields.String(required=True)
    key_points = fields.List(fields.Nested(KeyPoint), required=True,
                             validate=validate.Length(min=1))
    summary = fields.String(required=True)
    confidence = fields.Float(required=True, validate=validate.Range(min=0.0, max=1.0))


@contract("report", 1)
class Report(Schema):
    title = fields.String(required=True)
    body = fields.String(required=True)
    sources = fields.List(fields.String(), required=True)
    confidence = fields.Float(required=True)
    words = fields.Integer(required=True, validate=validate.Range(min=1))


@contract("audit_event", 1)
class AuditEvent(Schema):
    """Anything an event carries: the auditor reads every ``*.completed`` payload."""

    class Meta:
        unknown = INCLUDE


@contract("audit_record", 1)
class AuditRecord(Schema):
    event_type = fields.String(required=True)
    event_id = fields.String(required=True)
    digest = fields.String(required=True)
    size_bytes = fields.Integer(required=True)


def _usage(ctx: StepContext, read: str, wrote: Any) -> None:
    text = wrote if isinstance(wrote, str) else json.dumps(wrote)
    ctx.report_usage(prompt_tokens=len(retrieval.words(read)),
                     completion_tokens=len(retrieval.words(text)), model=MODEL)


def _forget_cache(ctx: CompensationContext) -> None:
    """Clear the research data this run cached (the talk's research compensation)."""
    ctx.redis.delete(CACHE_KEY.format(run_id=ctx.run_id))


@agent(input="research_question@1", output="research_findings@1", on=["research.requested"],
       emits="research.completed", compensate=_forget_cache, time_limit_s=20)
def research(request: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Rank the corpus's passages against the question (BM25); cache what was found."""
    hits, confidence = retrieval.search(request["question"], request.get("max_passages", 3))
    findings = [{"passage": h.passage.text, "source": h.passage.source, "score": h.score}
                for h in hits]
    out = {
        "question": request["question"],
        "findings": findings,
        "confidence": confidence,
        "sources": sorted({h.passage.source.split("#")[0] for h in hits}),
        "retrieved_at": datetime.now(UTC).isoformat(),
    }
    if findings:
        key = CACHE_KEY.format(run_id=ctx.run_id)
        ctx.redis.hset(key, mapping={f["source"]: f["passage"] for f in findings})
        ctx.redis.expire(key, CACHE_TTL_S)
    # the whole corpus was read to rank it
    ctx.report_usage(prompt_tokens=retrieval.index().total_words
                     + len(retrieval.words(request["question"])),
                     completion_tokens=len(retrieval.words(json.dumps(findings))), model=MODEL)
    return out


def _delete_draft(ctx: CompensationContext) -> None:
    """Delete the draft recommendation this run wrote (the talk's analysis compensation)."""
    ctx.redis.hdel(DRAFTS_KEY, ctx.run_id)


@agent(input="confident_findings@1", output="analysis@1", on=["research.completed"],
       emits="analysis.ready", compensate=_delete_draft, time_limit_s=20)
def analysis(findings: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Extract the sentences that answer the question; write a draft recommendation."""
    passages = [(f["source"], f["passage"]) for f in findings["findings"]]
    points = retrieval.key_sentences(findings["question"], passages, limit=4)
    if not points:
        raise ValueError(f"no sentence of {len(passages)} passages answers the question")
    sources = sorted({s.split("#")[0] for _, srcs in points for s in srcs})
    summary = (f"{len(points)} key points from {len(sources)} source"
               f"{'s' if len(sources) != 1 else ''} ({', '.join(sources)}) answer "
               f"\"{findings['question']}\" with confidence {findings['confidence']:.0%}.")
    out = {
        "question": findings["question"],
        "key_points": [{"point": p, "sources": srcs} for p, srcs in points],
        "summary": summary,
        "confidence": findings["confidence"],
    }
    ctx.redis.hset(DRAFTS_KEY, ctx.run_id, summary)
    _usage(ctx, " ".join(text for _, text in passages), out)
    return out


def _unpublish(ctx: CompensationContext) -> None:
    """Take the published report down."""
    ctx.redis.hdel(REPORTS_KEY, ctx.run_id)


@agent(input="analysis@1", output="report@1", on=["analysis.ready"], emits="report.completed",
       compensate=_unpublish, time_limit_s=20)
def report(result: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Write the report in Markdown and publish it."""
    lines = [f"# {result['question']}", "", result["summary"], ""]
    for i, kp in enumerate(result["key_points"], 1):
        lines.append(f"{i}. {kp['point']} [{', '.join(kp['sources'])}]")
    body = "\n".join(lines)
    ctx.redis.hset(REPORTS_KEY, ctx.run_id, body)
    out = {
        "title": f"Report: {result['question']}",
        "body": body,
        "sources": sorted({s.split("#")[0] for kp in result["key_points"] for s in kp["sources"]}),
        "confidence": result["confidence"],
        "words": len(retrieval.words(body)),
    }
    _usage(ctx, json.dumps(result), body)
    return out


def _retract(ctx: CompensationContext) -> None:
    """An audit trail is never rewritten: append a retraction of the record."""
    record = ctx.output or {}
    ctx.redis.rpush(AUDIT_KEY.format(run_id=ctx.run_id), json.dumps(
        {"retracted": record.get("event_id", ctx.step.split(":")[0]), "step": ctx.step}))


@agent(input="audit_event@1", output="audit_record@1", on=["*.completed"],
       compensate=_retract, time_limit_s=10)
def audit(payload: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Record every completed piece of work: which event, its digest and size."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    record = {"event_type": ctx.event_type, "event_id": ctx.event,
              "digest": hashlib.sha256(text.encode()).hexdigest(), "size_bytes": len(text)}
    ctx.redis.rpush(AUDIT_KEY.format(run_id=ctx.run_id), json.dumps(record))
    _usage(ctx, text, record)
    return record


research_report = Choreography(
    "research_report", start="research.requested", terminal=["report.completed"],
    input="research_question@1",
    description="The talk's research -> analysis -> report flow, choreographed by events.",
)
research_chain = Workflow(
    "research_chain", [research, analysis, report],
    description="The same agents, orchestrated: research -> analysis -> report.",
)


# -- the same agents on one model's limit, as a fleet shares a provider's rate limits -------

MODEL_LIMIT = limit("demo:research-model", requests_per_minute=240, burst=1, concurrency=2,
                    price_per_1k_prompt=0.0025, price_per_1k_completion=0.01)
"""Four calls a second, evenly spaced, two at once, for every worker of the fleet."""


def _on_the_model(a: Agent, estimate: int) -> Agent:
    return agent(f"{a.name}_paced", input=a.input, output=a.output, compensate=a.compensate,
                 queue=a.queue, time_limit_s=a.time_limit_s, limits=(MODEL_LIMIT.name,),
                 estimate_tokens=estimate, description=a.description)(a.execute)


research_paced = Workflow(
    "research_paced",
    [_on_the_model(research, 2_000), _on_the_model(analysis, 400),
     _on_the_model(report, 400)],
    budget=Budget(tokens=5_000),
    description="research -> analysis -> report, every call on the model's shared limit, "
                "each run within a budget of 5,000 tokens.",
)
