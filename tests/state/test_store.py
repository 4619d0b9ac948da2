"""The versioned state store against a real Redis: atomic appends, direct reads,
digests, size limits, retention."""

from __future__ import annotations

import multiprocessing
import uuid

import pytest
import redis

from pipeline.errors import (
    ContractViolation,
    IntegrityError,
    PayloadTooLarge,
    PipelineError,
    RunNotFound,
    StoreUnavailable,
    VersionNotFound,
)
from pipeline.keys import RunKeys
from pipeline.state import RunStatus, StateStore, connect, digest_of
from pipeline.state.store import UNENQUEUED_TTL_S
from pipeline.state.version import canonical_json


@pytest.fixture
def store(redis_url: str) -> StateStore:
    return StateStore(connect(redis_url), url=redis_url, max_payload_bytes=4096, retention_s=600)


def new_run(store: StateStore, payload: object = None) -> str:
    run_id = f"t-{uuid.uuid4()}"
    created = store.create_run(run_id, workflow="wf", payload=payload or {"n": 0},
                               contract="count@1")
    assert created.created
    store.mark_enqueued(run_id)
    return run_id


def seal(store: StateStore, run_id: str, step: str, parents: list[int], n: int,
         final: bool = False) -> int:
    s = store.seal(run_id, step=step, agent="a", contract="count@1", payload={"n": n},
                   parents=parents, final=final)
    assert s.outcome in ("new", "sealed")
    assert s.version is not None
    return s.version


def test_input_is_sealed_as_version_zero(store: StateStore) -> None:
    run_id = new_run(store, {"n": 7})
    v0 = store.get(run_id, 0)
    assert (v0.version, v0.parents, v0.payload, v0.contract) == (0, (), {"n": 7}, "count@1")
    assert v0.digest == digest_of(canonical_json({"n": 7}))
    info = store.run_info(run_id)
    assert info.status is RunStatus.RUNNING and info.head == 0 and info.workflow == "wf"


def test_appends_assign_contiguous_versions_and_read_back_directly(store: StateStore) -> None:
    run_id = new_run(store)
    versions = [seal(store, run_id, f"s{i}", [i], i + 1) for i in range(5)]
    assert versions == [1, 2, 3, 4, 5]
    assert store.get(run_id, 3).payload == {"n": 3}
    assert [v.version for v in store.history(run_id)] == [0, 1, 2, 3, 4, 5]
    # version N lives at stream id N-1: found without scanning
    raw = store.redis.xrange(RunKeys(run_id).states, "3-1", "3-1")
    assert raw[0][1]["version"] == "3"


def test_same_step_key_seals_once(store: StateStore) -> None:
    run_id = new_run(store)
    first = store.seal(run_id, step="s", agent="a", contract="count@1", payload={"n": 1},
                       parents=[0])
    again = store.seal(run_id, step="s", agent="a", contract="count@1", payload={"n": 999},
                       parents=[0])
    assert (first.outcome, again.outcome) == ("new", "sealed")
    assert again.version == first.version == 1
    assert [v.payload for v in store.history(run_id)] == [{"n": 0}, {"n": 1}]


def test_lineage_follows_parents_through_a_fan_in(store: StateStore) -> None:
    run_id = new_run(store)
    seal(store, run_id, "a", [0], 1)
    b, c = seal(store, run_id, "b", [1], 2), seal(store, run_id, "c", [1], 3)
    d = seal(store, run_id, "d", [b, c], 4)
    assert store.get(run_id, d).parents == (2, 3)
    assert [v.version for v in store.lineage(run_id, d)] == [4, 3, 2, 1, 0]
    assert [v.version for v in store.lineage(run_id, b)] == [2, 1, 0]


def test_a_tampered_entry_raises_a_clear_integrity_error(store: StateStore) -> None:
    run_id = new_run(store)
    seal(store, run_id, "s", [0], 1)
    key = RunKeys(run_id).states
    entries = store.redis.xrange(key)
    store.redis.delete(key)  # rewrite the stream with version 1's payload changed
    for sid, fields in entries:
        if fields["version"] == "1":
            fields = {**fields, "payload": '{"n":1000}'}
        store.redis.xadd(key, fields, id=sid)
    with pytest.raises(IntegrityError, match=rf"run {run_id} version 1 .*digest mismatch"):
        store.get(run_id, 1)
    with pytest.raises(IntegrityError):
        store.history(run_id)


def test_payload_over_the_limit_is_refused_before_redis(store: StateStore) -> None:
    run_id = new_run(store)
    big = {"n": 1, "blob": "x" * 5000}
    with pytest.raises(PayloadTooLarge, match=r"agent a output: payload is 5,.* bytes .* limit"):
        store.seal(run_id, step="s", agent="a", contract="c@1", payload=big, parents=[0])
    assert store.run_info(run_id).head == 0
    with pytest.raises(PayloadTooLarge):
        store.create_run(f"t-{uuid.uuid4()}", workflow="wf", payload=big, contract="c@1")


