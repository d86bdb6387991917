"""Benchmark of `kernels.modulated_conv2d.modulated_conv2d` (modulate, demodulate, convolve; no noise,
bias or activation) at the generator's 3x3 conv shapes.

Official: a rosinality `ModulatedConv2d` module in the benchmark's dtype (`fused_modconv=True`). The
Triton generator runs `styled_conv2d` instead (this op plus its epilogue): `used=False`; the
difference between the two rows is what the fused noise / bias / activation cost.
"""

from __future__ import annotations

from typing import Sequence

import torch

from benchmarks.kernel_ops.common import Case, Impls, conv_operands, generator_convs
from benchmarks.kernel_ops.styled_conv2d import conv_bytes
from reference.stylegan2 import ModulatedConv2d


def cases(output_size: int, n: int) -> list[Case]:
    """`conv1`, then per level the upsampling conv and the plain one, at batch `n`."""
    out = []
    for name, ci, co, r, up in generator_convs(output_size):
        nb = conv_bytes(n, ci, co, r, up) + 4.0 * n * (ci + co)  # styles, output scale (fp32)
        out.append(Case("modulated_conv2d", f"{name} {ci}->{co} {r}px", n, ci, co, r, up=up, used=False,
                        flops=2.0 * n * r * r * co * ci * 9, nbytes=nb))
    return out


def impls(case: Case, device: str | torch.device, dtype: torch.dtype, seed: int, impls: Sequence[str]) -> Impls:
    """A seeded `ModulatedConv2d`; the ops get its effective weight and styles (`modulation(w)`)."""
    from kernels import modulated_conv2d as mc

    g = torch.Generator().manual_seed(seed)
    n, r = case.batch, case.res
    torch.manual_seed(seed)
    layer = ModulatedConv2d(case.c_in, case.c_out, 3, upsample=case.up == 2).to(device).eval()
    w = torch.randn(n, 512, generator=g).to(device)
    x = torch.randn(n, case.c_in, r // case.up, r // case.up, generator=g).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    styles, weight, wsq, packed, fir = conv_operands(layer, w, dtype, impls)
    fns: Impls = {}
    if packed is not None:
        fns["triton"] = lambda: mc.modulated_conv2d(x, weight, styles, True, case.up, None, fir, True, "triton",
                                                    wsq=wsq, packed_weight=packed)
    styles_ref = styles.to(dtype)  # the reference convolves in the dtype of x (see styled_conv2d)
    fns["ref"] = lambda: mc.modulated_conv2d(x, weight, styles_ref, True, case.up, None, fir, True, "ref")
    official, w16 = layer.to(dtype), w.to(dtype)
    fns["official"] = lambda: official(x, w16)
    return fns
