"""The breaker registry against a real Redis: the state machine transition by
transition, probe leases, exactness under several processes, and snapshots."""

from __future__ import annotations

import multiprocessing
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from pipeline.breaker import BreakerPolicy, BreakerRegistry, BreakerState, Permit
from pipeline.state import connect
from tests.conftest import wait_for

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
SPAWN = multiprocessing.get_context("spawn")

# INCR the number of probes running now and keep the highest value ever seen.
ENTER_PROBE = (
    "local v = redis.call('INCR', KEYS[1]) "
    "if v > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], v) end "
    "return v"
)


def new_agent() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def new_lease() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def registry(redis_url: str) -> BreakerRegistry:
    return BreakerRegistry(connect(redis_url), url=redis_url)


def fail_times(registry: BreakerRegistry, agent: str, policy: BreakerPolicy, n: int) -> None:
    for _ in range(n):
        registry.record(agent, policy, "failure", reason="boom")


def wait_for_probe(registry: BreakerRegistry, agent: str, policy: BreakerPolicy,
                   lease: str | None = None, timeout_s: float = 5.0) -> Permit:
    """Ask until the breaker admits a probe (it must have half-opened, or a lease freed)."""
    lease = lease or new_lease()

    def probe() -> Permit | None:
        permit = registry.acquire(agent, policy, lease)
        return permit if permit.decision == "probe" else None

    permit = wait_for(probe, timeout_s=timeout_s, message=f"a probe on {agent}")
    assert isinstance(permit, Permit)
    return permit


def moves(registry: BreakerRegistry, agent: str) -> list[tuple[str, str]]:
    return [(t["from"], t["to"]) for t in registry.transitions(agent)]


def open_then_probe(registry: BreakerRegistry, agent: str, policy: BreakerPolicy) -> Permit:
    fail_times(registry, agent, policy, policy.failure_threshold)
    return wait_for_probe(registry, agent, policy)


# -- closed -----------------------------------------------------------------------------


def test_a_closed_breaker_stays_closed_below_the_threshold_and_a_success_resets_the_count(
        registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=3, window=20, min_calls=20)
    for _ in range(3):  # twice: two failures, then a success forgives them
        fail_times(registry, agent, policy, 2)
        assert registry.snapshot(agent, policy).consecutive_failures == 2
        r = registry.record(agent, policy, "success")
        assert (r.state, r.transition) == (CLOSED, "")
        assert registry.snapshot(agent, policy).consecutive_failures == 0
    permit = registry.acquire(agent, policy, new_lease())
    assert (permit.decision, permit.state, permit.wait_s, permit.lease) == ("allow", CLOSED, 0, "")
    snap = registry.snapshot(agent, policy)
    assert (snap.state, snap.successes, snap.failures) == (CLOSED, 3, 6)
    assert registry.transitions(agent) == []


def test_consecutive_failures_open_the_breaker_and_log_who_when_and_why(
        registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=3)
    before_ms = registry.redis.time()[0] * 1000
    fail_times(registry, agent, policy, 2)
    r = registry.record(agent, policy, "failure", reason="upstream 503")
    assert (r.state, r.transition) == (OPEN, "closed>open")
    [entry] = registry.transitions(agent)
    assert {"at", "agent", "from", "to", "reason"} <= entry.keys()
    assert (entry["agent"], entry["from"], entry["to"]) == (agent, "closed", "open")
    assert entry["reason"] == "3 consecutive failures, last: upstream 503"
    assert before_ms <= int(entry["at"]) <= before_ms + 5_000
    snap = registry.snapshot(agent, policy)
    assert snap.opened_at == int(entry["at"]) / 1000.0


# -- open -------------------------------------------------------------------------------


