"""Prometheus metrics read from Redis at scrape time, served by ``pipeline exporter``.

Workers serve no metrics: they only count, in Redis, what the exporter reports
(``counters.py``). The exporter reads those hashes, the breakers, the dead-letter stream and the
runs index when Prometheus scrapes it. A run in a status that never changes is
read once and remembered (with its expiry) in the exporter, so a scrape reads
only the live runs. Flower's own ``/metrics`` keeps covering tasks and workers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis

from ..agent import Agent, agents, import_agent_modules
from ..archive.backlog import backlog
from ..breaker import BreakerRegistry, Snapshot
from ..counters import BUDGET_EXCEEDED, COMPENSATIONS, FAILURES, LATENCY, LATENCY_BUCKETS_MS
from ..errors import ConfigurationError, StoreError
from ..flow import workflows
from ..keys import DEAD_LETTERS, RUNS_INDEX, RunKeys
from ..limits import LimitState, named_limit_states
from ..lua import decoding_client
from ..settings import Settings
from ..state import RunStatus, StateStore, translate_errors

if TYPE_CHECKING:  # the `metrics` extra's types; the extra is imported when the exporter starts
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

__all__ = ["DEFAULT_ADDRESS", "DEFAULT_PORT", "PipelineCollector", "RunCensus", "serve", "start"]

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 9808
NEW_RUN_GRACE_MS = 60_000
"""An indexed run not found is dropped from the index only when seen before or older than
this: on a cluster, the index may be written before the run's keys."""
SETTLED_RECHECK_MS = 10_000
"""How long a finished run with no expiry is counted before it is read again."""
READ_PAGE = 1000
SETTLED = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.COMPENSATED,
                     RunStatus.CANCELLED})
"""Statuses a run never leaves (``compensation_failed`` may be re-driven)."""
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
INSTALL_HINT = "pip install celery-agent-pipeline[metrics]"


# -- reading, in the exporter --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Settled:
    workflow: str
    status: str
    expires_at_ms: float  # this process's clock: when to read the run again


class RunCensus:
    """How many indexed runs are in each (workflow, status).

    Runs already in a status they never leave are read once and remembered
    until they expire (ten seconds at a time when they have no expiry); the
    live ones are read at every count, in pipelined pages. A run found missing
    is dropped from the index (``ZREM``).
    """

    def __init__(self, client: redis.Redis) -> None:
        decoding_client(client, "RunCensus")
        self.redis = client
        self._settled: dict[str, _Settled] = {}
        self._live: set[str] = set()

    def count(self) -> Counter[tuple[str, str]]:
        now_ms = time.time() * 1000
        indexed = {str(m): float(s) for m, s in self.redis.zscan_iter(RUNS_INDEX,
                                                                        count=READ_PAGE)}
        for run_id in self._settled.keys() - indexed.keys():
            del self._settled[run_id]  # dropped from the index elsewhere
        due = [run_id for run_id in indexed if run_id not in self._settled
               or _expired(self._settled[run_id], now_ms)]
        counts: Counter[tuple[str, str]] = Counter()
        live: set[str] = set()
        gone: list[str] = []
        for run_id, (workflow, status), ttl_ms in self._read(due):
            was_settled = self._settled.pop(run_id, None) is not None  # it was due to expire
            if status is None:
                seen = was_settled or run_id in self._live
                if seen or now_ms - indexed[run_id] > NEW_RUN_GRACE_MS:
                    gone.append(run_id)
            elif status in SETTLED:
                # read again when it expires; one without an expiry (or that expired between
                # the two reads) is read again after a while, so no race leaves it counted
                expires = now_ms + (ttl_ms if ttl_ms > 0 else SETTLED_RECHECK_MS)
                self._settled[run_id] = _Settled(workflow or "", status, expires)
            else:
                counts[(workflow or "", status)] += 1
                live.add(run_id)
        for run in self._settled.values():
            counts[(run.workflow, run.status)] += 1
        self._live = live
        for i in range(0, len(gone), READ_PAGE):
            self.redis.zrem(RUNS_INDEX, *gone[i:i + READ_PAGE])
        return counts

    def _read(self, run_ids: Sequence[str]) -> Iterator[tuple[str, list[str | None], int]]:
        for i in range(0, len(run_ids), READ_PAGE):
            page = run_ids[i:i + READ_PAGE]
            pipe = self.redis.pipeline(transaction=False)
            for run_id in page:
                pipe.hmget(RunKeys(run_id).run, ["workflow", "status"])
                pipe.pttl(RunKeys(run_id).run)
            replies = pipe.execute()
            for j, run_id in enumerate(page):
                yield run_id, replies[2 * j], int(replies[2 * j + 1])


def _expired(run: _Settled, now_ms: float) -> bool:
    return now_ms >= run.expires_at_ms


