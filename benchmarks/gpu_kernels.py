"""GPU benchmark of the Triton kernels against the reference ops and the official formulation.

    python -m benchmarks.gpu_kernels [--batch 1,8] [--ops bias_act,upfirdn2d,modulated_conv2d,styled_conv2d,to_rgb]
                                     [--output-size 1024] [--cudagraph] [--json results.json]

For every op of the op table (`kernels.ops.OPS`) at the shapes of the 1024 generator (rosinality
layout, channel_multiplier 2), batch 1 and 8, fp16 activations, three implementations timed in the
same process on the same inputs:

  * `triton`   - the op with `impl="triton"` (kernels/); precomputable operands (packed weight,
                 `weight_sq`) prepared once, as the generator caches them;
  * `ref`      - the same op with `impl="ref"` (reference/ ops, torch eager), fp16;
  * `official` - torch eager of the official formulation: rosinality `ModulatedConv2d` /
                 `StyledConv` / `ToRGB` modules (grouped modulated conv, `fused_modconv=True`),
                 rosinality `upfirdn2d_native` and `fused_leaky_relu` (its CPU/native path), fp16.

Each op's cases and inputs are its benchmark module, named after it: `benchmarks/kernel_ops/<op>.py`
(the table's `benchmark`); this file times them. Timing: `triton.testing.do_bench` (L2 flushed
between runs; median of the timed runs, warm-up excluded) or, with `--cudagraph`,
`do_bench_cudagraph` (launch overhead removed: what a CUDA-graphed generator would see). The first
call of each implementation (Triton's JIT compile, cuDNN autotuning) is timed apart and reported as
`first_ms`. Printed: median ms, TFLOP/s and GB/s (compulsory bytes: inputs read once, output written
once), speed-up of triton over ref and over official, and the worst element of |triton - official|
as a sanity check.

Without a CUDA device the script prints one line saying so and exits with code 0: there is nothing
to measure and no number is invented. The compiled code can still be analysed without a GPU:
`python -m kernels.inspect`. The case list and the argument building are plain torch and are
importable (`build_cases`, `make_impls`); tests/test_inspect.py runs them on the CPU.

Source: house style (shared/docs/STYLE.md: honest timing, ratios measured in the same process;
one benchmark per op, Liger-Kernel's layout); rosinality stylegan2-pytorch for the official
formulation (`benchmarks.kernel_ops.common`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from benchmarks.kernel_ops.common import Case
from kernels.ops import NAMES, op, resolve
from reference.plumbing.cli import ArgumentParser, int_at_least, run_cli
from reference.plumbing.errors import UsageError
from reference.plumbing.files import write_json

OPS = NAMES  # every op of the table, in its order
IMPLS = ("triton", "ref", "official")
NO_CUDA = (
    "no CUDA device: this benchmark needs a GPU; see `python -m kernels.inspect` for the compiled-code analysis"
)


def benchmark(name: str):
    """The benchmark module of op `name` (the op table's `benchmark`: `cases`, `impls`)."""
    return resolve(op(name).benchmark)


# ----------------------------------------------------------------------------------------------
# the cases


def build_cases(output_size: int = 1024, batches: Sequence[int] = (1, 8), ops: Sequence[str] = OPS) -> list[Case]:
    """Every (op, layer shape, batch) of a generator of `output_size`: per batch, per op in table order,
    the op benchmark's `cases` (forward order).

    Raises:
        UsageError (a ValueError): an unknown op or an output size that is not a power of two in [8, 1024].
    """
    if output_size < 8 or output_size > 1024 or output_size & (output_size - 1):
        raise UsageError(f"output_size must be a power of two in [8, 1024], got {output_size}")
    bad = set(ops) - set(OPS)
    if bad:
        raise UsageError(f"unknown ops {sorted(bad)}; choose from {OPS}")
    return [c for n in batches for name in OPS if name in ops for c in benchmark(name).cases(output_size, n)]


def make_impls(case: Case, device: str | torch.device = "cuda", dtype: torch.dtype = torch.float16,
               seed: int = 0, impls: Sequence[str] = IMPLS) -> dict[str, Callable[[], torch.Tensor]]:
    """Inputs of `case` on `device` in `dtype` and one zero-argument callable per implementation in `impls`
    (the op benchmark's `impls`).

    All implementations see the same inputs and weights (activations channels_last for the
    modulated convs, the layout the Triton kernel is fastest in; NCHW for the elementwise ops).
    The `official` modules are rosinality modules in `dtype`; the Triton and ref ops get the same
    effective weight, styles (`module.conv.modulation(w)`), bias and noise.

    Raises:
        ValueError: `case.op` is not in the op table.
    """
    if case.op not in OPS:
        raise ValueError(f"unknown op {case.op!r}")
    fns = benchmark(case.op).impls(case, device, dtype, seed, impls)
    return {k: fns[k] for k in impls if k in fns}


# ----------------------------------------------------------------------------------------------
# timing


@dataclass
class Result:
    """One implementation of one case, timed. Times in ms; rates from `Case.flops` / `Case.nbytes`."""

    op: str
    layer: str
    batch: int
    impl: str
    dtype: str
    used: bool
    median_ms: float
    first_ms: float
    tflops: float
    gbps: float
    speedup_vs_ref: float | None = None
    speedup_vs_official: float | None = None
    max_abs_err_vs_official: float | None = None
    error: str | None = None


def _time(fn: Callable[[], torch.Tensor], cudagraph: bool) -> tuple[float, float, torch.Tensor]:
    """(first call ms, median ms, output)."""
    from triton.testing import do_bench, do_bench_cudagraph

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    if cudagraph:
        ms = do_bench_cudagraph(fn, rep=100, return_mode="median")
    else:
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    return first, float(ms), out


def run_case(case: Case, cudagraph: bool = False, dtype: torch.dtype = torch.float16) -> list[Result]:
    """Time every implementation of `case` on the current CUDA device."""
    results: list[Result] = []
    with torch.inference_mode():
        fns = make_impls(case, "cuda", dtype)
        outs: dict[str, torch.Tensor] = {}
        for impl, fn in fns.items():
            try:
                first, ms, outs[impl] = _time(fn, cudagraph)
                err = None
            except Exception as e:  # noqa: BLE001  an implementation that fails is reported, the others still run
                first = ms = float("nan")
                err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            results.append(Result(case.op, case.layer, case.batch, impl, str(dtype).removeprefix("torch."), case.used,
                                  ms, first, case.flops / ms / 1e9, case.nbytes / ms / 1e6, error=err))
        by = {r.impl: r for r in results}
        tri = by.get("triton")
        if tri is not None and tri.error is None:
            for other, attr in (("ref", "speedup_vs_ref"), ("official", "speedup_vs_official")):
                if other in by and by[other].error is None:
                    setattr(tri, attr, by[other].median_ms / tri.median_ms)
            if "official" in outs:
                tri.max_abs_err_vs_official = (outs["triton"].float() - outs["official"].float()).abs().max().item()
        del outs
        torch.cuda.empty_cache()
    return results


def format_results(results: Sequence[Result]) -> str:
    """Aligned text table."""
    header = ("op", "layer", "batch", "impl", "ms", "first ms", "TFLOP/s", "GB/s", "x ref", "x official", "max|Δ|")
    rows = [header]
    f = lambda v, p: "" if v is None or v != v else f"{v:.{p}f}"  # noqa: E731
    for r in results:
        rows.append((r.op, r.layer + ("" if r.used else " *"), str(r.batch), r.impl,
                     "FAILED" if r.error else f(r.median_ms, 4), f(r.first_ms, 1), f(r.tflops, 2), f(r.gbps, 0),
                     f(r.speedup_vs_ref, 2), f(r.speedup_vs_official, 2),
                     "" if r.max_abs_err_vs_official is None else f"{r.max_abs_err_vs_official:.2e}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_positive = int_at_least(1)


def _csv_ints(text: str) -> list[int]:
    return [_positive(v) for v in text.split(",") if v.strip()]


def build_parser() -> ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(prog="python -m benchmarks.gpu_kernels", description=__doc__.splitlines()[0],
                       epilog="Exit codes: 0 measured (or no CUDA: nothing measured, one line printed), 1 an "
                              "implementation failed, 2 usage error (one line), 130 interrupted.")
    p.add_argument("--batch", type=_csv_ints, default=[1, 8], help="batch sizes (default 1,8)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--output-size", type=int, default=1024)
    p.add_argument("--cudagraph", action="store_true", help="time with do_bench_cudagraph (no launch overhead)")
    p.add_argument("--json", type=Path, default=None, help="also save the results to this JSON file")
    return p


def _body(args: argparse.Namespace) -> int:
    cases = build_cases(args.output_size, args.batch, [o.strip() for o in args.ops.split(",") if o.strip()])
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    import triton

    results: list[Result] = []
    for case in cases:
        results.extend(run_case(case, args.cudagraph))
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"{'do_bench_cudagraph' if args.cudagraph else 'do_bench'} medians; fp16; * = not run standalone by the "
          "Triton generator (fused)")
    print(format_results(results))
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "cudagraph": args.cudagraph, "output_size": args.output_size}
        write_json(args.json, {"meta": meta, "results": [asdict(r) for r in results]})
    return 1 if any(r.error for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Exit code 0 (also without CUDA: nothing measured, one line printed), 1 if an implementation failed,
    2 usage error, 130 interrupted."""
    return run_cli(build_parser(), _body, argv, interrupted="nothing was saved; rerun the same command")


if __name__ == "__main__":
    sys.exit(main())
