"""Reference StyleGAN2 ops in plain PyTorch: upfirdn2d, bias + activation, modulated convolution.

These are the ground truth every fast path (`kernels/`, `export/`) is compared against. They
compute what the official pSp code computes with its CUDA ops replaced by their native
PyTorch twins (rosinality stylegan2-pytorch `op/upfirdn2d.py::upfirdn2d_native`,
`op/fused_act.py::fused_leaky_relu` CPU path, `model.py::ModulatedConv2d.forward`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------
# FIR filters and upfirdn2d


def setup_filter(k: Sequence[float] | torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Make a normalised 2-D FIR filter, as rosinality `make_kernel` does.

    Source: rosinality stylegan2-pytorch `model.py::make_kernel` (pSp `models/stylegan2/model.py`).

    Args:
        k: 1-D taps (separable: the outer product is taken) or a 2-D kernel `[kh, kw]`.
        gain: multiply the normalised kernel by this (4 for 2x upsampling, as the official
            `Blur(upsample_factor=2)` and `Upsample(factor=2)` store it).

    Returns:
        `[kh, kw]` float32 kernel whose taps sum to `gain`.
    """
    k = torch.as_tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    if k.ndim != 2:
        raise ValueError(f"FIR filter must be 1-D or 2-D, got shape {tuple(k.shape)}")
    return k / k.sum() * gain


