"""The floors of the design, checked on the source: reference.plumbing < reference (the model) <
kernels, export < engine < benchmarks.

Every `import` and `from ... import` in the project's packages is read from the syntax tree,
function-local ones and those under `if TYPE_CHECKING:` included (a local import that dodges a cycle
is still a cycle, and so is one that only annotations need). No module may import a floor above its
own, and the module graph has no cycle. The README's layout table names the same floors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# package (or subpackage) -> floor; a module is on the floor of its longest listed prefix
FLOORS = {"reference.plumbing": 0, "reference": 1, "kernels": 2, "export": 2, "engine": 3, "benchmarks": 4}


def floor_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    raise KeyError(module)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Project modules imported by `path` (resolved relative imports; `from a import b` gives `a.b` when
    that is a module, else `a`)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
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


MODULES = {_module_name(p): p for top in ("reference", "kernels", "export", "engine", "benchmarks")
           for p in (REPO / top).rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(path, name) if m in MODULES and m != name} for name, path in MODULES.items()}


GRAPH = _graph()


def test_the_graph_is_read():
    assert len(GRAPH) > 40
    assert "reference.checkpoint" in GRAPH["reference.psp"]          # a relative import
    assert "reference.plumbing.files" in GRAPH["engine.inputs"]               # an absolute one


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_from_a_floor_above(module):
    floor = floor_of(module)
    upward = sorted(m for m in GRAPH[module] if floor_of(m) > floor)
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


def test_type_only_imports_count(tmp_path):
    """An import that only annotations need (`if TYPE_CHECKING:`) is an arrow too: the cycle
    engine.inputs <-> engine.batch over `RunOptions` was one (issue 19)."""
    src = tmp_path / "inputs.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .batch import RunOptions\n")
    assert "engine.batch" in _imports(src, "engine.inputs")


def test_the_plumbing_is_below_the_model():
    """reference/plumbing/ (errors, files, digests, cli, platform, child) is the lowest floor: it
    imports nothing of the model, and the model (reference/) may use it."""
    plumbing = [m for m in GRAPH if m.startswith("reference.plumbing")]
    assert len(plumbing) >= 6 and floor_of("reference.plumbing.files") < floor_of("reference.psp")
    for m in plumbing:
        assert all(d.startswith("reference.plumbing") or d.split(".")[0] not in FLOORS for d in GRAPH[m]), m
