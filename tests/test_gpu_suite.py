"""benchmarks.gpu_suite: its dry run (the CPU, Triton's interpreter) runs every section and passes, so
the GPU suite cannot rot before a GPU comes; without CUDA (and without --dry-run) it says so and
exits 0; the pytest plugin poisons fresh outputs, salts seeds and spreads its subset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def suite(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import benchmarks.gpu_suite as suite

    return suite


def _run_suite(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the suite sets it itself in a dry run
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = _run_suite("--dry-run", "--out", str(out), "--seed", "1")
    return proc, out


@pytest.mark.slow
def test_dry_run_runs_every_section_and_passes(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    suite, sections = results["suite"], results["sections"]
    assert suite["mode"] == "dry-run" and suite["passed"] is True and suite["seed"] == 1
    assert list(sections) == ["environment", "kernel_parity", "e2e_parity", "e2e_speed", "kernel_speed"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(sections, "ran")

    env = sections["environment"]["data"]
    assert env["torch"] == torch.__version__ and env["triton"] and env["timing"].startswith("cpu-interpreter")
    assert env["copy"]["gb_per_s"] > 0 and env["matmul"]["bf16"]["tflops"] > 0 and env["matmul"]["fp16"]["tflops"] > 0

    kp = sections["kernel_parity"]["data"]
    assert kp["passed_all"] and kp["passed"] >= 5 and kp["failed"] == kp["errors"] == 0 and not kp["timed_out"]
    assert kp["device"] == "cpu-interpreter" and kp["poisoned_allocations"] >= kp["passed"]

    # every CUDA row of the registry either ran against the reference or says why not
    from export.backends import BACKENDS

    par = sections["e2e_parity"]["data"]
    offered = {(b.name, p) for b in BACKENDS.values() for p in b.precisions.get("cuda", ())}
    ran = {(r["backend"], r["precision"]) for r in par["rows"]}
    skipped = {(r["backend"], r["precision"]) for r in par["skipped_rows"]}
    assert ran | skipped == offered and not ran & skipped and all(r["skip"] for r in par["skipped_rows"])
    assert {("reference", "fp32"), ("engine", "fp32"), ("triton", "fp32")} <= ran
    for r in par["rows"]:
        assert r["passed"] and "error" not in r and "skipped" not in r, r
        if not r.get("baseline"):
            for output in ("w_plus", "img"):
                c = r[output]
                assert c["passed"] and c["finite"] and c["rel"] <= 1e-5 and c["nan"] == c["inf"] == 0
            assert r["img"]["u8_share"] == 0.0
    assert par["golden"]  # used, or why not

    speed = sections["e2e_speed"]["data"]
    assert speed["timing"].startswith("cpu-interpreter")
    assert {(r["backend"], r["precision"]) for r in speed["rows"]} == ran
    assert all(r["ms_per_image"] > 0 and r["images_per_s"] > 0 and "skipped" in r["graph"] for r in speed["rows"])
    # no warm-up, no repetitions: the parity call at batch 1 is the timed call (each forward runs once)
    assert all(r["timed_by"].startswith("its e2e_parity call") and r["batch"] == 1 for r in speed["rows"])
    assert set(speed["fastest"]) == {"fp32"}
    assert speed["placement"]["triton fp32"]["devices"] == ["cpu"]

    from kernels.ops import NAMES

    ks = sections["kernel_speed"]["data"]  # one case per op of the op table
    assert {(r["op"], r["impl"]) for r in ks["rows"]} == {(op, impl) for op in NAMES for impl in ("triton", "ref")}
    assert all(r["median_ms"] > 0 and r["roofline_ms"] > 0 and r["error"] is None for r in ks["rows"])

    md = (out / "results.md").read_text()
    assert "| triton | fp32 |" in md and "not GPU figures" in md
    assert proc.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])  # the tables are printed last


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_0(tmp_path, suite, capsys):
    """`main` (what `python -m benchmarks.gpu_suite` exits with; the module entry point itself runs
    in the dry run above) in this process: without CUDA it neither imports kernels nor sets the
    interpreter switch, so there is nothing a fresh process would change."""
    assert suite.main(["--out", str(tmp_path / "out")]) == 0
    assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "out" / "results.json").exists()


def test_usage_errors_exit_2(tmp_path, suite):
    assert suite.main(["--out", str(tmp_path), "--sections", "speed"]) == 2
    assert suite.main(["--dry-run"]) == 2  # --out is required


def test_poisoned_allocations_and_salted_seeds(suite, monkeypatch):
    plain = torch.randn(4, generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv(suite.ENV_SEED, "12345")
    with suite.poisoned_and_salted() as counter:
        assert torch.isnan(torch.empty(5)).all() and torch.isnan(torch.empty_like(plain)).all()
        assert torch.isnan(torch.empty_strided((2, 2), (1, 2))).all()
        torch.empty(3, dtype=torch.int64)  # integers are left alone
        assert counter[0] == 3
        salted = torch.randn(4, generator=torch.Generator().manual_seed(3))
        assert not torch.equal(salted, plain)
        again = torch.randn(4, generator=torch.Generator().manual_seed(3))
        assert torch.equal(salted, again)  # reproducible from the seed
    assert not torch.isnan(torch.zeros(1)).any() and torch.Generator is torch._C.Generator
    monkeypatch.setenv(suite.ENV_SEED, "0")
    with suite.poisoned_and_salted():
        assert torch.equal(torch.randn(4, generator=torch.Generator().manual_seed(3)), plain)


def test_kernel_subset_spreads_over_parametrisations(suite):
    items = [SimpleNamespace(path="t.py", originalname="test_a", name=f"test_a[{i}]") for i in range(6)]
    items.append(SimpleNamespace(path="t.py", originalname="test_b", name="test_b"))
    kept, dropped = suite._kernel_selection(items, 3)
    assert [i.name for i in kept] == ["test_a[0]", "test_a[2]", "test_a[4]", "test_b"]
    assert len(dropped) == 3


def test_plans_time_the_op_table(suite):
    """The kernel tests and the timed ops come from the op table (kernels/ops.py): every op in the full
    and dry-run plans, the generator's own first; the quick plan times the generator's ops only."""
    from kernels.ops import NAMES, kernel_test_files

    assert suite.KERNEL_TESTS == kernel_test_files()
    assert all((REPO / t).is_file() for t in suite.KERNEL_TESTS)
    for mode in ("full", "dry-run"):
        assert sorted(suite.PLANS[mode].kernel_ops) == sorted(NAMES), mode
        assert suite.PLANS[mode].kernel_ops[:2] == suite.GENERATOR_OPS == ("styled_conv2d", "to_rgb")
    assert suite.PLANS["quick"].kernel_ops == suite.GENERATOR_OPS
