"""Reference ops: upfirdn2d as a depthwise convolution (ours) vs the one-channel formulation of
rosinality `upfirdn2d_native` (what the official code runs without its CUDA op).

Run: `python -m pytest benchmarks/test_ops.py --benchmark-only --benchmark-columns=min,median,max,rounds`
The shapes are the 1024 generator's largest blur (after the 512->1024 transposed conv, batch 1)
and the 256 generator's at batch 4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference.ops import setup_filter, upfirdn2d

SHAPES = {"1024px-b1": (1, 32, 1025, 1025), "256px-b4": (4, 128, 257, 257)}


def upfirdn2d_one_channel(x: torch.Tensor, fir: torch.Tensor, pad: int) -> torch.Tensor:
    """rosinality `upfirdn2d_native` for up=down=1: every channel as a batch item of a 1-channel conv."""
    n, c, h, w = x.shape
    out = F.pad(x.reshape(n * c, 1, h, w), [pad] * 4)
    out = F.conv2d(out, torch.flip(fir, [0, 1])[None, None])
    return out.reshape(n, c, out.shape[2], out.shape[3])


@pytest.mark.parametrize("impl", ["depthwise", "one_channel"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_upfirdn2d_blur(benchmark, impl, shape):
    x = torch.randn(*SHAPES[shape], generator=torch.Generator().manual_seed(0))
    fir = setup_filter([1, 3, 3, 1], gain=4)
    benchmark.group = f"upfirdn2d-blur-{shape}"
    if impl == "depthwise":
        out = benchmark.pedantic(upfirdn2d, args=(x, fir), kwargs={"padding": 1}, rounds=5, warmup_rounds=1)
    else:
        out = benchmark.pedantic(upfirdn2d_one_channel, args=(x, fir, 1), rounds=5, warmup_rounds=1)
    assert torch.equal(out, upfirdn2d(x, fir, padding=1))
