"""The example deployment's agents: credit decisioning, and research -> analysis -> report
(choreographed by events, and orchestrated)."""

from pathlib import Path

from . import credit, research

SAMPLES = Path(__file__).parent / "samples"

DEMO = {
    "workflow": "credit_decision",
    "input": str(SAMPLES / "batch.json"),
    "rejected": str(SAMPLES / "invalid.json"),
    "columns": [
        ("application", "application_id"),
        ("decision", "decision"),
        ("score", "credit_score"),
        ("risk", "risk_rating"),
        ("DTI", "dti_with_loan"),
        ("fraud", "fraud_score"),
        ("amount", "approved_amount"),
        ("APR", "apr"),
    ],
    # Then the same batch with income_verification failing: its breaker opens after
    # five failures, and later runs seal its cached answer, marked degraded.
    "chaos": "income_verification=error:1",
    # The research flow, choreographed by events: a question the corpus answers, and one it
    # does not (its research is refused at the analysis contract, and compensated).
    "choreography": {
        "workflow": "research_report",
        "inputs": [str(SAMPLES / "research.json"), str(SAMPLES / "research_off_topic.json")],
        "explain": "analysis",
    },
    # The research flow orchestrated, every call on one model's limit shared by the fleet:
    # four questions at once wait their turn (throttled rows in the trace); then the first
    # question again with a budget its report step would cross (stopped, compensated).
    "limits": {
        "workflow": "research_paced",
        "input": str(SAMPLES / "research_batch.json"),
        "tight_budget": 2_500,
    },
}
"""What ``pipeline demo`` runs."""

__all__ = ["DEMO", "SAMPLES", "credit", "research"]
