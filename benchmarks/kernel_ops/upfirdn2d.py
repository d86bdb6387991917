"""Benchmark of `kernels.upfirdn2d.upfirdn2d` at its two uses in the generator: the ToRGB skip's 2x
upsample and the blur after the transposed (upsampling) conv.

Official: rosinality `upfirdn2d_native`. Neither runs standalone in the Triton generator (the skip
upsample is fused into `to_rgb`, the blur into `styled_conv2d`'s polyphase weights): `used=False`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from benchmarks.kernel_ops.common import BLUR, RGB_PAD, Case, Impls, levels, upfirdn2d_native
from reference.ops import setup_filter
from reference.stylegan2 import channels_for


def cases(output_size: int, n: int) -> list[Case]:
    """The skip upsamples (3 channels, each level), then the blurs (each level's channels), at batch `n`."""
    out = []
    for r in levels(output_size):
        out.append(Case("upfirdn2d", f"ToRGB skip Upsample {r // 2}->{r}px", n, 3, 3, r, up=2,
                        used=False, flops=n * 3 * r * r * 9.0, nbytes=2.0 * n * 3 * (r * r // 4 + r * r)))
    for r in levels(output_size):
        c = channels_for(r)
        out.append(Case("upfirdn2d", f"Blur after the up conv {c}x{r + 1}->{r}px", n, c, c, r, used=False,
                        flops=n * c * r * r * 33.0, nbytes=2.0 * n * c * ((r + 1) ** 2 + r * r)))
    return out


def impls(case: Case, device: str | torch.device, dtype: torch.dtype, seed: int, impls: Sequence[str]) -> Impls:
    """`up=2`: Upsample(factor=2) of a 3-channel image; `up=1`: Blur(pad=(1, 1)) of an odd-sized map."""
    from kernels.upfirdn2d import upfirdn2d

    g = torch.Generator().manual_seed(seed)
    n, r = case.batch, case.res
    fir = setup_filter(BLUR, gain=4).to(device)
    if case.up == 2:  # ToRGB skip: Upsample(factor=2)
        x, pad, up = torch.randn(n, 3, r // 2, r // 2, generator=g), RGB_PAD, 2
    else:  # Blur(pad=(1, 1)) after the transposed conv
        x, pad, up = torch.randn(n, case.c_in, r + 1, r + 1, generator=g), (1, 1, 1, 1), 1
    x = x.to(device=device, dtype=dtype)
    return {"triton": lambda: upfirdn2d(x, fir, up=up, padding=pad, impl="triton"),
            "ref": lambda: upfirdn2d(x, fir, up=up, padding=pad, impl="ref"),
            "official": lambda: upfirdn2d_native(x, fir, up, 1, pad)}
