"""The credit-decisioning contracts: one schema per handoff, registered by name@version."""

from __future__ import annotations

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from pipeline import contract

COUNTRY = validate.Regexp(r"^[A-Z]{2}$", error="must be an ISO 3166 two-letter country code")
RATIO = validate.Range(min=0.0, max=1.0)
NON_NEGATIVE = validate.Range(min=0)


class Applicant(Schema):
    id = fields.String(required=True, validate=validate.Length(min=1, max=64))
    name = fields.String(required=True, validate=validate.Length(min=1, max=200))
    email = fields.Email(required=True)
    country = fields.String(required=True, validate=COUNTRY)
    employment_years = fields.Float(required=True, validate=NON_NEGATIVE)


class Income(Schema):
    annual = fields.Float(required=True, validate=NON_NEGATIVE)
    monthly_debt = fields.Float(required=True, validate=NON_NEGATIVE)
    documents = fields.List(fields.String(), required=True)


class CreditHistory(Schema):
    on_time_payment_ratio = fields.Float(required=True, validate=RATIO)
    utilization = fields.Float(required=True, validate=RATIO)
    years = fields.Float(required=True, validate=NON_NEGATIVE)
    delinquencies = fields.Integer(required=True, validate=NON_NEGATIVE)
    bankruptcies = fields.Integer(required=True, validate=NON_NEGATIVE)
    hard_inquiries_6m = fields.Integer(required=True, validate=NON_NEGATIVE)


class Loan(Schema):
    amount = fields.Float(required=True, validate=validate.Range(min=100, max=5_000_000))
    term_months = fields.Integer(required=True, validate=validate.Range(min=6, max=360))
    purpose = fields.String(required=True, validate=validate.Length(min=1, max=100))


class Device(Schema):
    ip_country = fields.String(required=True, validate=COUNTRY)


@contract("credit_application", 1)
class CreditApplication(Schema):
    application_id = fields.String(required=True, validate=validate.Length(min=1, max=64))
    applicant = fields.Nested(Applicant, required=True)
    income = fields.Nested(Income, required=True)
    credit_history = fields.Nested(CreditHistory, required=True)
    loan = fields.Nested(Loan, required=True)
    device = fields.Nested(Device, required=True)


BANDS = ("excellent", "good", "fair", "poor")
BAND_FLOORS = ((740, "excellent"), (670, "good"), (580, "fair"))


def band_of(score: int) -> str:
    """The score band: excellent >= 740, good >= 670, fair >= 580, else poor."""
    return next((band for floor, band in BAND_FLOORS if score >= floor), "poor")


@contract("credit_score", 1)
class CreditScore(Schema):
    application_id = fields.String(required=True)
    score = fields.Integer(required=True, validate=validate.Range(min=300, max=850))
    band = fields.String(required=True, validate=validate.OneOf(BANDS))
    application = fields.Nested(CreditApplication, required=True)

    @validates_schema
    def band_matches_score(self, data: dict, **_: object) -> None:
        if band_of(data["score"]) != data["band"]:
            raise ValidationError(f"band {data['band']!r} does not match score {data['score']}",
                                  "band")


@contract("income_verification", 1)
class IncomeVerification(Schema):
    application_id = fields.String(required=True)
    verified = fields.Boolean(required=True)
    monthly_income = fields.Float(required=True, validate=NON_NEGATIVE)
    loan_amount = fields.Float(required=True, validate=NON_NEGATIVE)
    dti = fields.Float(required=True, validate=NON_NEGATIVE)
    dti_with_loan = fields.Float(required=True, validate=NON_NEGATIVE)
    employment_stable = fields.Boolean(required=True)


RATINGS = ("low", "medium", "high", "very_high")


@contract("risk_assessment", 1)
class RiskAssessment(Schema):
    application_id = fields.String(required=True)
    credit_score = fields.Integer(required=True, validate=validate.Range(min=300, max=850))
    rating = fields.String(required=True, validate=validate.OneOf(RATINGS))
    reasons = fields.List(fields.String(), required=True)


@contract("fraud_detection", 1)
class FraudDetection(Schema):
    application_id = fields.String(required=True)
    fraud_score = fields.Integer(required=True, validate=validate.Range(min=0, max=100))
    flagged = fields.Boolean(required=True)
    signals = fields.List(fields.String(), required=True)


@contract("credit_assessments", 1)
class CreditAssessments(Schema):
    """The fan-in: what final_approval receives from the three parallel agents."""

    income_verification = fields.Nested(IncomeVerification, required=True)
    risk_assessment = fields.Nested(RiskAssessment, required=True)
    fraud_detection = fields.Nested(FraudDetection, required=True)

    @validates_schema
    def same_application(self, data: dict, **_: object) -> None:
        ids = {part["application_id"] for part in data.values()}
        if len(ids) > 1:
            raise ValidationError(f"assessments are of different applications: {sorted(ids)}")


DECISIONS = ("approved", "declined", "referred")


@contract("credit_decision", 1)
class CreditDecision(Schema):
    application_id = fields.String(required=True)
    decision = fields.String(required=True, validate=validate.OneOf(DECISIONS))
    reasons = fields.List(fields.String(), required=True)
    credit_score = fields.Integer(required=True)
    risk_rating = fields.String(required=True, validate=validate.OneOf(RATINGS))
    dti_with_loan = fields.Float(required=True)
    fraud_score = fields.Integer(required=True)
    approved_amount = fields.Float(required=True, validate=NON_NEGATIVE)
    apr = fields.Float(required=True, allow_none=True)

    @validates_schema
    def approval_is_consistent(self, data: dict, **_: object) -> None:
        approved = data["decision"] == "approved"
        if approved != (data["approved_amount"] > 0):
            raise ValidationError("approved_amount must be positive exactly when approved",
                                  "approved_amount")
        if approved != (data["apr"] is not None):
            raise ValidationError("apr must be set exactly when approved", "apr")
