"""Data contracts: every failing field path is named, semantic rules hold, and no
payload whatever makes validation fail with anything but a ContractViolation."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import Schema, fields, validate

import tasks
import tests.agents  # noqa: F401  (registers the test contracts)
from pipeline.contracts import Contract, contracts, flatten_errors
from pipeline.errors import ContractViolation
from tasks.contracts import BANDS, band_of
from tasks.credit import compute_score
from tasks.research import ResearchFindings

GOOD = json.loads((tasks.SAMPLES / "good.json").read_text())
INVALID = json.loads((tasks.SAMPLES / "invalid.json").read_text())
REFS = [c.ref for c in contracts]

PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MUTATIONS = settings(PROPERTY, max_examples=150)


def violation(ref: str, payload: Any, **where: Any) -> ContractViolation:
    with pytest.raises(ContractViolation) as info:
        contracts.get(ref).validate(payload, **where)
    return info.value


# -- good payloads, one per contract with a semantic rule ----------------------------

SCORE = compute_score(GOOD["credit_history"])
GOOD_SCORE = {"application_id": "app-1001", "score": SCORE, "band": band_of(SCORE),
              "application": GOOD}
GOOD_ASSESSMENTS = {
    "income_verification": {
        "application_id": "app-1001", "verified": True, "monthly_income": 8000.0,
        "loan_amount": 25000.0, "dti": 0.15, "dti_with_loan": 0.2368,
        "employment_stable": True,
    },
    "risk_assessment": {
        "application_id": "app-1001", "credit_score": SCORE, "rating": "low",
        "reasons": [f"credit score {SCORE} (excellent)"],
    },
    "fraud_detection": {
        "application_id": "app-1001", "fraud_score": 0, "flagged": False, "signals": [],
    },
}
APPROVED = {
    "application_id": "app-1001", "decision": "approved", "reasons": ["low risk"],
    "credit_score": SCORE, "risk_rating": "low", "dti_with_loan": 0.2368, "fraud_score": 0,
    "approved_amount": 25000.0, "apr": 6.9,
}
DECLINED = {**APPROVED, "decision": "declined", "reasons": ["very high credit risk"],
            "risk_rating": "very_high", "approved_amount": 0.0, "apr": None}
GOOD_FINDINGS = {
    "question": "how do breakers work?",
    "findings": [{"passage": "A breaker opens.", "source": "a#1", "score": 2.5},
                 {"passage": "It half-opens later.", "source": "b#3", "score": 1.0}],
    "confidence": 0.7,
    "sources": ["a", "b"],
    "retrieved_at": "2026-11-24T10:00:00+00:00",
}

# (contract, good payload, paths its schema-level rules may name besides the changed leaf)
GOOD_PAYLOADS = [
    ("credit_application@1", GOOD, set()),
    ("credit_score@1", GOOD_SCORE, {"band"}),
    ("credit_assessments@1", GOOD_ASSESSMENTS, set()),
    ("credit_decision@1", APPROVED, {"approved_amount", "apr"}),
    ("credit_decision@1", DECLINED, {"approved_amount", "apr"}),
    ("research_findings@1", GOOD_FINDINGS, set()),
    ("confident_findings@1", GOOD_FINDINGS, {"confidence"}),
]


@pytest.mark.parametrize(("ref", "payload"), [(r, p) for r, p, _ in GOOD_PAYLOADS])
def test_good_payloads_pass_their_contract(ref: str, payload: dict[str, Any]) -> None:
    contracts.get(ref).validate(payload)


# -- what a violation says ------------------------------------------------------------


def test_violation_names_run_version_agent_contract_and_every_failing_path() -> None:
    e = violation("credit_application@1", INVALID, side="input", agent="credit_score",
                  run_id="run-42", version=0)
    expected = {
        "applicant.email",
        "applicant.country",
        "income.annual",
        "credit_history.on_time_payment_ratio",
        "loan.amount",
    }
    assert set(e.errors) == expected
    assert e.field_paths == sorted(expected)
    assert (e.contract, e.side, e.agent, e.run_id, e.version) == (
        "credit_application@1", "input", "credit_score", "run-42", 0)
    message = str(e)
    assert message.startswith("input breaks contract credit_application@1")
    for part in ("run run-42", "version 0", "agent credit_score", *expected):
        assert part in message
    assert "Missing data for required field." in e.errors["income.annual"]
    assert "Not a valid email address." in e.errors["applicant.email"]


def test_violation_without_context_still_names_contract_and_paths() -> None:
    e = violation("count@1", {"n": "seven"})
    assert str(e) == "payload breaks contract count@1: n: Not a valid integer."
    assert e.errors == {"n": ["Not a valid integer."]}


def test_unknown_fields_are_refused_by_name() -> None:
    e = violation("count@1", {"n": 1, "extra": {"deep": True}})
    assert e.errors == {"extra": ["Unknown field."]}


@pytest.mark.parametrize(
    ("payload", "kind"),
    [([], "an array"), ([{"n": 1}], "an array"), ("{}", "a string"), (None, "null"),
     (3, "a number"), (2.5, "a number"), (True, "a boolean")],
)
def test_a_payload_that_is_not_an_object_is_refused_at_the_root(payload: Any, kind: str) -> None:
    e = violation("credit_application@1", payload, agent="credit_score", run_id="r", version=0)
    assert e.errors == {"<root>": [f"expected a JSON object, got {kind}"]}
    assert f"<root>: expected a JSON object, got {kind}" in str(e)


# -- semantic rules -------------------------------------------------------------------


@pytest.mark.parametrize("confidence", [0.0, 0.5, 0.69, 0.6999])
def test_findings_below_minimum_confidence_are_refused_on_confidence(confidence: float) -> None:
    e = violation("confident_findings@1", {**GOOD_FINDINGS, "confidence": confidence})
    assert list(e.errors) == ["confidence"]
    assert "below 0.7" in e.errors["confidence"][0]
    # research may publish them: the consumer's contract is the one that refuses
    contracts.get("research_findings@1").validate({**GOOD_FINDINGS, "confidence": confidence})


@pytest.mark.parametrize("confidence", [0.7, 0.85, 1.0])
def test_findings_at_or_above_minimum_confidence_are_accepted(confidence: float) -> None:
    contracts.get("confident_findings@1").validate({**GOOD_FINDINGS, "confidence": confidence})


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"approved_amount": 0.0}, "approved_amount"),
        ({"apr": None}, "apr"),
    ],
)
def test_an_approval_needs_an_amount_and_an_apr(change: dict[str, Any], path: str) -> None:
    e = violation("credit_decision@1", {**APPROVED, **change})
    assert list(e.errors) == [path]


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"approved_amount": 1000.0}, "approved_amount"),
        ({"apr": 9.9}, "apr"),
    ],
)
def test_a_refusal_carries_no_amount_and_no_apr(change: dict[str, Any], path: str) -> None:
    for refusal in ("declined", "referred"):
        e = violation("credit_decision@1", {**DECLINED, "decision": refusal, **change})
        assert list(e.errors) == [path]


def test_a_decision_outside_the_known_ones_is_refused() -> None:
    e = violation("credit_decision@1", {**DECLINED, "decision": "maybe"})
    assert list(e.errors) == ["decision"]


@pytest.mark.parametrize("score", [300, 579, 580, 669, 670, 739, 740, 850])
def test_the_score_band_must_match_the_score(score: int) -> None:
    right = band_of(score)
    contracts.get("credit_score@1").validate({**GOOD_SCORE, "score": score, "band": right})
    for wrong in set(BANDS) - {right}:
        e = violation("credit_score@1", {**GOOD_SCORE, "score": score, "band": wrong})
        assert list(e.errors) == ["band"]
        assert f"does not match score {score}" in e.errors["band"][0]


def test_band_boundaries_are_the_documented_ones() -> None:
    assert [band_of(s) for s in (300, 579, 580, 669, 670, 739, 740, 850)] == [
        "poor", "poor", "fair", "fair", "good", "good", "excellent", "excellent"]


def test_assessments_of_different_applications_are_refused_at_the_root() -> None:
    mixed = copy.deepcopy(GOOD_ASSESSMENTS)
    mixed["fraud_detection"]["application_id"] = "app-9999"
    e = violation("credit_assessments@1", mixed)
    assert list(e.errors) == ["<root>"]
    assert "app-9999" in e.errors["<root>"][0]


# -- flatten_errors -------------------------------------------------------------------


def test_flatten_errors_joins_nested_keys_and_list_indexes_with_dots() -> None:
    nested = {
        "findings": {0: {"claim": ["Missing data for required field."]},
                     2: {"source": ["Not a valid string."]}},
        "applicant": {"email": ["Not a valid email address."]},
        "confidence": ["too low"],
    }
    assert flatten_errors(nested) == {
        "findings.0.claim": ["Missing data for required field."],
        "findings.2.source": ["Not a valid string."],
        "applicant.email": ["Not a valid email address."],
        "confidence": ["too low"],
    }


def test_flatten_errors_puts_schema_errors_on_their_parent_or_root() -> None:
    nested = {"_schema": ["mixed applications"], "income": {"_schema": ["Invalid input type."]}}
    assert flatten_errors(nested) == {"<root>": ["mixed applications"],
                                      "income": ["Invalid input type."]}


def test_flatten_errors_wraps_a_lone_message_in_a_list() -> None:
    assert flatten_errors({"a": {"b": "bad"}}) == {"a.b": ["bad"]}


def test_flatten_errors_on_real_marshmallow_errors_of_a_list_of_objects() -> None:
    payload = {**GOOD_FINDINGS, "findings": [{"passage": "ok", "source": "a", "score": 1},
                                             {"source": 3, "score": 1}]}
    errors = ResearchFindings().validate(payload)
    assert flatten_errors(errors) == {
        "findings.1.passage": ["Missing data for required field."],
        "findings.1.source": ["Not a valid string."],
    }


# -- properties: any JSON payload, any registered contract ------------------------------

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)


def _validators(field: fields.Field) -> list[Any]:
    return list(getattr(field, "validators", []))


def _plausible(field: fields.Field) -> st.SearchStrategy[Any]:
    """Values of the field's own type that often pass its validators."""
    checks = _validators(field)
    choice = next((v for v in checks if isinstance(v, validate.OneOf)), None)
    bounds = next((v for v in checks if isinstance(v, validate.Range)), None)
    length = next((v for v in checks if isinstance(v, validate.Length)), None)
    regexp = next((v for v in checks if isinstance(v, validate.Regexp)), None)
    lo = bounds.min if bounds is not None and bounds.min is not None else -1000
    hi = bounds.max if bounds is not None and bounds.max is not None else lo + 10_000
    if choice is not None:
        base: st.SearchStrategy[Any] = st.sampled_from(list(choice.choices))
    elif isinstance(field, fields.Nested):
        nested = field.schema
        assert isinstance(nested, Schema)
        base = _shaped(nested)
    elif isinstance(field, fields.List):
        min_size = length.min if length is not None and length.min is not None else 0
        base = st.lists(_plausible(field.inner), min_size=min_size, max_size=min_size + 3)
    elif isinstance(field, fields.Boolean):
        base = st.booleans()
    elif isinstance(field, fields.Integer):
        base = st.integers(math.ceil(lo), math.floor(hi))
    elif isinstance(field, fields.Float):
        base = st.floats(lo, hi) | st.integers(math.ceil(lo), math.floor(hi))
    elif isinstance(field, fields.Email):
        base = st.sampled_from(["ada@example.com", "eve@mailinator.com", "not-an-email"])
    elif regexp is not None:
        base = st.from_regex(regexp.regex, fullmatch=True)
    elif isinstance(field, fields.String):
        min_size = length.min if length is not None and length.min is not None else 0
        base = st.text(min_size=min_size, max_size=min_size + 10)
    else:
        base = JSON_VALUES
    return base | st.none() if field.allow_none else base


