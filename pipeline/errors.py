"""Every error the pipeline raises derives from :class:`PipelineError`.

Messages say what was wrong, where (run, version, agent, field path) and, when
there is something to do, what to do. Constructors take the message first so
that Celery can rebuild these exceptions from a JSON result.

A ``TransientStoreError`` (Redis or the broker unreachable, refusing writes for
now) is worth retrying and the pipeline's tasks retry it; every other
``StoreError`` (``RunNotFound``, ``IntegrityError``, ``PayloadTooLarge``, ...)
fails the same way again and is never retried. A ``DefinitionError`` (a bad
agent, contract, policy or flow) is raised when the thing is defined, at import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "PipelineError",
    "ConfigurationError",
    "DefinitionError",
    "StoreError",
    "TransientStoreError",
    "StoreUnavailable",
    "BrokerUnavailable",
    "RunNotFound",
    "VersionNotFound",
    "IntegrityError",
    "PayloadTooLarge",
    "RunAborted",
    "IdempotencyConflict",
    "ContractError",
    "ContractViolation",
    "UnknownContract",
    "ContractMismatch",
    "WorkflowError",
    "UnknownWorkflow",
    "UnknownAgent",
    "WorkflowDefinitionError",
    "InputError",
    "AgentError",
    "TransientAgentError",
    "RateLimited",
    "StepError",
    "DeliveryLimitExceeded",
    "CircuitOpen",
    "RunNotParked",
    "RunNotLive",
    "StepTimeLimitExceeded",
    "VersionNotInLineage",
    "StepCancelled",
    "WaitTimeout",
    "LimitError",
    "UnknownLimit",
    "BudgetExceeded",
    "Throttled",
]


class PipelineError(Exception):
    """Root of every error raised by the pipeline."""


class ConfigurationError(PipelineError):
    """Raised when a setting from the environment or code is missing or invalid."""


class DefinitionError(PipelineError, ValueError):
    """Raised when an agent, contract, breaker policy, event type or flow is defined wrong."""


class StoreError(PipelineError):
    """Raised when the versioned state store cannot do what was asked."""


class TransientStoreError(StoreError):
    """Raised when Redis or the broker fails for now (unreachable, refusing writes): retried."""


class StoreUnavailable(TransientStoreError):
    """Raised when Redis cannot be reached; the message names the URL, password redacted."""


class BrokerUnavailable(TransientStoreError):
    """Raised when the Celery broker refuses a message; nothing of the run is kept."""


class RunNotFound(StoreError):
    """Raised when a run id names no run (never started, or expired by retention)."""


class VersionNotFound(StoreError):
    """Raised when a run has no sealed version with the number asked for."""


class IntegrityError(StoreError):
    """Raised when a stored version's digest does not match its payload (tampering)."""


class PayloadTooLarge(StoreError):
    """Raised when a payload's canonical JSON is bigger than the configured limit."""


class RunAborted(StoreError):
    """Raised when a step tries to seal into a run that is failing or being compensated."""


class IdempotencyConflict(StoreError):
    """Raised when an idempotency key is reused with a different workflow or payload."""


class InputError(PipelineError):
    """Raised when input given to the client or CLI is not usable (not JSON, wrong shape)."""


class ContractError(PipelineError):
    """Raised for data-contract problems."""


class UnknownContract(ContractError):
    """Raised when a contract reference (``name@version``) is not registered."""


class ContractMismatch(ContractError):
    """Raised when a workflow hands a step output its neighbour's input contract refuses."""


class ContractViolation(ContractError):
    """Raised when a payload breaks a contract at a handoff; names every failing field path."""

    def __init__(
        self,
        message: str,
        *,
        contract: str = "",
        side: str = "",
        agent: str = "",
        run_id: str = "",
        version: int | None = None,
        errors: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.contract = contract
        self.side = side
        self.agent = agent
        self.run_id = run_id
        self.version = version
        self.errors: dict[str, list[str]] = {k: list(v) for k, v in (errors or {}).items()}

    @property
    def field_paths(self) -> list[str]:
        return sorted(self.errors)


class WorkflowError(PipelineError):
    """Raised when a workflow cannot be built or found."""


class UnknownWorkflow(WorkflowError):
    """Raised when a workflow name is not registered."""


class UnknownAgent(WorkflowError):
    """Raised when a workflow or task names an agent that is not registered."""


class WorkflowDefinitionError(WorkflowError, DefinitionError):
    """Raised when a workflow's graph is malformed (empty, duplicate parallel agents...)."""


class AgentError(PipelineError):
    """Raised by an agent's own code for a failure it knows about."""


class TransientAgentError(AgentError):
    """Raised by an agent for a failure worth retrying (rate limit, timeout upstream)."""


class RateLimited(AgentError):
    """Raised by an agent whose API refused a call for its rate (HTTP 429): waited, not failed."""

    def __init__(self, message: str = "rate limited", retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = max(0.0, float(retry_after_s))  # the API's Retry-After


class StepError(PipelineError):
    """Raised inside a worker when a step cannot complete for a reason of the pipeline's."""


class DeliveryLimitExceeded(StepError):
    """Raised when a step was delivered more times than allowed (a crash loop)."""


class CircuitOpen(StepError):
    """Raised when an agent's breaker refuses a call and its fallback cannot stand in."""


class RunNotParked(StoreError):
    """Raised when a run asked to resume is not waiting for a person."""


class RunNotLive(StoreError):
    """Raised when a run asked to stop or re-drive is not in a state that allows it."""


class StepTimeLimitExceeded(StepError):
    """Raised when an agent's execute ran past its time limit."""


class VersionNotInLineage(StepError):
    """Raised when a step reads a version it was not made from (a sibling's, a later one)."""


class StepCancelled(StepError):
    """Raised by ``ctx.raise_if_cancelled()`` when the step's run stopped while it ran."""


class WaitTimeout(PipelineError):
    """Raised when ``Run.wait`` gives up before the run reached a final status."""


class LimitError(PipelineError):
    """Raised about a named limit (a rate, a concurrency) shared by the whole fleet."""


class UnknownLimit(LimitError):
    """Raised when an agent or a ``Limiter`` names a limit that is not registered."""


class BudgetExceeded(LimitError):
    """Raised when a step's estimate would cross its run's budget: the step does not run."""


class Throttled(LimitError):
    """Raised when a call would wait for its limit longer than it may, or can never pass it."""

    def __init__(self, message: str, wait_s: float = 0.0, reason: str = "") -> None:
        super().__init__(message)
        self.wait_s = wait_s  # the wait the limit asked for
        self.reason = reason  # what it waits on: requests, tokens or concurrency
