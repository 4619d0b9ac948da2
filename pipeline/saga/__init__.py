"""Compensation (saga): undo a failed run's sealed steps, newest first, once each.

The canvas's errback only *begins* the saga (one atomic guard per run, however
many times Celery calls it) and enqueues ``pipeline.compensate_run``. That task
plans from the state stream, never from the errback's request: every sealed
agent version, and every step whose output broke its contract (its side
effects happened), grouped by workflow stage, newest stage first. A stage's
compensations run side by side, each on its agent's queue; the last one in
moves the saga to the next stage (Redis counts them, in one script), and the
last stage ends the run ``compensated`` (``cancelled`` for a run a person
cancelled) or ``compensation_failed``. A
compensation that keeps failing goes to the dead-letter stream ``pipeline:dead``
and the saga goes on; ``pipeline compensate RUN`` re-drives what is still owed.
"""

from .planning import begin, compensate_run, plan, redrive, start
from .stages import advance, compensate_step, give_up_or_record
from .undo import SELF_COMPENSATED, CompensationContext, dead_letter

__all__ = ["SELF_COMPENSATED", "CompensationContext", "advance", "begin", "compensate_run",
           "compensate_step", "dead_letter", "give_up_or_record", "plan", "redrive", "start"]
