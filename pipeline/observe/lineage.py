"""The lineage of a run's versions, for people: a tree of what each version was made
from, the versions a head was made from, and the same as a Graphviz graph."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from ..state import RunInfo, Version

__all__ = ["NO_AGENT", "lineage_dot", "lineage_tree", "named", "reached", "render_svg"]

NO_AGENT = "-"
"""The agent cell of version 0, the run's input, which no agent made: its ``agent`` is empty
(in Python, ``history --json`` and ``inspect --json``) and its step is ``input``. Tables
show an empty cell as ``-``, as they show no parents."""


def named(v: Version) -> str:
    """A version as a line names it: ``v5 final_approval``, or ``v0`` for the run's input."""
    return f"v{v.version} {v.agent}" if v.agent else f"v{v.version}"


def lineage_tree(history: Sequence[Version], head: int | None = None) -> list[str]:
    """The versions as a tree, newest first: each version above the versions it was made
    from, indented. A version reached twice (a diamond) is shown once, then referred to."""
    by_version = {v.version: v for v in history}
    roots = [head] if head is not None else _tips(history)
    lines: list[str] = []
    shown: set[int] = set()

    def walk(n: int, prefix: str, last: bool, top: bool) -> None:
        v = by_version[n]
        branch = "" if top else ("`-- " if last else "|-- ")
        label = (f"{named(v)} {v.contract} {v.digest[:12]}"
                 + (" DEGRADED" if v.degraded else "") + f" [{v.step}]")
        if n in shown:
            lines.append(f"{prefix}{branch}v{v.version} (above)")
            return
        shown.add(n)
        lines.append(f"{prefix}{branch}{label}")
        child_prefix = prefix + ("" if top else ("    " if last else "|   "))
        parents = list(v.parents)
        for i, p in enumerate(parents):
            walk(p, child_prefix, i == len(parents) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return lines


def reached(history: Sequence[Version], head: int | None) -> set[int]:
    """The versions ``head`` was made from, itself included (all of them without a head)."""
    if head is None:
        return {v.version for v in history}
    parents = {v.version: v.parents for v in history}
    seen: set[int] = set()
    todo = [head]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += list(parents.get(n, ()))
    return seen


def _tips(history: Sequence[Version]) -> list[int]:
    """Versions no other version was made from (the ends of the run's lineage)."""
    used = {p for v in history for p in v.parents}
    return sorted((v.version for v in history if v.version not in used), reverse=True)


def lineage_dot(info: RunInfo, history: Sequence[Version]) -> str:
    """The lineage as Graphviz DOT: one node per version, an edge from each parent."""
    def q(text: str) -> str:  # labels keep their \n line breaks (DOT's own escape)
        return '"' + text.replace('"', '\\"') + '"'

    lines = [f"digraph {q('run ' + info.run_id)} {{", "  rankdir=LR;",
             f"  label={q(f'{info.workflow} {info.run_id} ({info.status.value})')};",
             "  node [shape=box, fontname=Helvetica];"]
    for v in history:
        label = (f"{named(v)}\\n{v.contract}\\n{v.digest[:12]}"
                 + ("\\nDEGRADED" if v.degraded else "") + f"\\n[{v.step}]")
        style = ", style=filled, fillcolor=\"#f8d7a8\"" if v.degraded else ""
        if v.version == info.output_version:
            style += ", penwidth=2"
        lines.append(f"  v{v.version} [label={q(label)}{style}];")
    for v in history:
        for p in v.parents:
            lines.append(f"  v{p} -> v{v.version};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_svg(dot_source: str) -> bytes | None:
    """SVG from DOT with Graphviz's ``dot`` when it is installed, else None."""
    binary = shutil.which("dot")
    if binary is None:
        return None
    done = subprocess.run([binary, "-Tsvg"], input=dot_source.encode(), capture_output=True,
                          timeout=60, check=True)
    return done.stdout
