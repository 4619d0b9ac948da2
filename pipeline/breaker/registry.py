"""One circuit breaker per agent, in Redis, shared by every worker on every host.

State changes only inside the Lua scripts beside this file, on Redis server
time, so there is no read-then-write race between workers (unlike
pybreaker's Redis storage) and a half-open probe holds a lease that expires
if its worker dies (unlike resilience4j#903).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from ..keys import breaker_key, breaker_log_key, breaker_probes_key
from ..lua import Arg, Batch, Client, Script, decoding_client, route
from ..state import translate_errors
from .policy import BreakerPolicy, BreakerState

_PKG = "pipeline.breaker"
ACQUIRE = Script(_PKG, "acquire.lua")
RECORD = Script(_PKG, "record.lua")
FORCE = Script(_PKG, "force.lua")

LOG_MAXLEN = 10_000
DEFAULT_PROBE_LEASE_S = 60.0


@dataclass(frozen=True, slots=True)
class Permit:
    """The breaker's answer to one call."""

    decision: str  # allow | probe | deny
    state: BreakerState
    wait_s: float  # until a call may be admitted; -1 when forced open
    transition: str  # '' or 'from>to'
    lease: str = ""

    @property
    def allowed(self) -> bool:
        return self.decision != "deny"

    def refusal(self, agent: str) -> str:
        """Why the call was refused, and for how long, in words."""
        why = f"agent {agent}'s breaker is {self.state.value}"
        if self.wait_s < 0:
            return why + " (forced open until reset)"
        if self.state is BreakerState.OPEN:
            return why + f" (half-open in {self.wait_s:.1f}s)"
        return why + f" (its probe slots are taken, for up to {self.wait_s:.1f}s)"


