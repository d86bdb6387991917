"""Bias + activation (+ gain, + clamp) as one elementwise Triton kernel.

`y = clamp(act(x + b[c]) * gain, -clamp, clamp)`, act = leaky ReLU (slope `alpha`) or linear; the
math in fp32 whatever the storage dtype. One public op, `bias_act`, with the arguments of
`reference.ops.bias_act` plus `impl` (house style: pairing rule).

Layout rule: the kernel walks `x` in memory order, so `x` must be dense (some permutation of its
dims is contiguous: NCHW-contiguous, channels_last, NHWC-contiguous, ...). The channel of the
element at memory offset `o` is then `(o // x.stride(dim)) % x.shape[dim]`, which covers NCHW
(`dim=1`), NHWC (`dim=3`) and a channels_last NCHW tensor with `dim=1` alike; the output has the
strides of `x` (`torch.empty_like`). Non-dense views raise ValueError (call `.contiguous()`).

Source: NVlabs stylegan2-ada-pytorch `torch_utils/ops/bias_act.py` semantics; with `act="lrelu"`,
`alpha=0.2`, `gain=sqrt(2)` it is rosinality `op/fused_act.py::fused_leaky_relu` (pSp
`FusedLeakyReLU`). Kernel layout after the Triton tutorials (`01-vector-add`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from kernels._triton import KernelSpec, check_impl
from reference import ops as ref_ops

ACTS = ("lrelu", "linear")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024  # elements per program: 8 per thread at 4 warps (one 16-byte fp16 vector)
NUM_WARPS = 4


@triton.jit
def _bias_act_kernel(
    # pointers
    x_ptr,  # dense x, memory order, fp32/fp16/bf16
    b_ptr,  # [C] fp32 bias (unused when HAS_BIAS is False)
    y_ptr,  # output, same strides and dtype as x
    # sizes
    n_elements,  # x.numel()
    C,  # x.shape[dim]
    # strides
    stride_c,  # x.stride(dim): memory distance between consecutive channels
    # scalars
    alpha,  # leaky ReLU negative slope
    gain,  # output scale (after the activation)
    clamp,  # |y| <= clamp (unused when HAS_CLAMP is False)
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    LRELU: tl.constexpr,
    HAS_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] memory offsets
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        c = (offs // stride_c) % C  # [BLOCK] channel of each element
        x = x + tl.load(b_ptr + c, mask=mask, other=0.0)
    if LRELU:
        x = tl.where(x >= 0, x, x * alpha)
    x = x * gain
    if HAS_CLAMP:
        x = tl.clamp(x, -clamp, clamp, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + offs, x.to(y_ptr.dtype.element_ty), mask=mask)


@triton_op("psp::bias_act", mutates_args=())
def _bias_act_op(
    x: torch.Tensor,
    b: torch.Tensor | None,
    act: str,
    alpha: float,
    gain: float,
    clamp: float | None,
    dim: int,
) -> torch.Tensor:
    """The custom op `torch.ops.psp.bias_act` behind `bias_act(impl="triton")`: (2) allocate
    (3) launch. Expects the arguments `bias_act` has checked: dense `x`, `b` `[x.shape[dim]]`
    fp32 or None, `gain` resolved (not None), `dim` non-negative."""
    y = torch.empty_like(x)  # keeps the strides of a dense x
    n_elements = x.numel()
    if n_elements == 0:
        return y
    grid = (triton.cdiv(n_elements, BLOCK),)
    wrap_triton(_bias_act_kernel)[grid](
        x,
        x if b is None else b,
        y,
        n_elements,
        x.shape[dim],
        max(x.stride(dim), 1),
        alpha,
        gain,
        0.0 if clamp is None else clamp,
        HAS_BIAS=b is not None,
        LRELU=act == "lrelu",
        HAS_CLAMP=clamp is not None,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return y


def _is_dense(x: torch.Tensor) -> bool:
    """True when some permutation of `x`'s dims is contiguous (no gaps, no overlap)."""
    order = sorted(range(x.ndim), key=lambda d: (x.stride(d), x.shape[d]), reverse=True)
    return x.permute(order).is_contiguous()


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    act: str = "lrelu",
    alpha: float = 0.2,
    gain: float | None = None,
    clamp: float | None = None,
    dim: int = 1,
    impl: str = "ref",
) -> torch.Tensor:
    """`y = clamp(act(x + b) * gain, -clamp, clamp)`, the bias broadcast along `dim`.

    Source: NVlabs stylegan2-ada `torch_utils/ops/bias_act.py` semantics; `act="lrelu"`,
    `alpha=0.2`, `gain=sqrt(2)` is rosinality `fused_leaky_relu` (pSp `FusedLeakyReLU`).

    Args:
        x: float32/float16/bfloat16 tensor, e.g. `[N, C, H, W]` (NCHW, `dim=1`) or `[N, H, W, C]`
            (NHWC, `dim=3`). For `impl="triton"` it must be dense (contiguous in some dim order,
            e.g. channels_last); math is fp32, the output is rounded once to `x.dtype`.
        b: `[x.shape[dim]]` float bias, or None.
        act: `"lrelu"` (leaky ReLU with slope `alpha`) or `"linear"`.
        alpha: negative slope of the leaky ReLU.
        gain: output scale after the activation; default `sqrt(2)` for lrelu, 1 for linear.
        clamp: clamp the output to `[-clamp, clamp]` after the gain; None: no clamp.
        dim: the channel axis of `x` the bias runs along (negative counts from the end).
        impl: `"ref"` (`reference.ops.bias_act`) or `"triton"` (`torch.ops.psp.bias_act`).

    Returns:
        Tensor of the shape and dtype of `x` (for `impl="triton"`, also its strides).

    Raises:
        ValueError: unknown `impl` or `act`, a bias of the wrong shape, `dim` out of range, and
            for `impl="triton"` an unsupported dtype, a non-dense `x`, more than 2**31 - 1
            elements or a negative `clamp`.
        KernelUnavailableError: `impl="triton"` where Triton cannot run (see `check_impl`).
    """
    check_impl("bias_act", impl, x, b)
    if impl == "ref":
        return ref_ops.bias_act(x, b, act, alpha, gain, clamp, dim)

    # (1) check
    if act not in ACTS:
        raise ValueError(f"bias_act: act must be one of {ACTS}, got {act!r}")
    if x.dtype not in DTYPES:
        raise ValueError(f"bias_act: x must be float32, float16 or bfloat16 for impl='triton', got {x.dtype}")
    if not -x.ndim <= dim < x.ndim:
        raise ValueError(f"bias_act: dim={dim} is out of range for x of shape {tuple(x.shape)}")
    dim = dim % x.ndim
    if b is not None:
        if b.ndim != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(f"bias_act: bias must be [{x.shape[dim]}] (x.shape[{dim}]), got {tuple(b.shape)}")
        if not b.dtype.is_floating_point:
            raise ValueError(f"bias_act: bias must be a float tensor, got {b.dtype}")
        b = b.to(device=x.device, dtype=torch.float32).contiguous()
    if not _is_dense(x):
        raise ValueError(
            f"bias_act: impl='triton' needs a dense x (contiguous in some dim order); got shape "
            f"{tuple(x.shape)} with strides {x.stride()}: call .contiguous() first"
        )
    if x.numel() >= 2**31 - BLOCK:
        raise ValueError(f"bias_act: impl='triton' indexes with int32; x has {x.numel()} elements")
    if clamp is not None and clamp < 0:
        raise ValueError(f"bias_act: clamp must be >= 0 or None, got {clamp}")
    if gain is None:
        gain = ref_ops.SQRT2 if act == "lrelu" else 1.0
    # (2) allocate (3) launch: in the custom op
    return torch.ops.psp.bias_act(
        x, b, act, float(alpha), float(gain), None if clamp is None else float(clamp), dim
    )


