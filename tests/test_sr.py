"""reference.sr: the official super-resolution degradation, against a direct numpy formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reference.images import to_input_tensor
from reference.sr import bicubic_downsample, bicubic_kernel, degrade, parse_factors, super_resolution_input


def keys_cubic(x: float, a: float = -0.5) -> float:
    """Keys' cubic convolution kernel, float64."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def numpy_downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """[C, H, W] float64: reflect pad 3f (floor/ceil), then out[i, j] = sum k[u] k[v] x[i f + u, j f + v]."""
    size = 4 * factor
    k = np.array([keys_cubic((i - size // 2 + 0.5) / factor) for i in range(size)])
    k /= k.sum()
    pad = 3 * factor
    xp = np.pad(img, ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)), mode="reflect")
    h = (xp.shape[1] - size) // factor + 1
    w = (xp.shape[2] - size) // factor + 1
    out = np.zeros((img.shape[0], h, w))
    for i in range(h):
        for j in range(w):
            patch = xp[:, i * factor:i * factor + size, j * factor:j * factor + size]
            out[:, i, j] = np.einsum("chw,h,w->c", patch, k, k)
    return out


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_kernel(factor):
    k = bicubic_kernel(factor)
    assert k.shape == (4 * factor,) and k.dtype == torch.float32
    assert abs(float(k.sum()) - 1) < 1e-6
    assert torch.equal(k, k.flip(0)), "symmetric taps"
    ref = np.array([keys_cubic((i - 2 * factor + 0.5) / factor) for i in range(4 * factor)])
    np.testing.assert_allclose(k.numpy(), ref / ref.sum(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("factor, shape", [(1, (3, 20, 24)), (2, (3, 32, 32)), (4, (3, 64, 48)), (8, (1, 64, 64))])
def test_downsample_matches_direct_formula(factor, shape):
    x = torch.rand((1, *shape), generator=torch.Generator().manual_seed(factor), dtype=torch.float32)
    out = bicubic_downsample(x, factor)[0].double().numpy()
    ref = numpy_downsample(x[0].double().numpy(), factor)
    assert out.shape == ref.shape == (shape[0], shape[1] // factor, shape[2] // factor)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert np.isfinite(rel) and rel < 1e-6, rel


def test_factor_one_blurs_and_constants_stay():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(bicubic_downsample(x, 1), x), "the 4-tap kernel blurs even at factor 1"
    c = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(bicubic_downsample(c, 4), torch.full((1, 3, 8, 8), 0.3), atol=1e-6)


def test_degrade_truncates_like_to_pil_image():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8), "RGB")
    lr = degrade(im, 4)
    assert lr.size == (64, 64) and lr.mode == "RGB"
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255
    expect = (bicubic_downsample(x, 4)[0].clamp(0, 1) * 255).floor().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(lr), expect)


def test_super_resolution_input_and_tensor(shared):
    im = Image.open(shared / "data" / "faces" / "aligned" / "hyperstyle_pitt_256.jpg")
    plain = to_input_tensor([im], 0)
    sr = to_input_tensor([im], 0, degrade_factor=8)
    assert sr.shape == plain.shape == (1, 3, 256, 256)
    assert sr.min() >= -1 and sr.max() <= 1
    # the degraded input keeps the picture (low frequencies) but loses detail
    assert float((sr - plain).abs().mean()) > 0.01
    low = torch.nn.functional.avg_pool2d
    assert float((low(sr, 16) - low(plain, 16)).abs().mean()) < 0.05
    assert super_resolution_input(im, None).size == (256, 256)
    assert np.array_equal(np.asarray(super_resolution_input(im, None)), np.asarray(im.convert("RGB")))


def test_bad_factors():
    for bad in (0, -2, 1.5, True, 1000):
        with pytest.raises(ValueError, match="factor"):
            bicubic_kernel(bad)
    with pytest.raises(ValueError, match="too small"):
        bicubic_downsample(torch.rand(1, 3, 8, 8), 8)
    with pytest.raises(ValueError, match="RGB"):
        to_input_tensor([Image.new("L", (64, 64))], 1, degrade_factor=4)
    assert parse_factors("1,2,4,8,16,32") == [1, 2, 4, 8, 16, 32] and parse_factors(None) == []
