"""The versioned state store: an append-only Redis stream per run.

Each run is a handful of keys under one hash tag (``keys.RunKeys``): its versions
(a stream, appended to once per step key, never changed), the step keys sealed,
its record, its log (what happened, for the trace) and its deliveries. Every
change is one Lua script, so a step opens in one round trip and seals in one."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis

from ..errors import RunNotFound, RunNotParked, VersionNotFound
from ..keys import HELD, LIVE, RUNS_INDEX, UNENQUEUED, RunKeys, version_stream_id
from ..lua import Arg, Batch, Client, Script, checked, decoding_client, route
from ..settings import (
    DEFAULT_LEASE_S,
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_RETENTION_S,
    Settings,
)
from .budget import Budget
from .connection import connect, translate_errors, url_of
from .replies import Created, Opening, Sealing
from .version import RunInfo, RunStatus, Sealable, Version, sealable

_PKG = "pipeline.state"
CREATE_RUN = Script(_PKG, "create_run.lua")
OPEN_STEP = Script(_PKG, "open_step.lua")
SEAL = Script(_PKG, "seal.lua", include=["stages.lua"])
FINISH = Script(_PKG, "finish.lua", include=["budget.lua"])
NOTE = Script(_PKG, "note.lua")
MARK_ENQUEUED = Script(_PKG, "mark_enqueued.lua")
PARK = Script(_PKG, "park.lua")
RESUME = Script(_PKG, "resume.lua")
HOLD = Script(_PKG, "hold.lua")

UNENQUEUED_TTL_S = 24 * 3600
"""A run whose canvas never reached the broker is removed after this long."""

HISTORY_PAGE = 1000

Entries = list[tuple[str, dict[str, str]]]

Extra = Callable[[Batch], int]
"""Queues one more call on a step's round trip and returns its index in the batch."""


