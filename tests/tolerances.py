"""One table of tolerances for every comparison in the tests, keyed by (what, dtype).

`rel` bounds the relative error ||out - ref|| / ||ref|| (Frobenius norms); `atol` bounds the
worst element where an absolute bound is what the source promises (golden vectors: 1e-4).
"""

from __future__ import annotations

import torch

TOL: dict[tuple[str, str], dict[str, float]] = {
    # reference op vs a direct float64 formula
    ("upfirdn2d", "float32"): {"rel": 1e-6},
    ("bias_act", "float32"): {"rel": 1e-7},
    # the two modulated-conv formulations (grouped vs activation modulation)
    ("modulated_conv2d", "float32"): {"rel": 2e-6},
    ("modulated_conv2d", "float64"): {"rel": 1e-12},
    ("generator_formulations", "float32"): {"rel": 1e-5},
    # kernels.modulated_conv2d (interpreter on CPU) vs the fp32 reference path on the same (rounded)
    # inputs: fp32 differs by summation order; fp16/bf16 round the modulated activations, the
    # weights and the output once each (fp32 accumulation): ~3x the rms 2^-11/sqrt(3), 2^-8/sqrt(3)
    ("modulated_conv2d_triton", "float32"): {"rel": 2e-6},
    ("modulated_conv2d_triton", "float16"): {"rel": 2e-3},
    ("modulated_conv2d_triton", "bfloat16"): {"rel": 1.6e-2},
    ("styled_conv2d_triton", "float32"): {"rel": 2e-6},
    ("styled_conv2d_triton", "float16"): {"rel": 2e-3},
    ("styled_conv2d_triton", "bfloat16"): {"rel": 1.6e-2},
    ("to_rgb_triton", "float32"): {"rel": 2e-6},
    ("to_rgb_triton", "float16"): {"rel": 2e-3},
    ("to_rgb_triton", "bfloat16"): {"rel": 1.6e-2},
    # polyphase upsampling conv vs transposed conv + blur (same math, other summation order)
    ("polyphase", "float32"): {"rel": 1e-6},
    ("polyphase", "float64"): {"rel": 1e-13},
    # the synthesis network on the Triton kernels vs the reference generator (fp16: activations
    # in fp16, styles/demodulation in fp32; the 1e-2 of shared/golden/README.md for fp16 paths)
    ("triton_generator", "float32"): {"rel": 1e-5},
    ("triton_generator", "float16"): {"rel": 1e-2},
    # Triton kernels (interpreter on CPU) vs the fp32 reference op on the same (rounded) inputs:
    # fp32 differs by summation order only; fp16/bf16 by one rounding of the output (rms relative
    # 2^-11/sqrt(3) = 2.8e-4 and 2^-8/sqrt(3) = 2.3e-3), math in fp32
    ("bias_act_triton", "float32"): {"rel": 1e-6},
    ("bias_act_triton", "float16"): {"rel": 1e-3},
    ("bias_act_triton", "bfloat16"): {"rel": 8e-3},
    ("upfirdn2d_triton", "float32"): {"rel": 1e-6},
    ("upfirdn2d_triton", "float16"): {"rel": 1e-3},
    ("upfirdn2d_triton", "bfloat16"): {"rel": 8e-3},
    # export.engine_model (static weights, folded BN, batched heads) vs the reference, fp32
    ("engine_model", "float32"): {"rel": 1e-5},
    # an AOTInductor package (export/aoti.py; Python loader and the C++ runner) vs the reference model
    # in the official formulation: the package computes the activation-modulation formulation (as
    # "generator_formulations") with inductor's fused, reordered fp32 arithmetic (measured ~1e-6)
    ("aoti", "float32"): {"rel": 1e-5},
    # exported graphs run by ONNX Runtime vs the reference (fp16: fp16 activations, fp32 style math)
    ("onnx", "float32"): {"rel": 1e-5},
    ("onnx", "float16"): {"rel": 1e-2},
    # against the official implementation's outputs (shared/golden/README.md: atol 1e-4)
    ("golden", "float32"): {"atol": 1e-4},
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when either holds NaN/Inf (NaN never passes)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(out64).all() and torch.isfinite(ref64).all()):
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


def assert_close(out: torch.Tensor, ref: torch.Tensor, what: str, dtype: str = "float32") -> None:
    """Assert `out` matches `ref` within TOL[(what, dtype)]; reports the worst element."""
    tol = TOL[(what, dtype)]
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    diff = (out.detach().double() - ref.detach().double()).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    finite = bool(torch.isfinite(out).all())
    assert finite, f"{what}: output has NaN/Inf"
    if "rel" in tol:
        err = rel_error(out, ref)
        assert err <= tol["rel"], f"{what} [{dtype}]: rel error {err:.3e} > {tol['rel']:.1e} (worst |diff| {worst:.3e})"
    if "atol" in tol:
        assert worst <= tol["atol"], f"{what} [{dtype}]: max |diff| {worst:.3e} > {tol['atol']:.1e}"