def test_an_open_breaker_denies_calls_with_a_countdown_and_counts_them_rejected(
        registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=2, reset_timeout_s=5)
    fail_times(registry, agent, policy, 2)
    first = registry.acquire(agent, policy, new_lease())
    assert (first.decision, first.state, first.allowed, first.lease) == ("deny", OPEN, False, "")
    assert 0 < first.wait_s <= 5.0

    def later() -> Permit | None:
        permit = registry.acquire(agent, policy, new_lease())
        assert (permit.decision, permit.state) == ("deny", OPEN)
        return permit if permit.wait_s < first.wait_s else None

    counted_down = wait_for(later, timeout_s=2.0, message="the countdown to move")
    assert isinstance(counted_down, Permit) and counted_down.wait_s > 0
    snap = registry.snapshot(agent, policy)
    assert snap.rejected >= 2
    registry.acquire(agent, policy, new_lease())
    assert registry.snapshot(agent, policy).rejected == snap.rejected + 1
    assert moves(registry, agent) == [("closed", "open")]


def test_after_the_reset_timeout_the_next_call_half_opens_the_breaker_as_a_probe(
        registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=2, reset_timeout_s=0.2)
    fail_times(registry, agent, policy, 2)
    lease = new_lease()
    permit = wait_for_probe(registry, agent, policy, lease)
    assert (permit.state, permit.transition, permit.lease) == (HALF_OPEN, "open>half_open", lease)
    assert permit.allowed
    entry = registry.transitions(agent)[-1]
    assert (entry["from"], entry["to"], entry["reason"]) == (
        "open", "half_open", "reset timeout elapsed")
    snap = registry.snapshot(agent, policy)
    assert (snap.state, snap.probes, snap.half_open_in_s) == (HALF_OPEN, 1, None)


# -- half-open --------------------------------------------------------------------------


def test_a_half_open_breaker_denies_a_second_call_while_the_probe_holds_its_lease(
        registry: BreakerRegistry) -> None:
    agent = new_agent()
    policy = BreakerPolicy(failure_threshold=2, reset_timeout_s=0.2, probe_lease_s=30)
    open_then_probe(registry, agent, policy)
    for _ in range(3):
        second = registry.acquire(agent, policy, new_lease())
        assert (second.decision, second.state, second.transition) == ("deny", HALF_OPEN, "")
        assert 25 < second.wait_s <= 30  # until the probe's lease runs out
    snap = registry.snapshot(agent, policy)
    assert (snap.state, snap.probes) == (HALF_OPEN, 1)
    assert snap.rejected >= 3


def test_a_successful_probe_closes_the_breaker_and_clears_the_window(
        registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=3, reset_timeout_s=0.2)
    registry.record(agent, policy, "success")
    probe = open_then_probe(registry, agent, policy)
    assert registry.snapshot(agent, policy).window == "0111"
    r = registry.record(agent, policy, "success", lease=probe.lease)
    assert (r.state, r.transition) == (CLOSED, "half_open>closed")
    snap = registry.snapshot(agent, policy)
    assert (snap.state, snap.consecutive_failures, snap.window, snap.probes) == (CLOSED, 0, "", 0)
    assert registry.acquire(agent, policy, new_lease()).decision == "allow"
    assert moves(registry, agent) == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert registry.transitions(agent)[-1]["reason"] == "probe succeeded"
    # a fresh count: it takes the full threshold again to open
    fail_times(registry, agent, policy, 2)
    assert registry.snapshot(agent, policy).state is CLOSED


def test_a_failed_probe_reopens_the_breaker_and_restarts_the_timer(
        registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=2, reset_timeout_s=0.4)
    probe = open_then_probe(registry, agent, policy)
    first_opened = registry.snapshot(agent, policy).opened_at
    assert first_opened is not None
    r = registry.record(agent, policy, "failure", lease=probe.lease, reason="still down")
    assert (r.state, r.transition) == (OPEN, "half_open>open")
    entry = registry.transitions(agent)[-1]
    assert (entry["from"], entry["to"], entry["reason"]) == (
        "half_open", "open", "probe failed: still down")
    snap = registry.snapshot(agent, policy)
    assert snap.state is OPEN and snap.opened_at == int(entry["at"]) / 1000.0
    assert snap.opened_at >= first_opened + 0.4  # the failure time, not the first opening
    # the old timer has long run out; a prompt call is denied on the new one
    again = registry.acquire(agent, policy, new_lease())
    assert (again.decision, again.state) == ("deny", OPEN)
    assert 0.2 < again.wait_s <= 0.4
    wait_for_probe(registry, agent, policy)
    assert moves(registry, agent) == [("closed", "open"), ("open", "half_open"),
                                      ("half_open", "open"), ("open", "half_open")]


