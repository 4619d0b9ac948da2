"""Credit decisioning: credit_score -> (income_verification | risk_assessment |
fraud_detection) -> final_approval.

Breaker fallbacks: a verified income is slow to change, so income_verification
reuses its last good answer for the same input (``cached``); fraud_detection
must never be skipped (``fail``); risk_assessment waits for its breaker to
half-open (``retry_later``); final_approval hands the case to a person
(``park``).

Each agent decides only on the sealed version it is handed, never on the
customer record that other systems keep writing: that is what stops the
talk's stale-cache bug. Each also leaves an observable side effect in a
per-run ledger (``credit:ledger:{run_id}``, agent -> JSON entry) that its
compensation can undo; writes are keyed by run and agent, so a step executed
twice leaves one entry.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from pipeline import StepContext, Workflow, agent, parallel
from pipeline.saga import CompensationContext

from .contracts import band_of

LEDGER_KEY = "credit:ledger:{run_id}"
CUSTOMER_KEY = "credit:customer:{applicant_id}"
DISPOSABLE_EMAIL_DOMAINS = frozenset({"mailinator.com", "tempmail.com", "10minutemail.com"})
MAX_DTI = 0.43
APR_BY_RATING = {"low": 6.9, "medium": 9.9}


def record(ctx: StepContext, entry: dict[str, Any]) -> None:
    """Write this step's side effect to the run's ledger (idempotent per run and agent)."""
    ctx.redis.hset(LEDGER_KEY.format(run_id=ctx.run_id), ctx.agent, json.dumps(entry))


def release(ctx: CompensationContext) -> None:
    """Undo a step's side effect: drop its ledger entry (idempotent)."""
    ctx.redis.hdel(LEDGER_KEY.format(run_id=ctx.run_id), ctx.agent)


def ledger(client: redis.Redis, run_id: str) -> dict[str, dict[str, Any]]:
    """The side effects the run's agents left, by agent."""
    raw = client.hgetall(LEDGER_KEY.format(run_id=run_id))
    return {k.decode() if isinstance(k, bytes) else k: json.loads(v) for k, v in raw.items()}


# -- the score ------------------------------------------------------------------


def compute_score(history: dict[str, Any]) -> int:
    """A FICO-like score from the credit history, 300..850."""
    score = (
        300
        + 270 * history["on_time_payment_ratio"]
        + 170 * (1 - history["utilization"])
        + 6 * min(history["years"], 20)
        - 60 * history["delinquencies"]
        - 150 * history["bankruptcies"]
        - 10 * history["hard_inquiries_6m"]
    )
    return int(max(300, min(850, round(score))))


