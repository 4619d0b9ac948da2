"""The archiver: finished runs into the archive's tables, in batches, each exactly once; only
then is a run's time in Redis shortened (``PIPELINE_ARCHIVED_RETENTION_S``).

It needs nothing of the hot path. Every run is in ``RUNS_INDEX`` from its creation (a
worker of any version puts it there); the archiver walks that index behind a cursor, a
minute behind the clock (a client's clock may lag), and moves each run it walks past into
its backlog, ``waiting``, once (``walk.lua``: the cursor moves only from where it was read).
From the backlog, a run that ended at least ``settle_s`` ago (a late duplicate's log entry
lands first) is a candidate; a live one is looked at again later.

A batch is claimed atomically (``claim.lua``): its runs leave the backlog and it gets the
next number, so no run is in two batches. It stays pending in Redis until every table
committed it (``table.write_batch``: each commit carries the batch's number, and a table
that has it is skipped) and its runs were marked archived (``keep.lua``); an archiver killed
anywhere in between leaves it to the next pass, which writes what is missing, never a row
twice. While the table cannot be written, the batch waits, and every run of it and of the
backlog the pass looks at is kept in Redis for ``PIPELINE_RETENTION_S`` more: a run that is
not archived is never expired by the archiver's absence of success. (With no archiver
running at all, runs live their retention as before; ``pipeline_archive_backlog`` shows it.)
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from ..errors import IntegrityError, PipelineError
from ..keys import ARCHIVE, RUNS_INDEX, RunKeys
from ..lua import Batch, Script
from ..settings import Settings, redact_url
from ..state import RunStatus, StateStore, translate_errors
from .backlog import cursor_of
from .rows import TABLES, RunRows, run_rows, snapshots
from .table import as_arrow, write_tables, written_batch

__all__ = ["ArchiveReport", "Archiver"]

log = logging.getLogger(__name__)

WALK = Script("pipeline.archive", "walk.lua")
CLAIM = Script("pipeline.archive", "claim.lua")
DONE = Script("pipeline.archive", "done.lua")
KEEP = Script("pipeline.archive", "keep.lua")

LAG_S = 60.0
"""The cursor stays this far behind Redis's clock: a run's index score is its client's
clock, and a run scored behind the cursor would never be walked."""
WALK_PAGE = 1000
ARCHIVABLE = frozenset(s.value for s in RunStatus if s.is_final) - {
    RunStatus.COMPENSATION_FAILED.value}
"""What a run must have ended as to be archived. A compensation that failed waits for a
person (``pipeline compensate``): the run is kept in Redis meanwhile, and archived once it
ends otherwise."""
HOLD_AGAIN_MS = 3_600_000
"""How often a run waiting for a person is given ``PIPELINE_RETENTION_S`` more in Redis."""
LOOK_AGAIN_MS = 10_000
"""A run still live when looked at is looked at again this much later (so a run is
archived at most this long after it ended and settled, the backlog allowing)."""
READ_RUNS = 100
"""Runs whose keys are read in one pipeline (two round trips for them all)."""
LOCK_S = 60.0
"""The archive lock's life unless renewed (after the walk and after each batch): an archiver
killed holding it keeps the others out this long at most."""


@dataclass
class ArchiveReport:
    """What one pass did."""

    runs: int = 0
    batches: list[int] = field(default_factory=list)
    walked: int = 0
    held: int = 0  # runs kept in Redis longer, the table being out of reach
    refused: list[str] = field(default_factory=list)  # a version changed in Redis
    expired: list[str] = field(default_factory=list)  # gone from Redis before archived
    error: str = ""
    busy: bool = False  # another archiver holds the lock

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.busy:
            return "another archiver is at work"
        n = len(self.batches)
        parts = [f"{self.runs} run{'s' * (self.runs != 1)} archived in {n} "
                 f"batch{'es' * (n != 1)}"]
        if self.held:
            parts.append(f"{self.held} kept in Redis longer")
        if self.refused:
            parts.append(f"{len(self.refused)} refused (a version changed in Redis)")
        if self.expired:
            parts.append(f"{len(self.expired)} expired before they were archived")
        if self.error:
            parts.append(f"the archive could not be written: {self.error}")
        return "; ".join(parts)


class Archiver:
    """Archives the finished runs of ``store`` under ``root``; ``run_once`` is one pass."""

    def __init__(self, store: StateStore, root: str, *, batch: int = 500,
                 archived_retention_s: int = 3600, settle_s: float = 10.0,
                 max_s: float = 60.0, lag_s: float = LAG_S) -> None:
        self.store = store
        self.root = root
        self.batch = batch
        self.archived_retention_s = archived_retention_s
        self.settle_ms = int(settle_s * 1000)
        self.max_s = max_s
        self.lag_ms = int(lag_s * 1000)

    @classmethod
    def from_settings(cls, store: StateStore, settings: Settings, **kwargs: Any) -> Archiver:
        return cls(store, settings.archive_uri, batch=settings.archive_batch,
                   archived_retention_s=settings.archived_retention_s, **kwargs)

    def run_once(self, *, lock: bool = True) -> ArchiveReport:
        """Walk the index, then write batches until the backlog has no finished run left
        (or ``max_s`` passed); one archiver at a time unless ``lock`` is False."""
        report = ArchiveReport()
        with self._locked(lock) as renew:
            if renew is None:
                report.busy = True
                return report
            deadline = time.monotonic() + self.max_s
            self._walk(report)
            while time.monotonic() < deadline:
                renew()
                try:
                    claimed = self._claim(report)
                    if claimed is None:
                        break
                    if self._write(*claimed, report):
                        continue
                except PipelineError:
                    raise
                except Exception as e:  # noqa: BLE001 - the tables' store: kept, retried
                    with translate_errors(self.store.url):
                        pending = cast(str | None, self.store.redis.hget(ARCHIVE.batch, "runs"))
                    self._failed(report, e, runs=json.loads(pending) if pending else [])
                self._look(report, hold=True)
                break
        return report

    # -- the backlog --------------------------------------------------------------------

    def _now_ms(self) -> int:
        with translate_errors(self.store.url):
            seconds, micros = self.store.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def _walk(self, report: ArchiveReport) -> None:
        """Move every run created more than ``lag_s`` ago past the cursor into the backlog.

        The cursor is ``<score> <member>``, the last run walked: runs of one score are in
        the order of their ids, so the walk goes on right after it whatever left the index
        meanwhile (``pipeline runs`` drops runs that expired)."""
        r = self.store.redis
        while True:
            now_ms = self._now_ms()
            with translate_errors(self.store.url):
                cursor = cast(str | None, r.get(ARCHIVE.cursor)) or ""
                score, last = cursor_of(cursor)
                page: list[tuple[str, float]] = []
                skip = 0
                while True:  # past the runs of the cursor's score walked already
                    read = cast(list[tuple[str, float]], r.zrangebyscore(
                        RUNS_INDEX, score, now_ms - self.lag_ms, start=skip, num=WALK_PAGE,
                        withscores=True))
                    page = [(m, s) for m, s in read if int(s) > score or m > last]
                    if page or len(read) < WALK_PAGE:
                        break
                    skip += WALK_PAGE
                if not page:
                    return
                member, at = page[-1]
                walked = WALK(r, [ARCHIVE.cursor, ARCHIVE.waiting],
                              [cursor, f"{int(at)} {member}", now_ms, *(m for m, _ in page)])
            if walked:
                report.walked += len(page)
            if len(read) < WALK_PAGE:
                return

    def _look(self, report: ArchiveReport, *, hold: bool = False) -> list[str]:
        """The oldest runs of the backlog that ended ``settle_s`` ago or more (at most a
        batch); the others are looked at again later. With ``hold`` (the table is out of
        reach), those are kept in Redis longer and moved to the back of the backlog."""
        r = self.store.redis
        now_ms = self._now_ms()
        with translate_errors(self.store.url):
            ids = cast(list[str], r.zrangebyscore(ARCHIVE.waiting, "-inf", now_ms, start=0,
                                                  num=2 * self.batch))
            if not ids:
                return []
            pipe = r.pipeline(transaction=False)
            for run_id in ids:
                pipe.hmget(RunKeys(run_id).run, "status", "finished_at", "updated_at",
                           "archived")
            replies = pipe.execute()
        ready: list[str] = []
        later: dict[str, int] = {}
        gone: list[str] = []
        expired: list[str] = []
        waits: list[str] = []  # for a person (a compensation that failed): kept meanwhile
        for run_id, (status, finished, updated, archived) in zip(ids, replies, strict=True):
            if status is None or archived:
                gone.append(run_id)
                if status is None:
                    expired.append(run_id)
            elif status == RunStatus.COMPENSATION_FAILED:
                waits.append(run_id)
                later[run_id] = now_ms + HOLD_AGAIN_MS
            elif status not in ARCHIVABLE:  # live (or a status newer than this archiver)
                later[run_id] = now_ms + LOOK_AGAIN_MS
            elif (ended := int(finished or updated or 0)) > now_ms - self.settle_ms:
                later[run_id] = ended + self.settle_ms
            elif len(ready) < self.batch:
                ready.append(run_id)
        if hold:
            later.update({run_id: now_ms + LOOK_AGAIN_MS for run_id in ready})
            report.held += len(ready)
        self._keep([*waits, *ready] if hold else waits, 0, self.store.retention_s)
        with translate_errors(self.store.url):
            pipe = r.pipeline(transaction=False)
            if later:
                pipe.zadd(ARCHIVE.waiting, later, xx=True)
            if gone:
                pipe.zrem(ARCHIVE.waiting, *gone)
                pipe.hincrby(ARCHIVE.stats, "expired", len(expired))
            pipe.execute()
        report.expired += expired
        for run_id in expired:
            log.warning("archive: run %s expired from Redis before it was archived", run_id)
        return [] if hold else ready

    def _claim(self, report: ArchiveReport) -> tuple[int, list[str]] | None:
        """The batch to write: the one pending (an archiver died with it), else a new one."""
        r = self.store.redis
        with translate_errors(self.store.url):
            pending = cast(list[str | None], r.hmget(ARCHIVE.batch, "number", "runs"))
        ready = [] if pending[0] else self._look(report)
        if not pending[0] and not ready:
            return None
        newest = 0 if pending[0] else max(written_batch(self.root, t) for t in TABLES)
        with translate_errors(self.store.url):
            claimed = CLAIM(r, [ARCHIVE.batch, ARCHIVE.seq, ARCHIVE.waiting],
                            [newest, *ready])
        if not claimed:
            return None
        return int(claimed[0]), list(json.loads(claimed[1]))

    # -- a batch ------------------------------------------------------------------------

    def _write(self, number: int, runs: list[str], report: ArchiveReport) -> bool:
        """Write batch ``number`` to every table missing it, then mark its runs archived;
        False when the archive could not be written (the batch waits for the next pass)."""
        rows: list[RunRows] = []
        back: list[str] = []  # no longer ended (a compensation re-driven): to the backlog
        read = {run_id: snap for i in range(0, len(runs), READ_RUNS)
                for run_id, snap in snapshots(self.store, runs[i:i + READ_RUNS]).items()}
        for run_id in runs:
            try:
                found = run_rows(self.store, run_id, number, read[run_id])
            except Exception as e:  # noqa: BLE001 - this run alone, never the batch
                if isinstance(e, PipelineError) and not isinstance(e, IntegrityError):
                    raise  # Redis out of reach: the pass stops, the batch waits
                self._refuse(run_id, e, report)
                continue
            if found is None:
                report.expired.append(run_id)
            elif found.status not in ARCHIVABLE:
                back.append(run_id)
            else:
                rows.append(found)
        tables, unfit = as_arrow(rows)
        for run, error in unfit:
            self._refuse(run.run_id, error, report)
            rows.remove(run)
        try:
            write_tables(self.root, number, tables, len(rows))
        except PipelineError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the table's store says: kept, retried
            self._failed(report, e, number=number, runs=runs)
            return False
        self._keep([row.run_id for row in rows], number, self.archived_retention_s)
        with translate_errors(self.store.url):
            pipe = self.store.redis.pipeline(transaction=False)
            if back:  # looked at on the next pass
                pipe.zadd(ARCHIVE.waiting, dict.fromkeys(back, 0), nx=True)
            if expired := [r for r in runs if r in report.expired]:
                pipe.hincrby(ARCHIVE.stats, "expired", len(expired))
            pipe.execute()
            finished = DONE(self.store.redis, [ARCHIVE.batch, ARCHIVE.stats],
                            [number, len(rows)])
        if finished:  # else another archiver finished it, and counted it
            report.runs += len(rows)
            report.batches.append(number)
        return True

    def _refuse(self, run_id: str, error: Exception, report: ArchiveReport) -> None:
        """A run whose rows cannot be made (a version that no longer matches its digest, a
        value no column holds): left out of its batch, kept in Redis, said in its log."""
        report.refused.append(run_id)
        text = f"{type(error).__name__}: {error}"[:2000]
        log.error("archive: run %s is not archived: %s", run_id, text)
        self._keep([run_id], 0, self.store.retention_s)
        with translate_errors(self.store.url):
            self.store.redis.hincrby(ARCHIVE.stats, "refused", 1)
        self.store.note_once(run_id, "archive.refused", error=text,
                             reason="the archiver cannot make its rows; it stays in Redis for "
                                    "PIPELINE_RETENTION_S more")

    def _failed(self, report: ArchiveReport, error: Exception, *, number: int = 0,
                runs: Sequence[str] = ()) -> None:
        """The tables could not be read or written: what was being written is kept in Redis
        for ``PIPELINE_RETENTION_S`` more, and the failure counted."""
        report.error = f"{type(error).__name__}: {error}"[:2000]
        log.warning("archive: %s could not be written to %s, kept for the next pass: %s",
                    f"batch {number}" if number else "the archive", redact_url(self.root),
                    report.error)
        self._keep(list(runs), 0, self.store.retention_s)
        report.held += len(runs)
        with translate_errors(self.store.url):
            pipe = self.store.redis.pipeline(transaction=False)
            pipe.hincrby(ARCHIVE.stats, "failures", 1)
            pipe.hset(ARCHIVE.stats, mapping={"last_error": report.error,
                                              "last_error_at": self._now_ms()})
            pipe.execute()

    def _keep(self, runs: list[str], number: int, seconds: int) -> None:
        if not runs:
            return
        batch = Batch(self.store.redis)
        for run_id in runs:
            batch.script(KEEP, RunKeys(run_id).all(), [number, seconds])
        with translate_errors(self.store.url):
            batch.execute()

    @contextmanager
    def _locked(self, lock: bool) -> Iterator[Callable[[], None] | None]:
        """The lock held (what renews it), or None when another archiver holds it."""
        if not lock:
            yield lambda: None
            return
        held = self.store.redis.lock(ARCHIVE.lock, timeout=LOCK_S, blocking=False)
        with translate_errors(self.store.url):
            got = held.acquire(token=uuid.uuid4().hex)
        if not got:
            yield None
            return

        def renew() -> None:
            try:
                held.reacquire()
            except Exception:  # noqa: BLE001 - expired meanwhile: batches are safe regardless
                log.warning("the archive lock expired during a pass; another may overlap it")

        try:
            yield renew
        finally:
            try:
                held.release()
            except Exception:  # noqa: BLE001 - it expires by itself
                log.warning("the archive lock could not be released; it expires by itself")

