"""The op table (kernels/ops.py): every row resolves, pairs its fast path with its reference, and is what
`kernels.inspect`, the GPU suite, the kernel benchmark and the tests read; the benchmarks run as
modules (`python -m benchmarks.NAME`) with no `sys.path` edits.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from export.compare import TOL
from kernels.ops import NAMES, OPS, Op, kernel_test_files, op, resolve, spec_modules

REPO = Path(__file__).resolve().parent.parent
ROWS = pytest.mark.parametrize("row", OPS, ids=NAMES)


def test_names_are_unique_and_looked_up():
    assert len(set(NAMES)) == len(NAMES) == len(OPS)
    assert op("to_rgb").module == "kernels.modulated_conv2d"
    with pytest.raises(KeyError, match="the ops are bias_act, upfirdn2d"):
        op("conv")


def test_resolve():
    assert resolve("reference.ops.setup_filter").__name__ == "setup_filter"
    assert resolve("reference.ops").__name__ == "reference.ops"
    with pytest.raises(ImportError, match="reference.ops has no nothing"):
        resolve("reference.ops.nothing")
    with pytest.raises(ImportError, match="no importable module"):
        resolve("no_such_package.x")


@ROWS
def test_fast_function_pairs_with_its_reference(row: Op):
    """The pairing rule (shared/docs/STYLE.md): one public function with `impl="ref"` first, its
    positional arguments before `impl`; where the reference is a `reference.ops` function, the same
    arguments in the same order with the same defaults. The layer-shaped ops pair with the rosinality
    layer their docstring names."""
    fast = resolve(row.fast)
    assert callable(fast) and fast.__module__ == row.module and fast.__name__ == row.name
    params = list(inspect.signature(fast).parameters.values())
    names = [p.name for p in params]
    assert "impl" in names and params[names.index("impl")].default == "ref", row.name
    before = params[: names.index("impl")]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in before)
    assert all(p.kind is p.KEYWORD_ONLY for p in params[names.index("impl") + 1:])  # cached operands
    ref = resolve(row.reference)
    if inspect.isfunction(ref):
        assert ref.__module__ == "reference.ops"
        assert [(p.name, p.default) for p in inspect.signature(ref).parameters.values()] == \
            [(p.name, p.default) for p in before], row.name
    else:
        assert inspect.isclass(ref) and ref.__module__ == "reference.stylegan2", row.reference
        assert f"rosinality `{ref.__name__}`" in fast.__doc__, row.name


@ROWS
def test_tolerance_key_is_in_the_table(row: Op):
    assert (row.tolerance, "float32") in TOL and (row.tolerance, "float16") in TOL, row.tolerance


@ROWS
def test_test_file_tests_the_op_on_the_gpu_path(row: Op):
    """The test file exists, calls the op with `impl="triton"` in `gpu`-marked tests (what the GPU suite
    runs on CUDA) and reads the op's tolerance key from the table, not a copy of it."""
    path = REPO / row.test
    assert path.is_file(), row.test
    text = path.read_text()
    assert f"{row.name}(" in text and 'impl="triton"' in text and "@pytest.mark.gpu" in text, row.test
    assert "from kernels.ops import op" in text and f'"{row.tolerance}"' not in text, row.test


@ROWS
def test_benchmark_resolves_and_builds_cases(row: Op):
    bench = resolve(row.benchmark)
    assert callable(bench.cases) and callable(bench.impls), row.benchmark
    cases = bench.cases(8, 1)
    assert cases and all(c.op == row.name and c.batch == 1 and c.flops > 0 and c.nbytes > 0 for c in cases)
    assert {c.used for c in cases} == {row.generator}, row.name  # the generator runs it standalone, or not


def test_every_benchmark_module_is_a_row():
    """One benchmark per op: benchmarks/kernel_ops/<op>.py for every row, and no benchmark without one."""
    files = {p.stem for p in (REPO / "benchmarks" / "kernel_ops").glob("*.py")} - {"__init__", "common"}
    assert files == set(NAMES)
    assert {o.benchmark for o in OPS} == {f"benchmarks.kernel_ops.{n}" for n in NAMES}


def test_inspect_specs_load_from_the_table():
    from kernels import inspect as ki

    assert ki.SPEC_MODULES == spec_modules() == ("kernels.bias_act", "kernels.upfirdn2d", "kernels.modulated_conv2d")
    for module in spec_modules():
        assert ki.load_specs([module], 8), module


