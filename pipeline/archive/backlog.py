"""What the archiver has not done yet, read from Redis alone (no ``archive`` extra needed):
the exporter's ``pipeline_archive_*`` gauges and ``pipeline archive --status``."""

from __future__ import annotations

import json
from typing import cast

from ..keys import ARCHIVE, RUNS_INDEX
from ..state import StateStore, translate_errors

__all__ = ["backlog", "cursor_of"]


def cursor_of(cursor: str) -> tuple[int, str]:
    """The archiver's cursor: the index score and the run id its walk stopped at (``0`` and
    ``''`` before any)."""
    score, _, member = cursor.partition(" ")
    return int(score or 0), member


def backlog(store: StateStore) -> dict[str, int | str]:
    """Runs not archived yet (``backlog``: in the batch being written, walked and waiting,
    and every run the index holds past the archiver's cursor, live ones included), with
    the archiver's counters (``runs``, ``batches``, ``failures``, ``expired``,
    ``last_ok_at``, ``last_error``...)."""
    r = store.redis
    with translate_errors(store.url):
        score, _ = cursor_of(cast(str | None, r.get(ARCHIVE.cursor)) or "")
        pipe = r.pipeline(transaction=False)
        pipe.zcard(ARCHIVE.waiting)
        pipe.zcount(RUNS_INDEX, f"({score}", "+inf")  # (less a run of the cursor's ms)
        pipe.hgetall(ARCHIVE.stats)
        pipe.hget(ARCHIVE.batch, "runs")
        waiting, ahead, stats, pending = pipe.execute()
    in_batch = len(json.loads(pending)) if pending else 0
    out: dict[str, int | str] = {
        "backlog": in_batch + int(waiting) + int(ahead)}
    for name, value in cast(dict[str, str], stats).items():
        out[name] = value if name == "last_error" else int(value)
    return out
