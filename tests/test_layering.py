"""The floors of the design, checked on the source: reference < kernels, export < engine < benchmarks.

Every `import` and `from ... import` in the project's packages is read from the syntax tree,
function-local ones included (a local import that dodges a cycle is still a cycle); only imports
under `if TYPE_CHECKING:` (never executed) are passed over. No module may import a floor above its
own, and the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLOORS = {"reference": 0, "kernels": 1, "export": 1, "engine": 2, "benchmarks": 3}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str) -> set[str]:
    """Project modules imported by `path` (resolved relative imports; `from a import b` gives `a.b` when
    that is a module, else `a`)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for n in child.orelse:
                    visit(n)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    prefix = ".".join(base + ([child.module] if child.module else []))
                else:
                    prefix = child.module or ""
                for a in child.names:  # `from pkg import mod` imports mod; `from mod import name`, mod
                    sub = f"{prefix}.{a.name}"
                    found.add(sub if sub in MODULES else prefix)
            visit(child)

    visit(tree)
    return found


MODULES = {_module_name(p): p for floor in FLOORS for p in (REPO / floor).rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(path, name) if m in MODULES and m != name} for name, path in MODULES.items()}


GRAPH = _graph()


def test_the_graph_is_read():
    assert len(GRAPH) > 40
    assert "reference.checkpoint" in GRAPH["reference.psp"]          # a relative import
    assert "reference.files" in GRAPH["engine.inputs"]               # an absolute one


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_from_a_floor_above(module):
    floor = FLOORS[module.split(".")[0]]
    upward = sorted(m for m in GRAPH[module] if FLOORS[m.split(".")[0]] > floor)
    assert not upward, f"{module} (floor {floor}) imports from a floor above: {upward}"


def test_no_import_cycle():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"
