"""A run's budget in tokens and/or cost, and what its steps spent and reserved of it.

A workflow (or one ``start(..., budget=...)``) gives the run a budget, kept in the run's
record. Each step reserves its estimate when it opens (``open_step.lua``: a step that would
cross the budget does not run, and the run fails with ``BudgetExceeded``) and is charged
what it used when it seals (``seal.lua``): both in the step's own round trips, once per step
key however often its message is delivered. Cost is tokens times the prices per 1,000
tokens of the first limit the agent draws on that has prices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import DefinitionError

__all__ = ["Budget", "Spending"]


@dataclass(frozen=True, slots=True)
class Budget:
    """At most ``tokens`` (prompt and completion) and/or ``cost`` (in the unit of the
    limits' prices) for one run."""

    tokens: int | None = None
    cost: float | None = None

    def __post_init__(self) -> None:
        if self.tokens is not None and (isinstance(self.tokens, bool)
                                        or not isinstance(self.tokens, int) or self.tokens < 0):
            raise DefinitionError(f"budget tokens={self.tokens!r} must be a whole number >= 0")
        if self.cost is not None and (isinstance(self.cost, bool)
                                      or not isinstance(self.cost, int | float)
                                      or not math.isfinite(self.cost) or self.cost < 0):
            raise DefinitionError(f"budget cost={self.cost!r} must be a number >= 0")
        if self.tokens is None and self.cost is None:
            raise DefinitionError("a budget needs tokens or cost (or both)")

    def args(self) -> list[str]:
        """For ``create_run.lua``: tokens and cost, '' for none."""
        return ["" if self.tokens is None else str(self.tokens),
                "" if self.cost is None else repr(float(self.cost))]

    def describe(self) -> str:
        parts = ([f"{self.tokens:,} tokens"] if self.tokens is not None else []) \
            + ([f"cost {self.cost:g}"] if self.cost is not None else [])
        return " and ".join(parts)


@dataclass(frozen=True, slots=True)
class Spending:
    """A run's budget, what its sealed steps spent and what its open steps reserved."""

    budget: Budget
    spent_tokens: int = 0
    spent_cost: float = 0.0
    reserved_tokens: int = 0
    reserved_cost: float = 0.0

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Spending | None:
        """From the run's record; None for a run without a budget."""
        if not h.get("budget_tokens") and not h.get("budget_cost"):
            return None
        budget = Budget(tokens=int(h["budget_tokens"]) if h.get("budget_tokens") else None,
                        cost=float(h["budget_cost"]) if h.get("budget_cost") else None)
        return cls(budget, spent_tokens=int(float(h.get("spent_tokens") or 0)),
                   spent_cost=float(h.get("spent_cost") or 0),
                   reserved_tokens=int(float(h.get("reserved_tokens") or 0)),
                   reserved_cost=float(h.get("reserved_cost") or 0))

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.budget.tokens, "cost": self.budget.cost,
                "spent_tokens": self.spent_tokens, "spent_cost": round(self.spent_cost, 6),
                "reserved_tokens": self.reserved_tokens,
                "reserved_cost": round(self.reserved_cost, 6)}

    def describe(self) -> str:
        """``1,200 of 5,000 tokens spent (300 reserved)``, and the same for cost."""
        parts = []
        if self.budget.tokens is not None:
            parts.append(f"{self.spent_tokens:,} of {self.budget.tokens:,} tokens spent"
                         + (f" ({self.reserved_tokens:,} reserved)" if self.reserved_tokens
                            else ""))
        if self.budget.cost is not None:
            parts.append(f"cost {self.spent_cost:.4g} of {self.budget.cost:g} spent"
                         + (f" ({self.reserved_cost:.4g} reserved)" if self.reserved_cost
                            else ""))
        return "; ".join(parts)
