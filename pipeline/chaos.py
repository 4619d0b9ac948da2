"""``PIPELINE_CHAOS``: make named agents misbehave on purpose .

``PIPELINE_CHAOS="agent=mode:probability[,agent=mode:probability...]"`` where
mode is ``error`` (raise), ``crash`` (kill the worker process), ``slow`` (sleep
past the agent's time limit) or ``bad_output`` (return output that breaks the
contract). The probability defaults to 1.

The spec is read when the settings are (``Settings``), so a spec that cannot be read stops
a worker before it is ready; ``check_agents`` then refuses an agent name that is a near miss
of one this process registers. Drawing (``draw``) never fails.
"""

from __future__ import annotations

import difflib
import functools
import math
import random
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from .errors import AgentError, ConfigurationError

CRASH_EXIT_CODE = 70
BAD_OUTPUT = {"chaos": "bad_output"}
VARIABLE = "PIPELINE_CHAOS"
NEAR_MISS_CUTOFF = 0.75
"""How alike (difflib's ratio) an unknown agent name and a registered one must be for the
unknown one to be taken for a typo of it."""


class ChaosMode(StrEnum):
    ERROR = "error"
    CRASH = "crash"
    SLOW = "slow"
    BAD_OUTPUT = "bad_output"


class ChaosError(AgentError):
    """Raised by an agent that ``PIPELINE_CHAOS`` told to fail."""


@dataclass(frozen=True, slots=True)
class Rule:
    agent: str
    mode: ChaosMode
    probability: float


ACCEPTED = (
    "expected agent=mode:probability[,agent=mode:probability...] with mode one of "
    f"{', '.join(m.value for m in ChaosMode)} and probability from 0 to 1 (default 1)"
)


@functools.lru_cache(maxsize=16)
def parse(spec: str) -> tuple[Rule, ...]:
    """The rules of ``spec``; ``ConfigurationError`` naming the part that cannot be read."""
    rules: list[Rule] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        rule = _rule(part)
        if isinstance(rule, str):
            raise ConfigurationError(
                f"{VARIABLE}={spec!r}: cannot read {part!r}: {rule}; {ACCEPTED}")
        rules.append(rule)
    return tuple(rules)


def _rule(part: str) -> Rule | str:
    """The rule ``part`` says, or what is wrong with it."""
    agent, sep, rest = (s.strip() for s in part.partition("="))
    if not sep or not agent:
        return "it is not agent=mode[:probability]"
    mode, sep, prob = (s.strip() for s in rest.partition(":"))
    modes = [m.value for m in ChaosMode]
    if mode not in modes:
        guess = difflib.get_close_matches(mode, modes, n=1)
        return f"unknown mode {mode!r}" + (f" (did you mean {guess[0]!r}?)" if guess else "")
    try:
        probability = float(prob) if sep else 1.0
    except ValueError:
        probability = math.nan
    if not 0.0 <= probability <= 1.0:  # NaN too
        return f"probability {prob!r} is not a number from 0 to 1"
    return Rule(agent, ChaosMode(mode), probability)


def check_agents(spec: str, registered: Collection[str]) -> list[str]:
    """Refuse a rule for an agent this process does not register when its name is a near
    miss of one it does (a typo); return the other unknown names.

    Those may be agents of another pool (a pool may import only some agent modules), so
    they are not refused: the rule fires only where the agent runs.
    """
    unknown: list[str] = []
    for rule in parse(spec):
        if rule.agent in registered or rule.agent in unknown:
            continue
        near = difflib.get_close_matches(rule.agent, sorted(registered), n=3,
                                         cutoff=NEAR_MISS_CUTOFF)
        if near:
            raise ConfigurationError(
                f"{VARIABLE}={spec!r}: no agent is named {rule.agent!r}; did you mean "
                f"{' or '.join(repr(n) for n in near)}? Agents of this process: "
                f"{', '.join(sorted(registered))}. If {rule.agent!r} is an agent of another "
                f"pool, set {VARIABLE} only on the pools that import it"
            )
        unknown.append(rule.agent)
    return unknown


def draw(spec: str, agent: str) -> ChaosMode | None:
    """The misbehaviour this call of ``agent`` should show, if any."""
    for rule in parse(spec):
        if rule.agent == agent and random.random() < rule.probability:
            return rule.mode
    return None