def _shaped(schema: Schema) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the schema's own field names, all required ones present."""
    required = {n: _plausible(f) for n, f in schema.fields.items() if f.required}
    optional = {n: _plausible(f) for n, f in schema.fields.items() if not f.required}
    return st.fixed_dictionaries(required, optional=optional)


def _noisy(schema: Schema) -> st.SearchStrategy[dict[str, Any]]:
    """The schema's field names, any of them missing, with plausible or random values."""
    def value(f: fields.Field) -> st.SearchStrategy[Any]:
        if isinstance(f, fields.Nested) and isinstance(f.schema, Schema):
            return _noisy(f.schema) | JSON_VALUES
        return _plausible(f) | JSON_VALUES

    known = st.fixed_dictionaries({}, optional={n: value(f) for n, f in schema.fields.items()})
    extra = st.dictionaries(st.text(max_size=8), JSON_LEAVES, max_size=2)
    return st.builds(lambda k, e: {**e, **k}, known, extra | st.just({}))


def payloads_for(c: Contract) -> st.SearchStrategy[Any]:
    """Random JSON, the contract's fields with noise, or well-typed objects that reach
    the contract's semantic rules."""
    return JSON_VALUES | _noisy(c.schema) | _shaped(c.schema)


def check(c: Contract, payload: Any) -> ContractViolation | None:
    """Validate; a refusal must be a well-formed ContractViolation, and nothing else."""
    try:
        c.validate(payload, side="input", agent="prop", run_id="run-p", version=7)
    except ContractViolation as e:
        assert isinstance(e.errors, dict) and e.errors
        message = str(e)
        assert f"contract {c.ref} (run run-p, version 7, agent prop)" in message
        for path, msgs in e.errors.items():
            assert isinstance(path, str)
            assert isinstance(msgs, list) and msgs
            assert all(isinstance(m, str) and m for m in msgs)
            assert f"{path}: " in message
        assert (e.contract, e.run_id, e.version, e.agent) == (c.ref, "run-p", 7, "prop")
        return e
    return None


