"""Reference pSp on the CPU: encode and synthesize at 256 and 1024 output, batch 1 and 4.

Run: `python -m pytest benchmarks/test_reference.py --benchmark-only --benchmark-columns=min,median,max,rounds`
(not part of the test suite). Times are per call (a whole batch); warm-up rounds are excluded.
The reference is the official formulation (grouped modulated convolution, fp32), so these are
the baselines every engine backend is compared against in the same process.
"""

from __future__ import annotations

import pytest
import torch

from _models import model

CONFIGS = {256: "ffhq_encode_256", 1024: "ffhq_encode"}


def _x(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(batch)) * 2 - 1


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("size", [256, 1024])
def test_encode(benchmark, size, batch):
    m = model(CONFIGS[size])
    x = _x(batch)
    benchmark.group = f"encode-{size}"
    benchmark.extra_info.update(batch=batch, output_size=size)
    w_plus = benchmark.pedantic(m.encode, args=(x,), rounds=3, warmup_rounds=1)
    assert w_plus.shape == (batch, m.n_styles, 512)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("size", [256, 1024])
def test_synthesize(benchmark, size, batch):
    m = model(CONFIGS[size])
    w_plus = m.latent_avg.expand(batch, -1, -1).clone()
    benchmark.group = f"synthesize-{size}"
    benchmark.extra_info.update(batch=batch, output_size=size)
    img = benchmark.pedantic(m.synthesize, args=(w_plus,), kwargs={"resize": True}, rounds=3, warmup_rounds=1)
    assert img.shape == (batch, 3, 256, 256) and torch.isfinite(img).all()