@dataclass(frozen=True, slots=True)
class _Reading:
    latency: dict[str, str]
    failures: dict[str, str]
    compensations: dict[str, str]
    dead_letters: int
    breakers: list[Snapshot]
    runs: Counter[tuple[str, str]]
    over_budget: dict[str, str]
    limits: list[LimitState]
    archive: dict[str, int | str]


class PipelineCollector:
    """A prometheus_client collector that reads the pipeline's state from Redis on scrape."""

    def __init__(self, store: StateStore, *, agents: Iterable[Agent] = (),
                 workflows: Iterable[str] = ()) -> None:
        self.store = store
        self.agents = list(agents)
        self.workflows = sorted(workflows)
        self.census = RunCensus(store.redis)
        self._lock = threading.Lock()  # the HTTP server answers scrapes in threads

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("pipeline_redis_up",
                               "1 when the exporter could read the pipeline's Redis at this "
                               "scrape, else 0 (and no other pipeline_ metric is reported)")
        try:
            with self._lock:
                reading = self._read()
        except StoreError as e:
            log.warning("scrape failed: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self._families(reading)

    def _read(self) -> _Reading:
        with translate_errors(self.store.url):
            pipe = self.store.redis.pipeline(transaction=False)
            pipe.hgetall(LATENCY)
            pipe.hgetall(FAILURES)
            pipe.hgetall(COMPENSATIONS)
            pipe.xlen(DEAD_LETTERS)
            pipe.hgetall(BUDGET_EXCEEDED)
            latency, failures, compensations, dead, over_budget = pipe.execute()
            runs = self.census.count()
        registry = BreakerRegistry(self.store.redis, url=self.store.url)
        breakers = registry.snapshots((a.name, a.breaker) for a in self.agents
                                      if a.breaker.enabled)
        drawn = sorted({name for a in self.agents for name in a.limits})
        states = [s for s in named_limit_states(self.store.redis, drawn, url=self.store.url)
                  if s is not None]
        return _Reading(latency, failures, compensations, int(dead), breakers, runs,
                        over_budget, states, backlog(self.store))

    def _families(self, r: _Reading) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        names = {a.name for a in self.agents}
        state = GaugeMetricFamily("pipeline_breaker_state",
                                  "Circuit breaker of each agent: 0 closed, 1 half_open, 2 open",
                                  labels=["agent"])
        calls = CounterMetricFamily("pipeline_breaker_calls",
                                    "Calls each agent's breaker counted, by outcome (success, "
                                    "failure, rejected); `pipeline breakers reset` restarts them",
                                    labels=["agent", "outcome"])
        for snap in r.breakers:
            state.add_metric([snap.agent], BREAKER_STATES[snap.state.value])
            for outcome, n in (("success", snap.successes), ("failure", snap.failures),
                               ("rejected", snap.rejected)):
                calls.add_metric([snap.agent, outcome], n)
        yield state
        yield calls

        runs = GaugeMetricFamily("pipeline_runs",
                                 "Runs in the runs index (pipeline:runs) by workflow and status; "
                                 "finished runs leave it when they expire",
                                 labels=["workflow", "status"])
        for workflow in sorted(set(self.workflows) | {w for w, _ in r.runs}):
            for status in RunStatus:
                runs.add_metric([workflow, status.value], r.runs.get((workflow, status.value), 0))
        yield runs

        latency = HistogramMetricFamily("pipeline_step_latency_seconds",
                                        "Time from a step's start to its seal, per agent: "
                                        "every call that ran and reached its seal (sealed, "
                                        "a duplicate, or discarded); fallbacks excluded",
                                        labels=["agent"])
        by_agent = _split(r.latency)
        for agent in sorted(names | by_agent.keys()):
            fields = by_agent.get(agent, {})
            observed = sorted((int(k), int(v)) for k, v in fields.items() if k.isdigit())
            buckets = [(str(b / 1000), sum(n for le, n in observed if le <= b))
                       for b in LATENCY_BUCKETS_MS]
            count = int(fields.get("count", 0))
            latency.add_metric([agent], buckets + [("+Inf", count)],
                               sum_value=int(fields.get("sum_us", 0)) / 1e6)
        yield latency

        failures = CounterMetricFamily("pipeline_step_failures",
                                       "Steps that failed for good (not retried), per agent",
                                       labels=["agent"])
        for agent in sorted(names | r.failures.keys()):
            failures.add_metric([agent], int(r.failures.get(agent, 0)))
        yield failures

        compensations = CounterMetricFamily("pipeline_compensations",
                                            "Compensations recorded by the saga, per agent and "
                                            "outcome (done, or dead: dead-lettered)",
                                            labels=["agent", "outcome"])
        done = _split(r.compensations)
        for agent in sorted({a.name for a in self.agents if a.compensate} | done.keys()):
            for outcome in ("done", "dead"):
                compensations.add_metric([agent, outcome], int(done.get(agent, {}).get(outcome, 0)))
        yield compensations

        dead = GaugeMetricFamily("pipeline_dead_letters",
                                 "Entries in the dead-letter stream pipeline:dead (compensations "
                                 "that failed for good, waiting for a person)")
        dead.add_metric([], r.dead_letters)
        yield dead
        yield from _limit_families(r, names)
        yield from _archive_families(r.archive)


def _archive_families(archive: dict[str, int | str]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    waiting = GaugeMetricFamily("pipeline_archive_backlog",
                                "Runs not archived yet (live ones included): with "
                                "PIPELINE_ARCHIVE_URI set, a backlog that only grows means no "
                                "archiver runs, or the tables cannot be written")
    waiting.add_metric([], int(archive["backlog"]))
    yield waiting
    for name, key, text in (
            ("pipeline_archived_runs", "runs", "Runs the archiver wrote to the archive"),
            ("pipeline_archive_failures", "failures",
             "Batches the archiver could not write (each kept for the next pass)"),
            ("pipeline_archive_expired", "expired",
             "Runs that expired from Redis before the archiver reached them"),
            ("pipeline_archive_refused", "refused",
             "Runs the archiver left out: their rows could not be made (archive.refused in "
             "their log)")):
        counter = CounterMetricFamily(name, text)
        counter.add_metric([], int(archive.get(key, 0)))
        yield counter


def _limit_families(r: _Reading, agents: set[str]) -> Iterator[Metric]:
    """The limits the agents draw on, and the steps their runs' budgets stopped."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    over = CounterMetricFamily("pipeline_budget_exceeded",
                               "Steps that did not run because their run's budget was spent, "
                               "per agent (each stopped its run)", labels=["agent"])
    for agent in sorted(agents | r.over_budget.keys()):
        over.add_metric([agent], int(r.over_budget.get(agent, 0)))
    yield over
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        "in_flight": GaugeMetricFamily("pipeline_limit_in_flight",
                                       "Calls admitted under each limit and not settled",
                                       labels=["limit"]),
        "factor": GaugeMetricFamily("pipeline_limit_rate_factor",
                                    "What the API's 429s left of each limit's rates and "
                                    "concurrency (1: all of them)", labels=["limit"]),
        "tokens_reserved": GaugeMetricFamily("pipeline_limit_tokens_reserved",
                                             "Tokens reserved by calls in flight, per limit",
                                             labels=["limit"]),
        "throttled": CounterMetricFamily("pipeline_limit_throttled",
                                         "Calls each limit held back", labels=["limit"]),
        "throttled_s": CounterMetricFamily("pipeline_limit_throttled_seconds",
                                           "The waits each limit asked of the calls it held "
                                           "back", labels=["limit"]),
        "rate_limited": CounterMetricFamily("pipeline_limit_rate_limited",
                                            "Calls the API refused (429) under each limit",
                                            labels=["limit"]),
    }
    for state in r.limits:
        for field, family in families.items():
            family.add_metric([state.name], getattr(state, field))
    yield from families.values()


def _split(fields: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{"a:count": "3"}`` -> ``{"a": {"count": "3"}}``."""
    out: dict[str, dict[str, str]] = {}
    for key, value in fields.items():
        agent, _, part = key.rpartition(":")
        out.setdefault(agent, {})[part] = value
    return out


# -- serving ---------------------------------------------------------------------------


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            f"the exporter needs prometheus-client: {INSTALL_HINT}"
        ) from None
    return prometheus_client


def start(settings: Settings, address: str = DEFAULT_ADDRESS,
          port: int = DEFAULT_PORT) -> WSGIServer:
    """Serve ``/metrics`` on ``address:port`` from a daemon thread; ``shutdown()`` stops it.

    Imports the agent modules (the breakers are per agent). Raises
    ``ConfigurationError`` without the ``metrics`` extra or when the port is taken.
    """
    prometheus_client = _prometheus()
    import_agent_modules(settings.agent_modules)
    registry = prometheus_client.CollectorRegistry()
    registry.register(PipelineCollector(StateStore.from_settings(settings), agents=agents,
                                        workflows=[w.name for w in workflows]))
    try:
        server, _ = prometheus_client.start_wsgi_server(port, addr=address, registry=registry)
    except OSError as e:
        raise ConfigurationError(
            f"the exporter cannot listen on {address}:{port}: {e.strerror or e}; "
            "pass another --port or --address"
        ) from e
    return cast("WSGIServer", server)


def serve(settings: Settings, address: str = DEFAULT_ADDRESS, port: int = DEFAULT_PORT) -> None:
    """Serve ``/metrics`` until the process is stopped (``pipeline exporter``)."""
    server = start(settings, address, port)
    log.info("pipeline exporter: http://%s:%d/metrics", address, port)
    try:
        threading.Event().wait()
    finally:
        server.shutdown()
        server.server_close()
