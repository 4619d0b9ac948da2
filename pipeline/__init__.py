"""Multi-agent workflows on Celery: versioned state, data contracts, canvases."""

from .agent import Agent, StepContext, agent, agents
from .client import Pipeline, Run, RunResult
from .contracts import Contract, contract, contracts
from .errors import (
    ContractViolation,
    PipelineError,
    RunNotFound,
    TransientAgentError,
)
from .settings import Settings
from .state import RunStatus, Version
from .workflow import Workflow, parallel, workflows

__all__ = [
    "Agent",
    "Contract",
    "ContractViolation",
    "Pipeline",
    "PipelineError",
    "Run",
    "RunNotFound",
    "RunResult",
    "RunStatus",
    "Settings",
    "StepContext",
    "TransientAgentError",
    "Version",
    "Workflow",
    "agent",
    "agents",
    "contract",
    "contracts",
    "parallel",
    "workflows",
]
