"""Bad input and hostile messages (issue 8, part 5).

- A pickle-serialized task message published straight to the broker is refused by a real
  worker: nothing runs, nothing is unpickled, and the worker goes on serving.
- Hypothesis throws hostile JSON at every registered contract and at ``pipeline run``'s
  JSON input, 10,000 examples in all: the only outcomes are a clear ``ContractViolation``
  (or ``PayloadTooLarge``) naming the contract and field path, or a one-line usage error
  with exit code 2.
- Payloads over the size limit, nested too deeply or holding huge strings are refused
  before they reach Redis, at the client and at the worker.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from marshmallow import RAISE, Schema, fields

import pipeline.cli.group
import tests.agents  # noqa: F401  (registers the test contracts and workflows)
import tests.hostile_agents  # noqa: F401  (registers grow_request@1, blob@1, growing)
from pipeline import Pipeline, RunStatus
from pipeline.app import create_app
from pipeline.cli import main
from pipeline.client import MAX_IDEMPOTENCY_KEY_CHARS
from pipeline.contracts import Contract, contracts
from pipeline.errors import ContractViolation, InputError, PayloadTooLarge
from pipeline.flow import workflows
from pipeline.settings import DEFAULT_MAX_PAYLOAD_BYTES, Settings
from pipeline.state.version import MAX_DEPTH, canonical_json, sealable
from tasks import SAMPLES
from tests.conftest import AGENT_MODULES, Cluster, wait_for
from tests.quick_agents import EXECUTIONS_KEY
from tests.test_contracts import GOOD_PAYLOADS, _shaped, leaf_paths, replaced

WORKFLOW = "credit_decision"
INPUT = contracts.get("credit_application@1")
GOOD = json.loads((SAMPLES / "good.json").read_text())
HOSTILE_MODULES = f"{AGENT_MODULES},tests.hostile_agents"

# -- the fuzzing budget: every contract and the CLI's JSON input, 10,000 examples in all ------

TOTAL_EXAMPLES = 10_000
REFS = [c.ref for c in contracts]
PER_CONTRACT = 7_000 // len(REFS)
CLI_EXAMPLES = TOTAL_EXAMPLES - PER_CONTRACT * len(REFS)
FUZZ = settings(deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture,
    HealthCheck.large_base_example])


def nest(depth: int, leaf: Any = 0) -> Any:
    """``leaf`` inside ``depth`` arrays."""
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def size_of(payload: Any) -> int:
    """Bytes of canonical JSON, as the limit counts them."""
    return len(canonical_json(payload).encode("utf-8"))


def snapshot(r: Any) -> dict[str, tuple[str, int]]:
    """Every key of a database with its type and length: what a write would change."""
    sizes = {"string": r.strlen, "list": r.llen, "hash": r.hlen, "set": r.scard,
             "zset": r.zcard, "stream": r.xlen}
    return {k: (t, sizes[t](k)) for k in r.scan_iter("*") for t in [r.type(k)]}


@pytest.fixture
def untouched(cluster: Cluster) -> Iterator[Cluster]:
    """A private database with no worker; asserts afterwards that nothing was written."""
    before = snapshot(cluster.redis)
    yield cluster
    assert snapshot(cluster.redis) == before


def hostile_pipeline(url: str, **overrides: Any) -> Pipeline:
    """A client that knows the hostile agents too (``growing``)."""
    s = Settings(redis_url=url, broker_url=url, result_backend=url,
                 agent_modules=tuple(HOSTILE_MODULES.split(",")), **overrides)
    return Pipeline(settings=s, app=create_app(s))


# -- hostile JSON ----------------------------------------------------------------------

ODD_CHARS = st.characters(categories=["Cc", "Cf", "Cs", "Zl", "Zp"])
"""Control characters, lone surrogates, line and paragraph separators."""
ODD_TEXT = st.text(ODD_CHARS | st.characters(), max_size=8)
NUMERIC_TEXT = st.sampled_from(
    ["12", "2.5", "-1", "1e3", "0x10", "NaN", "Infinity", "true", "yes", "no", "on", "",
     " 7 ", "1_000"]) | st.integers().map(str) | st.floats().map(str)
FUZZ_LIMIT = 64 * 1024
"""PIPELINE_MAX_PAYLOAD_BYTES while fuzzing: the same check as at 1 MiB, on cheaper strings."""
HUGE_TEXT = st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "€", "𝄞", "\n"]),
                      st.integers(16_000, 70_000))
"""Strings near and over FUZZ_LIMIT once UTF-8 encoded (é is 2 bytes, € 3, 𝄞 4)."""
HOSTILE_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63).map(lambda n: n * 10**300)
    | st.floats()  # NaN and infinities included: Python's json reads them
    | st.text(max_size=12)
    | ODD_TEXT
    | NUMERIC_TEXT
)
KEYS = st.text(max_size=8) | ODD_TEXT | st.sampled_from(["_schema", ".", "a.b", "0", " "])
HOSTILE_JSON = st.recursive(
    HOSTILE_LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=10,
)
DEPTHS = [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 250, 400]
"""Deep, and deeper than the limit, yet shallow enough for Python's own json to write and
read back in any test process (the client's own refusal of deeper ones is tested below)."""


def hostile(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly small hostile values; now and then a deep or a huge one."""
    return st.one_of(value, value, value, value, value, value, value, value,
                     st.sampled_from(DEPTHS).map(nest), HUGE_TEXT)


def _good_payload(c: Contract) -> st.SearchStrategy[Any]:
    known = [p for ref, p, _ in GOOD_PAYLOADS if ref == c.ref]
    return st.sampled_from(known) if known else _shaped(c.schema)


@st.composite
def one_leaf_replaced(draw: st.DrawFn, c: Contract) -> Any:
    """A payload that passes (or nearly: the semantic rules) with one leaf made hostile, or
    one key added."""
    good = draw(_good_payload(c))
    path = draw(st.sampled_from(sorted(leaf_paths(good), key=str)))
    if not path or draw(st.booleans()) and len(path) == 1:
        return {**good, draw(KEYS): draw(hostile(HOSTILE_LEAVES))}
    return replaced(good, path, draw(hostile(HOSTILE_LEAVES)))


def declared(field: fields.Field[Any], value: Any) -> bool:
    """Whether ``value`` has the JSON type ``field`` declares: what the next agent gets."""
    if value is None:
        return bool(field.allow_none)
    if isinstance(field, fields.Nested):
        assert isinstance(field.schema, Schema)
        if field.many:
            return isinstance(value, list) and all(typed(field.schema, v) for v in value)
        return typed(field.schema, value)
    if isinstance(field, fields.List):
        return isinstance(value, list) and all(declared(field.inner, v) for v in value)
    if isinstance(field, fields.Boolean):
        return type(value) is bool
    if isinstance(field, fields.Integer):
        return type(value) is int
    if isinstance(field, fields.Float):
        return type(value) is int or type(value) is float and math.isfinite(value)
    if isinstance(field, fields.String | fields.DateTime):
        return type(value) is str
    return True


def typed(schema: Schema, payload: Any) -> bool:
    if not isinstance(payload, dict):
        return False
    by_key = {f.data_key or n: f for n, f in schema.fields.items()}
    if schema.unknown == RAISE and set(payload) - set(by_key):
        return False
    return all(
        (key in payload and declared(f, payload[key])) if f.required
        else (key not in payload or declared(f, payload[key]))
        for key, f in by_key.items()
    )


def one_line(message: str) -> None:
    assert len(message.splitlines()) == 1 and message.isprintable(), repr(message[:300])


# -- every contract ----------------------------------------------------------------------


@pytest.mark.parametrize("ref", REFS)
@settings(FUZZ, max_examples=PER_CONTRACT)
@given(data=st.data())
def test_any_hostile_payload_is_sealable_and_well_typed_or_refused_by_name(
    ref: str, data: st.DataObject
) -> None:
    """What the client and every worker run before a payload reaches Redis: the size, depth
    and JSON check, then the contract. Each refuses with an error that names the contract
    (or the payload's place) and the field path, on one line; what passes both is JSON within
    the limits, with the types its contract declares."""
    c = contracts.get(ref)
    payload = data.draw(hostile(HOSTILE_JSON) | one_leaf_replaced(c))
    where = f"run r-1 agent fuzz output of {ref}"
    refused: list[Exception] = []
    try:
        form = sealable(payload, FUZZ_LIMIT, where)
    except PayloadTooLarge as e:
        assert str(e).startswith(f"{where}: payload is ")
        assert f"over the limit of {FUZZ_LIMIT:,} bytes" in str(e)
        refused.append(e)
    except ContractViolation as e:
        assert str(e).startswith(f"{where}: payload is ")
        assert e.errors and all(msgs for msgs in e.errors.values())
        refused.append(e)
    else:
        assert json.loads(form.text) == payload
        assert len(form.text.encode()) <= FUZZ_LIMIT
    try:
        c.validate(payload, side="output", agent="fuzz", run_id="r-1", version=3)
    except ContractViolation as e:
        prefix = f"output breaks contract {ref} (run r-1, version 3, agent fuzz): "
        assert str(e).startswith(prefix)
        assert (e.contract, e.side, e.agent, e.run_id, e.version) == (
            ref, "output", "fuzz", "r-1", 3)
        assert e.errors
        for path, msgs in e.errors.items():
            assert path and msgs and all(m for m in msgs)
            assert f"{path}: {' '.join(msgs)}" in str(e)
        refused.append(e)
    for e in refused:
        one_line(str(e))
    if not refused:
        assert typed(c.schema, payload), f"{ref} accepted a value it would convert: {payload}"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("income", "annual"), "85000", "Not a valid number."),
        (("income", "monthly_debt"), "1e3", "Not a valid number."),
        (("loan", "term_months"), 36.5, "Not a valid integer."),
        (("loan", "term_months"), "36", "Not a valid integer."),
        (("credit_history", "delinquencies"), True, "Not a valid integer."),
    ],
    ids=["numeric-string", "exponent-string", "fraction-for-integer", "integer-string",
         "boolean-for-integer"],
)
def test_a_value_the_contract_would_have_to_convert_is_refused_at_its_path(
    path: tuple[str, str], value: Any, message: str
) -> None:
    """marshmallow would read "85000" as a number; the pipeline seals what was checked, so
    the agent downstream would divide a string. The contract refuses it where it is."""
    payload = replaced(GOOD, path, value)
    with pytest.raises(ContractViolation) as e:
        INPUT.validate(payload, side="input", agent="credit_score")
    dotted = ".".join(path)
    assert e.value.errors == {dotted: [message]}
    assert str(e.value) == (f"input breaks contract credit_application@1 (agent credit_score): "
                            f"{dotted}: {message}")


def test_unprintable_keys_are_escaped_so_the_error_stays_on_one_line() -> None:
    payload = {**GOOD, "x\ny": 1, "\u2028": 2, "\ud800": 3}
    with pytest.raises(ContractViolation) as e:
        INPUT.validate(payload)
    assert set(e.value.errors) == {"x\\ny", "\\u2028", "\\ud800"}
    one_line(str(e.value))


# -- the CLI's JSON input -----------------------------------------------------------------

def cli(url: str, *args: str, stdin: str | bytes | None = None, **env: str) -> Result:
    environ: dict[str, str | None] = {
        "PIPELINE_REDIS_URL": url, "PIPELINE_AGENT_MODULES": AGENT_MODULES,
        "CELERY_BROKER_URL": None, "CELERY_RESULT_BACKEND": None, "PIPELINE_CHAOS": None,
        "PIPELINE_MAX_PAYLOAD_BYTES": None, **env,
    }
    return CliRunner().invoke(main, list(args), input=stdin, env=environ)


def error_line(result: Result) -> str:
    """The one ``error: ...`` line of a refusal: exit 2, no traceback, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[:500]
    return lines[0]


def expected_refusal(text: str | bytes, key: str | None) -> str | None:
    """What ``pipeline run credit_decision`` must say about this input, worked out here
    the way the client does it, in order: JSON, idempotency key, size and depth, contract.
    A prefix for a JSON error, the whole line otherwise; None when the run may start."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return "error: input stdin is not UTF-8 text: "
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        return "error: input stdin is not JSON: "
    except RecursionError:
        return "error: input stdin is nested too deeply to be a payload"
    except ValueError:
        return "error: input stdin is not usable JSON: "
    if key is not None and (len(key) > MAX_IDEMPOTENCY_KEY_CHARS or _not_utf8(key)):
        return "error: idempotency key "
    try:
        sealable(payload, FUZZ_LIMIT, f"input of workflow {WORKFLOW}")
        INPUT.validate(payload, side="input", agent="credit_score")
    except (ContractViolation, PayloadTooLarge) as e:
        return f"error: {e}"
    return None


def _not_utf8(key: str) -> bool:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)  # ASCII: lone surrogates travel as \ud800


CLI_TEXTS = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    HOSTILE_JSON.map(_dumps),
    one_leaf_replaced(INPUT).map(_dumps),
    one_leaf_replaced(INPUT).map(lambda p: json.dumps(p, indent=2, allow_nan=True)),
    st.builds(lambda p, cut: _dumps(p)[:cut], one_leaf_replaced(INPUT), st.integers(0, 400)),
    st.sampled_from([50, 101, 400, 5_000]).flatmap(
        lambda d: st.sampled_from(["[" * d + "]" * d, '{"a":' * d + "1" + "}" * d])),
    st.sampled_from(["1" * 5_000, '{"loan": ' + "9" * 4_400 + "}", "\ufeff{}", "NaN",
                     '{"a": 1, "a": 2}', '"\\ud800"', "[1e400]"]),
)
CLI_KEYS = st.none() | st.none() | st.text(min_size=1, max_size=12) | ODD_TEXT | st.builds(
    lambda n: "k" * n, st.integers(MAX_IDEMPOTENCY_KEY_CHARS - 1, MAX_IDEMPOTENCY_KEY_CHARS + 2))


@pytest.fixture
def one_client(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """The client ``pipeline`` builds from its environment, built once the same way and
    reused by every command: building it costs more than the rest of a fuzzed example."""
    client = Pipeline(settings=Settings.from_env({
        "PIPELINE_REDIS_URL": cluster.url, "PIPELINE_AGENT_MODULES": AGENT_MODULES,
        "PIPELINE_MAX_PAYLOAD_BYTES": str(FUZZ_LIMIT)}))
    monkeypatch.setattr(pipeline.cli.group, "client", lambda **_: client)
    return cluster


@settings(FUZZ, max_examples=CLI_EXAMPLES)
@given(text=CLI_TEXTS, key=CLI_KEYS)
def test_any_input_to_pipeline_run_starts_a_valid_run_or_is_one_clear_error(
    one_client: Cluster, text: str | bytes, key: str | None
) -> None:
    """In-process, as a user runs it; no worker is needed to start a run."""
    cluster = one_client
    args = ["run", WORKFLOW, "--input", "-"] + (["--idempotency-key", key] if key else [])
    key = key or None
    result = cli(cluster.url, *args, stdin=text)
    expected = expected_refusal(text, key)
    if expected is None:
        if result.exit_code == 2:  # an example before used the key with another payload
            line = error_line(result)
            assert line.startswith("error: idempotency key ") and "already started" in line
            return
        assert result.exit_code == 0, (result.output, result.exception)
        event("started a run")
        match = re.fullmatch(rf"run (\S+) of {WORKFLOW}: running \(version 0\)\n",
                             result.stdout)
        assert match, result.stdout
        p = cluster.pipeline()
        [version] = p.run(match[1]).history()
        payload = json.loads(text)
        assert version.payload == payload and typed(INPUT.schema, payload)
        return
    line = error_line(result)
    event(re.sub(r"[:(].*", "", line.removeprefix("error: ")))  # the kinds seen, for -s stats
    if expected.endswith(": ") or expected.endswith("key "):
        assert line.startswith(expected), (line, expected)
    else:
        assert line == expected
    one_line(line)


def test_the_fuzzing_budget_is_ten_thousand_examples() -> None:
    assert PER_CONTRACT * len(REFS) + CLI_EXAMPLES == TOTAL_EXAMPLES
    assert len(REFS) >= 21 and CLI_EXAMPLES >= 2_000


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", WORKFLOW], "Missing option '--input'"),
        (["run"], "Missing argument 'WORKFLOW'"),
        (["run", WORKFLOW, "--input", "-", "--timeout", "soon"], "'soon' is not a valid float"),
        (["run", WORKFLOW, "--input", "-", "--bogus"], "No such option '--bogus'"),
    ],
)
def test_a_usage_error_exits_2_and_names_what_is_wrong(
    untouched: Cluster, args: list[str], expected: str
) -> None:
    result = cli(untouched.url, *args, stdin="{}")
    assert result.exit_code == 2
    assert "Traceback" not in result.output and expected in result.stderr


def test_an_idempotency_key_utf8_cannot_carry_is_a_usage_error(untouched: Cluster) -> None:
    """What a shell hands Python for the bytes ``\\xff`` in argv: it used to crash."""
    result = cli(untouched.url, "run", WORKFLOW, "--input", str(SAMPLES / "good.json"),
                 "--idempotency-key", "order-\udcff")
    assert error_line(result) == (
        "error: idempotency key 'order-\\udcff' is not UTF-8 text: surrogates not allowed "
        "at position 6")


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"applicant": {**GOOD["applicant"], "name": "\ud800"}},
         "payload 1 of the batch: input of workflow credit_decision: payload is not JSON: "),
        ({"income": {**GOOD["income"], "documents": ["x" * 3000]}},
         "payload 1 of the batch: input of workflow credit_decision: payload is 3,"),
    ],
    ids=["lone-surrogate", "too-big"],
)
def test_a_batch_with_one_unsealable_payload_starts_no_run(
    untouched: Cluster, tmp_path: Path, bad: dict[str, Any], expected: str
) -> None:
    """Both payloads pass the contract; the second cannot be sealed. It used to be found
    only after the first run had started."""
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([GOOD, {**GOOD, **bad}]))
    result = cli(untouched.url, "run", WORKFLOW, "--input", str(batch), "--batch",
                 PIPELINE_MAX_PAYLOAD_BYTES="2048")
    assert error_line(result).startswith(f"error: {expected}")


# -- refused before Redis, at the client ------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 50, 5_000])
def test_input_nested_deeper_than_the_limit_is_refused_before_redis(
    untouched: Cluster, depth: int
) -> None:
    p = hostile_pipeline(untouched.url)
    with pytest.raises(ContractViolation) as e:
        p.start("growing", {"blob": nest(depth)})  # the object itself is one level
    assert str(e.value).startswith(
        f"input of workflow growing: payload is nested more than {MAX_DEPTH} levels deep "
        "(at blob.0.0.0.0.0.0.0...)")
    assert e.value.errors == {"blob": [f"nested more than {MAX_DEPTH} levels deep"]}


def test_input_nested_up_to_the_limit_is_accepted(cluster: Cluster) -> None:
    p = hostile_pipeline(cluster.url)
    run = p.start("growing", {"blob": nest(MAX_DEPTH - 1)})
    assert run.history()[0].payload == {"blob": nest(MAX_DEPTH - 1)}


@pytest.mark.parametrize("text", ["x" * DEFAULT_MAX_PAYLOAD_BYTES, "é" * 600_000],
                         ids=["ascii", "two-byte-characters"])
def test_a_huge_string_is_refused_before_redis(untouched: Cluster, text: str) -> None:
    """The limit counts UTF-8 bytes of canonical JSON, not characters."""
    payload = replaced(GOOD, ("applicant", "name"), text)
    with pytest.raises(PayloadTooLarge) as e:
        untouched.pipeline().start(WORKFLOW, payload)
    size = size_of(payload)
    assert size > DEFAULT_MAX_PAYLOAD_BYTES >= len(text)
    assert str(e.value).startswith(f"input of workflow {WORKFLOW}: payload is {size:,} bytes")
    assert "over the limit of 1,048,576 bytes (PIPELINE_MAX_PAYLOAD_BYTES)" in str(e.value)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("", "idempotency key '' must be a non-empty string"),
        ("k" * (MAX_IDEMPOTENCY_KEY_CHARS + 1),
         f"idempotency key is 257 characters, over the limit of {MAX_IDEMPOTENCY_KEY_CHARS}"),
        ("\ud800", "idempotency key '\\ud800' is not UTF-8 text"),
    ],
    ids=["empty", "huge", "lone-surrogate"],
)
def test_a_hostile_idempotency_key_is_refused_before_redis(
    untouched: Cluster, key: str, expected: str
) -> None:
    with pytest.raises(InputError) as e:
        untouched.pipeline().start(WORKFLOW, GOOD, idempotency_key=key)
    assert str(e.value).startswith(expected)


def test_an_idempotency_key_at_the_limit_is_kept(cluster: Cluster) -> None:
    key = "k" * MAX_IDEMPOTENCY_KEY_CHARS
    run = cluster.pipeline().start(WORKFLOW, GOOD, idempotency_key=key)
    assert run.info().idempotency_key == key


def test_an_output_too_big_for_a_parked_step_leaves_the_run_parked(cluster: Cluster) -> None:
    """It used to resume the run, fail to seal, park it again and blame the broker."""
    p = cluster.pipeline(max_payload_bytes=256)
    run_id = str(uuid.uuid4())
    p.store.create_run(run_id, workflow="w_guarded_park", payload={"n": 1}, contract="count@1")
    p.store.seal(run_id, step="0:increment", agent="increment", contract="count@1",
                 payload={"n": 2}, parents=[0])
    assert p.store.park(run_id, step="1:guarded_park", agent="guarded_park", reason="test")
    before = snapshot(cluster.redis)
    with pytest.raises(PayloadTooLarge) as e:
        p.resume(run_id, {"n": 10**300})
    assert str(e.value).startswith(f"run {run_id} output for parked step 1:guarded_park: "
                                   f"payload is {size_of({'n': 10**300})} bytes")
    assert snapshot(cluster.redis) == before
    assert p.store.run_info(run_id).status is RunStatus.WAITING_FOR_HUMAN


def test_an_output_too_big_for_a_parked_delivery_leaves_the_run_parked(
    cluster: Cluster,
) -> None:
    p = cluster.pipeline(max_payload_bytes=256)
    run_id = str(uuid.uuid4())
    p.store.create_run(run_id, workflow="guarding", payload={"n": 1}, contract="count@1")
    assert p.store.park(run_id, step="e1:guard_park", agent="guard_park", reason="test")
    before = snapshot(cluster.redis)
    with pytest.raises(PayloadTooLarge, match="output for parked delivery e1:guard_park: "):
        p.resume(run_id, {"n": 10**300})
    assert snapshot(cluster.redis) == before


# -- with real workers --------------------------------------------------------------------


class Detonator:
    """Unpickling this makes a directory: proof that a worker deserialized pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return os.mkdir, (self.path,)


def test_a_pickled_task_message_is_refused_and_runs_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    worker = cluster.worker()
    p = cluster.pipeline()
    run_id = str(uuid.uuid4())
    p.store.create_run(run_id, workflow="counting", payload={"n": 1}, contract="count@1")
    p.store.mark_enqueued(run_id)
    step = workflows.get("counting").stages[0][0].key
    marker = tmp_path / "unpickled"
    kwargs = {"run_id": run_id, "step": step}
    # A well-formed step of a real run, and one whose unpickling would act.
    p.app.send_task("agent.increment", args=[0], kwargs=kwargs, serializer="pickle")
    p.app.send_task("agent.increment", args=[Detonator(str(marker))], kwargs=kwargs,
                    serializer="pickle")

    refused = ("Received invalid task message: Refusing to deserialize untrusted content of "
               "type pickle (application/x-python-serialize)\nThe message has been ignored and "
               "discarded.")
    wait_for(lambda: worker.tail(200_000).count(refused) == 2, 20,
             "the worker to refuse both pickled messages")
    assert "kombu.exceptions.ContentDisallowed" in worker.tail(200_000)
    r = cluster.redis
    assert wait_for(lambda: r.llen("agents.increment") == 0 and not r.hlen("unacked"), 10,
                    "the refused messages to leave the queue, not to wait for redelivery")
    assert not marker.exists()
    assert r.get(EXECUTIONS_KEY.format(run_id=run_id, agent="increment")) is None
    assert [v.version for v in p.store.history(run_id)] == [0]
    assert [e["event"] for e in p.store.log(run_id)] == ["run.created"]
    # The worker is still healthy: a normal run goes through it.
    result = p.start("counting", {"n": 1}).wait(30)
    assert (result.status, result.output) == (RunStatus.SUCCEEDED, {"n": 4})
    assert worker.process is not None and worker.process.poll() is None


def test_an_agent_output_too_deep_or_too_big_never_reaches_redis(cluster: Cluster) -> None:
    """The worker checks an output before it seals it: the run fails naming the agent, and
    no version of it is written."""
    cluster.worker(PIPELINE_AGENT_MODULES=HOSTILE_MODULES, PIPELINE_MAX_PAYLOAD_BYTES="65536")
    p = hostile_pipeline(cluster.url)
    fine = p.start("growing", {"blob": "leaf", "wrap": 3})
    deep = p.start("growing", {"blob": nest(60), "wrap": 60})  # 61 levels in, 121 out
    big = p.start("growing", {"blob": "x" * 1000, "repeat": 100})  # 100 kB out
    assert fine.wait(30).output == {"blob": nest(3, "leaf")}
    for run, error in [
        (deep, f"ContractViolation: run {deep.run_id} agent grow output: payload is nested "
               f"more than {MAX_DEPTH} levels deep (at blob.0.0.0.0.0.0.0...)"),
        (big, f"PayloadTooLarge: run {big.run_id} agent grow output: payload is "
              f"{size_of({'blob': 'x' * 100_000}):,} bytes of canonical JSON, over the limit "
              "of 65,536 bytes"),
    ]:
        result = run.wait(30)
        info = run.info()
        assert result.status is RunStatus.FAILED, result  # nothing sealed to compensate
        assert info.failed_agent == "grow"
        assert info.error is not None and info.error.startswith(error), info.error
        assert [v.version for v in run.history()] == [0]
        assert cluster.redis.xlen(f"pipeline:{{{run.run_id}}}:states") == 1


def test_a_payload_that_is_fine_is_not_touched_by_the_checks() -> None:
    """The checks refuse; they never change what is sealed."""
    payload = copy.deepcopy(GOOD)
    form = sealable(payload, DEFAULT_MAX_PAYLOAD_BYTES, "input")
    INPUT.validate(payload)
    assert payload == GOOD and json.loads(form.text) == GOOD