# -- the failure-rate rule --------------------------------------------------------------


def test_alternating_outcomes_never_open_the_breaker_by_failure_rate(
        registry: BreakerRegistry) -> None:
    agent = new_agent()
    policy = BreakerPolicy(failure_threshold=5, window=10, min_calls=5, failure_rate=0.5)
    for _ in range(20):
        for outcome in ("success", "failure"):
            assert registry.record(agent, policy, outcome).state is CLOSED
    snap = registry.snapshot(agent, policy)
    assert (snap.window, snap.to_dict()["window"]) == ("01" * 5, {"calls": 10, "failures": 5})
    assert registry.transitions(agent) == []


def test_six_failures_in_ten_calls_open_the_breaker_without_five_in_a_row(
        registry: BreakerRegistry) -> None:
    agent = new_agent()
    policy = BreakerPolicy(failure_threshold=5, window=10, min_calls=5, failure_rate=0.5)
    outcomes = "SSSSFFFFSFF"  # 4/8 is not over half; the last call makes 6 of the last 10
    for i, o in enumerate(outcomes):
        r = registry.record(agent, policy, "failure" if o == "F" else "success")
        assert r.state is (OPEN if i == len(outcomes) - 1 else CLOSED)
    assert r.transition == "closed>open"
    snap = registry.snapshot(agent, policy)
    assert (snap.consecutive_failures, snap.window) == (2, "0001111011")
    [entry] = registry.transitions(agent)
    assert entry["reason"] == "failure rate 6/10 over the last 10 calls"


def test_the_failure_rate_counts_only_once_the_window_holds_min_calls(
        registry: BreakerRegistry) -> None:
    agent = new_agent()
    policy = BreakerPolicy(failure_threshold=5, window=10, min_calls=5, failure_rate=0.5)
    for o in ("failure", "failure", "failure", "success"):  # 3 of 4 failed, but only 4 calls
        assert registry.record(agent, policy, o).state is CLOSED
    r = registry.record(agent, policy, "success")  # 3 of 5: even a success tips it
    assert (r.state, r.transition) == (OPEN, "closed>open")
    assert registry.transitions(agent)[0]["reason"] == "failure rate 3/5 over the last 5 calls"


# -- outcomes that prove nothing ---------------------------------------------------------


def test_an_ignored_outcome_changes_nothing(registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=3, reset_timeout_s=0.2)
    fail_times(registry, agent, policy, 2)
    before = registry.snapshot(agent, policy)
    for _ in range(5):
        assert registry.record(agent, policy, "ignore").state is CLOSED
    assert registry.snapshot(agent, policy) == before

    # nor does a probe that proved nothing: the breaker stays half-open, its slot frees
    fail_times(registry, agent, policy, 1)
    probe = wait_for_probe(registry, agent, policy)
    before, log = registry.snapshot(agent, policy), registry.transitions(agent)
    r = registry.record(agent, policy, "ignore", lease=probe.lease)
    assert (r.state, r.transition) == (HALF_OPEN, "")
    after = registry.snapshot(agent, policy)
    assert (after.state, after.successes, after.failures, after.window) == (
        HALF_OPEN, before.successes, before.failures, before.window)
    assert after.probes == 0 and registry.transitions(agent) == log
    assert registry.acquire(agent, policy, new_lease()).decision == "probe"


# -- by hand ----------------------------------------------------------------------------