def test_every_example_contract_is_registered() -> None:
    assert {"credit_application@1", "credit_score@1", "credit_assessments@1",
            "credit_decision@1", "research_findings@1", "count@1"} <= set(REFS)


@pytest.mark.parametrize("ref", REFS)
@PROPERTY
@given(data=st.data())
def test_any_json_payload_either_passes_or_raises_a_contract_violation(
    ref: str, data: st.DataObject
) -> None:
    c = contracts.get(ref)
    check(c, data.draw(payloads_for(c)))


def leaf_paths(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from leaf_paths(v, (*path, k))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            yield from leaf_paths(v, (*path, i))
    else:
        yield path


def replaced(payload: Any, path: tuple[str | int, ...], value: Any) -> Any:
    out = copy.deepcopy(payload)
    target = out
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return out


@pytest.mark.parametrize(("ref", "good", "rule_paths"), GOOD_PAYLOADS,
                         ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(GOOD_PAYLOADS)])
@MUTATIONS
@given(data=st.data())
def test_changing_one_leaf_is_blamed_on_that_leaf(
    ref: str, good: dict[str, Any], rule_paths: set[str], data: st.DataObject
) -> None:
    c = contracts.get(ref)
    path = data.draw(st.sampled_from(sorted(leaf_paths(good), key=str)))
    bad = replaced(good, path, data.draw(JSON_VALUES))
    e = check(c, bad)
    if e is None:
        return
    leaf = ".".join(str(p) for p in path)
    for blamed in e.errors:
        assert (
            blamed == leaf
            or blamed.startswith(leaf + ".")
            or leaf.startswith(blamed + ".")
            or blamed == "<root>"
            or blamed in rule_paths
        ), f"changed {leaf}, violation blames {blamed}: {e}"


