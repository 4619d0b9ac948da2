"""An archived run brought back to Redis when Redis no longer has it: every command and
``Run`` method then reads it as it read it before it expired, with the same output and
the same digest check (a version read from the table is checked against its digest, and
again by whatever reads it from Redis).

A read-through cache: the run is restored whole or not at all (``restore.lua``, one
script), for ``PIPELINE_ARCHIVED_RETENTION_S``, its record marked ``archived`` (so the
archiver never writes it again) and ``recalled_at``. A run Redis still has is left alone.
"""

from __future__ import annotations

import json
import time

from ..errors import IntegrityError
from ..keys import RunKeys, version_stream_id
from ..lua import Script
from ..state import StateStore, translate_errors
from .rows import flat, key_names
from .table import read_run

__all__ = ["recall"]

RESTORE = Script("pipeline.archive", "restore.lua")


def recall(store: StateStore, root: str, run_id: str, *, seconds: int) -> bool:
    """Restore run ``run_id``, which Redis no longer has (the caller looked), from the
    archive at ``root``; True when restored, False when Redis had it after all (restored
    by someone else meanwhile: left alone). ``RunNotFound`` when the archive has no such run
    either, ``IntegrityError`` when one of its versions does not match its digest (nothing
    is restored then)."""
    keys = RunKeys(run_id)
    archived = read_run(root, run_id)
    found = dict(archived.keys)
    found["states"] = ["stream", [[version_stream_id(int(e["version"])), flat(e.items())]
                                  for e in archived.entries]]
    found["run"] = ["hash", flat([*archived.record, ("archived", str(archived.batch)),
                                   ("recalled_at", str(int(time.time() * 1000)))])]
    for name, (kind, data) in found.items():
        ids = [_id(entry[0]) for entry in data] if kind == "stream" else []
        if ids != sorted(set(ids)):
            raise IntegrityError(f"run {run_id}: the archive's {name} stream is out of order")
    aligned = [found.get(name) for name in key_names(run_id)]
    with translate_errors(store.url):
        return bool(RESTORE(store.redis, keys.all(), [json.dumps(aligned), seconds]))


def _id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)