def test_a_forced_open_breaker_stays_open_past_the_reset_timeout_until_reset(
        registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(reset_timeout_s=0.2)
    registry.force_open(agent, reason="maintenance")
    permit = registry.acquire(agent, policy, new_lease())
    assert (permit.decision, permit.state, permit.wait_s) == ("deny", OPEN, -1.0)
    time.sleep(0.3)  # well past the reset timeout
    for _ in range(3):
        permit = registry.acquire(agent, policy, new_lease())
        assert (permit.decision, permit.state, permit.wait_s) == ("deny", OPEN, -1.0)
    snap = registry.snapshot(agent, policy)
    assert (snap.state, snap.forced, snap.half_open_in_s, snap.rejected) == (OPEN, True, None, 4)
    registry.reset(agent, reason="fixed")
    assert registry.acquire(agent, policy, new_lease()).decision == "allow"
    assert registry.snapshot(agent, policy).forced is False
    log = registry.transitions(agent)
    assert [(t["from"], t["to"], t["reason"]) for t in log] == [
        ("closed", "open", "maintenance"), ("open", "closed", "fixed")]


def test_forcing_open_a_half_open_breaker_frees_its_probes(registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=1, reset_timeout_s=0.2)
    probe = open_then_probe(registry, agent, policy)
    registry.force_open(agent)
    assert registry.snapshot(agent, policy).probes == 0
    r = registry.record(agent, policy, "success", lease=probe.lease)
    assert (r.state, r.transition) == (OPEN, "")  # the probe's lease went with the half-open
    assert registry.acquire(agent, policy, new_lease()).wait_s == -1.0


def test_reset_closes_the_breaker_and_clears_its_counters(registry: BreakerRegistry) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=3, reset_timeout_s=0.2)
    registry.record(agent, policy, "success")
    open_then_probe(registry, agent, policy)  # half-open, one probe holding a lease
    registry.reset(agent)
    snap = registry.snapshot(agent, policy)
    assert (snap.state, snap.forced, snap.consecutive_failures, snap.window, snap.probes) == (
        CLOSED, False, 0, "", 0)
    assert snap.last_transition is not None
    assert (snap.last_transition["from"], snap.last_transition["to"]) == ("half_open", "closed")
    assert registry.acquire(agent, policy, new_lease()).decision == "allow"
    fail_times(registry, agent, policy, 2)  # the count starts again from zero
    assert registry.snapshot(agent, policy).state is CLOSED
    fail_times(registry, agent, policy, 1)
    assert registry.snapshot(agent, policy).state is OPEN


# -- a dead probe -----------------------------------------------------------------------


def test_a_dead_probes_lease_expires_and_its_late_outcome_changes_nothing(
        registry: BreakerRegistry) -> None:
    agent = new_agent()
    policy = BreakerPolicy(failure_threshold=2, reset_timeout_s=0.2, probe_lease_s=0.5)
    dead = open_then_probe(registry, agent, policy)  # its worker dies: it never records
    asked = time.monotonic()
    denied = registry.acquire(agent, policy, new_lease())
    assert (denied.decision, denied.state) == ("deny", HALF_OPEN)
    assert 0.3 < denied.wait_s <= 0.5  # until the dead probe's lease runs out
    lease_ends = asked + denied.wait_s

    live = wait_for_probe(registry, agent, policy)
    late_by = time.monotonic() - lease_ends
    assert -0.05 < late_by < 0.3  # admitted once the lease ran out, not before, nor much after
    assert live.transition == ""  # still the same half-open spell
    assert registry.snapshot(agent, policy).probes == 1

    late = registry.record(agent, policy, "failure", lease=dead.lease, reason="late")
    assert (late.state, late.transition) == (HALF_OPEN, "")
    assert registry.acquire(agent, policy, new_lease()).decision == "deny"  # live one holds
    r = registry.record(agent, policy, "success", lease=live.lease)
    assert (r.state, r.transition) == (CLOSED, "half_open>closed")
    assert moves(registry, agent) == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


# -- exactness under concurrency --------------------------------------------------------


