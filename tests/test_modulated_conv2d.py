"""kernels.modulated_conv2d: the Triton path against the reference path; the polyphase upsampling conv.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
which costs ~5 ms per loop iteration of each program: shapes are small and odd (7, 13 px;
13 -> 7, 20 -> 24, 32 -> 16 channels, not multiples of the blocks) and the kernels take the
interpreter's whole-layer tiles (`interpreter_config`), except in `test_generator_block_configs`
and `test_several_channel_blocks`, which run GPU-sized tiles (several M, N and K blocks). fp16
outputs are compared with the fp32 reference on the same (rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from kernels import modulated_conv2d as mc  # noqa: E402
from kernels._triton import interpret_mode, jit_function  # noqa: E402
from kernels.ops import op  # noqa: E402
from reference import ops as ref_ops  # noqa: E402
from export.compare import assert_close  # noqa: E402

DEVICE = "cpu" if interpret_mode() else "cuda"
# the op table's keys of export.compare.TOL (three ops of one kernel)
MODCONV_TOL, STYLED_TOL, RGB_TOL = (op(name).tolerance for name in ("modulated_conv2d", "styled_conv2d", "to_rgb"))
BLUR = ref_ops.setup_filter([1, 3, 3, 1], gain=4)  # the stored blur.kernel / upsample.kernel
_CONV_CONFIG = mc.conv_config

if DEVICE == "cuda" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def _use_config(monkeypatch, make_config) -> None:
    """Launch with `make_config(c_in, c_out, m_phase, ...)` whether the GPU or the interpreter picks."""
    monkeypatch.setattr(mc, "conv_config", lambda c_in, c_out, m, *a, **k: make_config(c_in, c_out, m))
    monkeypatch.setattr(mc, "interpreter_config", lambda c_in, c_out, m: make_config(c_in, c_out, m))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(n: int, c_in: int, c_out: int, size: int, k: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random layer: x [N, C_in, s, s], effective weight (randn / sqrt(fan_in)), styles ~ 1 + randn
    (the affine's bias_init=1), bias [C_out], asymmetric 4x4 fir."""
    g = _gen(seed)
    return {
        "x": torch.randn(n, c_in, size, size, generator=g),
        "weight": torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5,
        "styles": 1 + torch.randn(n, c_in, generator=g),
        "bias": 0.2 * torch.randn(c_out, generator=g),
        "fir": torch.rand(4, 4, generator=g) + 0.1,
    }


