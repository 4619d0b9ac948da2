"""Errors: one root to catch, a docstring that says when each is raised, messages that
survive Celery's JSON results; and the chaos spec that makes agents fail on purpose."""

from __future__ import annotations

import json

import pytest
from celery import Celery

import tests.agents  # noqa: F401  (registers count@1)
from pipeline import errors
from pipeline.app import create_app
from pipeline.chaos import ChaosError, ChaosMode, Rule, parse
from pipeline.contracts import contracts
from pipeline.errors import ConfigurationError, ContractViolation, PipelineError
from tests.conftest import settings_for

PUBLIC = [getattr(errors, name) for name in errors.__all__]
RAISED = [cls for cls in PUBLIC if cls is not PipelineError]  # the root is only caught


@pytest.fixture(scope="module")
def app() -> Celery:
    """An app whose result backend (de)serializes exceptions; nothing connects to Redis."""
    return create_app(settings_for("redis://127.0.0.1:6379/13"))


def test_every_public_name_is_an_exception_class() -> None:
    assert len(set(errors.__all__)) == len(errors.__all__)
    assert all(isinstance(cls, type) and issubclass(cls, Exception) for cls in PUBLIC)


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_every_public_error_derives_from_pipeline_error(cls: type[Exception]) -> None:
    assert issubclass(cls, PipelineError)
    with pytest.raises(PipelineError):
        raise cls("boom")


@pytest.mark.parametrize("cls", RAISED, ids=lambda c: c.__name__)
def test_every_error_says_in_one_line_when_it_is_raised(cls: type[Exception]) -> None:
    doc = cls.__doc__ or ""
    assert doc.startswith("Raised "), doc
    assert "\n" not in doc.strip(), doc


def test_every_error_class_defined_in_the_module_is_public() -> None:
    defined = {name for name, obj in vars(errors).items()
               if isinstance(obj, type) and issubclass(obj, Exception)
               and obj.__module__ == errors.__name__}
    assert defined == set(errors.__all__)


def test_contract_violation_is_rebuilt_from_its_message_alone() -> None:
    with pytest.raises(ContractViolation) as info:
        contracts.get("count@1").validate({"n": "x"}, side="input", agent="increment",
                                          run_id="run-1", version=2)
    message = str(info.value)
    rebuilt = ContractViolation(message)
    assert str(rebuilt) == message
    assert rebuilt.args == (message,)
    assert rebuilt.errors == {} and rebuilt.field_paths == []


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_every_error_survives_celerys_json_result_round_trip(
    app: Celery, cls: type[Exception]
) -> None:
    message = "run r-1, version 3, agent a: income.annual: Missing data for required field."
    sent = json.loads(json.dumps(app.backend.prepare_exception(cls(message))))
    back = app.backend.exception_to_python(sent)
    assert type(back) is cls
    assert str(back) == message


def test_a_real_contract_violation_survives_celerys_json_result_round_trip(app: Celery) -> None:
    bad = {"n": "seven", "extra": 1}
    with pytest.raises(ContractViolation) as info:
        contracts.get("count@1").validate(bad, side="output", agent="double", run_id="r-2",
                                          version=4)
    sent = json.loads(json.dumps(app.backend.prepare_exception(info.value)))
    back = app.backend.exception_to_python(sent)
    assert isinstance(back, ContractViolation)
    assert str(back) == str(info.value)
    assert "n: Not a valid integer." in str(back) and "extra: Unknown field." in str(back)


# -- chaos ----------------------------------------------------------------------------


def test_chaos_error_is_a_pipeline_error() -> None:
    assert issubclass(ChaosError, PipelineError)
    assert issubclass(ChaosError, errors.AgentError)
    assert (ChaosError.__doc__ or "").startswith("Raised ")


def test_chaos_spec_names_agents_modes_and_probabilities() -> None:
    assert parse("a=error:0.5,b=crash") == (
        Rule("a", ChaosMode.ERROR, 0.5),
        Rule("b", ChaosMode.CRASH, 1.0),
    )


def test_chaos_spec_tolerates_spaces_and_empty_parts() -> None:
    assert parse(" fraud_detection = slow : 0.25 , , risk_assessment=bad_output:0 ") == (
        Rule("fraud_detection", ChaosMode.SLOW, 0.25),
        Rule("risk_assessment", ChaosMode.BAD_OUTPUT, 0.0),
    )


def test_empty_chaos_spec_means_no_chaos() -> None:
    assert parse("") == ()


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ("a", "a"),
        ("a=", "a="),
        ("=error", "=error"),
        ("a=explode", "a=explode"),
        ("a=error:1.5", "a=error:1.5"),
        ("a=error:-0.1", "a=error:-0.1"),
        ("a=error:often", "a=error:often"),
        ("a=error:nan", "a=error:nan"),
        ("a=error:0.5:0.2", "a=error:0.5:0.2"),
        ("a=error:0.5,b=crash,c", "c"),
        ("ok=slow,b=explode:0.3", "b=explode:0.3"),
    ],
)
def test_bad_chaos_spec_is_a_configuration_error_naming_the_bad_part(spec: str, bad: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse(spec)
    message = str(info.value)
    assert message.startswith(f"PIPELINE_CHAOS={spec!r}: cannot read {bad!r}: ")
    assert "error, crash, slow, bad_output" in message
