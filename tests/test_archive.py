"""The archive on real local Delta tables, with a real worker: finished runs written once
whatever repeats (an archiver SIGKILLed mid-batch, two archivers at once, a table out of
reach), then expired from Redis and read back by every command as before, digests checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import redis
from click.testing import CliRunner, Result
from deltalake import write_deltalake

from pipeline import IntegrityError, Pipeline, RunNotFound, RunStatus
from pipeline.app import create_app
from pipeline.archive.archiver import Archiver
from pipeline.archive.backlog import backlog
from pipeline.archive.rows import SCHEMAS
from pipeline.archive.table import query, read_run, table_uri, written_batch
from pipeline.cli import main
from pipeline.keys import ARCHIVE, RUNS_INDEX, RunKeys
from pipeline.local import WorkerProcess
from pipeline.names import SWEEP_TASK
from pipeline.observe.metrics import PipelineCollector
from tasks import SAMPLES
from tests.conftest import AGENT_MODULES, ROOT, settings_for, wait_for, worker_env

pytestmark = pytest.mark.workers

GOOD = json.loads((SAMPLES / "good.json").read_text())


@pytest.fixture(scope="module")
def url(second_redis_url: str) -> Iterator[str]:
    """A database of this module's own, served by one worker that archives to ``root`` on
    beat's sweep (the tests that archive by hand use their own roots)."""
    client = redis.Redis.from_url(second_redis_url)
    client.flushdb()
    yield second_redis_url
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("swept") / "archive")


@pytest.fixture(scope="module")
def worker(url: str, sweep_root: str) -> Iterator[WorkerProcess]:
    w = WorkerProcess(env=worker_env(url, PIPELINE_ARCHIVE_URI=sweep_root), concurrency=2,
                      cwd=ROOT, name="archive").start()
    yield w
    w.stop()


@pytest.fixture
def r(url: str, worker: WorkerProcess) -> Iterator[redis.Redis]:
    """Redis, the archiver's bookkeeping cleared and its cursor put at now: each test
    archives only the runs it starts."""
    client = redis.Redis.from_url(url, decode_responses=True)
    client.delete(ARCHIVE.cursor, ARCHIVE.waiting, ARCHIVE.batch, ARCHIVE.stats, ARCHIVE.lock)
    seconds, micros = client.time()
    client.set(ARCHIVE.cursor, f"{seconds * 1000 + micros // 1000} ")
    yield client
    client.close()


def client(url: str, root: str, **settings: Any) -> Pipeline:
    s = settings_for(url, archive_uri=root, **settings)
    return Pipeline(settings=s, app=create_app(s))


def archiver(p: Pipeline, **kwargs: Any) -> Archiver:
    kwargs = {"settle_s": 0, "lag_s": 0, **kwargs}
    return Archiver.from_settings(p.store, p.settings, **kwargs)


def finished(p: Pipeline, n: int = 1, payload: Any = None) -> list[str]:
    runs = [p.start("credit_decision", payload or GOOD) for _ in range(n)]
    for run in runs:
        assert run.wait(30).status is RunStatus.SUCCEEDED
    return [run.run_id for run in runs]


def rows(root: str, table: str, run_id: str | None = None) -> list[dict[str, Any]]:
    found = query(root, f"SELECT * FROM {table}", table)
    assert found is not None, f"no {table} table under {root}"
    return [row for row in found.to_pylist() if run_id is None or row["run_id"] == run_id]


def cli(url: str, root: str, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={
        "PIPELINE_REDIS_URL": url, "PIPELINE_AGENT_MODULES": AGENT_MODULES,
        "CELERY_BROKER_URL": None, "CELERY_RESULT_BACKEND": None, "PIPELINE_CHAOS": None,
        "PIPELINE_ARCHIVE_URI": root})


READS = [("status", "--json"), ("history", "--json"), ("trace", "--json"),
         ("inspect", "--json"), ("events", "--json"), ("graph",), ("verify", "--json"),
         ("explain", "{run}", "expand", "--json")]
"""Every command that explains a run, as it reads one (``{run}``: the run id)."""


def read_all(url: str, root: str, run_id: str) -> dict[str, str]:
    out = {}
    for command, *rest in READS:
        args = [a.replace("{run}", run_id) for a in rest]
        if "{run}" not in rest:
            args = [run_id, *args]
        result = cli(url, root, command, *args)
        assert result.exit_code == 0, (command, result.output)
        out[command] = result.output
    return out


