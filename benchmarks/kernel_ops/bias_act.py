"""Benchmark of `kernels.bias_act.bias_act`: bias + leaky ReLU * sqrt(2) at every FusedLeakyReLU of the generator.

Official: rosinality `fused_leaky_relu` (its native branch). Not run standalone by the Triton
generator (fused into `styled_conv2d`): `used=False`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from benchmarks.kernel_ops.common import Case, Impls, fused_leaky_relu_native, levels
from reference.stylegan2 import channels_for


def cases(output_size: int, n: int) -> list[Case]:
    """Every FusedLeakyReLU shape of a generator of `output_size` at batch `n`, 4 px first."""
    out = []
    for r in [4] + levels(output_size):
        c, e = channels_for(r), n * channels_for(r) * r * r
        out.append(Case("bias_act", f"FusedLeakyReLU {c}x{r}px", n, c, c, r, used=False,
                        flops=3.0 * e, nbytes=4.0 * e + 4.0 * c))
    return out


def impls(case: Case, device: str | torch.device, dtype: torch.dtype, seed: int, impls: Sequence[str]) -> Impls:
    """NCHW `x` in `dtype`, an fp32 bias; triton, ref and official on the same tensors."""
    from kernels.bias_act import bias_act

    g = torch.Generator().manual_seed(seed)
    n, r = case.batch, case.res
    x, b = torch.randn(n, case.c_in, r, r, generator=g).to(device=device, dtype=dtype), \
        torch.randn(case.c_in, generator=g).to(device)
    return {"triton": lambda: bias_act(x, b, impl="triton"), "ref": lambda: bias_act(x, b, impl="ref"),
            "official": lambda: fused_leaky_relu_native(x, b)}
