"""The archive's tables on a real local Delta table: finished runs written as a numbered
batch once per table, whatever repeats, and read back as Redis gave them, digests checked."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from pipeline import IntegrityError, Pipeline, RunNotFound, RunStatus
from pipeline.archive import SCHEMAS, read_run, run_rows, write_batch, written_batch
from pipeline.archive.table import APP_ID, table_uri
from pipeline.observe import calls
from tasks import SAMPLES

pytestmark = pytest.mark.workers

GOOD = json.loads((SAMPLES / "good.json").read_text())


@pytest.fixture(scope="module")
def finished(pipeline: Pipeline) -> list[str]:
    """A credit run that succeeded, and a choreography its budget stopped (compensated)."""
    ok = pipeline.start("credit_decision", GOOD)
    stopped = pipeline.start("spending", {"n": 1})
    assert ok.wait(30).status is RunStatus.SUCCEEDED
    assert stopped.wait(30).status is RunStatus.COMPENSATED
    return [ok.run_id, stopped.run_id]


def count(root: Path, table: str, run_id: str) -> int:
    dataset = DeltaTable(table_uri(str(root), table)).to_pyarrow_dataset()
    return dataset.count_rows(filter=pa.compute.field("run_id") == run_id)


def test_a_finished_run_reads_back_from_the_archive_as_redis_gave_it(
        pipeline: Pipeline, finished: list[str], tmp_path: Path) -> None:
    store = pipeline.store
    rows = [run_rows(store, run_id) for run_id in finished]
    assert write_batch(str(tmp_path), 1, rows) == ["versions", "calls", "runs", "events"]
    for run_id in finished:
        archived = read_run(str(tmp_path), run_id)
        assert [v.to_dict() for v in archived.versions] \
            == [v.to_dict() for v in store.history(run_id)]
        assert archived.info == store.run_info(run_id)
        assert archived.log == store.log(run_id)
        assert calls(archived.log) == calls(store.log(run_id))  # what trace and inspect show
    credit, choreography = finished
    assert count(tmp_path, "calls", credit) == 5
    assert count(tmp_path, "events", credit) == 0
    assert count(tmp_path, "events", choreography) >= 2  # spend.requested, spend.next...
    runs = DeltaTable(table_uri(str(tmp_path), "runs")).to_pyarrow_table().to_pylist()
    by_id = {r["run_id"]: r for r in runs}
    assert by_id[credit]["status"] == "succeeded" and by_id[credit]["workflow"] \
        == "credit_decision"
    assert (by_id[choreography]["status"], by_id[choreography]["compensation"]) \
        == ("compensated", "compensated")
    with pytest.raises(RunNotFound, match="no-such-run"):
        read_run(str(tmp_path), "no-such-run")


def test_a_batch_written_again_writes_nothing_twice(
        pipeline: Pipeline, finished: list[str], tmp_path: Path) -> None:
    """An archiver killed after its versions commit writes the batch again: the versions
    table, which recorded the batch in the same commit as its rows, is skipped; the others
    are written once; a third time writes nothing."""
    root = str(tmp_path)
    rows = [run_rows(pipeline.store, run_id) for run_id in finished]
    versions = [row for r in rows for row in r.tables["versions"]]
    write_deltalake(  # the commit the killed archiver made before it died
        table_uri(root, "versions"), pa.Table.from_pylist(versions, schema=SCHEMAS["versions"]),
        mode="append", partition_by=["workflow", "day"],
        commit_properties=CommitProperties(
            app_transactions=[Transaction(APP_ID.format(table="versions"), 7)]))
    assert write_batch(root, 7, rows) == ["calls", "runs", "events"]
    assert write_batch(root, 7, rows) == []
    assert written_batch(root, "runs") == 7
    for run_id, r in zip(finished, rows, strict=True):
        assert count(tmp_path, "versions", run_id) == len(r.tables["versions"])
        assert count(tmp_path, "runs", run_id) == 1


def test_a_version_changed_in_the_table_is_an_integrity_error(
        pipeline: Pipeline, finished: list[str], tmp_path: Path) -> None:
    root = str(tmp_path)
    credit = finished[0]
    rows = run_rows(pipeline.store, credit)
    write_batch(root, 1, [rows])
    versions = DeltaTable(table_uri(root, "versions")).to_pyarrow_table().to_pylist()
    for v in versions:
        if v["version"] == 2:
            v["payload"] = v["payload"].replace("0", "9", 1)  # someone edits the history
    write_deltalake(table_uri(root, "versions"),
                    pa.Table.from_pylist(versions, schema=SCHEMAS["versions"]),
                    mode="overwrite", partition_by=["workflow", "day"])
    with pytest.raises(IntegrityError, match=f"run {credit} version 2"):
        read_run(root, credit)