@dataclass
class SerialModel:
    """The closed/open rules of record.lua, applied one call at a time."""

    policy: BreakerPolicy
    state: str = "closed"
    consecutive: int = 0
    calls: str = ""
    successes: int = 0
    failures: int = 0
    transitions: list[tuple[str, str]] = field(default_factory=list)

    def record(self, outcome: str) -> str:
        if outcome == "success":
            self.successes += 1
        elif outcome == "failure":
            self.failures += 1
        if self.state != "closed" or outcome == "ignore":
            return ""  # admitted before the breaker opened: counted, not judged
        failed = outcome == "failure"
        self.calls = (self.calls + ("1" if failed else "0"))[-self.policy.window:]
        self.consecutive = self.consecutive + 1 if failed else 0
        n = len(self.calls)
        if self.consecutive >= self.policy.failure_threshold or (
                n >= self.policy.min_calls
                and self.calls.count("1") / n > self.policy.failure_rate):
            return self._move("open")
        return ""

    def reset(self) -> None:  # a reset by hand clears the totals too
        self.consecutive, self.calls = 0, ""
        self.successes = self.failures = 0
        self._move("closed")

    def _move(self, to: str) -> str:
        self.transitions.append((self.state, to))
        transition, self.state = f"{self.state}>{to}", to
        return transition


CONCURRENT_POLICY = {"failure_threshold": 5, "window": 20, "min_calls": 10,
                     "failure_rate": 0.5, "reset_timeout_s": 3600}