def test_every_public_op_of_a_kernels_module_is_a_row():
    """A kernels module with `aot_specs` is the table's, and each of its public functions with an `impl`
    argument is a row: a new op cannot be left out of the table."""
    found = set()
    for path in sorted((REPO / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        if "aot_specs" not in funcs:
            continue
        assert f"kernels.{path.stem}" in spec_modules(), path
        for name, fn in funcs.items():
            args = [a.arg for a in fn.args.args + fn.args.kwonlyargs]
            if not name.startswith("_") and "impl" in args:
                found.add(f"kernels.{path.stem}.{name}")
    assert found == {o.fast for o in OPS}


def test_consumers_read_the_table(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import benchmarks.gpu_kernels as gk
    import benchmarks.gpu_suite as suite

    assert suite.KERNEL_TESTS == kernel_test_files() == tuple(dict.fromkeys(o.test for o in OPS))
    assert gk.OPS == NAMES
    assert sorted(suite.ALL_OPS) == sorted(NAMES)
    assert suite.GENERATOR_OPS == ("styled_conv2d", "to_rgb") == suite.ALL_OPS[:2]


TABLE_SCRIPT = textwrap.dedent('''
    import sys
    import kernels.ops
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton", "benchmarks")
                 or (m.startswith("kernels.") and m != "kernels.ops")))
''')


def _run_script(tmp_path: Path, text: str, timeout: float) -> subprocess.CompletedProcess:
    """`text` as a script file, run from the repository root with it on the path (as `python -m` puts it)."""
    script = tmp_path / "script.py"
    script.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_table_imports_no_kernel_and_no_floor_above(tmp_path):
    """`kernels.ops` is strings: reading it leaves `TRITON_INTERPRET` free to set (the GPU suite's dry
    run reads the table first) and imports neither torch nor a benchmark (a fresh process)."""
    proc = _run_script(tmp_path, TABLE_SCRIPT, 120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


BENCH_SCRIPT = textwrap.dedent('''
    import contextlib, importlib, io, pathlib, runpy, sys, warnings

    before = list(sys.path)
    names = sorted(p.stem for p in pathlib.Path("benchmarks").glob("*.py")
                   if not p.stem.startswith("test_") and p.stem != "conftest")
    names += ["kernel_ops." + p.stem for p in sorted(pathlib.Path("benchmarks/kernel_ops").glob("*.py"))
              if p.stem != "__init__"]
    for name in names:
        importlib.import_module("benchmarks." + name)
        assert sys.path == before, (name, [p for p in sys.path if p not in before])
    print("imported", len(names))
    warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" (imported above)
    for name in names:
        if "__main__" not in pathlib.Path("benchmarks", name.replace(".", "/") + ".py").read_text():
            continue
        sys.argv = ["benchmarks." + name, "--help"]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                runpy.run_module("benchmarks." + name, run_name="__main__", alter_sys=True)
            code = "returned"
        except SystemExit as e:
            code = e.code
        assert code in (0, None), (name, code)
    sys.argv = ["benchmarks.gpu_kernels", "--batch", "1", "--ops", "to_rgb"]
    try:
        runpy.run_module("benchmarks.gpu_kernels", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        print("exit", e.code)
''')


@pytest.mark.slow  # ~20 s on 2 busy cores: a process importing torch, onnx and every benchmark
def test_benchmarks_run_as_modules_without_path_edits(tmp_path):
    """Every benchmark module imports from the repository root as `python -m benchmarks.NAME` does,
    leaving `sys.path` as it found it; each with a command line answers `--help` as `__main__`; and
    `benchmarks.gpu_kernels` runs (without CUDA it says so and exits 0). A real script file in a second
    process."""
    proc = _run_script(tmp_path, BENCH_SCRIPT, 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "imported 21", proc.stdout  # 15 in benchmarks/ (not the pytest files), 6 in kernel_ops/
    import torch

    if not torch.cuda.is_available():
        assert lines[-2:] == ["no CUDA device: this benchmark needs a GPU; see `python -m kernels.inspect` for the "
                              "compiled-code analysis", "exit 0"], proc.stdout


def test_docs_run_the_benchmarks_as_modules():
    """README.md and benchmarks/RESULTS.md give `python -m benchmarks.NAME`, never a script path."""
    for doc in ("README.md", "benchmarks/RESULTS.md"):
        text = (REPO / doc).read_text()
        assert "python benchmarks/" not in text, doc
