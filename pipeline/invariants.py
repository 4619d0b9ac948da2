"""What must hold of every run once the fleet is quiet (``pipeline verify``, the soak).

Read from Redis alone, run by run:

- **finished**: ``succeeded``, ``compensated``, ``cancelled``, ``compensation_failed`` with
  its dead letters in ``pipeline:dead``, or ``failed`` with nothing sealed to undo;
- **versions**: contiguous from 0 (stream id ``N-1``), the run's head the last one, every
  parent an earlier version, every digest the SHA-256 of its payload, every step key
  sealed once;
- **compensation**: each step a failed run sealed (and each whose output broke its
  contract) compensated exactly once, dead at most once; none of a succeeded run;
- **side effects** (when the caller says how to read them, as the soak does for the
  credit ledger): none left by a compensated or cancelled run.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from .agent import agents
from .catalog import known_agents
from .keys import DEAD_LETTERS, RUNS_INDEX, RunKeys
from .route import EDIT_STEP, agent_of
from .state import StateStore, translate_errors
from .state.version import digest_of, made_by

__all__ = ["Violation", "Verdict", "verify"]

FINAL = ("succeeded", "compensated", "cancelled", "compensation_failed", "failed")
COMPENSATIONS = ("compensation.done", "compensation.dead", "step.self_compensated",
                 "step.self_compensation_failed")

SideEffects = Callable[[str], Mapping[str, Any]]
"""Run id -> the side effects its agents left (empty when all were undone)."""


@dataclass(frozen=True, slots=True)
class Violation:
    run_id: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"run {self.run_id}: {self.rule}: {self.detail}"


@dataclass(slots=True)
class Verdict:
    runs: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    versions: int = 0
    compensations: int = 0
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "by_status": dict(self.by_status), "versions": self.versions,
                "compensations": self.compensations, "ok": self.ok,
                "violations": [{"run_id": v.run_id, "rule": v.rule, "detail": v.detail}
                               for v in self.violations]}


BATCH = 200
"""Runs read per round trip."""


def verify(store: StateStore, run_ids: Iterable[str] | None = None, *,
           side_effects: SideEffects | None = None, verdict: Verdict | None = None) -> Verdict:
    """Check every run of ``run_ids`` (default: every run in ``pipeline:runs``), reading
    ``BATCH`` runs a round trip; add to ``verdict`` when given."""
    if run_ids is None:
        with translate_errors(store.url):
            run_ids = [str(r) for r in store.redis.zrange(RUNS_INDEX, 0, -1)]
    with translate_errors(store.url):
        dead = Counter(str(fields.get("run_id", "")) for _, fields in
                       cast(list[tuple[str, dict[str, str]]], store.redis.xrange(DEAD_LETTERS)))
        # which agents can undo a step: this process's own, else the fleet's catalog
        undoable = {name: card.compensates
                    for name, card in known_agents(store.redis, agents).items()}
    verdict = verdict if verdict is not None else Verdict()
    ids = list(run_ids)
    for start in range(0, len(ids), BATCH):
        batch = ids[start:start + BATCH]
        with translate_errors(store.url):
            pipe = store.redis.pipeline(transaction=False)
            for run_id in batch:
                keys = RunKeys(run_id)
                pipe.hgetall(keys.run)
                pipe.xrange(keys.states)
                pipe.hgetall(keys.steps)
                pipe.xrange(keys.log)
                pipe.hgetall(keys.saga)
            replies = pipe.execute()
        for i, run_id in enumerate(batch):
            run, states, steps, log, saga = replies[5 * i:5 * i + 5]
            _check(run_id, run, states, steps, log, saga, verdict, dead_letters=dead[run_id],
                   side_effects=side_effects, undoable=undoable)
    return verdict


def _check(run_id: str, run: dict[str, str], states: list[tuple[str, dict[str, str]]],
           steps: dict[str, str], log: list[tuple[str, dict[str, str]]], saga: dict[str, str],
           verdict: Verdict, *, dead_letters: int, side_effects: SideEffects | None,
           undoable: Mapping[str, bool]) -> None:
    if not run:
        return  # expired (retention) or never created: nothing left to hold anything of
    verdict.runs += 1
    status = run.get("status", "")
    verdict.by_status[status] += 1

    def violated(rule: str, detail: str) -> None:
        verdict.violations.append(Violation(run_id, rule, detail))

    sealed = _versions(run_id, run, states, steps, violated)
    verdict.versions += len(states)
    if status not in FINAL:
        violated("finished", f"still {status or 'without a status'}")
    elif status == "compensation_failed" and dead_letters == 0:
        violated("finished", "compensation_failed with no dead letter in pipeline:dead")
    elif status == "failed" and sealed:
        violated("finished", f"failed with {len(sealed)} sealed step(s) never compensated: "
                 f"{', '.join(sorted(sealed))}")
    elif status == "succeeded" and run.get("output_version") != run.get("head"):
        violated("finished", f"succeeded with output version {run.get('output_version')} "
                 f"but head {run.get('head')}")

    outcomes = Counter((e.get("step", ""), e["event"]) for _, e in log
                       if e.get("event") in COMPENSATIONS)
    verdict.compensations += sum(outcomes.values())
    if status == "succeeded":
        # A step whose output broke its contract and that fell back (fallback_on="failure")
        # undid its own attempt, once, before its stand-in was sealed: the run goes on.
        fell_back = {e.get("step", "") for _, e in log if e.get("event") == "step.fallback"}
        undone = {k: n for k, n in outcomes.items()
                  if not (k[0] in fell_back and k[1].startswith("step.self_compensat")
                          and n == 1)}
        claims = {k: v for k, v in saga.items()
                  if not (k.removeprefix("c:") in fell_back and v == "self")}
        if undone or claims:
            violated("compensation", f"a succeeded run has compensations: {dict(outcomes)}")
    elif status in ("compensated", "cancelled", "compensation_failed"):
        for step in sorted(sealed):  # the saga owes each of these exactly one outcome
            done = outcomes[(step, "compensation.done")]
            died = outcomes[(step, "compensation.dead")]
            # exactly once: done once, or dead (each re-drive of a dead one may die again)
            if done > 1 or (done == 0 and died == 0):
                violated("compensation", f"step {step} compensated {done} time(s) (dead "
                         f"{died} time(s)); expected exactly once")
            elif saga.get(f"c:{step}") != ("done" if done else "dead"):
                violated("compensation", f"step {step}: the saga records "
                         f"{saga.get(f'c:{step}')!r}, the log says {'done' if done else 'dead'}")
        # Never sealed, yet their side effects happened: an output that broke its contract,
        # a step that finished after the saga began (discarded). The saga or the step itself
        # undoes each, at most once; exactly once when its agent (known here or to the
        # fleet's catalog) can undo.
        unsealed = {e.get("step", "") for _, e in log
                    if (e.get("event") == "step.failed" and e.get("side") == "output")
                    or e.get("event") == "step.discarded"} - set(sealed)
        for step in sorted(unsealed):
            by_itself = (outcomes[(step, "step.self_compensated")]
                         + outcomes[(step, "step.self_compensation_failed")])
            by_saga = outcomes[(step, "compensation.done")] + outcomes[(step, "compensation.dead")]
            # a step that undid itself first still gets the saga's record of it (claim 'self')
            n = by_itself if by_itself else by_saga
            if n > 1 or (n == 0 and undoable.get(agent_of(step), False)):
                violated("compensation", f"step {step} (never sealed, its side effects "
                         f"happened) compensated {n} time(s); expected exactly once")
        extra = {s for s, _ in outcomes} - set(sealed) - unsealed
        if extra:
            violated("compensation", f"compensated step(s) that sealed nothing and broke no "
                     f"contract: {', '.join(sorted(extra))}")
        if status in ("compensated", "cancelled") and side_effects is not None:
            left = side_effects(run_id)
            if left:
                violated("side effects", f"left after compensation: {sorted(left)}")


def _versions(run_id: str, run: Mapping[str, str], states: list[tuple[str, dict[str, str]]],
              steps: Mapping[str, str], violated: Callable[[str, str], None]
              ) -> dict[str, int]:
    """Check the version stream; return the agent steps sealed (step key -> version)."""
    seen_steps: Counter[str] = Counter()
    sealed: dict[str, int] = {}
    for expected, (sid, fields) in enumerate(states):
        where = f"version {fields.get('version', '?')}"
        if sid != f"{expected}-1" or fields.get("version") != str(expected):
            violated("versions", f"{where} is stream entry {sid}, expected {expected}-1: "
                     "not contiguous from 0")
            continue
        if digest_of(fields.get("payload", "")) != fields.get("digest"):
            violated("versions", f"{where} ({made_by(fields.get('agent'))}): digest "
                     "does not match its payload")
        try:
            parents = [int(p) for p in json.loads(fields.get("parents", "[]"))]
        except (ValueError, TypeError):
            violated("versions", f"{where}: parents {fields.get('parents')!r} unreadable")
            parents = []
        if expected == 0 and parents:
            violated("versions", "version 0 has parents")
        for p in parents:
            if not 0 <= p < expected:
                violated("versions", f"{where}: parent {p} is not an earlier version")
        step = fields.get("step", "")
        seen_steps[step] += 1
        if steps.get(step) != str(expected):
            violated("versions", f"{where}: step {step} is recorded at version "
                     f"{steps.get(step)!r}")
        if expected > 0 and fields.get("degraded") != "1" and step != EDIT_STEP:
            sealed[step] = expected  # what a failed run must have undone
    if states and run.get("head") != str(len(states) - 1):
        violated("versions", f"head is {run.get('head')!r} but the last version is "
                 f"{len(states) - 1}")
    for step, n in seen_steps.items():
        if n > 1:
            violated("versions", f"step {step} sealed {n} times")
    return sealed