def outcomes_for(seed: int, count: int) -> list[str]:
    """Mostly successes, then a stretch bad enough that the breaker surely opens."""
    rng = random.Random(seed)
    return ["failure" if rng.random() < (0.15 if i < count // 2 else 0.6) else "success"
            for i in range(count)]


def _record_sequence(url: str, agent: str, seed: int, count: int, start: Any,
                     out: Any) -> None:
    registry = BreakerRegistry(connect(url), url=url)
    policy = BreakerPolicy(**CONCURRENT_POLICY)  # type: ignore[arg-type]
    calls = []
    start.wait(30)
    for outcome in outcomes_for(seed, count):
        r = registry.record(agent, policy, outcome, reason=f"seed {seed}")
        calls.append((r.seq, outcome, r.transition))
    out.put(calls)


def record_from_processes(url: str, agent: str, seeds: list[int],
                          count: int) -> list[tuple[int, str, str]]:
    start, out = SPAWN.Barrier(len(seeds)), SPAWN.Queue()
    procs = [SPAWN.Process(target=_record_sequence, args=(url, agent, seed, count, start, out))
             for seed in seeds]
    for p in procs:
        p.start()
    calls = [call for _ in procs for call in out.get(timeout=60)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return sorted(calls)


def test_four_processes_recording_at_once_match_a_serial_model(
        registry: BreakerRegistry, redis_url: str) -> None:
    agent, policy = new_agent(), BreakerPolicy(**CONCURRENT_POLICY)  # type: ignore[arg-type]
    model = SerialModel(policy)
    for round_, seeds in enumerate(([11, 12, 13, 14], [21, 22, 23, 24])):
        if round_:
            registry.reset(agent)
            model.reset()
        calls = record_from_processes(redis_url, agent, seeds, 300)
        seqs = [seq for seq, _, _ in calls]
        assert seqs == list(range(seqs[0], seqs[0] + 1200))  # each call applied exactly once
        opened_at_seq = []
        for seq, outcome, transition in calls:  # in the order Redis applied them
            expected = model.record(outcome)
            assert transition == expected, f"call {seq}"
            if expected:
                opened_at_seq.append(seq)
        assert len(opened_at_seq) == 1, "the model must open once per round"

        snap = registry.snapshot(agent, policy)
        assert snap.state.value == model.state == "open"
        assert (snap.successes, snap.failures) == (model.successes, model.failures)
        assert (snap.consecutive_failures, snap.window) == (model.consecutive, model.calls)
        assert moves(registry, agent) == model.transitions
    assert model.transitions == [("closed", "open"), ("open", "closed"), ("closed", "open")]


def _hammer_probes(url: str, agent: str, duration_s: float, start: Any, out: Any) -> None:
    client = connect(url)
    registry = BreakerRegistry(client, url=url)
    policy = BreakerPolicy(failure_threshold=1, reset_timeout_s=0.2, half_open_max_calls=2)
    enter = client.register_script(ENTER_PROBE)
    active, most = f"test:active:{agent}", f"test:max:{agent}"
    admitted, decisions = 0, set()
    start.wait(30)
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        permit = registry.acquire(agent, policy, new_lease())
        decisions.add((permit.decision, permit.state.value))
        if permit.decision == "probe":
            admitted += 1
            enter(keys=[active, most])
            time.sleep(0.001)  # the call itself
            client.decr(active)
            registry.record(agent, policy, "ignore", lease=permit.lease)
    out.put((admitted, sorted(decisions)))


def test_a_half_open_breaker_never_admits_more_probes_at_once_than_allowed(
        registry: BreakerRegistry, redis_url: str) -> None:
    agent = new_agent()
    policy = BreakerPolicy(failure_threshold=1, reset_timeout_s=0.2, half_open_max_calls=2)
    probe = open_then_probe(registry, agent, policy)
    registry.record(agent, policy, "ignore", lease=probe.lease)

    start, out = SPAWN.Barrier(4), SPAWN.Queue()
    procs = [SPAWN.Process(target=_hammer_probes, args=(redis_url, agent, 2.0, start, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0

    assert sum(admitted for admitted, _ in results) > 10
    seen = {d for _, decisions in results for d in decisions}
    assert seen == {("probe", "half_open"), ("deny", "half_open")}
    assert registry.redis.get(f"test:active:{agent}") == "0"
    assert int(registry.redis.get(f"test:max:{agent}") or 0) == 2  # reached, never passed
    snap = registry.snapshot(agent, policy)
    assert (snap.state, snap.probes, snap.successes) == (HALF_OPEN, 0, 0)
    assert moves(registry, agent) == [("closed", "open"), ("open", "half_open")]
    registry.redis.delete(f"test:active:{agent}", f"test:max:{agent}")


# -- one breaker for the fleet ----------------------------------------------------------


def _open_from_elsewhere(url: str, agent: str, how: str) -> None:
    registry = BreakerRegistry(connect(url), url=url)
    if how == "forced":
        registry.force_open(agent, reason="opened from another process")
    else:
        fail_times(registry, agent, BreakerPolicy(failure_threshold=3), 3)


@pytest.mark.parametrize("how", ["forced", "failures"])
def test_a_breaker_opened_in_one_process_is_seen_at_once_by_another(
        registry: BreakerRegistry, redis_url: str, how: str) -> None:
    agent, policy = new_agent(), BreakerPolicy(failure_threshold=3)
    assert registry.acquire(agent, policy, new_lease()).decision == "allow"
    p = SPAWN.Process(target=_open_from_elsewhere, args=(redis_url, agent, how))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    permit = registry.acquire(agent, policy, new_lease())
    assert (permit.decision, permit.state) == ("deny", OPEN)
    if how == "forced":
        assert permit.wait_s == -1.0
    else:
        assert 0 < permit.wait_s <= policy.reset_timeout_s


# -- snapshots --------------------------------------------------------------------------


def test_a_snapshot_reports_state_counters_window_last_transition_and_time_to_half_open(
        registry: BreakerRegistry) -> None:
    agent = new_agent()
    policy = BreakerPolicy(failure_threshold=3, window=10, min_calls=10, reset_timeout_s=5)
    for o in ("success", "failure", "success", "failure", "failure", "failure"):
        registry.record(agent, policy, o, reason="timeout")
    registry.acquire(agent, policy, new_lease())
    snap = registry.snapshot(agent, policy)
    assert (snap.agent, snap.state, snap.forced) == (agent, OPEN, False)
    assert (snap.successes, snap.failures, snap.rejected, snap.probes) == (2, 4, 1, 0)
    assert (snap.consecutive_failures, snap.window) == (3, "010111")
    assert snap.half_open_in_s is not None and 0 < snap.half_open_in_s <= 5
    assert snap.opened_at is not None and snap.last_transition is not None
    assert snap.last_transition["from"] == "closed" and snap.last_transition["to"] == "open"
    assert snap.last_transition["reason"] == "3 consecutive failures, last: timeout"
    assert float(snap.last_transition["at"]) == snap.opened_at
    d = snap.to_dict()
    assert d["state"] == "open" and d["window"] == {"calls": 6, "failures": 4}
    assert d["last_transition"] == snap.last_transition
    assert d["half_open_in_s"] == snap.half_open_in_s


def test_a_snapshot_of_an_unknown_agent_is_a_closed_breaker_with_nothing_counted(
        registry: BreakerRegistry) -> None:
    snap = registry.snapshot(new_agent(), BreakerPolicy())
    assert (snap.state, snap.forced, snap.successes, snap.failures, snap.rejected) == (
        CLOSED, False, 0, 0, 0)
    assert (snap.window, snap.opened_at, snap.last_transition, snap.half_open_in_s) == (
        "", None, None, None)


def test_snapshots_of_several_agents_come_back_in_the_order_asked(
        registry: BreakerRegistry) -> None:
    quick, slow = BreakerPolicy(failure_threshold=1, reset_timeout_s=0.2), BreakerPolicy()
    opened, closed, half = new_agent(), new_agent(), new_agent()
    registry.force_open(opened)
    registry.record(closed, slow, "success")
    open_then_probe(registry, half, quick)
    snaps = registry.snapshots([(opened, slow), (closed, slow), (half, quick)])
    assert [(s.agent, s.state, s.probes) for s in snaps] == [
        (opened, OPEN, 0), (closed, CLOSED, 0), (half, HALF_OPEN, 1)]
    assert snaps[0].half_open_in_s is None  # forced: no half-open to wait for


def test_a_probe_delivered_again_keeps_its_own_lease(registry: BreakerRegistry) -> None:
    """A probe whose worker died is delivered again with the same lease id: it must
    get its slot back, not be refused by its own lease."""
    agent = f"t{uuid.uuid4().hex[:8]}"
    policy = BreakerPolicy(failure_threshold=1, reset_timeout_s=0.05, window=1, min_calls=1)
    registry.record(agent, policy, "failure")
    wait_for(lambda: registry.acquire(agent, policy, "task-1:0", 30).decision == "probe",
             message="the breaker to half-open")
    assert registry.acquire(agent, policy, "task-1:0", 30).decision == "probe"
    assert registry.acquire(agent, policy, "task-2:0", 30).decision == "deny"


def test_an_excluded_error_says_nothing_of_the_agents_health() -> None:
    from pipeline.agent import Agent
    from pipeline.errors import ContractViolation
    from pipeline.step.gate import outcome_of

    class Rejected(Exception):
        pass

    a = Agent(name="t_excluded", execute=lambda p, c: p, input="count@1", output="count@1",
              breaker=BreakerPolicy(excluded=(Rejected,)))
    assert outcome_of(a, Rejected("no")) == "ignore"
    assert outcome_of(a, RuntimeError("down")) == "failure"
    assert outcome_of(a, ContractViolation("x", side="output")) == "failure"
    assert outcome_of(a, ContractViolation("x", side="input")) == "ignore"


def test_a_configuration_error_says_nothing_of_the_agents_health() -> None:
    from pipeline.agent import Agent
    from pipeline.errors import ConfigurationError, UnknownContract
    from pipeline.step.gate import outcome_of

    a = Agent(name="t_configured", execute=lambda p, c: p, input="count@1", output="count@1")
    assert outcome_of(a, ConfigurationError("PIPELINE_CHAOS='x=eror': ...")) == "ignore"
    assert outcome_of(a, UnknownContract("unknown contract count@9")) == "ignore"
