"""Benchmark of `kernels.modulated_conv2d.styled_conv2d` at every StyledConv of the generator
(modulated 3x3 conv, the level's first one upsampling, + noise, bias, leaky ReLU).

Official: a rosinality `StyledConv` module in the benchmark's dtype (`fused_modconv=True`). The
Triton generator runs this op itself (`used=True`). Activations channels_last, the layout the
kernel is fastest in; the packed weight prepared once, as the generator caches it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from benchmarks.kernel_ops.common import NOISE_STRENGTH, Case, Impls, conv_operands, generator_convs
from reference.stylegan2 import StyledConv


def conv_bytes(n: int, ci: int, co: int, r: int, up: int) -> float:
    """Compulsory fp16 bytes of one modulated 3x3 conv: input, (polyphase) weight, output."""
    phases = 4 if up == 2 else 1
    return 2.0 * (n * ci * (r // up) ** 2 + phases * 9 * ci * co + n * co * r * r)


def cases(output_size: int, n: int) -> list[Case]:
    """`conv1`, then per level the upsampling conv and the plain one, at batch `n`."""
    out = []
    for name, ci, co, r, up in generator_convs(output_size):
        nb = conv_bytes(n, ci, co, r, up) + 2.0 * r * r  # + the noise
        nb += 4.0 * n * (ci + 2 * co)  # styles, output scale, bias (fp32)
        out.append(Case("styled_conv2d", f"{name} {ci}->{co} {r}px", n, ci, co, r, up=up,
                        flops=2.0 * n * r * r * co * ci * 9, nbytes=nb))
    return out


def impls(case: Case, device: str | torch.device, dtype: torch.dtype, seed: int, impls: Sequence[str]) -> Impls:
    """A seeded `StyledConv` (noise strength `NOISE_STRENGTH`, a random bias); the ops get its effective
    weight, styles (`conv.modulation(w)`), bias and noise."""
    from kernels import modulated_conv2d as mc

    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    n, r, to = case.batch, case.res, dict(device=device, dtype=dtype)
    torch.manual_seed(seed)
    layer = StyledConv(case.c_in, case.c_out, 3, upsample=case.up == 2)
    with torch.no_grad():
        layer.noise.weight.fill_(NOISE_STRENGTH)
        layer.activate.bias.copy_(0.1 * rnd(case.c_out))
    layer = layer.to(device).eval()
    w = rnd(n, 512).to(device)
    x = rnd(n, case.c_in, r // case.up, r // case.up).to(**to).contiguous(memory_format=torch.channels_last)
    noise = rnd(1, 1, r, r).to(**to)
    styles, weight, wsq, packed, fir = conv_operands(layer.conv, w, dtype, impls)
    strength = layer.noise.weight.detach().float().clone()  # clones: the module goes to `dtype` below
    bias = layer.activate.bias.detach().float().clone()
    args = (x, weight, styles, noise, strength, bias, True, case.up, fir, None)
    fns: Impls = {}
    if packed is not None:
        fns["triton"] = lambda: mc.styled_conv2d(*args, "triton", wsq=wsq, packed_weight=packed)
    # the reference mixes dtypes badly (fp16 x with fp32 styles fails in F.conv2d): styles in `dtype`
    # and a tensor noise_strength promotes its output to fp32: strength in `dtype` too
    ref_args = (x, weight, styles.to(dtype), noise, strength.to(dtype), bias, True, case.up, fir, None)
    fns["ref"] = lambda: mc.styled_conv2d(*ref_args, "ref")
    official, w16 = layer.to(dtype), w.to(dtype)
    fns["official"] = lambda: official(x, w16, noise)
    return fns
