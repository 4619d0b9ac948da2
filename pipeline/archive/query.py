"""Two questions the archive's tables answer, with pyarrow alone (the README shows the same
with Polars and DuckDB): credit decisions by risk rating, and each agent's p95 latency per
day. ``pipeline demo`` prints both."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import DeltaTable

from .table import table_uri

__all__ = ["approvals", "p95_latency"]


def approvals(root: str, agent: str = "final_approval") -> list[tuple[str, str, str]]:
    """(risk rating, decision, runs) over every version ``agent`` sealed, most first."""
    versions = DeltaTable(table_uri(root, "versions")).to_pyarrow_dataset()
    sealed = versions.to_table(columns=["payload"], filter=ds.field("agent") == agent)
    decided = [json.loads(text) for text in sealed.column("payload").to_pylist()]
    counts = Counter((d.get("risk_rating", "-"), d.get("decision", "-")) for d in decided)
    return [(risk, decision, str(n)) for (risk, decision), n in counts.most_common()]


def p95_latency(root: str) -> list[tuple[str, str, str, str]]:
    """(day, agent, calls, p95 ms) over the calls that ran to their seal."""
    calls = DeltaTable(table_uri(root, "calls")).to_pyarrow_dataset()
    ran = calls.to_table(columns=["day", "agent", "latency_ms"],
                         filter=ds.field("status") == "ok")
    stats = ran.group_by(["day", "agent"]).aggregate([
        ("latency_ms", "count"),
        ("latency_ms", "tdigest", pc.TDigestOptions(q=0.95)),
    ]).sort_by([("day", "ascending"), ("agent", "ascending")])
    return [(row["day"], row["agent"], str(row["latency_ms_count"]),
             f"{row['latency_ms_tdigest'][0]:.1f}") for row in stats.to_pylist()]
