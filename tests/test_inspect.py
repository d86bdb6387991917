"""`python -m kernels.inspect`: compiling Triton kernels for sm_80 / sm_90 without a GPU.

Two small kernels defined here (a `tl.dot` of fp16 tiles, where tensor-core MMA must appear, and
an elementwise one, where it must not) check the compile-and-read path; the real specs of
`kernels.bias_act`, `kernels.upfirdn2d` and `kernels.modulated_conv2d` are checked for failures,
spills and MMA. Both are compiled once per module by one run of the CLI for both archs (its JSON
rows are the reports checked; the real specs only when a test of them is selected), in this
process with `TRITON_INTERPRET=1` as the suite runs (tests/conftest.py): the compiles then run in
clean worker processes, so the sample and the real kernels share one worker's imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from kernels import inspect as ki  # noqa: E402
from kernels._triton import KernelSpec  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HERE = f"{Path(__file__).resolve()}:sample_specs"
ARCHS = (80, 90)


@triton.jit
def _leaky(x, alpha):
    return tl.where(x >= 0, x, x * alpha)  # a @triton.jit helper: what the interpreter breaks


@triton.jit
def _sample_dot_kernel(
    # pointers
    a_ptr,  # [BLOCK, BLOCK] fp16
    b_ptr,  # [BLOCK, BLOCK] fp16
    c_ptr,  # [BLOCK, BLOCK] fp32
    # meta-parameters
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    idx = offs[:, None] * BLOCK + offs[None, :]
    acc = tl.dot(tl.load(a_ptr + idx), tl.load(b_ptr + idx))
    tl.store(c_ptr + idx, _leaky(acc, 0.2))


@triton.jit
def _sample_eltwise_kernel(
    # pointers
    x_ptr,  # [n] fp16
    y_ptr,  # [n] fp16
    # sizes
    n,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (_leaky(x, 0.2) * 1.4142135).to(tl.float16), mask=mask)


def sample_specs(output_size: int = 1024) -> list[KernelSpec]:
    """The two sample kernels as specs (a spec source for `kernels.inspect --source`)."""
    dot = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"}
    elt = {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}
    return [
        KernelSpec("_sample_dot_kernel[64]", _sample_dot_kernel, dot, {"BLOCK": 64}, num_warps=4,
                   flops=2.0 * 64**3, min_bytes=64 * 64 * (2 + 2 + 4), layer="sample", calls=2),
        KernelSpec("_sample_eltwise_kernel[1024]", _sample_eltwise_kernel, elt, {"BLOCK": 1024}, num_warps=4,
                   flops=3.0 * 2**20, min_bytes=4.0 * 2**20, layer="sample", calls=1),
        # the same configuration under another name: compiled once, reported twice
        KernelSpec("_sample_eltwise_kernel[1024] again", _sample_eltwise_kernel, elt, {"BLOCK": 1024}, num_warps=4,
                   flops=3.0 * 2**20, min_bytes=4.0 * 2**20, layer="sample", calls=5, used=False),
    ]


# ----------------------------------------------------------------------------------------------
# parsers, on recorded tool output (Triton 3.9 / CUDA 13.1 tools)

PTXAS_LOG_80 = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_dot_kernel' for 'sm_80'
ptxas info    : Function properties for _dot_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 79 registers, used 1 barriers, 392 bytes cmem[0]
ptxas info    : Compile time = 25.830 ms
"""

PTXAS_LOG_90_SPILL = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Function properties for __internal_helper
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Compiling entry function '_big_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _big_kernel
    48 bytes stack frame, 44 bytes spill stores, 40 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers
ptxas-blackwell info    : Compile time = 42.371 ms
"""

RESOURCE_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _dot_kernel:
  REG:64 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
\tcode for sm_90a
\t\tFunction : _dot_kernel
        /*0080*/                   LDG.E.U16 R33, [R26.64+0x800] ;                 /* 0x000800041a217981 */
                                                                                   /* 0x0000a8000c1e1500 */
        /*0aa0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4].tnspB, RZ, !UPT ;   /* 0x40e00000041879f0 */
        /*0af0*/               @P0 HMMA.16816.F32 R4, R8, R12, R4 ;   /* 0x000000000c04723c */
        /*0b00*/              @!P1 BRA 0x1 ;   /* 0x0 */
        /*0b10*/                   EXIT ;                          /* 0x000000000000794d */
"""


