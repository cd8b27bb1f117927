"""The layers of the tree: core below serving below delivery below the command line, and no circles.

Imports are read from the source, lazy ones (inside functions) included: a lazy
import that runs is as much a dependency as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ORCHESTRATION = ("kfp", "defectkit_kfp")
# Higher numbers sit above lower ones; a module imports only its own layer or lower ones.
LAYERS = {"cli": 3, "delivery": 2, "serving": 1}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted((ROOT / "defectkit").rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports (absolute names), without ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        todo.extend(ast.iter_child_nodes(node))
    return found


def _layer(name: str) -> int:
    if name == "defectkit.__main__":  # ``python -m defectkit`` is the command line
        return LAYERS["cli"]
    parts = name.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def _local_imports(name: str) -> set[str]:
    return {i for i in _imports(name) if i in MODULES and i != name}


@pytest.mark.parametrize("name", [n for n in MODULES if _layer(n) < LAYERS["cli"]])
def test_the_core_never_imports_orchestration(name):
    reached = {i for i in _imports(name) if i.split(".")[0] in ORCHESTRATION or i.startswith(("components", "pipelines"))}
    assert not reached, f"{name} imports {sorted(reached)}; only defectkit.cli may"


@pytest.mark.parametrize("name", list(MODULES))
def test_no_module_imports_a_higher_layer(name):
    higher = {i for i in _local_imports(name) if _layer(i) > _layer(name)}
    assert not higher, f"{name} (layer {_layer(name)}) imports {sorted(higher)} from a higher layer"


def test_no_import_circles():
    graph = {name: _local_imports(name) for name in MODULES}
    # A package's __init__ importing its own modules is how a package exposes them, not a circle.
    for name in graph:
        graph[name] = {i for i in graph[name] if not (MODULES[name].name == "__init__.py" and i.startswith(name + "."))}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