def test_a_time_limit_hit_during_validation_is_not_called_a_contract_violation() -> None:
    from celery.exceptions import SoftTimeLimitExceeded
    from marshmallow import Schema, fields, validates_schema

    class Slow(Schema):
        n = fields.Integer(required=True)

        @validates_schema
        def takes_too_long(self, data: dict[str, Any], **_: object) -> None:
            raise SoftTimeLimitExceeded()

    from pipeline.contracts import ContractRegistry

    registry = ContractRegistry()
    with pytest.raises(SoftTimeLimitExceeded):
        registry.register("slow", 1, Slow).validate({"n": 1})


def test_a_step_rechecks_its_input_only_when_the_sealed_contract_is_not_its_own() -> None:
    """A version was checked against the contract it is sealed under, and its digest is
    checked on read: the consumer checks again only under another contract (its own
    rules), and always for a fan-in mapping."""
    from pipeline.agent import agents
    from pipeline.state import Version
    from pipeline.step.runner import needs_input_check

    def sealed(contract: str) -> Version:
        return Version(run_id="r", version=1, parents=(0,), agent="a", contract=contract,
                       payload={}, digest="", created_at=0.0, step="0:a")

    analysis = agents.get("analysis")  # input confident_findings@1
    assert needs_input_check(analysis, [sealed("research_findings@1")], fan_in=False)
    assert not needs_input_check(analysis, [sealed("confident_findings@1")], fan_in=False)
    assert needs_input_check(agents.get("final_approval"),
                             [sealed("credit_assessments@1")], fan_in=True)
