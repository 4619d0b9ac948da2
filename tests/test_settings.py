"""Settings are read strictly when a process starts: a value that cannot be used stops a worker
before it reports ready, naming the variable, the value and what is accepted; and a step that
fails from a configuration error is never counted on its agent's breaker."""

from __future__ import annotations

import logging

import pytest
import redis

from pipeline import Pipeline, RunStatus
from pipeline.app import create_app
from pipeline.breaker import BreakerState
from pipeline.chaos import check_agents
from pipeline.errors import ConfigurationError
from pipeline.settings import DEFAULT_RETENTION_S, Settings
from tests.agents import EXECUTIONS_KEY, QUICK_BREAKER
from tests.conftest import Cluster, settings_for

WHOLE_SECONDS = "expected a whole number of seconds from 1 to"


@pytest.mark.parametrize(
    ("variable", "value", "wrong", "accepted"),
    [
        ("PIPELINE_LEASE_S", "0", "is out of range", WHOLE_SECONDS),
        ("PIPELINE_RETENTION_S", "-3600", "is out of range", WHOLE_SECONDS),
        ("PIPELINE_VISIBILITY_TIMEOUT_S", "1h", "is not a whole number", WHOLE_SECONDS),
        ("PIPELINE_SWEEP_INTERVAL_S", "2.5", "is not a whole number", WHOLE_SECONDS),
        ("PIPELINE_MAX_PAYLOAD_BYTES", str(2**40), "is out of range",
         "expected a whole number of bytes from 1 to 536870912"),
        ("PIPELINE_OTEL", "ture", "is neither on nor off", "expected 1, true, yes, on (on)"),
        ("PIPELINE_AGENT_MODULES", "tasks;billing", "'tasks;billing' is not a module name",
         "expected module names separated by commas"),
        ("PIPELINE_CHAOS", "sentimnt=eror:1", "unknown mode 'eror' (did you mean 'error'?)",
         "mode one of error, crash, slow, bad_output"),
        ("PIPELINE_CHAOS", "credit_score=error:2", "probability '2' is not a number from 0 to 1",
         "expected agent=mode:probability"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable_the_value_and_what_is_accepted(
    variable: str, value: str, wrong: str, accepted: str,
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env({variable: value})
    message = str(refused.value)
    assert message.startswith(f"{variable}={value!r}")
    assert wrong in message and accepted in message


def test_every_bad_value_is_reported_at_once() -> None:
    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env({"PIPELINE_LEASE_S": "0", "PIPELINE_CHAOS": "report=boom",
                           "PIPELINE_OTEL": "maybe", "PIPELINE_SWEEP_INTERVAL_S": "15"})
    lines = str(refused.value).splitlines()
    assert lines[0] == "3 settings cannot be used:"
    assert [line.split("=")[0] for line in lines[1:]] == [
        "- PIPELINE_LEASE_S", "- PIPELINE_CHAOS", "- PIPELINE_OTEL"]


def test_good_values_are_read_and_empty_ones_mean_the_default() -> None:
    settings = Settings.from_env({
        "PIPELINE_LEASE_S": "1", "PIPELINE_RETENTION_S": "", "PIPELINE_OTEL": " On ",
        "PIPELINE_AGENT_MODULES": " support.agents , billing,", "PIPELINE_CHAOS":
        " payments = slow : 0.5 , credit_score=error",
    })
    assert (settings.lease_s, settings.retention_s, settings.otel) == (1, DEFAULT_RETENTION_S,
                                                                       True)
    assert settings.agent_modules == ("support.agents", "billing")
    assert not Settings.from_env({"PIPELINE_OTEL": "off"}).otel
    assert Settings.from_env({"PIPELINE_AGENT_MODULES": ""}).agent_modules == ()


def test_settings_built_in_code_are_checked_as_the_environment_is() -> None:
    with pytest.raises(ConfigurationError,
                       match=r"^lease_s=0 \(PIPELINE_LEASE_S\) is out of range; expected"):
        Settings(lease_s=0)
    with pytest.raises(ConfigurationError, match=r"^retention_s=True \(PIPELINE_RETENTION_S\) "
                                                 "is not a whole number"):
        Settings(retention_s=True)
    with pytest.raises(ConfigurationError, match=r"^PIPELINE_CHAOS='a=eror': cannot read"):
        Settings(chaos="a=eror")


# -- chaos rules for agents this process does not register -----------------------------------


def test_a_chaos_agent_name_close_to_a_registered_one_is_refused_with_what_it_could_mean(
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        check_agents("credit_score=slow:0.1,risk_assesment=error:1",
                     {"credit_score", "risk_assessment", "fraud_detection"})
    message = str(refused.value)
    assert message.startswith("PIPELINE_CHAOS='credit_score=slow:0.1,risk_assesment=error:1': "
                              "no agent is named 'risk_assesment'; did you mean "
                              "'risk_assessment'? Agents of this process: credit_score, ")
    assert "set PIPELINE_CHAOS only on the pools that import it" in message


def test_a_chaos_agent_name_like_none_registered_is_left_to_the_pools_that_run_it() -> None:
    """A pool may import only some agent modules (a mixed fleet): a name close to none of
    its agents may be another pool's agent, so it is not refused here."""
    registered = {"credit_score", "risk_assessment"}
    assert check_agents("payments=error:1,credit_score=crash,payments=slow", registered) == [
        "payments"]
    assert check_agents("", registered) == []
    assert check_agents("payments=error:1", set()) == ["payments"]


def test_create_app_refuses_a_chaos_typo_of_an_agent_it_registers(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'risk_assessment'"):
        create_app(settings_for(redis_url, chaos="risk_assesment=error:1"))


def test_create_app_says_in_its_log_that_a_chaos_rule_is_for_another_pools_agent(
    redis_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.app"):
        create_app(settings_for(redis_url, chaos="payments=error:1"))
    assert "PIPELINE_CHAOS names agent 'payments', which no module of this process " \
           "registers" in caplog.text


# -- real worker processes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"PIPELINE_CHAOS": "sentimnt=eror:1"},
         "PIPELINE_CHAOS='sentimnt=eror:1': cannot read 'sentimnt=eror:1': unknown mode 'eror'"),
        ({"PIPELINE_CHAOS": "risk_assesment=error:1"},
         "no agent is named 'risk_assesment'; did you mean 'risk_assessment'?"),
        ({"PIPELINE_LEASE_S": "0"},
         f"PIPELINE_LEASE_S='0' is out of range; {WHOLE_SECONDS}"),
    ],
)
def test_a_worker_with_a_bad_setting_exits_before_it_is_ready_naming_it(
    cluster: Cluster, env: dict[str, str], said: str,
) -> None:
    worker = cluster.worker(start=False, **env)  # celery -A config worker
    with pytest.raises(ConfigurationError, match="exited at start") as refused:
        worker.start()
    assert said in str(refused.value)
    assert " ready." not in str(refused.value)
    assert worker.process is not None and worker.process.returncode not in (0, None)


def test_a_step_failing_from_a_configuration_error_leaves_its_breaker_untouched(
    pipeline: Pipeline, rclient: redis.Redis,
) -> None:
    """Three failures would open this breaker (threshold 2) were they the agent's; the agent
    may retry any exception, but a configuration error fails the same way every time."""
    runs = [pipeline.start("misconfiguring", {"n": i}) for i in range(3)]
    for run in runs:
        result = run.wait(30)
        assert result.status is RunStatus.COMPENSATED, result.error  # increment had sealed
        assert result.error is not None
        assert result.error.startswith("ConfigurationError: TEST_MISCONFIGURED_API_KEY")
        assert run.info().failed_agent == "misconfigured"
        executed = rclient.get(EXECUTIONS_KEY.format(run_id=run.run_id, agent="misconfigured"))
        assert executed == "1"  # never retried
        failed = [e for e in run.store.log(run.run_id) if e["event"] == "step.failed"]
        assert [(e["agent"], e["error_type"]) for e in failed] == [
            ("misconfigured", "ConfigurationError")]

    snap = pipeline.breakers.snapshot("misconfigured", QUICK_BREAKER)
    assert snap.state is BreakerState.CLOSED
    assert (snap.failures, snap.consecutive_failures, snap.successes, snap.window) == (0, 0, 0,
                                                                                       "")
    assert pipeline.breakers.transitions("misconfigured") == []