def _parse_padding(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    """Padding as NVlabs takes it: int, [px, py] or [x0, x1, y0, y1]."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        px, py = padding
        return px, px, py, py
    if len(padding) == 4:
        return padding[0], padding[1], padding[2], padding[3]
    raise ValueError(f"padding must be an int, [px, py] or [x0, x1, y0, y1], got {padding}")


def upfirdn2d(
    x: torch.Tensor,
    fir: torch.Tensor,
    up: int = 1,
    down: int = 1,
    padding: int | Sequence[int] = 0,
    gain: float = 1.0,
) -> torch.Tensor:
    """Upsample (zero insertion), pad, convolve with a FIR filter, downsample.

    A true convolution: the filter is flipped (correlation with `fir[::-1, ::-1]`), as the
    official op. Negative padding crops. Computation follows rosinality `upfirdn2d_native`.

    Source: rosinality stylegan2-pytorch `op/upfirdn2d.py::upfirdn2d_native`; the `padding`
    convention is NVlabs stylegan2-ada `torch_utils/ops/upfirdn2d.py`.

    Args:
        x: `[N, C, H, W]` float tensor.
        fir: `[kh, kw]` 2-D filter, or `[k]` 1-D taps used separably (outer product, not
            normalised: pass `setup_filter(...)` output for the usual normalisation).
        up: integer upsampling factor (zeros inserted after every sample), both axes.
        down: integer downsampling factor (keep every `down`-th sample), both axes.
        padding: int, `[px, py]` or `[x0, x1, y0, y1]` pixels added (negative: cropped) after
            upsampling.
        gain: multiply the output by this.

    Returns:
        `[N, C, (H*up + y0 + y1 - kh) // down + 1, (W*up + x0 + x1 - kw) // down + 1]`, dtype of `x`.

    Raises:
        ValueError: on a bad filter rank, bad factors, or an empty output.
    """
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d expects x [N, C, H, W], got shape {tuple(x.shape)}")
    if up < 1 or down < 1:
        raise ValueError(f"up and down must be >= 1, got up={up}, down={down}")
    fir = fir.to(device=x.device, dtype=x.dtype)
    if fir.ndim == 1:
        fir = fir[:, None] * fir[None, :]
    if fir.ndim != 2:
        raise ValueError(f"fir must be 1-D or 2-D, got shape {tuple(fir.shape)}")
    x0, x1, y0, y1 = _parse_padding(padding)
    n, c, in_h, in_w = x.shape
    kh, kw = fir.shape
    out_h = (in_h * up + y0 + y1 - kh) // down + 1
    out_w = (in_w * up + x0 + x1 - kw) // down + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"upfirdn2d output would be empty ({out_h}x{out_w}) for input {in_h}x{in_w}")

    out = x.reshape(n, c, in_h, 1, in_w, 1)
    # zero insertion: every sample followed by up-1 zeros, on both axes
    out = F.pad(out, [0, up - 1, 0, 0, 0, up - 1])
    out = out.reshape(n, c, in_h * up, in_w * up)
    out = F.pad(out, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    out = out[
        :,
        :,
        max(-y0, 0) : out.shape[2] - max(-y1, 0),
        max(-x0, 0) : out.shape[3] - max(-x1, 0),
    ]
    # the same filter on every channel: a depthwise convolution (bit-identical to the official
    # one-channel formulation, and ~10x faster on CPU)
    w = torch.flip(fir, [0, 1]).reshape(1, 1, kh, kw).expand(c, 1, kh, kw)
    out = F.conv2d(out, w, groups=c)
    out = out[:, :, ::down, ::down]
    return out * gain if gain != 1 else out


# ----------------------------------------------------------------------------------------------
# bias + activation


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    act: str = "lrelu",
    alpha: float = 0.2,
    gain: float | None = None,
    clamp: float | None = None,
    dim: int = 1,
) -> torch.Tensor:
    """`y = clamp(act(x + b) * gain, -clamp, clamp)`, the bias broadcast along `dim`.

    Source: NVlabs stylegan2-ada `torch_utils/ops/bias_act.py` semantics; with `act="lrelu"`,
    `alpha=0.2`, `gain=sqrt(2)` it is rosinality `fused_leaky_relu` (pSp `FusedLeakyReLU`).

    Args:
        x: float tensor, any layout (NCHW: `dim=1`; NHWC: `dim=3`).
        b: `[x.shape[dim]]` bias, or None.
        act: `"lrelu"` (leaky ReLU with slope `alpha`) or `"linear"`.
        alpha: negative slope of the leaky ReLU.
        gain: output scale; default `sqrt(2)` for lrelu, 1 for linear.
        clamp: clamp the output to `[-clamp, clamp]` after the gain; None: no clamp.
        dim: the channel axis of `x` the bias runs along.

    Returns:
        Tensor of the shape and dtype of `x`.

    Raises:
        ValueError: unknown `act` or a bias of the wrong length.
    """
    if act not in ("lrelu", "linear"):
        raise ValueError(f"act must be 'lrelu' or 'linear', got {act!r}")
    if gain is None:
        gain = SQRT2 if act == "lrelu" else 1.0
    if b is not None:
        if b.ndim != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(f"bias must be [{x.shape[dim]}], got {tuple(b.shape)}")
        shape = [1] * x.ndim
        shape[dim] = -1
        x = x + b.reshape(shape).to(x.dtype)
    if act == "lrelu":
        x = F.leaky_relu(x, negative_slope=alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def fused_leaky_relu(
    x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2, scale: float = SQRT2
) -> torch.Tensor:
    """rosinality `fused_leaky_relu`: `leaky_relu(x + bias[c], slope) * scale`, channel axis 1.

    Source: rosinality stylegan2-pytorch `op/fused_act.py` (CPU path), used by pSp's
    `FusedLeakyReLU` and `EqualLinear(activation='fused_lrelu')`.

    Args:
        x: `[N, C, ...]` float tensor.
        bias: `[C]`.

    Returns:
        Tensor shaped like `x`.
    """
    return bias_act(x, bias, act="lrelu", alpha=negative_slope, gain=scale, dim=1)


# ----------------------------------------------------------------------------------------------
# modulated convolution


def demodulation_coefficients(weight: torch.Tensor, styles: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`dcoefs[n, o] = rsqrt(sum_i styles[n, i]^2 * sum_k weight[o, i, k]^2 + eps)` in fp32.

    Source: Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (2020), Eq. 3.

    Args:
        weight: `[C_out, C_in, k, k]` effective (already scaled) weight.
        styles: `[N, C_in]` modulation styles.
        eps: 1e-8 as the official code (below fp16 range: computed in fp32).

    Returns:
        `[N, C_out]` float32 (float64 when an input is float64).
    """
    dtype = torch.promote_types(torch.promote_types(weight.dtype, styles.dtype), torch.float32)
    wsq = weight.to(dtype).square().sum(dim=[2, 3])  # [O, I]
    return torch.rsqrt(styles.to(dtype).square() @ wsq.t() + eps)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    up: int = 1,
    padding: int | None = None,
    fir: torch.Tensor | None = None,
    fused_modconv: bool = True,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution (modulate, demodulate, convolve; optional 2x upsampling).

    Source: Karras et al. 2020, Sec. 2.2, Eqs. 1-3; computation as rosinality
    `model.py::ModulatedConv2d.forward` (the layout official pSp checkpoints use).

    Two formulations, equal up to fp32 rounding:
      * `fused_modconv=True` (official): per-sample weights `weight * styles[n]`, demodulated,
        applied as one grouped convolution (`groups=N`).
      * `fused_modconv=False` (activation modulation): `x * styles` -> convolution with the
        static `weight` -> `* dcoefs[n, o]`. Static weights make this form exportable and fast.

    Upsampling (`up=2`): stride-2 transposed convolution with the weight transposed to
    `[C_in, C_out, k, k]` (not flipped), then the FIR blur `fir` with padding (1, 1), as the
    official `ModulatedConv2d(upsample=True)` + `Blur`. Output `2H x 2W` for a 3x3 kernel.

    Args:
        x: `[N, C_in, H, W]` float activations.
        weight: `[C_out, C_in, k, k]` effective weight (the parameter times `1/sqrt(C_in*k*k)`).
        styles: `[N, C_in]` modulation (the affine of w; `bias_init=1`).
        demodulate: apply demodulation (True for StyledConv, False for ToRGB).
        up: 1 or 2.
        padding: convolution padding for `up=1`; default `k // 2`.
        fir: `[4, 4]` blur filter for `up=2` (the stored `blur.kernel`, already x4).
        fused_modconv: formulation, see above.

    Returns:
        `[N, C_out, H*up, W*up]` in the dtype of `x`.

    Raises:
        ValueError: on shape mismatches, `up` not in {1, 2}, or `up=2` without `fir`.
    """
    n, c_in, h, w = x.shape
    c_out, c_in_w, kh, kw = weight.shape
    if c_in_w != c_in or styles.shape != (n, c_in):
        raise ValueError(
            f"modulated_conv2d: x {tuple(x.shape)}, weight {tuple(weight.shape)}, styles "
            f"{tuple(styles.shape)} do not agree (expected styles [{n}, {c_in}])"
        )
    if up not in (1, 2):
        raise ValueError(f"up must be 1 or 2, got {up}")
    if up == 2 and fir is None:
        raise ValueError("up=2 needs the blur filter `fir`")
    if padding is None:
        padding = kh // 2

    if fused_modconv:
        wmod = weight[None] * styles[:, None, :, None, None]  # [N, O, I, k, k]
        if demodulate:
            demod = torch.rsqrt(wmod.pow(2).sum([2, 3, 4]) + 1e-8)  # [N, O]
            wmod = wmod * demod[:, :, None, None, None]
        wmod = wmod.to(x.dtype)  # styles may be fp32 while activations are fp16
        if up == 2:
            wt = wmod.transpose(1, 2).reshape(n * c_in, c_out, kh, kw)
            out = F.conv_transpose2d(x.reshape(1, n * c_in, h, w), wt, padding=0, stride=2, groups=n)
            out = out.reshape(n, c_out, out.shape[2], out.shape[3])
            return upfirdn2d(out, fir, padding=(1, 1))
        out = F.conv2d(
            x.reshape(1, n * c_in, h, w), wmod.reshape(n * c_out, c_in, kh, kw), padding=padding, groups=n
        )
        return out.reshape(n, c_out, out.shape[2], out.shape[3])

    xs = x * styles[:, :, None, None].to(x.dtype)
    if up == 2:
        out = F.conv_transpose2d(xs, weight.transpose(0, 1), padding=0, stride=2)
        out = upfirdn2d(out, fir, padding=(1, 1))
    else:
        out = F.conv2d(xs, weight, padding=padding)
    if demodulate:
        out = out * demodulation_coefficients(weight, styles).to(out.dtype)[:, :, None, None]
    return out
