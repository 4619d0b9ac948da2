"""What every part of a sweep shares: the report a pass returns, its limits, and how it
reads Redis's replies.

A pass of the sweeper fills one ``SweepReport``: the broker's unacked messages it looked
at, those it handed out again (each a ``Redelivered``), the runs it enqueued, the sagas it
nudged, the runs it re-drove and those it gave up re-driving and compensated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BATCH", "MAX_REDRIVES", "Redelivered", "SweepReport", "text"]

BATCH = 500
"""Most runs looked at per pass by each part that reads a list of runs (the oldest first)."""
MAX_REDRIVES = 3
"""Re-drives of one run that stopped moving; stuck once more, it is compensated."""


@dataclass(frozen=True, slots=True)
class Redelivered:
    """A message the sweeper handed out again."""

    task: str
    task_id: str
    run_id: str
    step: str
    silent_s: float
    reason: str


@dataclass(slots=True)
class SweepReport:
    unacked: int = 0
    redelivered: list[Redelivered] = field(default_factory=list)
    enqueued: list[str] = field(default_factory=list)
    nudged: list[str] = field(default_factory=list)
    redriven: dict[str, list[str]] = field(default_factory=dict)
    """Run id -> the steps (or deliveries) handed out again: the run had stopped moving."""
    stuck: list[str] = field(default_factory=list)
    """Runs re-driven ``MAX_REDRIVES`` times that stopped again: compensated."""
    busy: bool = False
    """Another sweeper held the lock: this pass did nothing."""

    def to_dict(self) -> dict[str, Any]:
        return {"unacked": self.unacked, "redelivered": [asdict(r) for r in self.redelivered],
                "enqueued": self.enqueued, "nudged": self.nudged, "redriven": self.redriven,
                "stuck": self.stuck, "busy": self.busy}

    def summary(self) -> str:
        if self.busy:
            return "another sweeper is running: nothing done"
        lines = [f"{self.unacked} unacked message(s) looked at; {len(self.redelivered)} handed "
                 f"out again; {len(self.enqueued)} run(s) enqueued; {len(self.nudged)} saga(s) "
                 f"nudged; {len(self.redriven)} stopped run(s) re-driven"
                 + (f", {len(self.stuck)} compensated" if self.stuck else "")]
        lines += [f"  redelivered {r.task} run {r.run_id} {r.step}: {r.reason}"
                  for r in self.redelivered]
        lines += [f"  enqueued run {run_id} (its client died before sending it)"
                  for run_id in self.enqueued]
        lines += [f"  nudged the saga of run {run_id}" for run_id in self.nudged]
        lines += [f"  re-drove run {run_id} ({', '.join(steps) or 'nothing owed'}): it had "
                  "stopped moving, with no message of it left in the broker"
                  for run_id, steps in self.redriven.items()]
        lines += [f"  compensating run {run_id}: it stopped moving again after "
                  f"{MAX_REDRIVES} re-drives" for run_id in self.stuck]
        return "\n".join(lines)


def text(value: Any) -> str:
    """A Redis reply (bytes or not) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
