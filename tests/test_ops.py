"""reference.ops against direct formulas: upfirdn2d, bias_act, the two modulated-conv forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference.ops import bias_act, demodulation_coefficients, modulated_conv2d, setup_filter, upfirdn2d
from export.compare import assert_close


def upfirdn2d_direct(x: np.ndarray, f: np.ndarray, up: int, down: int, pad: tuple[int, int, int, int]) -> np.ndarray:
    """The definition, in float64: zero-insert, pad (negative crops), true convolution, keep every down-th."""
    x0, x1, y0, y1 = pad
    n, c, h, w = x.shape
    kh, kw = f.shape
    u = np.zeros((n, c, h * up, w * up))
    u[:, :, ::up, ::up] = x
    ph, pw = h * up + y0 + y1, w * up + x0 + x1
    p = np.zeros((n, c, ph, pw))
    # p[j] = u[j - y0] where valid
    for j in range(ph):
        src_j = j - y0
        if not 0 <= src_j < h * up:
            continue
        for i in range(pw):
            src_i = i - x0
            if 0 <= src_i < w * up:
                p[:, :, j, i] = u[:, :, src_j, src_i]
    oh, ow = ph - kh + 1, pw - kw + 1
    out = np.zeros((n, c, oh, ow))
    for ty in range(kh):
        for tx in range(kw):
            # true convolution: tap (ty, tx) of the flipped filter
            out += f[kh - 1 - ty, kw - 1 - tx] * p[:, :, ty : ty + oh, tx : tx + ow]
    return out[:, :, ::down, ::down]


CASES = [
    # (up, down, padding as [x0, x1, y0, y1], filter)
    (1, 1, (1, 1, 1, 1), "blur4"),  # Blur after the transposed conv
    (2, 1, (2, 1, 2, 1), "blur4"),  # ToRGB skip Upsample
    (1, 2, (1, 1, 1, 1), "blur4"),  # downsample (discriminator-style)
    (2, 2, (0, 0, 0, 0), "blur4"),
    (2, 1, (3, 0, -1, 2), "asym3x5"),  # asymmetric filter: the flip matters; negative pad crops
    (1, 2, (0, 2, 1, -1), "asym3x5"),
]


def _filter(name: str) -> torch.Tensor:
    if name == "blur4":
        return setup_filter([1, 3, 3, 1], gain=4)
    g = torch.Generator().manual_seed(7)
    return torch.rand(3, 5, generator=g) + 0.1


@pytest.mark.parametrize("up,down,pad,fname", CASES)
@pytest.mark.parametrize("shape", [(1, 3, 7, 13), (3, 5, 13, 7)])
def test_upfirdn2d_matches_direct_formula(up, down, pad, fname, shape):
    g = torch.Generator().manual_seed(hash((up, down, pad, fname, shape)) % 2**31)
    x = torch.randn(*shape, generator=g)
    f = _filter(fname)
    out = upfirdn2d(x, f, up=up, down=down, padding=pad)
    ref = upfirdn2d_direct(x.double().numpy(), f.double().numpy(), up, down, pad)
    assert_close(out, torch.from_numpy(ref), "upfirdn2d")


def test_upfirdn2d_separable_and_gain():
    x = torch.randn(2, 3, 9, 11)
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    full = upfirdn2d(x, k[:, None] * k[None, :], up=2, padding=(2, 1, 2, 1), gain=0.5)
    sep = upfirdn2d(x, k, up=2, padding=(2, 1, 2, 1), gain=0.5)
    torch.testing.assert_close(full, sep)
    assert full.shape == (2, 3, 18, 22)


def test_upfirdn2d_rejects_bad_arguments():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="empty"):
        upfirdn2d(x, torch.ones(4, 4), padding=-2)
    with pytest.raises(ValueError, match="up and down"):
        upfirdn2d(x, torch.ones(2, 2), up=0)
    with pytest.raises(ValueError, match="padding"):
        upfirdn2d(x, torch.ones(2, 2), padding=(1, 2, 3))


def test_setup_filter_is_the_stored_fir():
    f = setup_filter([1, 3, 3, 1], gain=4)
    expected = torch.tensor([[1, 3, 3, 1], [3, 9, 9, 3], [3, 9, 9, 3], [1, 3, 3, 1]], dtype=torch.float32) / 16
    torch.testing.assert_close(f, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize("act,clamp", [("lrelu", None), ("linear", None), ("lrelu", 0.5)])
def test_bias_act_matches_formula(dim, act, clamp):
    x = torch.randn(3, 5, 7, 13)
    b = torch.randn(x.shape[dim])
    shape = [1] * 4
    shape[dim] = -1
    y = x.double() + b.double().reshape(shape)
    if act == "lrelu":
        y = torch.where(y >= 0, y, 0.2 * y) * math.sqrt(2)
    if clamp is not None:
        y = y.clamp(-clamp, clamp)
    assert_close(bias_act(x, b, act=act, clamp=clamp, dim=dim), y, "bias_act")


def test_bias_act_errors():
    with pytest.raises(ValueError, match="act"):
        bias_act(torch.zeros(1, 2, 3, 3), act="gelu")
    with pytest.raises(ValueError, match="bias"):
        bias_act(torch.zeros(1, 2, 3, 3), torch.zeros(3))


def _modconv_inputs(n, c_in, c_out, k, h, w, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(c_out, c_in, k, k, generator=g, dtype=torch.float64) / math.sqrt(c_in * k * k)).to(dtype)
    styles = (1 + 0.5 * torch.randn(n, c_in, generator=g, dtype=torch.float64)).to(dtype)
    return x, weight, styles


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("up,k,demodulate", [(1, 3, True), (2, 3, True), (1, 1, False), (1, 3, False)])
@pytest.mark.parametrize("n", [1, 3])
def test_modulated_conv2d_formulations_equal(dtype, up, k, demodulate, n):
    x, weight, styles = _modconv_inputs(n, 13, 7, k, 7, 13, getattr(torch, dtype), seed=n * 10 + up + k)
    fir = setup_filter([1, 3, 3, 1], gain=4).to(x.dtype)
    grouped = modulated_conv2d(x, weight, styles, demodulate=demodulate, up=up, fir=fir, fused_modconv=True)
    activation = modulated_conv2d(x, weight, styles, demodulate=demodulate, up=up, fir=fir, fused_modconv=False)
    assert grouped.shape == (n, 7, 7 * up, 13 * up)
    assert_close(activation, grouped, "modulated_conv2d", dtype)


def test_modulated_conv2d_matches_per_sample_definition():
    """Grouped form == a loop over samples with the explicitly modulated, demodulated weight."""
    x, weight, styles = _modconv_inputs(3, 5, 4, 3, 9, 9, torch.float64, seed=3)
    out = modulated_conv2d(x, weight, styles, demodulate=True)
    for i in range(3):
        wi = weight * styles[i][None, :, None, None]
        wi = wi / torch.sqrt((wi**2).sum(dim=[1, 2, 3], keepdim=True) + 1e-8)
        torch.testing.assert_close(out[i : i + 1], F.conv2d(x[i : i + 1], wi, padding=1), rtol=1e-12, atol=1e-12)
    dc = demodulation_coefficients(weight, styles)
    assert dc.shape == (3, 4) and dc.dtype == torch.float64
    assert demodulation_coefficients(weight.half(), styles.half()).dtype == torch.float32


def test_modulated_conv2d_shape_errors():
    x, weight, styles = _modconv_inputs(2, 5, 4, 3, 8, 8, torch.float32, seed=1)
    with pytest.raises(ValueError, match="do not agree"):
        modulated_conv2d(x, weight, styles[:1])
    with pytest.raises(ValueError, match="fir"):
        modulated_conv2d(x, weight, styles, up=2)
    with pytest.raises(ValueError, match="up must be"):
        modulated_conv2d(x, weight, styles, up=4)