def test_a_payload_that_is_not_json_is_refused(store: StateStore) -> None:
    run_id = new_run(store)
    with pytest.raises(ContractViolation, match="not JSON"):
        store.seal(run_id, step="s", agent="a", contract="c@1", payload={"x": float("nan")},
                   parents=[0])
    assert store.run_info(run_id).head == 0


def test_unknown_run_and_version_are_named(store: StateStore) -> None:
    with pytest.raises(RunNotFound, match="no run 'nope'"):
        store.get("nope", 0)
    with pytest.raises(RunNotFound):
        store.history("nope")
    run_id = new_run(store)
    with pytest.raises(VersionNotFound, match=f"run {run_id} has no version 9"):
        store.get(run_id, 9)


def test_a_run_never_enqueued_expires_and_marking_it_enqueued_keeps_it(store: StateStore) -> None:
    run_id = f"t-{uuid.uuid4()}"
    store.create_run(run_id, workflow="wf", payload={"n": 0}, contract="count@1")
    for key in RunKeys(run_id).all()[:4]:
        assert 0 < store.redis.ttl(key) <= UNENQUEUED_TTL_S
    store.mark_enqueued(run_id)
    for key in RunKeys(run_id).all()[:4]:
        assert store.redis.ttl(key) == -1


def test_marking_a_finished_run_enqueued_keeps_its_retention(store: StateStore) -> None:
    run_id = f"t-{uuid.uuid4()}"
    store.create_run(run_id, workflow="wf", payload={"n": 0}, contract="count@1")
    seal(store, run_id, "s", [0], 1, final=True)  # finished before the client marked it
    store.mark_enqueued(run_id)
    assert 0 < store.redis.ttl(RunKeys(run_id).states) <= 600
    store.delete_run(run_id)
    store.mark_enqueued(run_id)  # an expired run is not re-created
    assert not store.redis.exists(RunKeys(run_id).run)


def test_a_finished_run_expires_and_a_live_one_does_not(store: StateStore) -> None:
    live, done, failed = new_run(store), new_run(store), new_run(store)
    seal(store, live, "s", [0], 1)
    seal(store, done, "s", [0], 1, final=True)
    assert store.finish(failed, RunStatus.FAILED, error="boom", agent="a")
    assert not store.finish(failed, RunStatus.FAILED, error="again")  # once only
    for key in RunKeys(live).all()[:4]:
        assert store.redis.ttl(key) == -1
    for run_id in (done, failed):
        for key in RunKeys(run_id).all()[:4]:
            assert 0 < store.redis.ttl(key) <= 600
    assert store.run_info(done).status is RunStatus.SUCCEEDED
    assert store.run_info(done).output_version == 1
    assert store.run_info(failed).error == "boom"


def test_a_finished_run_refuses_new_versions(store: StateStore) -> None:
    run_id = new_run(store)
    store.finish(run_id, RunStatus.FAILED, error="x")
    s = store.seal(run_id, step="late", agent="a", contract="c@1", payload={"n": 1}, parents=[0])
    assert (s.outcome, s.status, s.version) == ("aborted", "failed", None)
    assert store.run_info(run_id).head == 0


def _append_many(url: str, run_id: str, worker: int, count: int) -> None:
    store = StateStore(connect(url), url=url)
    for i in range(count):
        store.seal(run_id, step=f"w{worker}-{i}", agent=f"w{worker}", contract="c@1",
                   payload={"worker": worker, "i": i}, parents=[0])
        # the same step key again, as a redelivered message would
        store.seal(run_id, step=f"w{worker}-{i}", agent=f"w{worker}", contract="c@1",
                   payload={"worker": worker, "i": i}, parents=[0])


def test_concurrent_appends_from_processes_are_contiguous(redis_url: str,
                                                          store: StateStore) -> None:
    run_id = new_run(store)
    procs = [multiprocessing.get_context("spawn").Process(
        target=_append_many, args=(redis_url, run_id, w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    history = store.history(run_id)
    assert [v.version for v in history] == list(range(201))
    steps = [v.step for v in history[1:]]
    assert len(set(steps)) == 200  # each step sealed exactly once
    for w in range(4):  # each writer's versions keep its own order
        mine = [v.payload["i"] for v in history if v.agent == f"w{w}"]
        assert mine == list(range(50))


def test_unreachable_redis_names_the_url_without_its_password() -> None:
    url = "redis://user:s3cret@127.0.0.1:1/0"
    store = StateStore(connect(url), url=url)
    with pytest.raises(StoreUnavailable) as e:
        store.run_info("x")
    assert "127.0.0.1:1" in str(e.value) and "s3cret" not in str(e.value)
    assert isinstance(e.value, PipelineError)
    assert isinstance(e.value.__cause__, redis.ConnectionError)
