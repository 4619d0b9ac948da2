"""A step reads the run's input and its own lineage through its context: copies,
digest checked, each version read once, recorded in its trace entry; a version
outside its lineage (a parallel sibling's, a later one) is refused."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline import Pipeline, RunStatus, StepContext, StepError, Version, VersionNotInLineage
from pipeline.observe import calls
from pipeline.reads import LineageReads

# 0 input -> 1 increment -> 2 double, 3 recall (parallel) -> 4 join (parents 2, 3)
GRAPH = {0: ((), ""), 1: ((0,), "increment"), 2: ((1,), "double"), 3: ((1,), "recall"),
         4: ((2, 3), "join")}


def version(n: int) -> Version:
    parents, agent = GRAPH[n]
    return Version(run_id="r1", version=n, parents=parents, agent=agent, contract="count@1",
                   payload={"n": n, "nested": {"seen": [n]}}, digest=f"d{n}", created_at=0.0,
                   step=agent or "input")


class Store:
    """In-memory stand-in for ``StateStore.get``: counts the reads."""

    def __init__(self) -> None:
        self.reads: list[int] = []

    def get(self, n: int) -> Version:
        self.reads.append(n)
        return version(n)


def reads_for(store: Store, *inputs: int) -> LineageReads:
    return LineageReads(store.get, run_id="r1", step="s-join", inputs=[version(n) for n in inputs])


def test_nothing_is_read_until_the_agent_asks() -> None:
    store = Store()
    r = reads_for(store, 2, 3)
    assert store.reads == [] and r.trace_fields() == {}


def test_the_lineage_is_the_inputs_and_what_they_were_made_from() -> None:
    assert reads_for(Store(), 2, 3).lineage() == (3, 2, 1, 0)
    assert reads_for(Store(), 2).lineage() == (2, 1, 0)


def test_run_input_is_version_zeros_payload() -> None:
    assert reads_for(Store(), 2).run_input == {"n": 0, "nested": {"seen": [0]}}


def test_upstream_is_the_newest_version_of_that_agent_in_the_lineage() -> None:
    r = reads_for(Store(), 2, 3)
    assert r.upstream("increment").version == 1
    assert r.upstream("recall").version == 3


def test_each_version_is_read_once_per_step() -> None:
    store = Store()
    r = reads_for(store, 2, 3)
    for _ in range(3):
        r.version(1), r.run_input, r.upstream("increment")
    assert sorted(store.reads) == [0, 1]  # 2 and 3 came with the step's opening


def test_a_mutated_payload_does_not_change_the_next_read() -> None:
    r = reads_for(Store(), 2)
    first = r.run_input
    first["n"] = 99
    first["nested"]["seen"].append(99)
    v = r.version(1)
    v.payload["n"] = 99
    assert r.run_input == {"n": 0, "nested": {"seen": [0]}}
    assert r.version(1).payload == {"n": 1, "nested": {"seen": [1]}}


def test_a_sibling_version_is_refused_naming_run_step_and_version() -> None:
    store = Store()
    r = reads_for(store, 2)
    with pytest.raises(VersionNotInLineage) as e:
        r.version(3)
    assert "run r1 step s-join: version 3 is not in the step's lineage" in str(e.value)
    assert 3 not in store.reads  # refused without reading it
    with pytest.raises(VersionNotInLineage, match="run r1 step s-join: .* agent 'recall'"):
        r.upstream("recall")


def test_the_versions_handed_out_are_the_trace_entry_s_read_field() -> None:
    r = reads_for(Store(), 2, 3)
    r.upstream("increment"), r.run_input
    with pytest.raises(VersionNotInLineage):
        r.version(4)
    assert r.trace_fields() == {"read": "0,1"}


def test_a_context_without_reads_says_so() -> None:
    ctx = StepContext(run_id="r1", step="s", agent="a", attempt=1, input_versions=(0,),
                      redis=None)  # type: ignore[arg-type]
    with pytest.raises(StepError, match="run r1 step s: .* without access"):
        ctx.version(0)


def _sealed(p: Pipeline, run_id: str) -> dict[str, dict[str, str]]:
    return {e["agent"]: e for e in p.store.log(run_id) if e["event"] == "step.sealed"}


def test_a_join_reads_the_run_input_and_its_lineage_on_real_workers(pipeline: Pipeline) -> None:
    run = pipeline.start("recalling", {"n": 3})
    result = run.wait(30)

    assert result.status is RunStatus.SUCCEEDED
    history = {v.agent: v for v in run.history()}
    recall = 3 * 100 + 4  # the input (unchanged by its mutation) and increment's 4
    assert history["recall"].payload == {"n": recall}
    assert history["recall_join"].payload == {"n": recall + 8 + 3}
    sealed = _sealed(pipeline, run.run_id)
    assert sealed["recall"]["read"] == "0,1"
    assert sealed["recall_join"]["read"] == f"0,{history['double'].version}"
    assert "read" not in sealed["increment"] and "read" not in sealed["double"]
    by_agent: dict[str, Any] = {c.agent: c for c in calls(pipeline.store.log(run.run_id))}
    assert by_agent["recall_join"].read == [0, history["double"].version]


def test_reading_a_sibling_version_fails_the_step_with_a_clear_error(pipeline: Pipeline) -> None:
    run = pipeline.start("snooping", {"n": 3})
    result = run.wait(30)

    assert result.status in (RunStatus.FAILED, RunStatus.COMPENSATED)
    info = run.info()
    assert info.failed_agent == "snoop"
    assert info.error is not None and info.error.startswith("VersionNotInLineage: ")
    assert f"run {run.run_id} step " in info.error
    assert "version 2 is not in the step's lineage" in info.error
