"""The example deployment's agents: credit decisioning, and research -> analysis -> report."""

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
}
"""What ``pipeline demo`` runs."""

__all__ = ["DEMO", "SAMPLES", "credit", "research"]
