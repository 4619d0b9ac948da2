"""``PIPELINE_CHAOS``: make named agents misbehave on purpose (DESIGN section 11).

``PIPELINE_CHAOS="agent=mode:probability[,agent=mode:probability...]"`` where
mode is ``error`` (raise), ``crash`` (kill the worker process), ``slow`` (sleep
past the agent's time limit) or ``bad_output`` (return output that breaks the
contract). The probability defaults to 1.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from enum import StrEnum

from .errors import AgentError, ConfigurationError

CRASH_EXIT_CODE = 70
BAD_OUTPUT = {"chaos": "bad_output"}


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


@functools.lru_cache(maxsize=16)
def parse(spec: str) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        agent, sep, rest = part.partition("=")
        mode, _, prob = rest.partition(":")
        try:
            rule = Rule(agent.strip(), ChaosMode(mode.strip()), float(prob) if prob else 1.0)
        except ValueError:
            rule = None
        if not sep or not agent.strip() or rule is None or not 0.0 <= rule.probability <= 1.0:
            raise ConfigurationError(
                f"PIPELINE_CHAOS: cannot read {part!r}; expected agent=mode:probability with "
                f"mode one of {', '.join(m.value for m in ChaosMode)} and 0 <= probability <= 1"
            )
        rules.append(rule)
    return tuple(rules)


def draw(spec: str, agent: str) -> ChaosMode | None:
    """The misbehaviour this call of ``agent`` should show, if any."""
    for rule in parse(spec):
        if rule.agent == agent and random.random() < rule.probability:
            return rule.mode
    return None
