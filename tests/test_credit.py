"""The credit-decisioning workflow end to end, on real workers: decisions
computed by hand, the sealed history, the ledger, and the stale-read story."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import Pipeline, RunStatus
from pipeline.state import canonical_json, digest_of
from tasks.credit import CUSTOMER_KEY, ledger
from tests.conftest import Cluster, wait_for

SAMPLES = Path(__file__).parent.parent / "tasks" / "samples"
BATCH = {a["application_id"]: a for a in json.loads((SAMPLES / "batch.json").read_text())}
PARALLEL = {"income_verification", "risk_assessment", "fraud_detection"}


def decide(p: Pipeline, application: dict[str, Any]) -> Any:
    run = p.start("credit_decision", application)
    return run, run.wait(30)


def test_a_good_applicant_is_approved_with_a_credit_line_hold(pipeline: Pipeline) -> None:
    run, result = decide(pipeline, BATCH["app-1001"])
    # score = 300 + 270*0.98 + 170*(1-0.22) + 6*12 - 10*1 = 759.2 -> 759, excellent;
    # utilization 22% and a loan under half the income: low risk;
    # DTI with the loan = (1200 + 25000/36) / (96000/12) = 0.2368
    assert result.status is RunStatus.SUCCEEDED
    out = result.output
    assert (out["decision"], out["credit_score"], out["risk_rating"]) == ("approved", 759, "low")
    assert out["dti_with_loan"] == pytest.approx(0.2368)
    assert (out["approved_amount"], out["apr"], out["fraud_score"]) == (25000.0, 6.9, 0)
    held = ledger(pipeline.store.redis, run.run_id)
    assert held["final_approval"] == {"kind": "credit_line_hold", "amount": 25000.0}
    assert set(held) == {"credit_score", "final_approval"} | PARALLEL


@pytest.mark.parametrize(
    ("application_id", "decision", "score", "rating", "reason"),
    [
        # 300 + 191.7 + 11.9 + 24 - 180 - 150 - 40 = 157.6 -> floor 300: poor, very high risk
        ("app-1002", "declined", 300, "very_high", "very high credit risk"),
        # fraud: ip RU != DE (40) + mailinator (40) + 7 inquiries (25) = 105 -> 100, flagged
        ("app-1005", "referred", 605, "very_high", "fraud signals (score 100)"),
        # 674 good -> medium, loan above half the income -> high; DTI (1400+833.33)/3000 = 74%
        ("app-1006", "declined", 674, "high", "debt-to-income with the loan 74% above 43%"),
        # excellent score but only a bank statement: income not verified
        ("app-1007", "referred", 766, "low", "income not verified"),
    ],
)
def test_hand_computed_decisions(pipeline: Pipeline, application_id: str, decision: str,
                                 score: int, rating: str, reason: str) -> None:
    run, result = decide(pipeline, BATCH[application_id])
    out = result.output
    assert (out["decision"], out["credit_score"], out["risk_rating"]) == (decision, score, rating)
    assert out["reasons"] == [reason]
    assert out["approved_amount"] == 0.0 and out["apr"] is None
    assert "final_approval" not in ledger(pipeline.store.redis, run.run_id)  # no hold


def test_history_is_versions_zero_to_five_with_their_parents(pipeline: Pipeline) -> None:
    run, result = decide(pipeline, BATCH["app-1009"])
    history = run.history()
    assert [v.version for v in history] == [0, 1, 2, 3, 4, 5] and result.version == 5
    by_agent = {v.agent: v for v in history}
    assert history[0].agent == "" and history[0].parents == ()
    assert history[0].payload == BATCH["app-1009"]
    assert by_agent["credit_score"].parents == (0,)
    assert {a for a in by_agent if by_agent[a].parents == (1,)} == PARALLEL
    fan_in = by_agent["final_approval"]
    assert fan_in.version == 5 and sorted(fan_in.parents) == [2, 3, 4]
    assert {history[p].agent for p in fan_in.parents} == PARALLEL
    assert {v.agent: v.contract for v in history[1:]} == {
        "credit_score": "credit_score@1",
        "income_verification": "income_verification@1",
        "risk_assessment": "risk_assessment@1",
        "fraud_detection": "fraud_detection@1",
        "final_approval": "credit_decision@1",
    }
    for v in history:
        assert v.digest == digest_of(canonical_json(v.payload))
    assert [v.version for v in run.lineage()] == [5, 4, 3, 2, 1, 0]


def test_the_risk_agent_decides_on_the_sealed_score_not_a_changed_record(
    cluster: Cluster,
) -> None:
    """The talk's bug: a risk agent read a stale cached score. Here the run is
    held between credit_score and risk_assessment (only credit_score's queue
    is served), another writer changes the customer record, and the risk
    agent still decides on the score sealed in version 1."""
    p = cluster.pipeline()
    scorer = cluster.worker(queues=("agents.credit_score",), concurrency=1)
    application = BATCH["app-1001"]
    run = p.start("credit_decision", application)
    wait_for(lambda: run.info().head >= 1, message="credit_score to seal version 1")
    assert run.store.get(run.run_id, 1).payload["score"] == 759
    assert run.info().head == 1  # nothing downstream ran yet

    record = CUSTOMER_KEY.format(applicant_id=application["applicant"]["id"])
    cluster.redis.hset(record, mapping={"score": 580, "band": "fair"})  # another writer

    scorer.stop()
    cluster.worker(queues=("agents.income_verification", "agents.risk_assessment",
                           "agents.fraud_detection", "agents.final_approval", "pipeline"))
    result = run.wait(30)
    risk = next(v for v in run.history() if v.agent == "risk_assessment")
    assert risk.parents == (1,)
    assert risk.payload["credit_score"] == 759 and risk.payload["rating"] == "low"
    assert result.output["decision"] == "approved"
    assert cluster.redis.hget(record, "score") == "580"  # the record changed; the run did not