@agent(input="credit_application@1", output="credit_score@1", time_limit_s=10)
def credit_score(application: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Score the applicant's credit history and record the bureau inquiry."""
    score = compute_score(application["credit_history"])
    band = band_of(score)
    applicant_id = application["applicant"]["id"]
    # The legacy customer record other systems read (and sometimes overwrite);
    # what it held before is remembered so that a compensation can put it back.
    record_key = CUSTOMER_KEY.format(applicant_id=applicant_id)
    previous = ctx.redis.hgetall(record_key)
    if previous.get("run_id") != ctx.run_id:  # not this run's own earlier write (a rerun)
        ctx.remember({"customer_record": previous})
    ctx.redis.hset(record_key, mapping={"score": score, "band": band, "run_id": ctx.run_id})
    record(ctx, {"kind": "bureau_inquiry", "applicant_id": applicant_id, "score": score})
    return {
        "application_id": application["application_id"],
        "score": score,
        "band": band,
        "application": application,
    }


@credit_score.compensator
def undo_credit_score(ctx: CompensationContext) -> None:
    """Put the customer record back as it was, and drop the bureau inquiry."""
    record_key = CUSTOMER_KEY.format(applicant_id=ctx.input["applicant"]["id"])
    previous = (ctx.data or {}).get("customer_record") or {}
    if ctx.redis.hget(record_key, "run_id") == ctx.run_id:  # nobody wrote it since
        ctx.redis.delete(record_key)
        if previous:
            ctx.redis.hset(record_key, mapping=previous)
    release(ctx)


# -- the three parallel assessments ------------------------------------------------


@agent(input="credit_score@1", output="income_verification@1", time_limit_s=10,
       fallback="cached")
def income_verification(scored: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Check income documents and compute debt-to-income, with and without the new loan."""
    app = scored["application"]
    income, loan = app["income"], app["loan"]
    monthly_income = income["annual"] / 12
    payment = loan["amount"] / loan["term_months"]
    dti = _ratio(income["monthly_debt"], monthly_income)
    dti_with_loan = _ratio(income["monthly_debt"] + payment, monthly_income)
    verified = bool({"payslip", "tax_return"} & set(income["documents"]))
    record(ctx, {"kind": "income_check", "verified": verified})
    return {
        "application_id": scored["application_id"],
        "verified": verified,
        "monthly_income": round(monthly_income, 2),
        "loan_amount": loan["amount"],
        "dti": dti,
        "dti_with_loan": dti_with_loan,
        "employment_stable": app["applicant"]["employment_years"] >= 1,
    }


def _ratio(debt: float, income: float) -> float:
    return 9.999 if income <= 0 else round(min(debt / income, 9.999), 4)


RATING_LADDER = ("low", "medium", "high", "very_high")


@agent(input="credit_score@1", output="risk_assessment@1", time_limit_s=10,
       fallback="retry_later")
def risk_assessment(scored: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Rate the risk from the sealed score (never from the customer record) and the loan size."""
    score = scored["score"]
    app = scored["application"]
    reasons = [f"credit score {score} ({scored['band']})"]
    level = 0 if score >= 740 else 1 if score >= 670 else 2 if score >= 580 else 3
    if level == 0 and app["credit_history"]["utilization"] >= 0.3:
        level, reasons = 1, reasons + ["utilization at or above 30%"]
    if app["loan"]["amount"] > 0.5 * app["income"]["annual"] and level < 3:
        level += 1
        reasons.append("loan above half of annual income")
    rating = RATING_LADDER[level]
    record(ctx, {"kind": "risk_rating", "rating": rating, "score_used": score})
    return {
        "application_id": scored["application_id"],
        "credit_score": score,
        "rating": rating,
        "reasons": reasons,
    }


@agent(input="credit_score@1", output="fraud_detection@1", time_limit_s=10,
       fallback="fail")
def fraud_detection(scored: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Simple fraud rules: location mismatch, disposable email, inquiry bursts, oversized loans."""
    app = scored["application"]
    applicant, loan = app["applicant"], app["loan"]
    signals: list[tuple[str, int]] = []
    if app["device"]["ip_country"] != applicant["country"]:
        signals.append(("ip country differs from the applicant's country", 40))
    if applicant["email"].rsplit("@", 1)[-1].lower() in DISPOSABLE_EMAIL_DOMAINS:
        signals.append(("disposable email domain", 40))
    if app["credit_history"]["hard_inquiries_6m"] >= 6:
        signals.append(("six or more credit inquiries in six months", 25))
    if loan["amount"] > app["income"]["annual"]:
        signals.append(("loan larger than annual income", 20))
    if applicant["employment_years"] == 0 and loan["amount"] > 20_000:
        signals.append(("no employment history for a large loan", 15))
    fraud_score = min(100, sum(points for _, points in signals))
    flagged = fraud_score >= 50
    record(ctx, {"kind": "fraud_check", "flagged": flagged})
    return {
        "application_id": scored["application_id"],
        "fraud_score": fraud_score,
        "flagged": flagged,
        "signals": [s for s, _ in signals],
    }


# -- the decision -------------------------------------------------------------------


@agent(input="credit_assessments@1", output="credit_decision@1", time_limit_s=10,
       fallback="park")
def final_approval(assessed: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Decide, and place a credit-line hold for an approved amount."""
    income = assessed["income_verification"]
    risk = assessed["risk_assessment"]
    fraud = assessed["fraud_detection"]
    decision, reasons = "approved", []
    if fraud["flagged"]:
        decision, reasons = "referred", [f"fraud signals (score {fraud['fraud_score']})"]
    elif risk["rating"] == "very_high":
        decision, reasons = "declined", ["very high credit risk"]
    elif income["dti_with_loan"] > MAX_DTI:
        decision = "declined"
        reasons = [f"debt-to-income with the loan {income['dti_with_loan']:.0%} above 43%"]
    elif not income["verified"]:
        decision, reasons = "referred", ["income not verified"]
    elif risk["rating"] == "high":
        decision, reasons = "referred", ["high credit risk"]
    approved = decision == "approved"
    amount = float(income["loan_amount"]) if approved else 0.0
    if approved:
        reasons = [f"{risk['rating']} risk, debt-to-income {income['dti_with_loan']:.0%}"]
        record(ctx, {"kind": "credit_line_hold", "amount": amount})
    return {
        "application_id": risk["application_id"],
        "decision": decision,
        "reasons": reasons,
        "credit_score": risk["credit_score"],
        "risk_rating": risk["rating"],
        "dti_with_loan": income["dti_with_loan"],
        "fraud_score": fraud["fraud_score"],
        "approved_amount": amount,
        "apr": APR_BY_RATING[risk["rating"]] if approved else None,
    }


for _agent in (income_verification, risk_assessment, fraud_detection, final_approval):
    _agent.compensator(release)  # each undoes its ledger entry: the hold, the checks


credit_decision = Workflow(
    "credit_decision",
    [credit_score, parallel(income_verification, risk_assessment, fraud_detection),
     final_approval],
    description="Score, assess in parallel, decide; the talk's credit-decisioning system.",
)
