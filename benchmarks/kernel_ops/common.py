"""What the per-op kernel benchmarks share: the `Case` record, the generator's levels and convs, and
the official formulation where it is plain torch.

Source: rosinality stylegan2-pytorch `op/upfirdn2d.py::upfirdn2d_native`, `op/fused_act.py` and
`model.py` (`Generator`: the conv and ToRGB layers per level, channel_multiplier 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from reference.stylegan2 import ModulatedConv2d, channels_for

Impls = dict[str, Callable[[], torch.Tensor]]
BLUR = (1, 3, 3, 1)
RGB_PAD = (2, 1, 2, 1)  # rosinality Upsample(factor=2), 4 taps
NOISE_STRENGTH = 0.1  # NoiseInjection.weight is 0 at init; a trained value, so the noise path does work


@dataclass(frozen=True)
class Case:
    """One op at one layer shape.

    Attributes:
        op: a name of the op table (`kernels.ops.NAMES`).
        layer: the generator layer(s) it stands for.
        batch: N.
        c_in, c_out: channels (equal for elementwise ops).
        res: output resolution (pixels per side).
        up: 2 for the upsampling conv / the skip upsample, else 1.
        skip: ToRGB with the previous level's image.
        used: False for shapes the Triton generator does not run standalone (bias_act, the blur and
            the bare modulated conv are fused into `styled_conv2d` / `to_rgb`), benchmarked against
            the official path.
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


def levels(output_size: int) -> list[int]:
    """The resolutions after the 4 px constant, 8 .. output_size."""
    return [2**i for i in range(3, int(math.log2(output_size)) + 1)]


def generator_convs(output_size: int) -> list[tuple[str, int, int, int, int]]:
    """The generator's 3x3 modulated convs, forward order: `(name, c_in, c_out, res, up)`."""
    ch = channels_for
    convs = [("conv1", ch(4), ch(4), 4, 1)]
    for i, r in enumerate(levels(output_size)):
        convs.append((f"convs.{2 * i} up", ch(r // 2), ch(r), r, 2))
        convs.append((f"convs.{2 * i + 1}", ch(r), ch(r), r, 1))
    return convs


def conv_operands(conv: ModulatedConv2d, w: torch.Tensor, dtype: torch.dtype, impls: Sequence[str]):
    """What the kernels op takes from a rosinality `ModulatedConv2d` on its device and style input `w`.

    Returns:
        `(styles, weight, wsq, packed, fir)`: `[N, C_in]` fp32 `conv.modulation(w)`; the effective
        weight `conv.scale * conv.weight[0]` in `dtype`; `weight_sq` of it (None without
        demodulation); the Triton operand `pack_weight(...)` as the generator caches it (None when
        `"triton"` is not in `impls`); the blur filter for the upsampling conv, else None.
    """
    from kernels import modulated_conv2d as mc

    up = 2 if conv.upsample else 1
    with torch.no_grad():
        styles = conv.modulation(w).float()  # [N, C_in]
        weight = conv.scale * conv.weight[0]  # [O, I, k, k]
        wsq = mc.weight_sq(weight) if conv.demodulate else None
    fir = conv.blur.kernel.clone() if conv.upsample else None
    packed = mc.pack_weight(weight, up, fir, dtype) if "triton" in impls else None
    return styles, weight.to(dtype), wsq, packed, fir


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
