"""upfirdn2d (upsample by zero insertion, pad/crop, FIR filter, downsample) as one Triton kernel.

Direct formulation: the zero-inserted, padded tensor is never materialised. With padding
`[x0, x1, y0, y1]`, output pixel `(oy, ox)` is

    out[oy, ox] = gain * sum_{ty, tx} fir[KH-1-ty, KW-1-tx] * u[oy*down + ty - y0, ox*down + tx - x0]

where `u[j, i] = x[j // up, i // up]` when `0 <= j < H*up`, `0 <= i < W*up` and both are divisible
by `up`, else 0 (a true convolution: the filter is flipped). Negative padding crops. Each program
computes `BLOCK` consecutive output pixels of the contiguous `[N, C, OH, OW]` output (small
planes pack several to a program), one filter row at a time: the `KW` taps of a row are gathered
side by side as a `[BLOCK, KW_P]` tile whose column offsets and masks are computed once, and the
`KH` rows are unrolled (`KH`, `KW`, `UP`, `DOWN` are constexprs). Accumulation is fp32.

One public op, `upfirdn2d`, with the arguments of `reference.ops.upfirdn2d` plus `impl` (house
style: pairing rule). The custom op is `torch.ops.psp.upfirdn2d`.

Source: NVlabs stylegan2-ada-pytorch `torch_utils/ops/upfirdn2d.py` semantics (padding
convention, flip); rosinality stylegan2-pytorch `op/upfirdn2d.py` (`Upsample`, `Blur`; the layout
official pSp checkpoints use). Kernel layout after the Triton tutorials.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from kernels._triton import KernelSpec, check_impl
from reference import ops as ref_ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FACTORS = (1, 2)
BLOCK = 512  # output pixels per program, flat over [N, C, OH, OW]
NUM_WARPS = 8  # 2 pixels x 4 taps per thread: ~60 registers, no spills (sm_80, sm_90)


@triton.jit
def _upfirdn2d_kernel(
    # pointers
    x_ptr,  # [N, C, H, W] input, any strides, fp32/fp16/bf16
    fir_ptr,  # [KH, KW] fp32 filter, contiguous, as given (the kernel flips it)
    y_ptr,  # [N, C, OH, OW] contiguous output, dtype of x
    # sizes
    n_out,  # N * C * OH * OW
    C,
    H,
    W,
    OH,
    OW,
    # strides of x, in elements
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    # padding before the first upsampled row/column (negative: crop)
    pad_x0,
    pad_y0,
    # scalars
    gain,
    # meta-parameters
    UP: tl.constexpr,
    DOWN: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    KW_P: tl.constexpr,  # next power of two >= KW (tl.arange needs one)
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] flat output index (contiguous NCHW)
    out_mask = offs < n_out
    plane = offs // (OH * OW)  # n * C + c
    oy = (offs // OW) % OH
    ox = offs % OW
    x_plane = (plane // C) * stride_xn + (plane % C) * stride_xc  # [BLOCK]

    # the KW taps of one filter row side by side: columns computed once, [BLOCK, KW_P]
    tx = tl.arange(0, KW_P)  # [KW_P]
    ux = ox[:, None] * DOWN + tx[None, :] - pad_x0  # column in the zero-inserted, padded image
    if UP == 1:
        col_ok = (ux >= 0) & (ux < W)
        ix = ux
    else:
        col_ok = (ux >= 0) & (ux < W * UP) & (ux % UP == 0)
        ix = ux // UP  # masked where col_ok is False: C-style division of negatives is harmless
    col_ok = col_ok & (tx[None, :] < KW) & out_mask[:, None]
    col_off = x_plane[:, None] + ix * stride_xw  # [BLOCK, KW_P]

    acc = tl.zeros((BLOCK, KW_P), dtype=tl.float32)
    for ty in tl.static_range(KH):
        uy = oy * DOWN + ty - pad_y0  # [BLOCK] row in the zero-inserted, padded image
        if UP == 1:
            row_ok = (uy >= 0) & (uy < H)
            iy = uy
        else:
            row_ok = (uy >= 0) & (uy < H * UP) & (uy % UP == 0)
            iy = uy // UP
        # fir[KH-1-ty, KW-1-tx]: the filter flipped, a true convolution
        taps = tl.load(fir_ptr + (KH - 1 - ty) * KW + (KW - 1 - tx), mask=tx < KW, other=0.0)  # [KW_P]
        v = tl.load(x_ptr + (col_off + (iy * stride_xh)[:, None]), mask=col_ok & row_ok[:, None], other=0.0)
        acc += v.to(tl.float32) * taps[None, :]
    out = tl.sum(acc, axis=1) * gain  # [BLOCK]
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=out_mask)


def _out_size(in_h: int, in_w: int, kh: int, kw: int, up: int, down: int, pad: Sequence[int]) -> tuple[int, int]:
    """Output height and width for padding `[x0, x1, y0, y1]`, as `reference.ops.upfirdn2d`."""
    x0, x1, y0, y1 = pad
    return (in_h * up + y0 + y1 - kh) // down + 1, (in_w * up + x0 + x1 - kw) // down + 1


@triton_op("psp::upfirdn2d", mutates_args=())
def _upfirdn2d_op(
    x: torch.Tensor, fir: torch.Tensor, up: int, down: int, padding: list[int], gain: float
) -> torch.Tensor:
    """The custom op `torch.ops.psp.upfirdn2d` behind `upfirdn2d(impl="triton")`: (2) allocate
    (3) launch. Expects what `upfirdn2d` has checked: `x` `[N, C, H, W]`, `fir` `[KH, KW]`
    contiguous fp32 on the device of `x`, `padding` `[x0, x1, y0, y1]`, a non-empty output."""
    n, c, in_h, in_w = x.shape
    kh, kw = fir.shape
    out_h, out_w = _out_size(in_h, in_w, kh, kw, up, down, padding)
    y = torch.empty((n, c, out_h, out_w), dtype=x.dtype, device=x.device)
    n_out = y.numel()
    if n_out == 0:
        return y
    grid = (triton.cdiv(n_out, BLOCK),)
    wrap_triton(_upfirdn2d_kernel)[grid](
        x,
        fir,
        y,
        n_out,
        c,
        in_h,
        in_w,
        out_h,
        out_w,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        x.stride(3),
        padding[0],
        padding[2],
        gain,
        UP=up,
        DOWN=down,
        KH=kh,
        KW=kw,
        KW_P=triton.next_power_of_2(kw),
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return y


def upfirdn2d(
    x: torch.Tensor,
    fir: torch.Tensor,
    up: int = 1,
    down: int = 1,
    padding: int | Sequence[int] = 0,
    gain: float = 1.0,
    impl: str = "ref",
) -> torch.Tensor:
    """Upsample (zero insertion), pad, convolve with a FIR filter (true convolution), downsample.

    Source: NVlabs stylegan2-ada `torch_utils/ops/upfirdn2d.py` semantics and padding convention;
    rosinality stylegan2-pytorch `op/upfirdn2d.py` (pSp `Upsample`, `Blur`).

    Args:
        x: `[N, C, H, W]` float32/float16/bfloat16 activations (any strides for `impl="triton"`).
        fir: `[kh, kw]` 2-D filter, or `[k]` 1-D taps used separably (outer product, not
            normalised: pass `reference.ops.setup_filter(...)` for the usual normalisation).
            `impl="triton"` applies it in fp32 whatever `x.dtype`, accumulating in fp32.
        up: upsampling factor (zeros inserted after every sample), both axes; 1 or 2 for triton.
        down: downsampling factor (keep every `down`-th sample), both axes; 1 or 2 for triton.
        padding: int, `[px, py]` or `[x0, x1, y0, y1]` pixels added (negative: cropped) after
            upsampling.
        gain: multiply the output by this.
        impl: `"ref"` (`reference.ops.upfirdn2d`) or `"triton"` (`torch.ops.psp.upfirdn2d`).

    Returns:
        `[N, C, (H*up + y0 + y1 - kh) // down + 1, (W*up + x0 + x1 - kw) // down + 1]` contiguous,
        dtype of `x`.

    Raises:
        ValueError: unknown `impl`; a bad filter rank or padding; an empty output; and for
            `impl="triton"` `x` not 4-D, an unsupported dtype, `up`/`down` not in {1, 2}, or an
            input or output beyond int32 indexing (2**31 elements).
        KernelUnavailableError: `impl="triton"` where Triton cannot run (see `check_impl`).
    """
    check_impl("upfirdn2d", impl, x, fir)
    if impl == "ref":
        return ref_ops.upfirdn2d(x, fir, up, down, padding, gain)

    # (1) check
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"upfirdn2d: x must be float32, float16 or bfloat16 for impl='triton', got {x.dtype}")
    if up not in FACTORS or down not in FACTORS:
        raise ValueError(f"upfirdn2d: impl='triton' supports up, down in {FACTORS}, got up={up}, down={down}")
    if not fir.dtype.is_floating_point:
        raise ValueError(f"upfirdn2d: fir must be a float tensor, got {fir.dtype}")
    fir = fir.to(device=x.device, dtype=torch.float32)
    if fir.ndim == 1:
        fir = fir[:, None] * fir[None, :]  # separable taps: the outer product, as the reference
    if fir.ndim != 2 or fir.numel() == 0:
        raise ValueError(f"upfirdn2d: fir must be [k] or [kh, kw], got shape {tuple(fir.shape)}")
    pad = list(ref_ops._parse_padding(padding))
    n, c, in_h, in_w = x.shape
    out_h, out_w = _out_size(in_h, in_w, fir.shape[0], fir.shape[1], up, down, pad)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"upfirdn2d: output would be empty ({out_h}x{out_w}) for input {in_h}x{in_w}")
    span = sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())) + 1  # elements x reaches
    if max(span, n * c * out_h * out_w) >= 2**31 - BLOCK:
        raise ValueError(f"upfirdn2d: impl='triton' indexes with int32; x {tuple(x.shape)} or its output is too large")
    # (2) allocate (3) launch: in the custom op
    return torch.ops.psp.upfirdn2d(x, fir.contiguous(), int(up), int(down), pad, float(gain))


# ----------------------------------------------------------------------------------------------
# ahead-of-time configurations for `python -m kernels.inspect`

NOT_USED = "(not used by the triton generator)"

# rosinality 1024 generator: channels per resolution (channel_multiplier=2)
GENERATOR_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}


_INT_ARGS = ("n_out", "C", "H", "W", "OH", "OW", "stride_xn", "stride_xc", "stride_xh", "stride_xw", "pad_x0", "pad_y0")


def signature(dtype: str = "fp16", unit_args: Sequence[str] = ()) -> dict[str, str]:
    """`ASTSource` signature of `_upfirdn2d_kernel`.

    Args:
        dtype: activation dtype, "fp16", "bf16" or "fp32" (x and y; the filter is fp32).
        unit_args: integer arguments equal to 1 at run time, which Triton's JIT specializes to
            the constant 1 (e.g. `stride_xw` of a contiguous x); marked "constexpr".
    """
    sig = {"x_ptr": f"*{dtype}", "fir_ptr": "*fp32", "y_ptr": f"*{dtype}"}
    for name in _INT_ARGS:
        sig[name] = "constexpr" if name in unit_args else "i32"
    sig["gain"] = "fp32"
    for name in ("UP", "DOWN", "KH", "KW", "KW_P", "BLOCK"):
        sig[name] = "constexpr"
    return sig


def _spec(c: int, in_size: int, kh: int, up: int, pad: Sequence[int], layer: str, calls: int) -> KernelSpec:
    """One contiguous NCHW fp16 batch-1 configuration: `[1, c, in_size, in_size]`, a `kh x kh` filter."""
    out_h, out_w = _out_size(in_size, in_size, kh, kh, up, 1, pad)
    runtime = dict(zip(_INT_ARGS, (c * out_h * out_w, c, in_size, in_size, out_h, out_w,
                                   c * in_size * in_size, in_size * in_size, in_size, 1, pad[0], pad[2])))  # fmt: skip
    unit_args = [name for name, v in runtime.items() if v == 1]
    taps = (-(-kh // up)) ** 2  # taps that meet a non-zero sample, per output pixel
    out_px = c * out_h * out_w
    return KernelSpec(
        kernel=f"_upfirdn2d_kernel[up{up} {kh}x{kh} {c}x{in_size}->{out_h} fp16]",
        fn=_upfirdn2d_kernel,
        signature=signature("fp16", unit_args),
        constexprs={"UP": up, "DOWN": 1, "KH": kh, "KW": kh, "KW_P": triton.next_power_of_2(kh), "BLOCK": BLOCK}
        | {name: 1 for name in unit_args},
        num_warps=NUM_WARPS,
        flops=out_px * (2.0 * taps + 1.0),  # multiply-adds over the non-zero taps, then the gain
        min_bytes=2.0 * c * in_size * in_size + 2.0 * out_px + 4.0 * kh * kh,
        layer=layer,
        calls=calls,
        used=False,  # see aot_specs: nothing of this op is launched by the triton generator
    )


def aot_specs(output_size: int = 1024) -> list[KernelSpec]:
    """Every `_upfirdn2d_kernel` configuration a StyleGAN2 generator of `output_size` would run in
    fp16 activations, batch 1, with the `[1, 3, 3, 1]` filter (4x4, normalised, x4).

    * the ToRGB skip upsample at each resolution r = 8 .. output_size (`Upsample`: up=2,
      padding (2, 1, 2, 1), `[1, 3, r/2, r/2] -> [1, 3, r, r]`, once per resolution);
    * the blur after each transposed convolution (`Blur`: up=1, padding (1, 1, 1, 1),
      `[1, C, r+1, r+1] -> [1, C, r, r]`, once per resolution).

    The triton backend's synthesis (`export.backends.engine_model.Synthesis`) runs neither as this kernel: `to_rgb` fuses the
    skip upsample into the modulated-conv epilogue (`HAS_SKIP`) and the up StyledConv absorbs the
    blur into its polyphase weights. So every spec is marked `NOT_USED` in `layer` (left out of
    `kernels.inspect`'s roofline sum, which counts the skip in the ToRGB spec); `calls` is what a
    generator calling upfirdn2d standalone would run. Drop the prefix from the skip specs if the
    generator ever calls `upfirdn2d(impl="triton")` for the skip.

    Source: rosinality stylegan2-pytorch `model.py` (`ToRGB(upsample=True)`, `Upsample`,
    `ModulatedConv2d(upsample=True)` + `Blur`), layout of official pSp checkpoints.

    Args:
        output_size: generator resolution, a power of two in [4, 1024].

    Returns:
        `KernelSpec`s: the skip upsamples (8 px first), then the blurs.
    """
    if output_size not in GENERATOR_CHANNELS:
        raise ValueError(f"output_size must be one of {sorted(GENERATOR_CHANNELS)}, got {output_size}")
    levels = [r for r in GENERATOR_CHANNELS if 8 <= r <= output_size]
    skips = [
        _spec(
            3,
            r // 2,
            4,
            2,
            (2, 1, 2, 1),
            f"{NOT_USED} ToRGB skip Upsample {r // 2}->{r}px [1, 3, {r // 2}, {r // 2}] "
            "(fused into the ToRGB modulated-conv epilogue)",
            1,
        )
        for r in levels
    ]
    blurs = [
        _spec(
            GENERATOR_CHANNELS[r],
            r + 1,
            4,
            1,
            (1, 1, 1, 1),
            f"{NOT_USED} Blur after the transposed conv at {r}px [1, {GENERATOR_CHANNELS[r]}, {r + 1}, {r + 1}] "
            "(absorbed by the up StyledConv's polyphase weights)",
            1,
        )
        for r in levels
    ]
    return skips + blurs