def _dev(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    return None if t is None else t.to(device=DEVICE, dtype=dtype or t.dtype)


DTYPES = [torch.float32, torch.float16]


def _rounded(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in `dtype` on the device, the same values in fp32 on the CPU for the reference)."""
    xd = x.to(dtype)
    return _dev(xd), xd.float()


# ----------------------------------------------------------------------------------------------
# Triton vs reference


STYLED_CASES = [
    # (N, C_in, C_out, size, up, demodulate, noise, clamp)
    (1, 13, 7, 13, 1, True, "shared", None),
    (3, 20, 24, 7, 2, True, "per-sample", None),
    (8, 13, 7, 7, 1, False, None, 0.5),
    (3, 32, 16, 7, 2, True, "shared", 0.7),  # the sample is grid axis 2: batch 8 above, 3 here is enough
    (3, 13, 7, 13, 2, False, "per-sample", None),
]


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c_in,c_out,size,up,demod,noise,clamp", STYLED_CASES)
def test_styled_conv2d_matches_reference(dtype, n, c_in, c_out, size, up, demod, noise, clamp):
    p = _layer(n, c_in, c_out, size, seed=n * 100 + c_in + up)
    s_out = size * up
    noise_t = None
    if noise is not None:
        noise_t = torch.randn(1 if noise == "shared" else n, 1, s_out, s_out, generator=_gen(1))
    fir = BLUR if up == 2 and c_in != 20 else p["fir"]  # one case with an asymmetric 2-D blur
    xd, x32 = _rounded(p["x"], dtype)
    args = dict(noise_strength=0.3, demodulate=demod, up=up, fir=fir, clamp=clamp)
    ref = mc.styled_conv2d(x32, p["weight"], p["styles"], noise_t, bias=p["bias"], impl="ref", **args)
    out = mc.styled_conv2d(
        xd, _dev(p["weight"]), _dev(p["styles"]), _dev(noise_t), bias=_dev(p["bias"]), impl="triton",
        **dict(args, fir=_dev(fir)),
    )
    assert out.dtype == dtype and out.shape == (n, c_out, s_out, s_out)
    assert_close(out.cpu(), ref, STYLED_TOL, str(dtype).removeprefix("torch."))
    if clamp is not None:
        assert float(out.abs().max()) <= float(torch.tensor(clamp).to(dtype))  # the clamp, rounded once


MODCONV_CASES = [
    # (N, C_in, C_out, size, k, up, demodulate, padding, fused_modconv)
    (1, 13, 7, 13, 3, 1, True, None, True),
    (3, 20, 24, 7, 3, 2, False, None, False),
    (8, 13, 7, 7, 3, 1, False, 0, True),
    (3, 13, 7, 7, 3, 2, True, None, True),
    (3, 20, 7, 7, 1, 1, True, None, True),
]


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c_in,c_out,size,k,up,demod,padding,fused", MODCONV_CASES)
def test_modulated_conv2d_matches_reference(dtype, n, c_in, c_out, size, k, up, demod, padding, fused):
    p = _layer(n, c_in, c_out, size, k=k, seed=7 * n + c_in + up)
    xd, x32 = _rounded(p["x"], dtype)
    args = dict(demodulate=demod, up=up, padding=padding, fir=BLUR if up == 2 else None, fused_modconv=fused)
    ref = mc.modulated_conv2d(x32, p["weight"], p["styles"], impl="ref", **args)
    args_dev = dict(args, fir=_dev(args["fir"]))
    out = mc.modulated_conv2d(xd, _dev(p["weight"]), _dev(p["styles"]), impl="triton", **args_dev)
    assert out.dtype == dtype
    assert_close(out.cpu(), ref, MODCONV_TOL, str(dtype).removeprefix("torch."))


RGB_CASES = [
    # (N, C_in, size, skip, fir)
    (1, 13, 7, False, "blur"),
    (3, 20, 14, True, "blur"),
    (8, 32, 6, True, "asym"),
]


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c_in,size,skip,fir", RGB_CASES)
def test_to_rgb_matches_reference(dtype, n, c_in, size, skip, fir):
    p = _layer(n, c_in, 3, size, k=1, seed=n + c_in)
    bias = p["bias"].reshape(1, 3, 1, 1)  # as ToRGB stores it
    f = BLUR if fir == "blur" else p["fir"]
    skip_t = torch.randn(n, 3, size // 2, size // 2, generator=_gen(2)).to(dtype) if skip else None
    xd, x32 = _rounded(p["x"], dtype)
    ref = mc.to_rgb(x32, p["weight"], p["styles"], bias, None if skip_t is None else skip_t.float(), f, impl="ref")
    out = mc.to_rgb(xd, _dev(p["weight"]), _dev(p["styles"]), _dev(bias), _dev(skip_t), _dev(f), impl="triton")
    assert out.dtype == dtype and out.shape == (n, 3, size, size)
    assert_close(out.cpu(), ref, RGB_TOL, str(dtype).removeprefix("torch."))


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
def test_generator_block_configs(monkeypatch):
    """The GPU block sizes (`conv_config`) at small sizes: BLOCK_M 16 (two M blocks over the 25 pixels
    of a 5 px phase, the last masked), BLOCK_N 16 (two N blocks over 24 channels), BLOCK_K 16 (two K
    blocks over 20 channels)."""
    _use_config(monkeypatch, _CONV_CONFIG)
    p = _layer(1, 20, 24, 5, seed=3)
    noise = torch.randn(1, 1, 10, 10, generator=_gen(4))
    for up, nz in ((2, noise), (1, None)):
        ref = mc.styled_conv2d(p["x"], p["weight"], p["styles"], nz, 0.5, p["bias"], up=up, fir=BLUR, impl="ref")
        out = mc.styled_conv2d(_dev(p["x"]), _dev(p["weight"]), _dev(p["styles"]), _dev(nz), 0.5, _dev(p["bias"]),
                               up=up, fir=_dev(BLUR), impl="triton")
        assert_close(out.cpu(), ref, STYLED_TOL, "float32")


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
def test_several_channel_blocks(monkeypatch):
    """BLOCK_N = BLOCK_K = 16 on 20 -> 24 channels: two K blocks and two N blocks, both masked."""
    _use_config(monkeypatch, lambda *a: dict(_CONV_CONFIG(*a), BLOCK_M=128, BLOCK_N=16, BLOCK_K=16))
    p = _layer(3, 20, 24, 7, seed=5)
    ref = mc.styled_conv2d(p["x"], p["weight"], p["styles"], bias=p["bias"], impl="ref")
    out = mc.styled_conv2d(_dev(p["x"]), _dev(p["weight"]), _dev(p["styles"]), bias=_dev(p["bias"]), impl="triton")
    assert_close(out.cpu(), ref, STYLED_TOL, "float32")


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.parametrize("up", [1, 2])
def test_layouts_channels_last_and_strided(up):
    """channels_last in -> channels_last out (the vectorised path: 32 -> 16 channels, fp16);
    a strided NCHW view works too."""
    p = _layer(2, 32, 16, 9, seed=6)
    x16 = p["x"].half()
    noise = torch.randn(2, 1, 9 * up, 9 * up, generator=_gen(7))
    ref = mc.styled_conv2d(x16.float(), p["weight"], p["styles"], noise, 0.2, p["bias"], up=up, fir=BLUR, impl="ref")
    args = (_dev(p["weight"]), _dev(p["styles"]), _dev(noise), 0.2, _dev(p["bias"]))
    xcl = _dev(x16).contiguous(memory_format=torch.channels_last)
    out = mc.styled_conv2d(xcl, *args, up=up, fir=_dev(BLUR), impl="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out.cpu(), ref, STYLED_TOL, "float16")
    big = torch.zeros(2, 32, 11, 12, dtype=torch.float16)
    big[:, :, 1:10, 2:11] = x16
    view = _dev(big)[:, :, 1:10, 2:11]  # not contiguous, offset storage
    out = mc.styled_conv2d(view, *args, up=up, fir=_dev(BLUR), impl="triton")
    assert_close(out.cpu(), ref, STYLED_TOL, "float16")


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
def test_cached_operands_and_tensor_strength_give_identical_output():
    """`packed_weight` / `wsq` / `poly_weight` passed in, and a tensor noise strength, change nothing."""
    p = _layer(2, 13, 7, 7, seed=8)
    noise = torch.randn(2, 1, 14, 14, generator=_gen(9))
    w, s, b, x, nz, f = (_dev(t) for t in (p["weight"], p["styles"], p["bias"], p["x"], noise, BLUR))
    plain = mc.styled_conv2d(x, w, s, nz, 0.25, b, up=2, fir=f, impl="triton")
    cached = mc.styled_conv2d(
        x, w, s, nz, torch.tensor([0.25], device=DEVICE), b, up=2, fir=f, impl="triton",
        wsq=mc.weight_sq(w), packed_weight=mc.pack_weight(w, 2, f, x.dtype),
    )
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)
    poly = mc.styled_conv2d(x, w, s, nz, 0.25, b, up=2, fir=f, impl="triton", poly_weight=mc.polyphase_weights(w, f))
    torch.testing.assert_close(poly, plain, rtol=0, atol=0)


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.skipif(
    interpret_mode(),
    reason="Triton 3.9's interpreter multiplies bf16 tl.dot operands as raw integers (triton-lang/triton#11584)",
)
def test_bfloat16_matches_reference():  # pragma: no cover - needs a GPU
    p = _layer(3, 20, 24, 7, seed=10)
    xd, x32 = _rounded(p["x"], torch.bfloat16)
    ref = mc.styled_conv2d(x32, p["weight"], p["styles"], bias=p["bias"], up=2, fir=BLUR, impl="ref")
    out = mc.styled_conv2d(
        xd, _dev(p["weight"]), _dev(p["styles"]), bias=_dev(p["bias"]), up=2, fir=_dev(BLUR), impl="triton"
    )
    assert_close(out.cpu(), ref, STYLED_TOL, "bfloat16")


# ----------------------------------------------------------------------------------------------
# fp16 hazards


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.parametrize("style_scale", [1e-6, 1e-3, 1e3, 3e4])
def test_fp16_demodulation_extreme_styles_stay_finite(style_scale):
    """Styles making sum(s^2 w^2) tiny (1e-8 epsilon dominates) or huge (x * s beyond fp16's
    65504 if unscaled): fp16 activations stay finite and match the float64 reference. Two samples:
    the hazard is per sample (its own styles and demodulation)."""
    p = _layer(2, 20, 24, 7, seed=11)
    styles = p["styles"] * style_scale
    x16 = p["x"].half()
    for up in (1, 2):
        ref = ref_ops.modulated_conv2d(x16.double(), p["weight"].double(), styles.double(), up=up, fir=BLUR.double())
        out = mc.modulated_conv2d(_dev(x16), _dev(p["weight"]), _dev(styles), up=up, fir=_dev(BLUR), impl="triton")
        assert torch.isfinite(out).all()
        assert_close(out.cpu(), ref, MODCONV_TOL, "float16")


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
def test_fp16_to_rgb_large_styles_stay_finite():
    """No demodulation: |x * s| up to ~1e5 would overflow fp16; the output itself is in range."""
    p = _layer(2, 32, 3, 6, k=1, seed=12)
    styles = p["styles"] * 2e4
    weight = p["weight"] * 1e-3
    bias = p["bias"].reshape(1, 3, 1, 1)
    x16 = p["x"].half()
    ref = mc.to_rgb(x16.double(), weight.double(), styles.double(), bias.double(), impl="ref")
    out = mc.to_rgb(_dev(x16), _dev(weight), _dev(styles), _dev(bias), impl="triton")
    assert torch.isfinite(out).all()
    assert_close(out.cpu(), ref, RGB_TOL, "float16")


# ----------------------------------------------------------------------------------------------
# polyphase upsampling conv


def _transposed_conv_blur(x: torch.Tensor, weight: torch.Tensor, fir: torch.Tensor) -> torch.Tensor:
    """The official up path: conv_transpose2d(stride 2, weight transposed, not flipped) + blur pad 1."""
    return ref_ops.upfirdn2d(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2), fir, padding=(1, 1))


@pytest.mark.parametrize("fir", ["blur4", "taps1d", "asym2d"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 13), (1, 3, 13, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_polyphase_equals_transposed_conv_and_blur(fir, shape, dtype):
    g = _gen(13)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    weight = torch.randn(6, shape[1], 3, 3, generator=g, dtype=dtype)
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    filters = {"blur4": BLUR, "taps1d": taps, "asym2d": torch.rand(4, 4, generator=g) + 0.1}
    f = filters[fir].to(dtype)
    out = mc.upsample_conv2d_polyphase(x, weight, f)
    ref = _transposed_conv_blur(x, weight, f)
    assert out.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    assert_close(out, ref, "polyphase", str(dtype).removeprefix("torch."))


@pytest.mark.parametrize("k", [1, 5])
def test_polyphase_other_kernel_sizes(k):
    """Odd k with a (k+1)-tap blur: still k x k phase kernels with padding k//2."""
    g = _gen(14)
    x = torch.randn(2, 4, 7, 9, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 4, k, k, generator=g, dtype=torch.float64)
    f = torch.rand(k + 1, k + 1, generator=g, dtype=torch.float64)
    assert mc.polyphase_weights(weight, f).shape == (4, 3, 4, k, k)
    ref = _transposed_conv_blur(x, weight, f)
    assert_close(mc.upsample_conv2d_polyphase(x, weight, f), ref, "polyphase", "float64")


def test_polyphase_weights_conserve_the_sum():
    """Every (fir tap, weight tap) product lands in exactly one phase tap: sums multiply."""
    g = _gen(15)
    weight = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64)
    f = torch.rand(4, 4, generator=g, dtype=torch.float64)
    ph = mc.polyphase_weights(weight, f)
    torch.testing.assert_close(ph.sum(dim=(0, 3, 4)), weight.sum(dim=(2, 3)) * f.sum())


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_bad_shapes_raise_value_error(impl):
    p = _layer(2, 13, 7, 7)
    x, w, s, b = (_dev(t) for t in (p["x"], p["weight"], p["styles"], p["bias"]))
    f = _dev(BLUR)
    with pytest.raises(ValueError, match="styles"):
        mc.styled_conv2d(x, w, s[:, :5], impl=impl)
    with pytest.raises(ValueError, match="x"):
        mc.modulated_conv2d(x[0], w, s, impl=impl)
    with pytest.raises(ValueError, match="weight"):
        mc.styled_conv2d(x, w[:, :5], s, impl=impl)
    with pytest.raises(ValueError, match="up must be 1 or 2"):
        mc.styled_conv2d(x, w, s, up=3, fir=f, impl=impl)
    with pytest.raises(ValueError, match="fir"):
        mc.modulated_conv2d(x, w, s, up=2, impl=impl)
    with pytest.raises(ValueError, match="noise"):
        mc.styled_conv2d(x, w, s, torch.zeros(2, 1, 14, 14, device=DEVICE), impl=impl)  # up=1: 7x7 noise
    with pytest.raises(ValueError, match="noise"):
        mc.styled_conv2d(x, w, s, torch.zeros(3, 1, 7, 7, device=DEVICE), impl=impl)
    with pytest.raises(ValueError, match="bias"):
        mc.styled_conv2d(x, w, s, bias=b[:3], impl=impl)
    with pytest.raises(ValueError, match="clamp"):
        mc.styled_conv2d(x, w, s, clamp=-1.0, impl=impl)
    w1, b3 = w[:3, :, :1, :1].contiguous(), b[:3]
    with pytest.raises(ValueError, match="1x1"):
        mc.to_rgb(x, w[:3], s, b3, impl=impl)
    with pytest.raises(ValueError, match="bias"):
        mc.to_rgb(x, w1, s, b, impl=impl)
    with pytest.raises(ValueError, match="skip"):
        mc.to_rgb(x[:, :, :6, :6], w1, s, b3, torch.zeros(2, 3, 4, 4, device=DEVICE), f, impl=impl)
    with pytest.raises(ValueError, match="fir"):
        mc.to_rgb(x[:, :, :6, :6], w1, s, b3, torch.zeros(2, 3, 3, 3, device=DEVICE), impl=impl)
    with pytest.raises(ValueError, match="fir"):
        mc.to_rgb(x[:, :, :6, :6], w1, s, b3, torch.zeros(2, 3, 3, 3, device=DEVICE), f[:3, :3], impl=impl)