def test_parse_ptxas_log():
    assert ki.parse_ptxas_log(PTXAS_LOG_80) == {
        "_dot_kernel": {"registers": 79, "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0}
    }
    got = ki.parse_ptxas_log(PTXAS_LOG_90_SPILL)
    assert got["_big_kernel"] == {"registers": 255, "stack_bytes": 48, "spill_stores": 44, "spill_loads": 40}
    assert "registers" not in got["__internal_helper"]  # a non-entry function: its frame only


def test_parse_resource_usage():
    assert ki.parse_resource_usage(RESOURCE_USAGE)["_dot_kernel"] == {
        "REG": 64, "STACK": 0, "SHARED": 1024, "LOCAL": 0, "CONSTANT[0]": 568, "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0
    }


def test_sass_opcodes_and_mma():
    ops = ki.sass_opcodes(SASS)
    assert ops == {"LDG.E.U16": 1, "HGMMA.64x64x16.F32": 1, "HMMA.16816.F32": 1, "BRA": 1, "EXIT": 1}
    assert ki.mma_opcodes(ops) == {"HGMMA.64x64x16.F32": 1, "HMMA.16816.F32": 1}


# `nvdisasm --binary SM90a` of two kernels' code laid end to end (the second starts at 0x10a80)
RAW_SASS = """
	.headerflags	@"EF_CUDA_64BIT_ADDRESS EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0aa0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4].tnspB, RZ, !UPT ;
        /*10a70*/                  EXIT ;
        /*10a80*/                  LDC R1, c[0x0][0x28] ;
        /*10a90*/              @P0 HMMA.16816.F32 R4, R8, R12, R4 ;
        /*10aa0*/                  BRA 0x10aa0;
"""


def test_sass_opcodes_by_offset():
    first, second = ki.sass_opcodes_by_offset(RAW_SASS, [0, 0x10A80])
    assert first == {"LDC": 1, "HGMMA.64x64x16.F32": 1, "EXIT": 1}
    assert second == {"LDC": 1, "HMMA.16816.F32": 1, "BRA": 1}
    assert first + second == ki.sass_opcodes(RAW_SASS)


def _elf(sections: list[tuple[int, bytes]]) -> bytes:
    """A minimal little-endian ELF-64 file with `sections` ([(sh_flags, contents)]) after a null one."""
    body, headers = b"", [struct.pack("<IIQQQQIIQQ", *[0] * 10)]
    for flags, data in sections:
        headers.append(struct.pack("<IIQQQQIIQQ", 0, 1, flags, 0, 64 + len(body), len(data), 0, 0, 16, 0))
        body += data
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 190, 1, 0, 0, 64 + len(body), 0, 64, 0, 0, 64,
                                 len(headers), 0)
    return header + body + b"".join(headers)


def test_cubin_code():
    """The executable sections (SHF_EXECINSTR), in order, end to end; data sections left out."""
    text_a, text_b = bytes(range(32)), bytes(range(100, 116))
    cubin = _elf([(0x6, text_a), (0x2, b"constant"), (0x6, text_b)])
    assert ki.cubin_code(cubin) == text_a + text_b
    with pytest.raises(ValueError, match="ELF-64"):
        ki.cubin_code(b"not an elf")


def test_roofline():
    h100 = ki.PEAKS[90]
    t, bound = h100.seconds(989e12, 1.0)  # one second of tensor FLOPs, one byte
    assert t == pytest.approx(1.0) and bound == "compute"
    t, bound = h100.seconds(1.0, 3.35e12)
    assert t == pytest.approx(1.0) and bound == "memory"


def test_missing_module_is_an_error():
    with pytest.raises(ki.InspectError, match="module not found"):
        ki.load_specs(["kernels.no_such_op"])
    with pytest.raises(ki.InspectError, match="has no aot_specs"):
        ki.load_specs(["kernels._triton"])
    assert ki.main(["--source", "kernels.no_such_op"]) == 2


# ----------------------------------------------------------------------------------------------
# compiling: one CLI run (under TRITON_INTERPRET=1: through clean worker processes) serves the CLI
# test, the sample kernels' checks and, when selected, the real kernels' checks, so each
# configuration compiles once and one worker's imports (torch, Dynamo, triton) serve them all


def _real_selected(request) -> bool:
    """Whether this run selected a test of the real kernels (one using the `real_reports` fixture)."""
    return any("real_reports" in getattr(item, "fixturenames", ()) for item in request.session.items)