def test_runs_archived_then_expired_read_back_as_they_read_from_redis(
        url: str, r: redis.Redis, tmp_path: Path) -> None:
    root = str(tmp_path / "archive")
    p = client(url, root, archived_retention_s=1)
    credit = finished(p)[0]
    stopped = p.start("spending", {"n": 1})  # a choreography its budget stopped: compensated
    assert stopped.wait(30).status is RunStatus.COMPENSATED
    ids = [credit, stopped.run_id]
    before = {run_id: read_all(url, root, run_id) for run_id in ids}
    results = {run_id: p.run(run_id).result() for run_id in ids}

    report = archiver(p).run_once()
    assert (report.runs, len(report.batches), report.error) == (2, 1, "")
    number = report.batches[0]
    for run_id in ids:
        wait_for(lambda run_id=run_id: not r.exists(*RunKeys(run_id).all()), 15,
                 "the archived run to expire from Redis")
    assert archiver(p).run_once().runs == 0  # nothing twice

    for run_id in ids:
        after = read_all(url, root, run_id)  # each brings the run back from the archive
        assert after == before[run_id]
        assert r.hget(RunKeys(run_id).run, "archived") == str(number)
        assert r.ttl(RunKeys(run_id).run) > 60  # for PIPELINE_ARCHIVED_RETENTION_S (1 h)
    reader = client(url, root, archived_retention_s=60)
    for run_id in ids:
        r.delete(*RunKeys(run_id).all())  # gone again
        assert reader.run(run_id).result() == results[run_id]  # the API reads through too
        assert [v.to_dict() for v in reader.run(run_id).history()] \
            == json.loads(before[run_id]["history"])
    r.delete(*RunKeys(credit).all())  # gone again: a replay forks it from the archive
    replayed = cli(url, root, "replay", credit, "--from-version", "1", "--wait", "--json")
    assert replayed.exit_code == 0, replayed.output
    fork = json.loads(replayed.output)
    assert (fork["status"], fork["output"]) == ("succeeded", results[credit].output)
    assert reader.run(fork["run_id"]).info().replay_of == f"{credit}@1"
    listed = json.loads(cli(url, root, "runs", "--archived", "--json").output)
    assert {(row["run_id"], row["status"], row["batch"]) for row in listed} \
        == {(credit, "succeeded", number), (stopped.run_id, "compensated", number)}
    assert [row["compensation"] for row in listed if row["run_id"] == stopped.run_id] \
        == ["compensated"]
    assert len(rows(root, "calls", credit)) == 5
    assert len(rows(root, "events", stopped.run_id)) >= 2


def test_a_version_changed_in_the_table_is_an_integrity_error_and_nothing_is_restored(
        url: str, r: redis.Redis, tmp_path: Path) -> None:
    root = str(tmp_path / "archive")
    p = client(url, root, archived_retention_s=1)
    run_id = finished(p)[0]
    assert archiver(p).run_once().runs == 1
    versions = rows(root, "versions")
    for v in versions:
        if v["version"] == 2:
            v["payload"] = v["payload"].replace("0", "9", 1)  # someone edits the history
    write_deltalake(table_uri(root, "versions"),
                    pa.Table.from_pylist(versions, schema=SCHEMAS["versions"]),
                    mode="overwrite", partition_by=["workflow", "day"])
    wait_for(lambda: not r.exists(RunKeys(run_id).run), 15, "expiry")
    with pytest.raises(IntegrityError, match=f"run {run_id} version 2"):
        read_run(root, run_id)
    result = cli(url, root, "history", run_id)
    assert result.exit_code == 2 and f"run {run_id} version 2" in result.output
    assert not r.exists(*RunKeys(run_id).all())  # nothing half-restored
    with pytest.raises(RunNotFound, match="in Redis or in the archive"):
        p.run("no-such-run")


KILLER = """
import os, signal, sys
from pipeline.archive import archiver, table
from pipeline.archive.archiver import Archiver
from pipeline.state import StateStore, connect

where = sys.argv[3]
commits = []
write = table.write_deltalake

def write_then_die(*args, **kwargs):
    write(*args, **kwargs)
    commits.append(1)
    if where == "first-commit":
        os.kill(os.getpid(), signal.SIGKILL)

def keep(self, runs, number, seconds):
    if number and where == "all-commits":
        os.kill(os.getpid(), signal.SIGKILL)

table.write_deltalake = write_then_die
Archiver._keep = keep
Archiver(StateStore(connect(sys.argv[1])), sys.argv[2], settle_s=0, lag_s=0).run_once()
"""