# ----------------------------------------------------------------------------------------------
# ahead-of-time configurations for `python -m kernels.inspect`

NOT_USED = "(not used by the triton generator)"

# rosinality 1024 generator: channels per resolution (channel_multiplier=2)
GENERATOR_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}

_INT_ARGS = ("n_elements", "C", "stride_c")


def signature(dtype: str = "fp16", unit_args: Sequence[str] = ()) -> dict[str, str]:
    """`ASTSource` signature of `_bias_act_kernel`.

    Args:
        dtype: activation dtype, "fp16", "bf16" or "fp32" (x and y; the bias is fp32).
        unit_args: integer arguments equal to 1 at run time, which Triton's JIT specializes to
            the constant 1 (e.g. `stride_c` of NHWC); marked "constexpr".
    """
    sig = {"x_ptr": f"*{dtype}", "b_ptr": "*fp32", "y_ptr": f"*{dtype}"}
    for name in _INT_ARGS:
        sig[name] = "constexpr" if name in unit_args else "i32"
    sig.update({"alpha": "fp32", "gain": "fp32", "clamp": "fp32"})
    for name in ("HAS_BIAS", "LRELU", "HAS_CLAMP", "BLOCK"):
        sig[name] = "constexpr"
    return sig


def aot_specs(output_size: int = 1024) -> list[KernelSpec]:
    """Every `_bias_act_kernel` configuration a StyleGAN2 generator of `output_size` would run if
    bias + leaky ReLU ran standalone after each StyledConv: NCHW fp16, batch 1, `[1, C, r, r]`.

    The triton generator fuses bias + lrelu into the modulated-conv epilogue, so these are
    marked `NOT_USED` in `layer`; `calls` counts what a standalone generator forward would run
    (one at 4 px, two per resolution above: the up conv and the conv).

    Source: rosinality stylegan2-pytorch `model.py::StyledConv` (`FusedLeakyReLU`), layout of
    official pSp checkpoints (channels 512 up to 64 px, 256, 128, 64, 32 at 1024 px).

    Args:
        output_size: generator resolution, a power of two in [4, 1024].

    Returns:
        One `KernelSpec` per distinct activation shape.
    """
    if output_size not in GENERATOR_CHANNELS:
        raise ValueError(f"output_size must be one of {sorted(GENERATOR_CHANNELS)}, got {output_size}")
    specs = []
    for r, c in GENERATOR_CHANNELS.items():
        if r > output_size:
            break
        n = c * r * r
        runtime = {"n_elements": n, "C": c, "stride_c": r * r}  # contiguous NCHW
        unit_args = [name for name, v in runtime.items() if v == 1]
        calls = 1 if r == 4 else 2
        convs = "conv1" if r == 4 else "StyledConv up + StyledConv"
        specs.append(
            KernelSpec(
                kernel=f"_bias_act_kernel[lrelu fp16 {c}x{r}x{r}]",
                fn=_bias_act_kernel,
                signature=signature("fp16", unit_args),
                constexprs={"HAS_BIAS": True, "LRELU": True, "HAS_CLAMP": False, "BLOCK": BLOCK}
                | {name: 1 for name in unit_args},
                num_warps=NUM_WARPS,
                flops=3.0 * n,  # add bias, leaky slope, gain
                min_bytes=2.0 * n + 2.0 * n + 4.0 * c,  # read x, write y (fp16), read fp32 bias
                layer=f"{NOT_USED} FusedLeakyReLU after {convs} at {r}px "
                f"[1, {c}, {r}, {r}] (fused into the modulated-conv epilogue)",
                calls=calls,
                used=False,
            )
        )
    return specs