@pytest.fixture(scope="module")
def cli_run(request):
    """`python -m kernels.inspect --json --arch 80,90 --source <the sample specs> [--source <each of
    the three kernel modules>] --jobs N` (its `main`, in this process), as a user runs it with the
    interpreter on: the compiles in clean worker processes, the JSON rows on stdout, the roofline sum
    on stderr. The real specs only when a test of them is selected; then N is one worker per thread
    this test process is given (`$OMP_NUM_THREADS` as `export.backends.graph.physical_cores` reads it, 1 per
    pytest-xdist worker on 2 cores: one process importing torch and triton, not two), else
    `compile_all`'s default; the sample specs alone take `--jobs 1`.

    Returns:
        `code` (exit code), `out`, `err` (the text printed), `rows` (the JSON), `sources`.
    """
    from export.backends.graph import physical_cores

    sources = [HERE]
    jobs: int | None = 1
    if _real_selected(request):
        sources += list(ki.SPEC_MODULES)
        jobs = physical_cores() if os.environ.get("OMP_NUM_THREADS") else None
    argv = ["--json", "--arch", "80,90"] + [a for src in sources for a in ("--source", src)]
    argv += ["--jobs", str(jobs)] if jobs else []
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("TRITON_INTERPRET", "1")
        code = ki.main(argv)
    assert out.getvalue().lstrip().startswith("["), f"exit {code}, no JSON rows:\n{err.getvalue()[-3000:]}"
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue(), rows=json.loads(out.getvalue()),
                           sources=sources)


def _reports(cli_run, sample: bool) -> list[ki.KernelReport]:
    """The CLI's rows of the sample specs (`sample`) or of the real ones, as `KernelReport`s."""
    names = {s.kernel for s in sample_specs()}
    return [ki.KernelReport(**row) for row in cli_run.rows if (row["kernel"] in names) == sample]


@pytest.fixture(scope="module")
def sample_reports(cli_run):
    """The CLI's rows of the sample specs as `KernelReport`s: the JSON is `asdict` of `compile_all` +
    `make_reports` (3 specs, 2 distinct configurations, x 2 archs)."""
    assert os.environ.get("TRITON_INTERPRET") == "1" or not ki.interpret_mode()
    assert len(ki._jobs_of(sample_specs(), ARCHS)) == 2 * len(ARCHS)  # 3 specs, 2 distinct configurations
    return _reports(cli_run, sample=True)


def _row(reports, kernel, arch):
    (row,) = [r for r in reports if r.kernel == kernel and r.arch == arch]
    return row


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sample_dot_kernel(sample_reports, arch):
    r = _row(sample_reports, "_sample_dot_kernel[64]", arch)
    assert r.ok, r.error
    assert 0 < r.registers <= 255
    assert r.spills == 0 and r.local_bytes == 0
    assert r.shared_bytes > 0  # the dot operands are staged through shared memory
    assert r.mma, r.mma_opcodes
    assert {op.split(".")[0] for op in r.mma_opcodes} <= ({"HMMA"} if arch == "sm_80" else {"HMMA", "HGMMA"})
    assert r.bound == "memory" and r.roofline_us > 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sample_eltwise_kernel(sample_reports, arch):
    r = _row(sample_reports, "_sample_eltwise_kernel[1024]", arch)
    assert r.ok, r.error
    assert r.registers > 0 and r.spills == 0
    assert not r.mma and r.mma_opcodes == {}
    twin = _row(sample_reports, "_sample_eltwise_kernel[1024] again", arch)
    assert (twin.registers, twin.shared_bytes) == (r.registers, r.shared_bytes)
    assert twin.compile_s == r.compile_s  # the same compilation, reported twice
    assert not twin.used


def test_totals_and_table(sample_reports):
    tot = ki.roofline_totals(sample_reports)
    assert set(tot) == {"sm_80", "sm_90"}
    dot = _row(sample_reports, "_sample_dot_kernel[64]", "sm_90")
    elt = _row(sample_reports, "_sample_eltwise_kernel[1024]", "sm_90")
    assert tot["sm_90"]["us"] == pytest.approx(2 * dot.roofline_us + elt.roofline_us)  # the not-used twin is left out
    assert tot["sm_90"]["not_used_specs"] == 1
    table = ki.format_table(sample_reports)
    assert len(table.splitlines()) == 2 + len(sample_reports)
    assert "HGMMA" in table or "HMMA" in table
    assert ki.problems(sample_reports) == []