@dataclass(frozen=True, slots=True)
class Recorded:
    state: BreakerState
    transition: str
    seq: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What ``pipeline breakers`` shows for one agent."""

    agent: str
    state: BreakerState
    forced: bool
    consecutive_failures: int
    window: str
    successes: int
    failures: int
    rejected: int
    opened_at: float | None
    last_transition: dict[str, Any] | None
    half_open_in_s: float | None
    probes: int

    def to_dict(self) -> dict[str, Any]:
        failed = self.window.count("1")
        return {
            "agent": self.agent,
            "state": self.state.value,
            "forced": self.forced,
            "consecutive_failures": self.consecutive_failures,
            "window": {"calls": len(self.window), "failures": failed},
            "successes": self.successes,
            "failures": self.failures,
            "rejected": self.rejected,
            "opened_at": self.opened_at,
            "half_open_in_s": self.half_open_in_s,
            "probes": self.probes,
            "last_transition": self.last_transition,
        }


# Keys and policy arguments are built once per agent: they sit on every step's path.
@functools.lru_cache(maxsize=1024)
def _keys(agent: str) -> tuple[str, str, str]:
    return breaker_key(agent), breaker_log_key(agent), breaker_probes_key(agent)


@functools.lru_cache(maxsize=1024)
def _acquire_policy(agent: str, policy: BreakerPolicy, lease_s: float) -> tuple[Arg, ...]:
    return (agent, int(policy.reset_timeout_s * 1000), policy.half_open_max_calls,
            int((policy.probe_lease_s or lease_s) * 1000))


@functools.lru_cache(maxsize=1024)
def _record_policy(policy: BreakerPolicy) -> tuple[Arg, ...]:
    return (policy.failure_threshold, policy.window, policy.min_calls, policy.failure_rate)


def _acquire_args(agent: str, policy: BreakerPolicy, lease: str, lease_s: float) -> list[Arg]:
    return [*_acquire_policy(agent, policy, lease_s), lease, LOG_MAXLEN]


def _record_args(agent: str, policy: BreakerPolicy, outcome: str, lease: str,
                 reason: str) -> list[Arg]:
    return [agent, outcome, lease, *_record_policy(policy), reason[:200], LOG_MAXLEN]


class BreakerRegistry:
    """Asks and tells the breakers; every change is one atomic script."""

    def __init__(self, client: Client, *, url: str = "") -> None:
        self.redis = decoding_client(client, "BreakerRegistry")
        self.url = url

    # -- the two calls a step makes, queued on its own round trips -----------------

    def queue_acquire(self, batch: Batch, agent: str, policy: BreakerPolicy, lease: str,
                      lease_s: float) -> int:
        return batch.script(ACQUIRE, _keys(agent), _acquire_args(agent, policy, lease, lease_s))

    @staticmethod
    def permit(reply: Any, lease: str) -> Permit:
        if isinstance(reply, Exception):
            raise reply
        decision, state, wait_ms, transition = reply
        wait_s = -1.0 if wait_ms == "-1" else int(wait_ms) / 1000.0
        return Permit(decision, BreakerState(state), wait_s, transition,
                      lease if decision == "probe" else "")

    def queue_record(self, batch: Batch, agent: str, policy: BreakerPolicy, outcome: str,
                     lease: str = "", reason: str = "") -> int:
        return batch.script(RECORD, _keys(agent),
                            _record_args(agent, policy, outcome, lease, reason))

    @staticmethod
    def recorded(reply: Any) -> Recorded:
        if isinstance(reply, Exception):
            raise reply
        state, transition, seq = reply
        return Recorded(BreakerState(state), transition, int(seq))

    # -- the same, each in a round trip of its own -----------------------------------

    def acquire(self, agent: str, policy: BreakerPolicy, lease: str,
                lease_s: float = DEFAULT_PROBE_LEASE_S) -> Permit:
        with translate_errors(self.url):
            reply = ACQUIRE(self.redis, _keys(agent), _acquire_args(agent, policy, lease, lease_s))
        return self.permit(reply, lease)

    def record(self, agent: str, policy: BreakerPolicy, outcome: str, lease: str = "",
               reason: str = "") -> Recorded:
        with translate_errors(self.url):
            reply = RECORD(self.redis, _keys(agent),
                           _record_args(agent, policy, outcome, lease, reason))
        return self.recorded(reply)

    def force_open(self, agent: str, reason: str = "forced open by hand") -> None:
        with translate_errors(self.url):
            FORCE(self.redis, _keys(agent), [agent, "open", reason, LOG_MAXLEN])

    def reset(self, agent: str, reason: str = "reset by hand") -> None:
        with translate_errors(self.url):
            FORCE(self.redis, _keys(agent), [agent, "closed", reason, LOG_MAXLEN])

    # -- reads -----------------------------------------------------------------------

    def snapshot(self, agent: str, policy: BreakerPolicy) -> Snapshot:
        return self.snapshots([(agent, policy)])[0]

    def snapshots(self, agents: Iterable[tuple[str, BreakerPolicy]]) -> list[Snapshot]:
        """Every breaker's state in one round trip, timed by the clock of the Redis that
        holds it (its scripts' clock): on a cluster, one TIME per node."""
        pairs = list(agents)
        if not pairs:
            return []
        clocks: dict[str, int] = {}  # node -> index of its TIME among the replies
        clock_of: list[int] = []
        with translate_errors(self.url):
            pipe = self.redis.pipeline(transaction=False)
            for agent, _ in pairs:
                pipe.hgetall(breaker_key(agent))
                pipe.zrange(breaker_probes_key(agent), 0, -1, withscores=True)
            for agent, _ in pairs:
                where = route(self.redis, breaker_key(agent))
                node = str(getattr(where.get("target_nodes"), "name", ""))
                if node not in clocks:
                    clocks[node] = 2 * len(pairs) + len(clocks)
                    pipe.execute_command("TIME", **where)  # pipe.time() is refused on a cluster
                clock_of.append(clocks[node])
            replies = pipe.execute()
        out = []
        for i, (agent, policy) in enumerate(pairs):
            seconds, micros = replies[clock_of[i]]
            now = seconds + micros / 1e6
            h = cast(dict[str, str], replies[2 * i])
            state = BreakerState(h.get("state", "closed"))
            opened = int(h["opened_at"]) / 1000.0 if h.get("opened_at") else None
            forced = h.get("forced") == "1"
            half_open_in = None
            if state is BreakerState.OPEN and opened is not None and not forced:
                half_open_in = max(0.0, opened + policy.reset_timeout_s - now)
            last = None
            if h.get("last_to"):
                last = {"from": h.get("last_from", ""), "to": h["last_to"],
                        "reason": h.get("last_reason", ""),
                        "at": int(h.get("last_at", "0")) / 1000.0}
            out.append(Snapshot(
                agent=agent, state=state, forced=forced,
                consecutive_failures=int(h.get("consecutive", 0)), window=h.get("calls", ""),
                successes=int(h.get("successes", 0)), failures=int(h.get("failures", 0)),
                rejected=int(h.get("rejected", 0)), opened_at=opened,
                last_transition=last, half_open_in_s=half_open_in,
                probes=sum(1 for _, until in replies[2 * i + 1] if until > now * 1000),
            ))
        return out

    def transitions(self, agent: str) -> list[dict[str, str]]:
        with translate_errors(self.url):
            entries = cast(list[tuple[str, dict[str, str]]],
                           self.redis.xrange(breaker_log_key(agent)))
        return [{"id": sid, **fields} for sid, fields in entries]