@pytest.mark.parametrize("where", ["first-commit", "all-commits"])
def test_an_archiver_killed_mid_batch_leaves_exactly_one_copy(
        url: str, r: redis.Redis, tmp_path: Path, where: str) -> None:
    """SIGKILL after the first table's commit, or after every commit and before any run was
    marked archived: the next pass finishes the same batch, and writes no row twice."""
    root = str(tmp_path / "archive")
    p = client(url, root)
    ids = finished(p, 3)
    killed = subprocess.run([sys.executable, "-c", KILLER, url, root, where], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -9, killed.stderr
    number = int(r.hget(ARCHIVE.batch, "number") or 0)  # left pending
    assert number and not any(r.hget(RunKeys(i).run, "archived") for i in ids)

    report = archiver(p).run_once(lock=False)  # its lock would keep others out a minute
    assert (report.runs, report.batches) == (3, [number])
    for table in SCHEMAS:
        assert written_batch(root, table) == number
    assert sorted(row["run_id"] for row in rows(root, "runs")) == sorted(ids)
    assert len(rows(root, "versions")) == 3 * 6  # input and five steps, once each
    assert all(r.hget(RunKeys(i).run, "archived") == str(number) for i in ids)
    assert not r.exists(ARCHIVE.batch)


TWIN = """
import sys
from pipeline.archive.archiver import Archiver
from pipeline.state import StateStore, connect
a = Archiver(StateStore(connect(sys.argv[1])), sys.argv[2], batch=2, settle_s=0, lag_s=0)
for _ in range(40):
    a.run_once(lock=False)
"""


def test_two_archivers_at_once_write_every_run_once(
        url: str, r: redis.Redis, tmp_path: Path) -> None:
    """Without the lock that normally keeps them apart: they walk, claim and write the same
    backlog at once, batches of two."""
    root = str(tmp_path / "archive")
    p = client(url, root)
    ids = finished(p, 12)
    twins = [subprocess.Popen([sys.executable, "-c", TWIN, url, root], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for twin in twins:
        assert twin.wait(120) == 0, twin.stderr.read() if twin.stderr else ""
    archived = [row["run_id"] for row in rows(root, "runs")]
    assert sorted(archived) == sorted(ids)  # each once
    assert len(rows(root, "versions")) == 12 * 6
    assert all(r.hget(RunKeys(i).run, "archived") for i in ids)
    assert backlog(p.store)["backlog"] == 0


def test_a_table_out_of_reach_expires_nothing_and_archives_everything_once_back(
        url: str, r: redis.Redis, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the archive's directory should be")
    root = str(blocker / "archive")
    p = client(url, root)
    ids = finished(p, 3)
    for run_id in ids:  # their retention nearly over
        for key in RunKeys(run_id).all():
            if r.exists(key):
                r.expire(key, 30)
    report = archiver(p).run_once()
    assert report.runs == 0 and report.error and report.held == 3
    assert all(r.ttl(RunKeys(i).run) > 3600 for i in ids)  # kept: PIPELINE_RETENTION_S more
    state = backlog(p.store)
    assert (state["backlog"], state["failures"]) == (3, 1)
    assert "Not a directory" in str(state["last_error"])
    scraped = {m.name: m.samples[0].value for m in PipelineCollector(p.store).collect()
               if m.name.startswith("pipeline_archive")}
    assert (scraped["pipeline_archive_backlog"], scraped["pipeline_archive_failures"]) \
        == (3, 1)
    pending = r.hget(ARCHIVE.batch, "number")
    assert archiver(p).run_once().error  # still out of reach: still kept, still pending
    assert pending and r.hget(ARCHIVE.batch, "number") == pending

    blocker.unlink()  # the table is back
    report = archiver(p).run_once()
    assert (report.runs, report.error) == (3, "")
    assert sorted(row["run_id"] for row in rows(root, "runs")) == sorted(ids)
    assert all(0 < r.ttl(RunKeys(i).run) <= p.settings.archived_retention_s for i in ids)
    assert backlog(p.store)["backlog"] == 0


def test_beat_s_sweep_archives_in_the_worker(
        url: str, r: redis.Redis, sweep_root: str) -> None:
    """The sweep task, run by the worker's pool (deltalake in a forked child), archives
    what ended a minute ago: the runs here are dated back a minute and a half."""
    p = client(url, sweep_root)
    ids = finished(p, 2)
    back = 90_000
    for run_id in ids:
        score = r.zscore(RUNS_INDEX, run_id)
        assert score is not None
        r.zadd(RUNS_INDEX, {run_id: score - back}, xx=True)
        r.hset(RunKeys(run_id).run, "finished_at",
               int(r.hget(RunKeys(run_id).run, "finished_at") or 0) - back)
    r.set(ARCHIVE.cursor, f"{int(time.time() * 1000) - 10 * back} ")
    p.app.send_task(SWEEP_TASK, queue=p.settings.default_queue)
    wait_for(lambda: all(r.hget(RunKeys(i).run, "archived") for i in ids), 60,
             "the sweep to archive both runs")
    assert sorted(row["run_id"] for row in rows(sweep_root, "runs", None)
                  if row["run_id"] in ids) == sorted(ids)


def test_the_archive_command(url: str, r: redis.Redis, tmp_path: Path) -> None:
    root = str(tmp_path / "archive")
    p = client(url, root)
    finished(p, 2)
    nowhere = CliRunner().invoke(main, ["archive", "--once"], env={
        "PIPELINE_REDIS_URL": url, "PIPELINE_ARCHIVE_URI": ""})
    assert nowhere.exit_code == 2 and "PIPELINE_ARCHIVE_URI" in nowhere.output
    status = json.loads(cli(url, root, "archive", "--status", "--json").output)
    assert status["backlog"] >= 2
    once = cli(url, root, "archive", "--once", "--after", "0")
    assert once.exit_code == 0, once.output
    # the cursor stays a minute behind: runs this new are walked by a later pass
    assert "runs archived" in once.output
    archiver(p).run_once()
    again = json.loads(cli(url, root, "archive", "--status", "--json").output)
    assert (again["backlog"], again["runs"]) == (0, 2)
    for _ in range(3):  # three more small commits
        finished(p)
        archiver(p).run_once()
    optimized = cli(url, root, "archive", "--optimize")
    assert optimized.exit_code == 0 and "optimize versions: 4 files compacted" in \
        optimized.output, optimized.output
    vacuumed = cli(url, root, "archive", "--vacuum", "0")
    assert vacuumed.exit_code == 0 and "vacuum versions: 4 files deleted" in vacuumed.output
    assert len(rows(root, "runs")) == 5  # compacted and vacuumed: every row still there
    assert os.path.isdir(table_uri(root, "runs"))


def test_a_run_with_big_keys_is_restored_whole(url: str, r: redis.Redis, tmp_path: Path) -> None:
    """Lua's unpack() takes a few thousand values at most: a ledger of 6,000 deliveries (a
    long choreography's) goes back in slices, and the run reads back as it was."""
    root = str(tmp_path / "archive")
    p = client(url, root, archived_retention_s=60)
    run_id = finished(p)[0]
    ledger = {f"e{i}:agent": f"handled:task-{i}" for i in range(6000)}
    r.hset(RunKeys(run_id).ledger, mapping=ledger)
    before = {key: r.dump(key) is not None for key in RunKeys(run_id).all()}
    log = p.store.log(run_id)
    assert archiver(p).run_once().runs == 1
    r.delete(*RunKeys(run_id).all())
    assert p.recall(run_id)
    assert r.hgetall(RunKeys(run_id).ledger) == ledger
    assert p.store.log(run_id) == log
    assert {key: r.exists(key) == 1 for key in RunKeys(run_id).all()} == before
    assert not p.recall(run_id)  # Redis has it: left alone


def test_the_walk_misses_no_run_when_runs_leave_the_index_at_its_cursor(
        url: str, r: redis.Redis, tmp_path: Path) -> None:
    """The cursor names the last run walked, not a rank: runs dropped from the index at the
    cursor's score (``pipeline runs`` drops runs that expired) move no other run past it.
    These runs have no keys: each is walked, then found gone."""
    p = client(url, str(tmp_path / "archive"))
    at = int(r.get(ARCHIVE.cursor).split()[0]) + 1  # type: ignore[union-attr]
    r.zadd(RUNS_INDEX, {"walk-a": at, "walk-b": at})
    first = archiver(p).run_once()
    assert (first.walked, sorted(first.expired)) == (2, ["walk-a", "walk-b"])
    r.zrem(RUNS_INDEX, "walk-a", "walk-b")
    r.zadd(RUNS_INDEX, {"walk-c": at, "walk-d": at + 1})
    second = archiver(p).run_once()
    assert (second.walked, sorted(second.expired)) == (2, ["walk-c", "walk-d"])
    assert r.hget(ARCHIVE.stats, "expired") == "4"
    r.zrem(RUNS_INDEX, "walk-c", "walk-d")


def test_a_run_with_an_idempotency_key_keeps_its_time_in_redis_once_archived(
        url: str, r: redis.Redis, tmp_path: Path) -> None:
    """Its key returns the same run for as long as before: started again, it is the same
    run, not a second one."""
    p = client(url, str(tmp_path / "archive"), archived_retention_s=1)
    first = p.start("credit_decision", GOOD, idempotency_key="archived-once")
    assert first.wait(30).status is RunStatus.SUCCEEDED
    assert archiver(p).run_once().runs == 1
    assert r.hget(RunKeys(first.run_id).run, "archived")
    assert r.ttl(RunKeys(first.run_id).run) > 3600
    again = p.start("credit_decision", GOOD, idempotency_key="archived-once")
    assert again.run_id == first.run_id and again.result().version == 5


def test_a_run_whose_compensation_failed_waits_in_redis_for_a_person(
        url: str, r: redis.Redis, tmp_path: Path) -> None:
    """Not archived while it needs `pipeline compensate`, and kept meanwhile; archived once
    it ended otherwise (its record is set here as a failed, then a re-driven, saga's)."""
    p = client(url, str(tmp_path / "archive"), archived_retention_s=1)
    run_id = finished(p)[0]
    r.hset(RunKeys(run_id).run, "status", "compensation_failed")
    for key in RunKeys(run_id).all():
        if r.exists(key):
            r.expire(key, 30)
    report = archiver(p).run_once()
    assert report.runs == 0 and r.ttl(RunKeys(run_id).run) > 3600  # kept: it waits
    assert r.zscore(ARCHIVE.waiting, run_id) is not None
    r.hset(RunKeys(run_id).run, "status", "compensated")
    r.zadd(ARCHIVE.waiting, {run_id: 0}, xx=True)  # its next look, an hour on
    assert archiver(p).run_once().runs == 1
    assert [row["status"] for row in rows(p.settings.archive_uri, "runs", run_id)] \
        == ["compensated"]


def test_a_run_whose_rows_cannot_be_made_is_refused_alone(
        url: str, r: redis.Redis, tmp_path: Path) -> None:
    """A usage no 64-bit column holds: that run is left out (kept in Redis, said in its log),
    the batch is written without it, and the archive goes on."""
    root = str(tmp_path / "archive")
    p = client(url, root, archived_retention_s=60)
    bad, good = finished(p, 2)
    r.xadd(RunKeys(bad).log, {"event": "step.sealed", "step": "0:credit_score", "at": "1",
                              "version": "1", "prompt_tokens": "9" * 25})
    report = archiver(p).run_once()
    assert (report.runs, report.refused, report.error) == (1, [bad], "")
    assert [row["run_id"] for row in rows(root, "runs")] == [good]
    assert r.ttl(RunKeys(bad).run) > 3600 and not r.hget(RunKeys(bad).run, "archived")
    refusal = [e for e in p.store.log(bad) if e["event"] == "archive.refused"]
    assert refusal and "OverflowError" in refusal[0]["error"]
    assert backlog(p.store)["refused"] == 1


def test_an_object_store_out_of_reach_is_an_outage_not_a_crash(
        url: str, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3 endpoint that does not answer: the pass reports it, counts it and keeps the
    runs it would have archived, as for a local table out of reach."""
    for name, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ALLOW_HTTP": "true",
                        "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                        "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    p = client(url, "s3://nowhere/archive")
    ids = finished(p, 2)
    for run_id in ids:
        for key in RunKeys(run_id).all():
            if r.exists(key):
                r.expire(key, 30)
    report = archiver(p).run_once()
    assert report.runs == 0 and "OSError" in report.error and report.held == 2
    assert all(r.ttl(RunKeys(i).run) > 3600 for i in ids)
    assert backlog(p.store)["failures"] == 1


def test_a_redis_whose_batch_counter_went_back_never_reuses_a_number_the_tables_hold(
        url: str, r: redis.Redis, tmp_path: Path) -> None:
    """As after a failover to a replica behind, or a restore of an older snapshot: numbers
    go on from the tables' newest batch (a reused one would be skipped there: the runs
    marked archived, and never in the tables)."""
    root = str(tmp_path / "archive")
    p = client(url, root)
    finished(p)
    first = archiver(p).run_once().batches
    r.set(ARCHIVE.seq, 0)
    later = finished(p)[0]
    report = archiver(p).run_once()
    assert report.batches[0] > first[0]
    assert [row["run_id"] for row in rows(root, "runs", later)] == [later]


def test_a_table_made_again_under_the_same_root_is_written_to(
        url: str, r: redis.Redis, tmp_path: Path) -> None:
    """This process keeps its tables open between passes: a table deleted (and made again)
    under it is loaded afresh, not failed on for ever."""
    root = tmp_path / "archive"
    p = client(url, str(root))
    finished(p)
    assert archiver(p).run_once().runs == 1
    shutil.rmtree(root)
    later = finished(p)[0]
    report = archiver(p).run_once()
    assert (report.runs, report.error) == (1, "")
    assert [row["run_id"] for row in rows(str(root), "runs")] == [later]
