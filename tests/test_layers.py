"""The import layers of fxreparam, read from the source: no import runs back up, and no module-level import circle.

Layers, bottom up (a module imports only its own layer and the layers below it):
errors and metadata keys -> capture -> recognizers -> kernel math and cost -> passes -> pipeline -> verify ->
entry points.
Imports under ``if TYPE_CHECKING:`` are left out (they never run); imports inside functions count for the
layers (they run back up all the same) but not for circles (they do not run at import time).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each module by name prefix (the longest prefix wins); ``passes/`` ships as ``fxreparam.passes``.
LAYERS: dict[str, int] = {
    # meta: the node-metadata keys, capture writes them; trees: fresh copies of input trees, for every run
    **dict.fromkeys(("fxreparam.errors", "fxreparam.meta", "fxreparam.trees"), 0),
    "fxreparam.capture": 1,
    **dict.fromkeys(("fxreparam.spec", "fxreparam.ops", "fxreparam.mutation",
                     "fxreparam.evaluate"), 2),
    **dict.fromkeys(("fxreparam.algebra", "fxreparam.cost", "fxreparam.graph", "fxreparam.crops",
                     "fxreparam.padding", "fxreparam.branches"), 3),
    **dict.fromkeys(("fxreparam.registry", "fxreparam.passes"), 4),
    **dict.fromkeys(("fxreparam.pipeline", "fxreparam.finalize"), 5),
    **dict.fromkeys(("fxreparam.verify", "fxreparam.report"), 6),
    **dict.fromkeys(("fxreparam", "fxreparam.core", "fxreparam.frozen", "fxreparam.deploy", "fxreparam.api",
                     "fxreparam.backends", "fxreparam.cli", "fxreparam.cli_inputs", "fxreparam.testing",
                     "fxreparam.timing", "fxreparam.demo", "fxreparam.expand"), 7),
}

# (importing module, imported module): why it stays for now. Each is to be removed, not added to.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("fxreparam.ops.layers", "fxreparam.algebra"): "ops.BatchNorm normalizes eagerly (algebra.bn_to_affine)",
}


@dataclass(frozen=True)
class Import:
    """One import of an fxreparam module: who, what, where, and whether it runs when the module is imported."""

    source: str
    target: str
    line: int
    module_level: bool


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "passes":
        parts = ["fxreparam", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> dict[str, Path]:
    paths = [*ROOT.glob("fxreparam/**/*.py"), *ROOT.glob("passes/**/*.py")]
    return {_module_name(p): p for p in paths}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return ids


def imports() -> list[Import]:
    """Every runtime import of one fxreparam module by another, resolved to the module it loads."""
    files, found = _files(), []
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        skip, top = _type_checking_only(tree), {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                module = ".".join(p for p in (base, node.module) if p)
                targets = {f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names}
            elif isinstance(node, ast.Import):
                targets = {a.name for a in node.names}
            else:
                continue
            found += [Import(name, t, node.lineno, id(node) in top) for t in sorted(targets)
                      if t.partition(".")[0] == "fxreparam" and t != name]
    return found


def layer(module: str) -> int:
    """The layer of ``module``: that of its longest listed prefix."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def _where(i: Import) -> str:
    return f"{_files()[i.source].relative_to(ROOT)}:{i.line} imports {i.target}"


def test_every_module_has_a_layer():
    for name in _files():
        layer(name)


def test_no_import_runs_back_up():
    upward = [i for i in imports() if layer(i.target) > layer(i.source) and (i.source, i.target) not in EXCEPTIONS]
    assert not upward, "imports that run back up a layer:\n" + "\n".join(
        f"{_where(i)} (layer {layer(i.source)} -> {layer(i.target)})" for i in upward)


def test_listed_exceptions_still_exist():
    live = {(i.source, i.target) for i in imports()}
    assert set(EXCEPTIONS) <= live, f"fixed, remove from EXCEPTIONS: {sorted(set(EXCEPTIONS) - live)}"


def test_no_import_circle():
    graph: dict[str, set[str]] = {}
    for i in imports():
        if i.module_level:
            graph.setdefault(i.source, set()).add(i.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        circle = None if module in state else visit(module)
        assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_check_sees_an_import_that_runs_back_up():
    """The reader resolves relative imports to modules (``from ..trees import`` in capture is found as such) and
    sees the one upward import still listed (ops' BatchNorm normalizing through algebra)."""
    found = {(i.source, i.target) for i in imports()}
    assert ("fxreparam.capture", "fxreparam.trees") in found
    assert ("fxreparam.ops.layers", "fxreparam.algebra") in found
    assert layer("fxreparam.algebra") > layer("fxreparam.ops.layers")
    assert ("fxreparam.errors", "fxreparam.verify") not in found  # only under TYPE_CHECKING
