"""GPU benchmark of the Triton kernels against the reference ops and the official formulation.

    python benchmarks/gpu_kernels.py [--batch 1,8] [--ops bias_act,upfirdn2d,styled_conv2d,to_rgb]
                                     [--output-size 1024] [--cudagraph] [--json results.json]

For every op at the shapes of the 1024 generator (rosinality layout, channel_multiplier 2), batch
1 and 8, fp16 activations, three implementations timed in the same process on the same inputs:

  * `triton`   - the op with `impl="triton"` (kernels/); precomputable operands (packed weight,
                 `weight_sq`) prepared once, as the generator caches them;
  * `ref`      - the same op with `impl="ref"` (reference/ ops, torch eager), fp16;
  * `official` - torch eager of the official formulation: rosinality `StyledConv` / `ToRGB`
                 modules (grouped modulated conv, `fused_modconv=True`), rosinality
                 `upfirdn2d_native` and `fused_leaky_relu` (its CPU/native path), fp16.

Timing: `triton.testing.do_bench` (L2 flushed between runs; median of the timed runs, warm-up
excluded) or, with `--cudagraph`, `do_bench_cudagraph` (launch overhead removed: what a
CUDA-graphed generator would see). The first call of each implementation (Triton's JIT compile,
cuDNN autotuning) is timed apart and reported as `first_ms`. Printed: median ms, TFLOP/s and GB/s
(compulsory bytes: inputs read once, output written once), speed-up of triton over ref and over
official, and the worst element of |triton - official| as a sanity check.

Without a CUDA device the script prints one line saying so and exits with code 0: there is nothing
to measure and no number is invented. The compiled code can still be analysed without a GPU:
`python -m kernels.inspect`. The case list and the argument building are plain torch and are
importable (`build_cases`, `make_impls`); tests/test_inspect.py runs them on the CPU.

Source: house style (shared/docs/STYLE.md: honest timing, ratios measured in the same process);
rosinality stylegan2-pytorch `op/upfirdn2d.py::upfirdn2d_native`, `op/fused_act.py` and
`model.py` (`StyledConv`, `ToRGB`) for the official formulation.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from reference.cli import ArgumentParser, int_at_least, run_cli  # noqa: E402
from reference.errors import UsageError  # noqa: E402
from reference.files import write_json  # noqa: E402
from reference.ops import setup_filter  # noqa: E402
from reference.stylegan2 import StyledConv, ToRGB, channels_for  # noqa: E402

OPS = ("bias_act", "upfirdn2d", "styled_conv2d", "to_rgb")
IMPLS = ("triton", "ref", "official")
NO_CUDA = (
    "no CUDA device: this benchmark needs a GPU; see `python -m kernels.inspect` for the compiled-code analysis"
)
BLUR = (1, 3, 3, 1)
RGB_PAD = (2, 1, 2, 1)  # rosinality Upsample(factor=2), 4 taps
NOISE_STRENGTH = 0.1  # NoiseInjection.weight is 0 at init; a trained value, so the noise path does work


# ----------------------------------------------------------------------------------------------
# the official formulation (rosinality stylegan2-pytorch), verbatim where it is torch code


def upfirdn2d_native(x: torch.Tensor, kernel: torch.Tensor, up: int, down: int, pad: Sequence[int]) -> torch.Tensor:
    """rosinality `op/upfirdn2d.py::upfirdn2d_native` (what the official code runs without its CUDA op).

    Args:
        x: `[N, C, H, W]`.
        kernel: `[kh, kw]` filter (flipped: a true convolution).
        up, down: factors, both axes.
        pad: `(x0, x1, y0, y1)` as rosinality's `pad=(pad_x0, pad_x1)` with `pad_y = pad_x` expanded.

    Returns:
        `[N, C, OH, OW]`.
    """
    pad_x0, pad_x1, pad_y0, pad_y1 = pad
    _, channel, in_h, in_w = x.shape
    x = x.reshape(-1, in_h, in_w, 1)
    _, in_h, in_w, minor = x.shape
    kernel_h, kernel_w = kernel.shape
    out = x.view(-1, in_h, 1, in_w, 1, minor)
    out = F.pad(out, [0, 0, 0, up - 1, 0, 0, 0, up - 1])
    out = out.view(-1, in_h * up, in_w * up, minor)
    out = F.pad(out, [0, 0, max(pad_x0, 0), max(pad_x1, 0), max(pad_y0, 0), max(pad_y1, 0)])
    out = out[:, max(-pad_y0, 0) : out.shape[1] - max(-pad_y1, 0), max(-pad_x0, 0) : out.shape[2] - max(-pad_x1, 0), :]
    out = out.permute(0, 3, 1, 2)
    out = out.reshape([-1, 1, in_h * up + pad_y0 + pad_y1, in_w * up + pad_x0 + pad_x1])
    w = torch.flip(kernel, [0, 1]).view(1, 1, kernel_h, kernel_w).to(out.dtype)
    out = F.conv2d(out, w)
    out = out.reshape(-1, minor, in_h * up + pad_y0 + pad_y1 - kernel_h + 1, in_w * up + pad_x0 + pad_x1 - kernel_w + 1)
    out = out.permute(0, 2, 3, 1)
    out = out[:, ::down, ::down, :]
    out_h = (in_h * up + pad_y0 + pad_y1 - kernel_h) // down + 1
    out_w = (in_w * up + pad_x0 + pad_x1 - kernel_w) // down + 1
    return out.reshape(-1, channel, out_h, out_w)


def fused_leaky_relu_native(x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2,
                            scale: float = 2**0.5) -> torch.Tensor:
    """rosinality `op/fused_act.py::fused_leaky_relu`, its non-CUDA branch."""
    rest_dim = [1] * (x.ndim - bias.ndim - 1)
    return F.leaky_relu(x + bias.view(1, bias.shape[0], *rest_dim).to(x.dtype), negative_slope=negative_slope) * scale


# ----------------------------------------------------------------------------------------------
# the cases


@dataclass(frozen=True)
class Case:
    """One op at one layer shape.

    Attributes:
        op: one of `OPS`.
        layer: the generator layer(s) it stands for.
        batch: N.
        c_in, c_out: channels (equal for elementwise ops).
        res: output resolution (pixels per side).
        up: 2 for the upsampling conv / the skip upsample, else 1.
        skip: ToRGB with the previous level's image.
        used: False for shapes the Triton generator does not run standalone (bias_act and the
            blur are fused into the modulated-conv kernel), benchmarked against the official path.
        flops: floating-point operations per call (multiply-add = 2; the modulated convs count
            the GEMM the Triton kernel runs, as `kernels.modulated_conv2d.aot_specs`).
        nbytes: compulsory fp16 DRAM traffic per call (inputs once, output once, fp32 extras).
    """

    op: str
    layer: str
    batch: int
    c_in: int
    c_out: int
    res: int
    up: int = 1
    skip: bool = False
    used: bool = True
    flops: float = 0.0
    nbytes: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.op}[{self.layer}] b{self.batch}"


def _levels(output_size: int) -> list[int]:
    return [2**i for i in range(3, int(math.log2(output_size)) + 1)]


def build_cases(output_size: int = 1024, batches: Sequence[int] = (1, 8), ops: Sequence[str] = OPS) -> list[Case]:
    """Every (op, layer shape, batch) of a generator of `output_size`, in forward order per op.

    Raises:
        UsageError (a ValueError): an unknown op or an output size that is not a power of two in [8, 1024].
    """
    if output_size < 8 or output_size > 1024 or output_size & (output_size - 1):
        raise UsageError(f"output_size must be a power of two in [8, 1024], got {output_size}")
    bad = set(ops) - set(OPS)
    if bad:
        raise UsageError(f"unknown ops {sorted(bad)}; choose from {OPS}")
    ch = channels_for
    cases: list[Case] = []
    for n in batches:
        if "bias_act" in ops:
            for r in [4] + _levels(output_size):
                c, e = ch(r), n * ch(r) * r * r
                cases.append(Case("bias_act", f"FusedLeakyReLU {c}x{r}px", n, c, c, r, used=False,
                                  flops=3.0 * e, nbytes=4.0 * e + 4.0 * c))
        if "upfirdn2d" in ops:
            for r in _levels(output_size):
                cases.append(Case("upfirdn2d", f"ToRGB skip Upsample {r // 2}->{r}px", n, 3, 3, r, up=2,
                                  used=False, flops=n * 3 * r * r * 9.0, nbytes=2.0 * n * 3 * (r * r // 4 + r * r)))
            for r in _levels(output_size):
                c = ch(r)
                cases.append(Case("upfirdn2d", f"Blur after the up conv {c}x{r + 1}->{r}px", n, c, c, r, used=False,
                                  flops=n * c * r * r * 33.0, nbytes=2.0 * n * c * ((r + 1) ** 2 + r * r)))
        if "styled_conv2d" in ops:
            convs = [("conv1", ch(4), ch(4), 4, 1)]
            for i, r in enumerate(_levels(output_size)):
                convs.append((f"convs.{2 * i} up", ch(r // 2), ch(r), r, 2))
                convs.append((f"convs.{2 * i + 1}", ch(r), ch(r), r, 1))
            for name, ci, co, r, up in convs:
                phases = 4 if up == 2 else 1
                nb = 2.0 * (n * ci * (r // up) ** 2 + phases * 9 * ci * co + n * co * r * r + r * r)
                nb += 4.0 * n * (ci + 2 * co)  # styles, output scale, bias (fp32)
                cases.append(Case("styled_conv2d", f"{name} {ci}->{co} {r}px", n, ci, co, r, up=up,
                                  flops=2.0 * n * r * r * co * ci * 9, nbytes=nb))
        if "to_rgb" in ops:
            for r in [4] + _levels(output_size):
                c, skip = ch(r), r > 4
                nb = 2.0 * (n * c * r * r + 3 * c + n * 3 * r * r + (n * 3 * r * r // 4 if skip else 0)) + 4.0 * n * c
                cases.append(Case("to_rgb", f"{'to_rgb1' if r == 4 else 'to_rgbs'} {c}->3 {r}px", n, c, 3, r,
                                  skip=skip, flops=2.0 * n * r * r * 3 * c, nbytes=nb))
    return cases


# ----------------------------------------------------------------------------------------------
# inputs and the three implementations of a case


def make_impls(case: Case, device: str | torch.device = "cuda", dtype: torch.dtype = torch.float16,
               seed: int = 0, impls: Sequence[str] = IMPLS) -> dict[str, Callable[[], torch.Tensor]]:
    """Inputs of `case` on `device` in `dtype` and one zero-argument callable per implementation.

    All implementations see the same inputs and weights (activations channels_last for the
    modulated convs, the layout the Triton kernel is fastest in; NCHW for the elementwise ops).
    The `official` StyledConv / ToRGB are rosinality modules in `dtype`; the Triton and ref ops
    get the same effective weight, styles (`module.conv.modulation(w)`), bias and noise.
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    n, r = case.batch, case.res
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    to = dict(device=device, dtype=dtype)

    if case.op == "bias_act":
        from kernels.bias_act import bias_act

        x, b = rnd(n, case.c_in, r, r).to(**to), rnd(case.c_in).to(device)
        fns["triton"] = lambda: bias_act(x, b, impl="triton")
        fns["ref"] = lambda: bias_act(x, b, impl="ref")
        fns["official"] = lambda: fused_leaky_relu_native(x, b)

    elif case.op == "upfirdn2d":
        from kernels.upfirdn2d import upfirdn2d

        fir = setup_filter(BLUR, gain=4).to(device)
        if case.up == 2:  # ToRGB skip: Upsample(factor=2)
            x, pad = rnd(n, 3, r // 2, r // 2).to(**to), RGB_PAD
            fns["triton"] = lambda: upfirdn2d(x, fir, up=2, padding=pad, impl="triton")
            fns["ref"] = lambda: upfirdn2d(x, fir, up=2, padding=pad, impl="ref")
            fns["official"] = lambda: upfirdn2d_native(x, fir, 2, 1, pad)
        else:  # Blur(pad=(1, 1)) after the transposed conv
            x, pad = rnd(n, case.c_in, r + 1, r + 1).to(**to), (1, 1, 1, 1)
            fns["triton"] = lambda: upfirdn2d(x, fir, padding=pad, impl="triton")
            fns["ref"] = lambda: upfirdn2d(x, fir, padding=pad, impl="ref")
            fns["official"] = lambda: upfirdn2d_native(x, fir, 1, 1, pad)

    elif case.op == "styled_conv2d":
        from kernels import modulated_conv2d as mc

        torch.manual_seed(seed)
        layer = StyledConv(case.c_in, case.c_out, 3, upsample=case.up == 2)
        with torch.no_grad():
            layer.noise.weight.fill_(NOISE_STRENGTH)
            layer.activate.bias.copy_(0.1 * rnd(case.c_out))
        layer = layer.to(device).eval()
        w = rnd(n, 512).to(device)
        x = rnd(n, case.c_in, r // case.up, r // case.up).to(**to).contiguous(memory_format=torch.channels_last)
        noise = rnd(1, 1, r, r).to(**to)
        with torch.no_grad():
            styles = layer.conv.modulation(w).float()  # [N, C_in]
            weight = (layer.conv.scale * layer.conv.weight[0]).to(dtype)  # [O, I, 3, 3]
            wsq = mc.weight_sq(layer.conv.scale * layer.conv.weight[0])
        fir = layer.conv.blur.kernel.clone() if case.up == 2 else None
        strength = layer.noise.weight.detach().float().clone()  # clones: the module goes to `dtype` below
        bias = layer.activate.bias.detach().float().clone()
        args = (x, weight, styles, noise, strength, bias, True, case.up, fir, None)
        if "triton" in impls:
            packed = mc.pack_weight(layer.conv.scale * layer.conv.weight[0].detach(), case.up, fir, dtype)
            fns["triton"] = lambda: mc.styled_conv2d(*args, "triton", wsq=wsq, packed_weight=packed)
        # the reference mixes dtypes badly (fp16 x with fp32 styles fails in F.conv2d): styles in `dtype`
        # and a tensor noise_strength promotes its output to fp32: strength in `dtype` too
        ref_args = (x, weight, styles.to(dtype), noise, strength.to(dtype), bias, True, case.up, fir, None)
        fns["ref"] = lambda: mc.styled_conv2d(*ref_args, "ref")
        official = layer.to(dtype)
        w16 = w.to(dtype)
        fns["official"] = lambda: official(x, w16, noise)

    elif case.op == "to_rgb":
        from kernels import modulated_conv2d as mc

        torch.manual_seed(seed)
        layer = ToRGB(case.c_in, upsample=case.skip)
        with torch.no_grad():
            layer.bias.copy_(0.1 * rnd(1, 3, 1, 1))
        layer = layer.to(device).eval()
        w = rnd(n, 512).to(device)
        x = rnd(n, case.c_in, r, r).to(**to).contiguous(memory_format=torch.channels_last)
        skip = rnd(n, 3, r // 2, r // 2).to(**to) if case.skip else None
        with torch.no_grad():
            styles = layer.conv.modulation(w).float()
            weight = (layer.conv.scale * layer.conv.weight[0]).to(dtype)  # [3, C_in, 1, 1]
        fir = layer.upsample.kernel.clone() if case.skip else None
        bias = layer.bias.detach().float().clone()
        if "triton" in impls:
            packed = mc.pack_weight(layer.conv.scale * layer.conv.weight[0].detach(), 1, None, dtype)
            fns["triton"] = lambda: mc.to_rgb(x, weight, styles, bias, skip, fir, "triton", packed_weight=packed)
        styles_ref = styles.to(dtype)  # see styled_conv2d above
        fns["ref"] = lambda: mc.to_rgb(x, weight, styles_ref, bias, skip, fir, "ref")
        official = layer.to(dtype)
        w16 = w.to(dtype)
        fns["official"] = lambda: official(x, w16, skip)

    else:
        raise ValueError(f"unknown op {case.op!r}")
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
    p = ArgumentParser(prog="python benchmarks/gpu_kernels.py", description=__doc__.splitlines()[0],
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
