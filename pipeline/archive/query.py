"""Two questions the archive's tables answer, in SQL (DataFusion's, through delta-rs's
``QueryBuilder``): credit decisions by risk rating, and each agent's p95 latency per day.
``pipeline demo`` prints both; the README shows the same with pyarrow, Polars and DuckDB."""

from __future__ import annotations

import json
from collections import Counter

from .table import literal, query

__all__ = ["approvals", "p95_latency"]


def approvals(root: str, agent: str = "final_approval") -> list[tuple[str, str, str]]:
    """(risk rating, decision, runs) over every version ``agent`` sealed, most first."""
    sealed = query(root, f"SELECT payload FROM versions WHERE agent = {literal(agent)}",
                   "versions")
    decided = [json.loads(text) for text in ([] if sealed is None
                                             else sealed.column("payload").to_pylist())]
    counts = Counter((d.get("risk_rating", "-"), d.get("decision", "-")) for d in decided)
    return [(risk, decision, str(n)) for (risk, decision), n in counts.most_common()]


def p95_latency(root: str) -> list[tuple[str, str, str, str]]:
    """(day, agent, calls, p95 ms) over the calls that ran to their seal."""
    found = query(root, "SELECT day, agent, count(*) AS calls, "
                        "approx_percentile_cont(latency_ms, 0.95) AS p95 FROM calls "
                        "WHERE status = 'ok' GROUP BY day, agent ORDER BY day, agent", "calls")
    return [(row["day"], row["agent"], str(row["calls"]), f"{row['p95']:.1f}")
            for row in ([] if found is None else found.to_pylist())]
