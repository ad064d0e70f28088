"""The package's layers point one way and no module imports itself back, deferred imports included.

    L4  entry points: train (stage 0 in components), sample, evaluate, report, precompute, export, study, zero_shot
        (may use train, evaluate, report), bench (may use precompute)
    L3  driver helpers: launch (may use ray_env), ray_env, params
    L2  engine (may use eval) · eval
    L1  models (may use data) · data · tracking · testing
    L0  config (imports nothing of ours) · storage · batch · dist · images · processes

Every import statement anywhere in a module counts: top level, inside functions, under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "t2i_dist"
MAX_MODULE_LINES = 400

# (layer, unit): a module belongs to the first unit its dotted name starts with
UNITS: list[tuple[int, str]] = [
    (0, "t2i_dist.config"),
    (0, "t2i_dist.storage"),
    (0, "t2i_dist.batch"),
    (0, "t2i_dist.dist"),
    (0, "t2i_dist.images"),
    (0, "t2i_dist.processes"),
    (0, "t2i_dist.configs"),
    (0, "t2i_dist.studies"),
    (1, "t2i_dist.models"),
    (1, "t2i_dist.data"),
    (1, "t2i_dist.tracking"),
    (1, "t2i_dist.testing"),
    (2, "t2i_dist.engine"),
    (2, "t2i_dist.eval"),
    (3, "t2i_dist.launch"),
    (3, "t2i_dist.ray_env"),
    (3, "t2i_dist.params"),
    (4, "t2i_dist.train"),
    (4, "t2i_dist.sample"),
    (4, "t2i_dist.evaluate"),
    (4, "t2i_dist.report"),
    (4, "t2i_dist.precompute"),
    (4, "t2i_dist.export"),
    (4, "t2i_dist.study"),
    (4, "t2i_dist.components"),
    (4, "t2i_dist.bench"),
    (4, "t2i_dist.zero_shot"),
]
# imports allowed between units of the same layer (importer, imported)
SAME_LAYER = {
    ("t2i_dist.storage", "t2i_dist.config"),
    ("t2i_dist.dist", "t2i_dist.config"),
    ("t2i_dist.images", "t2i_dist.config"),
    ("t2i_dist.batch", "t2i_dist.config"),
    ("t2i_dist.models", "t2i_dist.data"),
    ("t2i_dist.testing", "t2i_dist.data"),
    ("t2i_dist.engine", "t2i_dist.eval"),
    ("t2i_dist.launch", "t2i_dist.ray_env"),
    ("t2i_dist.bench", "t2i_dist.precompute"),
    ("t2i_dist.train", "t2i_dist.components"),
    ("t2i_dist.precompute", "t2i_dist.components"),
    ("t2i_dist.precompute", "t2i_dist.train"),
    ("t2i_dist.components", "t2i_dist.export"),
    ("t2i_dist.study", "t2i_dist.train"),
    ("t2i_dist.study", "t2i_dist.components"),
    ("t2i_dist.study", "t2i_dist.evaluate"),
    ("t2i_dist.study", "t2i_dist.report"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that `name` imports, resolved to modules (a `from pkg import mod` names the module)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # importing a.b.c also runs a/__init__ and a/b/__init__
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in modules)
    found.discard(name)
    return found


def unit_of(name: str) -> tuple[int, str] | None:
    for layer, unit in UNITS:
        if name == unit or name.startswith(unit + "."):
            return layer, unit
    return None


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    unplaced = sorted(n for n in all_modules() if n != "t2i_dist" and unit_of(n) is None)
    assert not unplaced, f"modules outside every layer (add them to UNITS): {unplaced}"


def test_imports_point_down_the_layers():
    wrong = []
    for name, targets in import_graph().items():
        here = unit_of(name)
        for target in targets:
            there = unit_of(target)
            if here is None or there is None or here[1] == there[1]:
                continue
            if there[0] > here[0] or (there[0] == here[0] and (here[1], there[1]) not in SAME_LAYER):
                wrong.append(f"{name} (L{here[0]}) imports {target} (L{there[0]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one module are import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
    return [c for c in out if len(c) > 1]


def test_no_import_cycles():
    cycles = strongly_connected(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_the_size_limit():
    long = {name: len(path.read_text().splitlines()) for name, path in all_modules().items()}
    over = {name: n for name, n in long.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"
