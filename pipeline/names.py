"""The names the pipeline gives its Celery tasks and queues, in one place.

Every agent is two tasks on one queue: ``agent.<name>`` runs a step of it and
``compensate.<name>`` undoes one, both on ``agents.<name>`` unless the agent names
another queue. The pipeline's own tasks run on the default queue (``pipeline``).
A worker, the sweeper, the consumer that hands unknown agents' messages back and the
tracer all recognise a task by these names; a name changed here changes for all.
"""

from __future__ import annotations

__all__ = ["AGENT_QUEUE_PREFIX", "AGENT_TASK_PREFIX", "AGENT_TASK_PREFIXES",
           "COMPENSATE_RUN_TASK", "COMPENSATE_TASK_PREFIX", "ERRBACK_TASK", "FINISH_TASK",
           "OWN_TASKS", "SWEEP_TASK", "agent_of_task", "compensate_task", "default_queue",
           "is_pipeline_task", "step_task"]

AGENT_TASK_PREFIX = "agent."
COMPENSATE_TASK_PREFIX = "compensate."
AGENT_TASK_PREFIXES = (AGENT_TASK_PREFIX, COMPENSATE_TASK_PREFIX)
"""The prefixes of the two tasks of every agent."""
AGENT_QUEUE_PREFIX = "agents."

ERRBACK_TASK = "pipeline.run_failed"
"""The errback linked to every step: a step that failed for good begins the run's saga."""
COMPENSATE_RUN_TASK = "pipeline.compensate_run"
"""The saga's planner: plans a run's compensation and dispatches its first stage."""
FINISH_TASK = "pipeline.record_failure"
"""Ends a run whose step died in the worker's main process (time limit, lost worker)."""
SWEEP_TASK = "pipeline.sweep"
"""The sweeper, run by beat."""
OWN_TASKS = (ERRBACK_TASK, COMPENSATE_RUN_TASK, FINISH_TASK)
"""The pipeline's own tasks that carry a run's work (the sweep carries none)."""


def default_queue(agent: str) -> str:
    """The queue an agent runs on unless it names another: ``agents.<name>``."""
    return f"{AGENT_QUEUE_PREFIX}{agent}"


def step_task(agent: str) -> str:
    """The Celery task that runs one step of ``agent``."""
    return f"{AGENT_TASK_PREFIX}{agent}"


def compensate_task(agent: str) -> str:
    """The Celery task that undoes one step of ``agent``."""
    return f"{COMPENSATE_TASK_PREFIX}{agent}"


def agent_of_task(task: str) -> str:
    """The agent of an ``agent.<name>`` or ``compensate.<name>`` task, else ''."""
    for prefix in AGENT_TASK_PREFIXES:
        if task.startswith(prefix):
            return task.removeprefix(prefix)
    return ""


def is_pipeline_task(task: str) -> bool:
    """Whether a task carries a run's work: an agent's step or undo, or one of ``OWN_TASKS``."""
    return task.startswith(AGENT_TASK_PREFIXES) or task in OWN_TASKS