def test_cli_json(cli_run):
    """The CLI end to end, as a user runs it with the interpreter on: JSON on stdout (one row per
    spec and arch, arch-major), the roofline sum on stderr, exit 0 when every configuration compiled
    without spills (1, with each named on stderr, when one did not: the real kernels' tests say which)."""
    rows = cli_run.rows
    n_specs = len(ki.load_specs(cli_run.sources))  # 3 sample specs (+ 51 real ones)
    assert len(rows) == n_specs * len(ARCHS)
    for row in rows:
        assert {"kernel", "arch", "registers", "spills", "shared_bytes", "mma", "flops", "min_bytes", "calls",
                "roofline_us", "bound"} <= set(row)
    assert [row["arch"] for row in rows] == ["sm_80"] * n_specs + ["sm_90"] * n_specs
    assert {f.name for f in dataclasses.fields(ki.KernelReport)} == set(rows[0])  # asdict of a KernelReport
    found = ki.problems(ki.KernelReport(**row) for row in rows)
    assert cli_run.code == (1 if found else 0), cli_run.err
    assert all(line in cli_run.err for line in found)
    assert "Roofline sum" in cli_run.err
    assert not list(REPO.rglob("*.cubin"))  # nothing left in the repo


def failing_specs(output_size: int = 1024) -> list[KernelSpec]:
    """A spec that cannot compile: `tl.arange` needs a power-of-two length."""
    good = sample_specs(output_size)[0]
    return [KernelSpec("_sample_dot_kernel[48]", good.fn, good.signature, {"BLOCK": 48}, layer="sample")]


def test_compile_failure_is_reported_and_exits_1(capsys):
    src = f"{Path(__file__).resolve()}:failing_specs"
    assert ki.main(["--source", src, "--arch", "80", "--json"]) == 1
    out, err = capsys.readouterr()
    (row,) = json.loads(out)
    assert not row["ok"] and "power of 2" in row["error"]
    assert f"FAILED  _sample_dot_kernel[48] sm_80: {row['error']}" in err


def test_spills_are_problems():
    """A spilling row is named (synthetic: what ptxas spills depends on its version)."""
    spec = sample_specs()[1]
    c = ki.Compiled(key=ki.spec_key(spec), arch=80, registers=255, spill_stores=44, spill_loads=40, stack_bytes=48)
    (r,) = ki.make_reports([spec], {(c.key, 80): c}, [80])
    assert r.spills == 84
    assert ki.problems([r]) == [
        "SPILLS  _sample_eltwise_kernel[1024] sm_80: 44 B spill stores, 40 B spill loads "
        "(stack frame 48 B, 255 registers, 4 warps)"
    ]


# ----------------------------------------------------------------------------------------------
# the real kernels: every configuration of the 1024 generator, compiled once for both archs


@pytest.fixture(scope="module")
def real_reports(cli_run):
    """The CLI's rows of the real specs (`aot_specs(1024)` of the three kernel modules, compiled in
    the `cli_run` workers) as `KernelReport`s."""
    assert cli_run.sources[1:] == list(ki.SPEC_MODULES)
    return _reports(cli_run, sample=False)


@pytest.mark.slow
def test_real_specs_compile_without_spills(real_reports):
    """Every spec of bias_act, upfirdn2d and modulated_conv2d compiles for sm_80 and sm_90 with 0 spills."""
    assert {r.kernel.split("[")[0] for r in real_reports} == {
        "_bias_act_kernel", "_upfirdn2d_kernel", "_modulated_conv2d_kernel"
    }
    assert {r.arch for r in real_reports} == {"sm_80", "sm_90"}
    found = ki.problems(real_reports)
    assert not found, "\n" + "\n".join(found)


@pytest.mark.slow
def test_real_modulated_conv2d_uses_tensor_cores(real_reports):
    """The fp16 modulated-conv kernels run their GEMM on tensor cores (HMMA on sm_80, HGMMA/HMMA on sm_90)."""
    rows = [r for r in real_reports if r.kernel.startswith("_modulated_conv2d_kernel") and r.ok]
    assert rows
    no_mma = [f"{r.kernel} {r.arch}" for r in rows if not r.mma]
    assert not no_mma, no_mma
    for r in rows:
        kinds = {op.split(".")[0] for op in r.mma_opcodes}
        assert kinds <= ({"HMMA"} if r.arch == "sm_80" else {"HMMA", "HGMMA"}), (r.kernel, r.arch, kinds)


