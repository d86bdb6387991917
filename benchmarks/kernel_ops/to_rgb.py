"""Benchmark of `kernels.modulated_conv2d.to_rgb` at every ToRGB of the generator (1x1 modulated conv
without demodulation + bias + the 2x upsampled skip of the previous level).

Official: a rosinality `ToRGB` module in the benchmark's dtype. The Triton generator runs this op
itself (`used=True`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from benchmarks.kernel_ops.common import Case, Impls, conv_operands, levels
from reference.stylegan2 import ToRGB, channels_for


def cases(output_size: int, n: int) -> list[Case]:
    """`to_rgb1` at 4 px (no skip), then `to_rgbs` per level (with the skip), at batch `n`."""
    out = []
    for r in [4] + levels(output_size):
        c, skip = channels_for(r), r > 4
        nb = 2.0 * (n * c * r * r + 3 * c + n * 3 * r * r + (n * 3 * r * r // 4 if skip else 0)) + 4.0 * n * c
        out.append(Case("to_rgb", f"{'to_rgb1' if r == 4 else 'to_rgbs'} {c}->3 {r}px", n, c, 3, r,
                        skip=skip, flops=2.0 * n * r * r * 3 * c, nbytes=nb))
    return out


def impls(case: Case, device: str | torch.device, dtype: torch.dtype, seed: int, impls: Sequence[str]) -> Impls:
    """A seeded `ToRGB` (a random bias); the ops get its effective weight, styles, bias, skip and filter."""
    from kernels import modulated_conv2d as mc

    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    n, r, to = case.batch, case.res, dict(device=device, dtype=dtype)
    torch.manual_seed(seed)
    layer = ToRGB(case.c_in, upsample=case.skip)
    with torch.no_grad():
        layer.bias.copy_(0.1 * rnd(1, 3, 1, 1))
    layer = layer.to(device).eval()
    w = rnd(n, 512).to(device)
    x = rnd(n, case.c_in, r, r).to(**to).contiguous(memory_format=torch.channels_last)
    skip = rnd(n, 3, r // 2, r // 2).to(**to) if case.skip else None
    styles, weight, _, packed, _ = conv_operands(layer.conv, w, dtype, impls)  # [3, C_in, 1, 1]
    fir = layer.upsample.kernel.clone() if case.skip else None
    bias = layer.bias.detach().float().clone()
    fns: Impls = {}
    if packed is not None:
        fns["triton"] = lambda: mc.to_rgb(x, weight, styles, bias, skip, fir, "triton", packed_weight=packed)
    styles_ref = styles.to(dtype)  # the reference convolves in the dtype of x (see styled_conv2d)
    fns["ref"] = lambda: mc.to_rgb(x, weight, styles_ref, bias, skip, fir, "ref")
    official, w16 = layer.to(dtype), w.to(dtype)
    fns["official"] = lambda: official(x, w16, skip)
    return fns
