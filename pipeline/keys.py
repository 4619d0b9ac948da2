"""Every Redis key the pipeline uses, in one place.

All keys of a run share the hash tag ``{<run_id>}`` so that one Lua script may
touch them all, on a single Redis or a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "pipeline"


@dataclass(frozen=True, slots=True)
class RunKeys:
    run_id: str

    @property
    def states(self) -> str:
        """Stream of sealed versions; version N has stream id ``N-1``."""
        return f"{PREFIX}:{{{self.run_id}}}:states"

    @property
    def steps(self) -> str:
        """Hash step key -> sealed version number."""
        return f"{PREFIX}:{{{self.run_id}}}:steps"

    @property
    def run(self) -> str:
        """Hash: workflow, status, head version, timestamps (a projection of the log)."""
        return f"{PREFIX}:{{{self.run_id}}}:run"

    @property
    def log(self) -> str:
        """Stream of what happened to the run (the trace)."""
        return f"{PREFIX}:{{{self.run_id}}}:log"

    @property
    def deliveries(self) -> str:
        """Hash step key -> number of times the step was delivered to a worker."""
        return f"{PREFIX}:{{{self.run_id}}}:deliveries"

    @property
    def saga(self) -> str:
        """Hash: the compensation plan, its stage, and each step's compensation outcome."""
        return f"{PREFIX}:{{{self.run_id}}}:saga"

    @property
    def undo(self) -> str:
        """Hash step key -> the compensation data its agent chose to record (JSON)."""
        return f"{PREFIX}:{{{self.run_id}}}:undo"

    @property
    def ledger(self) -> str:
        """Hash delivery key (``<event>:<agent>``) -> its state (choreography):
        ``dispatched``, ``running:<task>``, ``handled:<task>`` or ``failed:<task>``."""
        return f"{PREFIX}:{{{self.run_id}}}:ledger"

    @property
    def events(self) -> str:
        """Hash event id -> the event (JSON), and ``src:<publisher>`` -> the id it published."""
        return f"{PREFIX}:{{{self.run_id}}}:events"

    def all(self) -> list[str]:
        """Every key of the run, in the order the Lua scripts expect them."""
        return [self.states, self.steps, self.run, self.log, self.deliveries, self.saga,
                self.undo, self.ledger, self.events]


def run_keys(run_id: str) -> RunKeys:
    return RunKeys(run_id)


RUNS_INDEX = f"{PREFIX}:runs"
"""Sorted set: run id -> when it was created (ms). ``pipeline runs`` reads it; a run that
expired is dropped from it when found missing."""

METRICS_PREFIX = f"{PREFIX}:{{metrics}}"
"""Counters the exporter reads (one hash tag: one slot on a cluster)."""

UNENQUEUED = f"{PREFIX}:unenqueued"
"""Sorted set: run id -> when it was created (ms), until its canvas reached the broker.
The sweeper enqueues a run left here past its grace (its client died in between)."""

SAGAS = f"{PREFIX}:sagas"
"""Sorted set: run id -> when its saga last moved (ms), while it compensates. The sweeper
enqueues the planner again for a saga that stopped moving (idempotent)."""

LIVE = f"{PREFIX}:live"
"""Sorted set: run id -> when the sweeper last saw it move (ms), from its enqueuing until it
ends. The sweeper re-drives a run that stopped moving with none of its messages left."""

STALLED = f"{PREFIX}:stalled"
"""Hash: run id -> ``<last log id>|<ms>``: when a sweep first found the run idle with none of
its messages in the broker (the next pass confirms it before re-driving)."""

HELD = f"{PREFIX}:held"
"""Sorted set: task id -> until when (ms, Redis clock) a live worker holds its message (waiting
for its ETA, reserved, or running). Every worker's main process renews what it holds every
third of the lease; the sweeper hands out again an unacked message that no live worker holds."""

SWEEP_LOCK = f"{PREFIX}:sweep:lock"
"""One sweeper at a time across the fleet (SET NX PX)."""

DEAD_LETTERS = f"{PREFIX}:dead"
"""Stream: compensations that failed for good (run, agent, version, error)."""

AGENT_CATALOG = f"{PREFIX}:agents"
"""Hash: agent name -> its card (JSON: queue, contracts, compensation, breaker settings),
published by every worker that serves it when it starts: the facts a process without the
agent's code may need."""


def breaker_key(agent: str) -> str:
    return f"{PREFIX}:breaker:{{{agent}}}"


def breaker_log_key(agent: str) -> str:
    return f"{PREFIX}:breaker:{{{agent}}}:log"


def breaker_probes_key(agent: str) -> str:
    """Sorted set: lease id of each half-open probe -> when its lease runs out (ms)."""
    return f"{PREFIX}:breaker:{{{agent}}}:probes"


def breaker_cache_key(agent: str, contract: str, input_digest: str) -> str:
    """The agent's last good output under ``contract`` for one input (``cached`` fallback)."""
    return f"{PREFIX}:breaker:{{{agent}}}:cache:{contract}:{input_digest}"


def limit_keys(name: str) -> list[str]:
    """A named limit's keys, one hash tag: its rates' times (hash), the calls in flight
    (sorted set lease -> expiry, ms) and their token reservations (hash lease -> tokens)."""
    base = f"{PREFIX}:limit:{{{name}}}"
    return [base, f"{base}:leases", f"{base}:reserved"]


def version_stream_id(version: int) -> str:
    """Stream id of version N: found directly with XRANGE, never by scanning."""
    return f"{version}-1"


@dataclass(frozen=True, slots=True)
class ArchiveKeys:
    """The archiver's bookkeeping: one hash tag (one slot on a cluster), so that its scripts
    move a run from the backlog to a batch atomically."""

    base: str = f"{PREFIX}:{{archive}}"

    @property
    def cursor(self) -> str:
        """String ``<score> <offset>``: how far the archiver has walked ``RUNS_INDEX``."""
        return f"{self.base}:cursor"

    @property
    def waiting(self) -> str:
        """Sorted set: run id -> when to look at it again (ms): the runs walked and not
        archived yet (live, just finished, or waiting for a batch): the backlog."""
        return f"{self.base}:waiting"

    @property
    def seq(self) -> str:
        """Counter: the last batch number handed out (never reused)."""
        return f"{self.base}:seq"

    @property
    def batch(self) -> str:
        """Hash: the batch being written (``number``, ``runs`` as JSON, ``at``), until every
        table committed it and its runs were marked archived."""
        return f"{self.base}:batch"

    @property
    def stats(self) -> str:
        """Hash: what the archiver did (runs, batches, failures, the last error and when)."""
        return f"{self.base}:stats"

    @property
    def lock(self) -> str:
        """One archiver at a time across the fleet (SET NX PX); correctness never needs it."""
        return f"{self.base}:lock"


ARCHIVE = ArchiveKeys()
