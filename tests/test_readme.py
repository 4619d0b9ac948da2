"""The README's Python runs as written: each ```python block in a fresh interpreter (so its
agents, contracts and workflows never meet this process's registries), from the repository's
directory, against the test Redis and, when it starts a run, the session's workers. And every
name it imports from the pipeline exists and is exported (``__all__``) by its module."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import Pipeline
from pipeline.archive.rows import run_rows
from pipeline.archive.table import write_batch
from tasks import SAMPLES
from tests.conftest import ROOT, worker_env

README = Path(ROOT) / "README.md"

SKIPPED = {
    # first line of the block -> why it does not run here
    "# start.py": "it needs a worker that imports support.py from the project's directory; "
                  "tests/test_own_project.py runs that section from a temporary project",
    "# conftest.py": "pytest's, in the user's project: tests/test_own_project.py runs it",
    "# test_support.py: python -m pytest test_support.py": "the user's tests, run by pytest "
                  "in their project: tests/test_own_project.py runs them",
}
"""Blocks that do not run here, by their first line, and why."""

CHECKS = {
    # block id -> code run after the block, in its interpreter: what its comments promise
    "using-it-from-application-code": (
        "from pipeline import RunStatus\n"
        "assert result.status is RunStatus.SUCCEEDED, result\n"
        "assert result.output['decision'] == 'approved', result.output\n"
        "assert [v.version for v in run.history()] == list(range(6))\n"
    ),
    "circuit-breakers-2": "assert receipt == {'order': 'o-1', 'charged': 42}\n",
    "budgets": (
        "from pipeline import RunStatus\n"
        "assert result.status is RunStatus.SUCCEEDED, result\n"
        "assert spending is not None and spending.budget == Budget(tokens=20_000, cost=0.5)\n"
        "assert spending.reserved_tokens == 0 and spending.spent_tokens <= 20_000\n"
    ),
    # a step of a run that is gone (expired, or never was) stops at its first check
    "cancelling-a-run": (
        "import os, redis\n"
        "from pipeline import StepCancelled\n"
        "ctx = StepContext(run_id='no-such-run', step='0:write_report', agent='write_report',\n"
        "                  attempt=1, input_versions=(0,),\n"
        "                  redis=redis.Redis.from_url(os.environ['PIPELINE_REDIS_URL']))\n"
        "try:\n"
        "    write_report.execute({'pages': 3}, ctx)\n"
        "except StepCancelled as e:\n"
        "    assert 'the run is gone' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('the step ran on')\n"
    ),
}
ARCHIVED = {"the-archive"}
"""Blocks that read an archive: they run with PIPELINE_ARCHIVE_URI on one holding a run."""
CHECKS["the-archive"] = (
    "assert decided[('low', 'approved')] == 1, decided\n"
    "assert {row['agent'] for row in p95.to_pylist()} >= {'credit_score', 'final_approval'}\n"
    "assert all(row['p95'] > 0 for row in p95.to_pylist())\n"
)
STARTS_A_RUN = re.compile(r"\.(start|wait)\(")
"""A block that starts or waits for a run needs the session's workers."""


@dataclass(frozen=True)
class Block:
    id: str
    """The heading it is under, as a slug, numbered from the second block under it."""
    line: int
    code: str

    @property
    def first_line(self) -> str:
        return self.code.splitlines()[0].strip() if self.code.strip() else ""


def python_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    heading, seen, lines, start = "top", 0, None, 0
    for n, line in enumerate(text.splitlines(), 1):
        if lines is None:
            if line.startswith("#"):
                heading = re.sub(r"[^a-z0-9]+", "-", line.lstrip("#").strip().lower()).strip("-")
                seen = 0
            elif line.strip() == "```python":
                lines, start = [], n + 1
        elif line.strip() == "```":
            seen += 1
            blocks.append(Block(heading if seen == 1 else f"{heading}-{seen}", start,
                                "\n".join(lines) + "\n"))
            lines = None
        else:
            lines.append(line)
    assert lines is None, "the README ends inside a ```python block"
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def imports_from_pipeline(block: Block) -> list[tuple[str, str]]:
    """(module, name) for every ``from pipeline... import name`` of the block."""
    found = []
    for node in ast.walk(ast.parse(block.code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pipeline":
            found += [(str(node.module), a.name) for a in node.names]
    return found


def test_the_readme_has_python_blocks_with_unique_ids() -> None:
    assert len(BLOCKS) >= 6
    assert len({b.id for b in BLOCKS}) == len(BLOCKS)
    assert set(CHECKS) <= {b.id for b in BLOCKS}


def test_every_skipped_block_is_still_in_the_readme() -> None:
    assert set(SKIPPED) <= {b.first_line for b in BLOCKS}


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_every_readme_block_runs_as_written(block: Block, redis_url: str,
                                            request: pytest.FixtureRequest) -> None:
    if block.first_line in SKIPPED:
        pytest.skip(f"README line {block.line}: {SKIPPED[block.first_line]}")
    if STARTS_A_RUN.search(block.code):
        request.getfixturevalue("pipeline")  # the session's workers, on the same database
    env = {**os.environ, **worker_env(redis_url)}
    if block.id in ARCHIVED:
        env["PIPELINE_ARCHIVE_URI"] = archive_of_one_run(
            request.getfixturevalue("pipeline"), request.getfixturevalue("tmp_path"))
    code = block.code + "\n" + CHECKS.get(block.id, "")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, (
        f"the README's block at line {block.line} ({block.id}) failed:\n{done.stderr}"
    )


def archive_of_one_run(p: Pipeline, where: Path) -> str:
    """An archive holding one approved credit run (written directly: nothing else of the
    test database is archived)."""
    run = p.start("credit_decision", json.loads((SAMPLES / "good.json").read_text()))
    assert run.wait(30).output["decision"] == "approved"
    root = str(where / "archive")
    found = run_rows(p.store, run.run_id, 1)
    assert found is not None
    write_batch(root, 1, [found])
    return root


@pytest.mark.parametrize("block", [b for b in BLOCKS if imports_from_pipeline(b)],
                         ids=lambda b: b.id)
def test_every_name_the_readme_imports_exists_and_is_exported_by_pipeline(
    block: Block,
) -> None:
    for module, name in imports_from_pipeline(block):
        imported = importlib.import_module(module)
        assert hasattr(imported, name), f"{module}.{name}"
        # from pipeline itself, or from a module made for it (pipeline.testing)
        assert name in getattr(imported, "__all__", ()), f"{name} (README line {block.line})"