def test_triton_only_errors():
    p = _layer(2, 13, 7, 7)
    x, w, s = (_dev(t) for t in (p["x"], p["weight"], p["styles"]))
    with pytest.raises(ValueError, match=r"\[k\+1, k\+1\]|\[4, 4\]"):
        mc.modulated_conv2d(x, w, s, up=2, fir=_dev(torch.ones(3, 3)), impl="triton")  # polyphase needs 4x4
    with pytest.raises(ValueError, match="packed_weight"):
        mc.styled_conv2d(x, w, s, impl="triton", packed_weight=mc.pack_weight(w, 2, BLUR.to(DEVICE), x.dtype))
    with pytest.raises(ValueError, match="packed_weight"):
        mc.styled_conv2d(x, w, s, impl="triton", packed_weight=mc.pack_weight(w, 1, None, torch.float16))
    with pytest.raises(ValueError, match="poly_weight"):
        mc.styled_conv2d(x, w, s, impl="triton", poly_weight=mc.polyphase_weights(w, BLUR.to(DEVICE)))  # up=1
    with pytest.raises(ValueError, match="wsq"):
        mc.styled_conv2d(x, w, s, impl="triton", wsq=torch.ones(3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        mc.styled_conv2d(x.double(), w, s, impl="triton")
    with pytest.raises(ValueError, match="odd k"):
        mc.polyphase_weights(torch.ones(2, 2, 2, 2), torch.ones(3, 3))


@pytest.mark.parametrize("op", ["modulated_conv2d", "styled_conv2d", "to_rgb"])
def test_unknown_impl_raises_value_error(op):
    p = _layer(1, 13, 3, 7, k=1)
    args = (p["x"], p["weight"], p["styles"]) + ((p["bias"][:3],) if op == "to_rgb" else ())
    with pytest.raises(ValueError, match="impl"):
        getattr(mc, op)(*args, impl="cuda")


# ----------------------------------------------------------------------------------------------
# custom ops and AOT specs


def test_custom_ops_schema_and_fake_kernels():
    """torch.ops.psp.* are registered, and their fake kernels give the real output's shape/strides."""
    p = _layer(1, 13, 7, 7, seed=16)
    x = _dev(p["x"]).contiguous(memory_format=torch.channels_last)
    w, s = _dev(p["weight"]), _dev(p["styles"]).float()
    pw, wsq = mc.pack_weight(w, 2, _dev(BLUR), x.dtype), mc.weight_sq(w)
    checks = ("test_schema", "test_faketensor")
    styled_args = (x, pw, s, wsq, None, None, None, 2, None)
    torch.library.opcheck(torch.ops.psp.styled_conv2d.default, styled_args, test_utils=checks)
    torch.library.opcheck(torch.ops.psp.modulated_conv2d.default, (x, pw, s, None, 2, 1), test_utils=checks)
    pw1 = mc.pack_weight(w[:3, :, :1, :1], 1, None, x.dtype)
    skip = _dev(torch.randn(1, 3, 3, 3))
    rgb_args = (x[:, :, :6, :6], pw1, s, _dev(p["bias"][:3]), skip, _dev(BLUR))
    torch.library.opcheck(torch.ops.psp.to_rgb.default, rgb_args, test_utils=checks)


def test_aot_specs_cover_the_1024_generator():
    specs = mc.aot_specs(1024)
    assert len(specs) == 17 + 9  # conv1 + 2 StyledConvs per level 8..1024; to_rgb1 + 8 ToRGBs
    assert list(specs[0].signature) == jit_function(mc._modulated_conv2d_kernel).arg_names  # every argument, in order
    for s in specs:
        c = s.constexprs
        assert min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16  # tl.dot
        assert {k for k, v in s.signature.items() if v == "constexpr"} == set(c)
        assert s.flops > 0 and s.min_bytes > 0 and s.calls == 1
    up64 = next(s for s in specs if "512->512 up2 64px" in s.kernel)
    assert up64.flops == 2 * 64 * 64 * 512 * 512 * 9
    assert len(mc.aot_specs(256)) == 13 + 7
    with pytest.raises(ValueError):
        mc.aot_specs(100)