class StateStore:
    """Reads and appends sealed versions. Every write is one atomic Lua call."""

    def __init__(
        self,
        client: Client,
        *,
        url: str = "",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        retention_s: int = DEFAULT_RETENTION_S,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        # Typed as a plain Redis for the code that hands it on (the step's context, the
        # metrics): a RedisCluster answers the same commands about the keys of one slot.
        self.redis = cast(redis.Redis, decoding_client(client, "StateStore"))
        self.url = url or url_of(client)
        self.max_payload_bytes = max_payload_bytes
        self.retention_s = retention_s
        self.lease_s = lease_s

    @classmethod
    def from_settings(cls, settings: Settings) -> StateStore:
        return cls(
            connect(settings.redis_url),
            url=settings.redis_url,
            max_payload_bytes=settings.max_payload_bytes,
            retention_s=settings.retention_s,
            lease_s=settings.lease_s,
        )

    # -- writes -----------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        *,
        workflow: str,
        payload: Any,
        contract: str,
        idempotency_key: str | None = None,
        form: Sealable | None = None,
        route: str = "",
        budget: Budget | None = None,
    ) -> Created:
        """Create the run and seal its input as version 0; a no-op if the run exists.

        ``form`` is the payload already checked by ``sealable`` (not done twice); ``route``
        (JSON) is what the pipeline's own work must know of the run's flow, kept in its
        record, as is its ``budget``.
        """
        form = form or sealable(payload, self.max_payload_bytes, f"input of workflow {workflow}")
        canonical, digest = form.text, form.digest
        keys = RunKeys(run_id)
        batch = Batch(self.redis)
        batch.script(CREATE_RUN, [keys.states, keys.steps, keys.run, keys.log],
                     [workflow, canonical, digest, contract, idempotency_key or "",
                      UNENQUEUED_TTL_S, route, *(budget.args() if budget else ("", ""))])
        # the index, in the same round trip (a run created before keeps its first score),
        # trimmed of entries older than any finished run can live
        now_ms = int(time.time() * 1000)
        batch.command("ZADD", RUNS_INDEX, "NX", now_ms, run_id)
        batch.command("ZADD", UNENQUEUED, "NX", now_ms, run_id)  # until mark_enqueued
        batch.command("ZREMRANGEBYSCORE", RUNS_INDEX, "-inf",
                      f"({now_ms - (self.retention_s + 2 * UNENQUEUED_TTL_S) * 1000}")
        with translate_errors(self.url):
            reply = checked(batch.execute()[0])
        if reply[0] == "created":
            return Created(run_id, True, workflow, digest)
        if reply[3] == "1":  # the ZADD above put a run handed over long ago back: undo it
            with translate_errors(self.url):
                self.redis.zrem(UNENQUEUED, run_id)
        return Created(run_id, False, reply[1], reply[2], enqueued=reply[3] == "1",
                       age_s=int(reply[4]) / 1000.0)

    def mark_enqueued(self, run_id: str) -> None:
        """Record that the run's canvas reached the broker (it then lives until it ends)."""
        batch = Batch(self.redis)
        batch.script(MARK_ENQUEUED, RunKeys(run_id).all(), [])
        batch.command("ZREM", UNENQUEUED, run_id)
        # watched by the sweeper until it ends (it drops what ended), trimmed of what no
        # sweeper looked at for longer than a finished run lives (a fleet without beat)
        now_ms = int(time.time() * 1000)
        batch.command("ZADD", LIVE, "NX", now_ms, run_id)
        batch.command("ZREMRANGEBYSCORE", LIVE, "-inf", f"({now_ms - self.retention_s * 1000}")
        with translate_errors(self.url):
            checked(batch.execute()[0])

    def hold(self, task_ids: Sequence[str]) -> None:
        """A live worker holds these tasks' messages for ``lease_s`` more (its heartbeat)."""
        with translate_errors(self.url):
            HOLD(self.redis, [HELD], [int(self.lease_s * 1000), *task_ids])

    def open_step(
        self,
        run_id: str,
        *,
        step: str,
        agent: str,
        inputs: Sequence[int],
        max_deliveries: int,
        worker: str = "",
        task_id: str = "",
        claim: bool = False,
        queue: str = "",
        extra: Sequence[Extra] = (),
        reserve: Sequence[Arg] = (0, 0, 0, 0),
    ) -> Opening:
        """Open a step in one round trip: status, seal check, delivery count, inputs.

        With ``claim`` (an event delivery), the task ``task_id`` claims the
        delivery: a delivery another task holds or ended is a ``duplicate``. ``reserve``:
        the tokens and cost the step reserves of its run's budget, and its prices per 1,000
        prompt and completion tokens (``budget.py``).
        """
        keys = RunKeys(run_id)
        batch = Batch(self.redis)
        batch.script(
            OPEN_STEP,
            keys.all(),
            [step, agent, max_deliveries, worker, task_id, task_id if claim else "", queue,
             *reserve, *(int(v) for v in inputs)],
        )
        extra_idx = [queue(batch) for queue in extra]
        with translate_errors(self.url):
            results = batch.execute()
            reply = checked(results[0])
        return Opening.from_reply(run_id, reply, tuple(results[i] for i in extra_idx))

    def seal(
        self,
        run_id: str,
        *,
        step: str,
        agent: str,
        contract: str,
        payload: Any,
        parents: Sequence[int],
        final: bool = False,
        degraded: bool = False,
        worker: str = "",
        latency_ms: float = 0.0,
        extra: Sequence[Extra] = (),
        form: Sealable | None = None,
        trace: dict[str, str | int] | None = None,
        group: str = "",
    ) -> Sealing:
        """Append ``payload`` as the run's next version, once per step key.

        A step key sealed before returns its version and writes nothing.
        ``trace`` adds fields to the step's trace entry (token usage). A member of a
        chord (``group``, its Celery group id) whose seal completes its stage joins it:
        ``Sealing.joined`` holds the stage's versions for the chord's body.
        Raises ``PayloadTooLarge`` or ``ContractViolation`` (not JSON) before
        anything reaches Redis.
        """
        form = form or sealable(payload, self.max_payload_bytes,
                                f"run {run_id} agent {agent} output")
        keys = RunKeys(run_id)
        batch = Batch(self.redis)
        batch.script(
            SEAL,
            keys.all(),
            [
                step,
                agent,
                contract,
                form.text,
                form.digest,
                json.dumps([int(p) for p in parents]),
                "1" if final else "0",
                self.retention_s,
                "1" if degraded else "0",
                worker,
                f"{latency_ms:.3f}",
                group,
                *(x for pair in (trace or {}).items() for x in pair),
            ],
        )
        extra_idx = [queue(batch) for queue in extra]
        with translate_errors(self.url):
            results = batch.execute()
            reply = checked(results[0])
        return Sealing.from_reply(reply, tuple(results[i] for i in extra_idx))

    def finish(self, run_id: str, status: RunStatus, *, error: str = "", agent: str = "") -> bool:
        """Move a running run to ``status``; False when it was not running."""
        with translate_errors(self.url):
            reply = FINISH(
                self.redis, RunKeys(run_id).all(), [status.value, error, agent, self.retention_s]
            )
        return bool(reply[0] == "changed")

    def park(self, run_id: str, *, step: str, agent: str, reason: str) -> bool:
        """Set a live run waiting for a person; False when it is not live."""
        keys = RunKeys(run_id)
        with translate_errors(self.url):
            return bool(PARK(self.redis, [keys.run, keys.log], [step, agent, reason]))

    def resume(self, run_id: str, *, how: str) -> list[str]:
        """Set a parked run running again; returns the steps it was parked at."""
        keys = RunKeys(run_id)
        with translate_errors(self.url):
            reply = RESUME(self.redis, [keys.run, keys.log, keys.deliveries], [how])
        if reply[0] != "resumed":
            if not reply[1]:
                raise RunNotFound(_no_run(run_id))
            raise RunNotParked(
                f"run {run_id} is {reply[1]}, not waiting_for_human: there is nothing to resume"
            )
        return [step for step in str(reply[1]).split(",") if step]

    def sealed_steps(self, run_id: str, steps: Sequence[str]) -> list[int | None]:
        """The versions sealed for these step keys (None where not sealed)."""
        if not steps:
            return []
        with translate_errors(self.url):
            found = self.redis.hmget(RunKeys(run_id).steps, list(steps))
        return [None if v is None else int(v) for v in cast(list[str | None], found)]

    def note(self, run_id: str, event: str, **fields: str | int | float) -> bool:
        """Append an entry to the run's log (only while the run exists)."""
        keys = RunKeys(run_id)
        args: list[str | int | float] = ["event", event]
        for name, value in fields.items():
            args += [name, value]
        with translate_errors(self.url):
            return bool(NOTE(self.redis, [keys.run, keys.log], args))

    def note_once(self, run_id: str, event: str, **fields: str | int | float) -> bool:
        """``note``, unless the run's newest log entry is this event already: a trouble
        that repeats (each sweep, each nudge) is said once until something else happens."""
        with translate_errors(self.url):
            last = self.redis.xrevrange(RunKeys(run_id).log, count=1)
        if last and (last[0][1] or {}).get("event") == event:
            return False
        return self.note(run_id, event, **fields)

    def delete_run(self, run_id: str) -> None:
        """Remove every key of a run (only for a run that was never enqueued)."""
        with translate_errors(self.url):
            self.redis.delete(*RunKeys(run_id).all())
            self.redis.zrem(RUNS_INDEX, run_id)
            self.redis.zrem(UNENQUEUED, run_id)

    # -- reads ------------------------------------------------------------------

    def get(self, run_id: str, version: int) -> Version:
        """Version N of a run, found directly by its stream id; digest checked."""
        sid = version_stream_id(version)
        keys = RunKeys(run_id)
        with translate_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            pipe.xrange(keys.states, sid, sid)
            pipe.exists(keys.run)
            entries, exists = pipe.execute()
        if not entries:
            if not exists:
                raise RunNotFound(_no_run(run_id))
            raise VersionNotFound(f"run {run_id} has no version {version}")
        return Version.from_entry(run_id, entries[0][1])

    def history(self, run_id: str) -> list[Version]:
        """Every sealed version of the run, oldest first; every digest checked."""
        keys = RunKeys(run_id)
        out: list[Version] = []
        start = "-"
        with translate_errors(self.url):
            while True:
                page = cast(Entries, self.redis.xrange(keys.states, start, "+",
                                                       count=HISTORY_PAGE))
                out += [Version.from_entry(run_id, fields) for _, fields in page]
                if len(page) < HISTORY_PAGE:
                    break
                start = "(" + page[-1][0]
        if not out:
            raise RunNotFound(_no_run(run_id))
        return out

    def lineage(self, run_id: str, version: int) -> list[Version]:
        """Version N and every version it was made from, newest first."""
        seen: dict[int, Version] = {}
        todo = [version]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            v = self.get(run_id, n)
            seen[n] = v
            todo += [p for p in v.parents if p not in seen]
        return [seen[n] for n in sorted(seen, reverse=True)]

    def run_info(self, run_id: str) -> RunInfo:
        with translate_errors(self.url):
            h = cast(dict[str, str], self.redis.hgetall(RunKeys(run_id).run))
        if not h:
            raise RunNotFound(_no_run(run_id))
        return RunInfo.from_hash(run_id, h)

    def log(self, run_id: str) -> list[dict[str, str]]:
        """The run's log entries, oldest first, each with its stream id as ``id``."""
        keys = RunKeys(run_id)
        with translate_errors(self.url):
            entries = cast(Entries, self.redis.xrange(keys.log))
            if not entries and not self.redis.exists(keys.run):
                raise RunNotFound(_no_run(run_id))
        return [{"id": sid, **fields} for sid, fields in entries]

    def wait_log(self, run_id: str, after: str, block_ms: int) -> str:
        """Block until the run's log has an entry after ``after``; its last id."""
        return self.wait_events(run_id, after, block_ms)[0]

    def wait_events(self, run_id: str, after: str, block_ms: int) -> tuple[str, list[str]]:
        """Block until the run's log has entries after ``after``: the last id, and what
        each entry says happened (``step.sealed``, ``run.succeeded``...).

        On a cluster the XREAD goes straight to the node that owns the run's slot.
        """
        key = RunKeys(run_id).log
        command = ("XREAD", "COUNT", 100, "BLOCK", block_ms, "STREAMS", key, after)
        with translate_errors(self.url):
            reply = cast(list[tuple[str, Entries]], self.redis.execute_command(  # type: ignore[no-untyped-call]
                *command, **route(self.redis, key)))
        if not reply:
            return after, []
        entries = reply[0][1]
        return entries[-1][0], [fields.get("event", "") for _, fields in entries]

    def ping(self) -> None:
        with translate_errors(self.url):
            self.redis.ping()


def _no_run(run_id: str) -> str:
    return (
        f"no run {run_id!r}: it was never started, or it finished and expired "
        "(PIPELINE_RETENTION_S)"
    )