@pytest.mark.slow
def test_real_roofline_total(real_reports):
    """The generator's roofline sum counts the layers it runs, once per call, on both GPUs."""
    tot = ki.roofline_totals(real_reports)
    assert tot["sm_90"]["gpu"] == "H100 SXM5"
    assert 0 < tot["sm_90"]["us"] < tot["sm_80"]["us"]
    assert tot["sm_90"]["calls"] == sum(r.calls for r in real_reports if r.arch == "sm_90" and r.used)


# ----------------------------------------------------------------------------------------------
# benchmarks.gpu_kernels and the per-op benchmarks (benchmarks/kernel_ops): their CPU side (case list,
# argument building, the official formulation)


@pytest.fixture(scope="module")
def gpu_bench():
    """`benchmarks.gpu_kernels`, imported as `python -m benchmarks.gpu_kernels` runs it (the repository root
    on the path, no path edits in the benchmark)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO))
        import benchmarks.gpu_kernels as gk

        yield gk


def test_bench_cases(gpu_bench):
    cases = gpu_bench.build_cases(1024, (1, 8))
    per_batch = {"bias_act": 9, "upfirdn2d": 16, "modulated_conv2d": 17, "styled_conv2d": 17, "to_rgb": 9}
    assert set(per_batch) == set(gpu_bench.OPS)  # every op of the table has its benchmark cases
    for op, n in per_batch.items():
        assert sum(c.op == op for c in cases) == 2 * n, op
    assert len({c.name for c in cases}) == len(cases)
    assert all(c.flops > 0 and c.nbytes > 0 for c in cases)
    up = [c for c in cases if c.op == "styled_conv2d" and c.up == 2 and c.batch == 1]
    assert [c.res for c in up] == [8, 16, 32, 64, 128, 256, 512, 1024]
    with pytest.raises(ValueError, match="unknown ops"):
        gpu_bench.build_cases(1024, (1,), ["conv"])


def test_bench_ref_matches_official_on_cpu(gpu_bench):
    """The benchmark's inputs reach `impl="ref"` and the official formulation alike (fp32, CPU)."""
    for case in gpu_bench.build_cases(16, (2,)):
        fns = gpu_bench.make_impls(case, "cpu", torch.float32, impls=("ref", "official"))
        with torch.inference_mode():
            ref, official = fns["ref"](), fns["official"]()
        assert ref.shape == official.shape == (2, case.c_out, case.res, case.res), case.name
        torch.testing.assert_close(ref, official, atol=1e-5, rtol=1e-5, msg=case.name)


def test_bench_triton_args_in_interpreter(gpu_bench):
    """The triton callables get valid arguments (small shapes, Triton's CPU interpreter, fp32).

    The 8 px generator's cases, except where 512 channels cost the interpreter seconds for nothing
    the arguments depend on: the styled convs and the blur (`up` 1 branch) take 16-32 channels."""
    if not ki.interpret_mode():
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py where no GPU exists)")
    Case = gpu_bench.Case
    cases = [c for c in gpu_bench.build_cases(8, (2,)) if c.op in ("bias_act", "upfirdn2d", "to_rgb")]
    blur = [c for c in cases if c.op == "upfirdn2d" and c.up == 1]
    assert len(blur) == 1 and blur[0].c_in == 512
    cases = [c for c in cases if c not in blur] + [Case("upfirdn2d", "Blur after the up conv 16x9->8px", 2, 16, 16, 8,
                                                        used=False)]
    cases += [Case("styled_conv2d", "small up", 2, 32, 16, 8, up=2), Case("styled_conv2d", "small", 2, 16, 16, 8)]
    cases += [Case("modulated_conv2d", "small up", 2, 32, 16, 8, up=2, used=False),
              Case("modulated_conv2d", "small", 2, 16, 16, 8, used=False)]
    for case in cases:
        fns = gpu_bench.make_impls(case, "cpu", torch.float32, impls=("triton", "official"))
        with torch.inference_mode():
            out, official = fns["triton"](), fns["official"]()
        torch.testing.assert_close(out, official, atol=1e-4, rtol=1e-4, msg=case.name)


def test_bench_without_cuda_exits_0(gpu_bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_bench.main(["--batch", "1"]) == 0
    assert capsys.readouterr().out.strip() == gpu_bench.NO_CUDA
