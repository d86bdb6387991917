"""A StyleGAN2 synthesis network assembled from the `kernels` ops (the `triton` backend's generator).

Source: Karras et al. 2020 (StyleGAN2), Sec. 2.2; layer order, style indices and noise use as
rosinality `model.py::Generator.forward` (restated in `shared/golden/spec/FORWARD_NOTES.md`).

Every per-layer constant is prepared once from a `reference.stylegan2.Generator`: the effective
convolution weights in the activation dtype, `wsq = Σ_k W²` and the modulation affines in fp32,
the four polyphase kernels of each upsampling convolution, the stored noise buffers. A forward
then runs, per resolution, one fused kernel per StyledConv (modulation on load, implicit GEMM,
demodulation, noise, bias, leaky ReLU) and one per ToRGB (with the upsampled skip).
"""

from __future__ import annotations

import torch
from torch import nn

from reference.stylegan2 import Generator, ModulatedConv2d, StyledConv, ToRGB

from . import modulated_conv2d as mc


def _affine(conv: ModulatedConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The modulation EqualLinear as (weight `[C_in, 512]`, bias `[C_in]`), fp32, scale folded in."""
    lin = conv.modulation
    return (lin.weight.detach().float() * lin.scale).contiguous(), (lin.bias.detach().float() * lin.lr_mul).contiguous()


class _Conv(nn.Module):
    """Prepared constants of one StyledConv or ToRGB."""

    def __init__(self, layer: StyledConv | ToRGB, dtype: torch.dtype):
        super().__init__()
        conv = layer.conv
        weight = conv.scale * conv.weight.detach()[0].float()  # [O, I, k, k] effective, fp32
        self.up = 2 if conv.upsample else 1
        self.demodulate = conv.demodulate
        aff_w, aff_b = _affine(conv)
        self.register_buffer("affine_weight", aff_w)
        self.register_buffer("affine_bias", aff_b)
        fir = conv.blur.kernel.detach().float() if conv.upsample else None
        self.register_buffer("fir", fir)
        # the reference path takes the [O, I, k, k] weight; the kernels take it packed
        # ([phases, k*k*I, O], polyphase for the upsampling conv), prepared once here
        self.register_buffer("weight", weight.to(dtype).contiguous())
        self.register_buffer("packed_weight", mc.pack_weight(weight, self.up, fir, dtype))
        self.register_buffer("wsq", mc.weight_sq(weight))  # [O, I] fp32
        if isinstance(layer, StyledConv):
            self.noise_strength = float(layer.noise.weight.detach().item())
            self.register_buffer("bias", layer.activate.bias.detach().float().contiguous())
        else:
            self.noise_strength = 0.0
            self.register_buffer("bias", layer.bias.detach().float().contiguous())  # [1, 3, 1, 1]
            self.register_buffer("skip_fir", layer.upsample.kernel.detach().float() if hasattr(layer, "upsample") else None)

    def styles(self, w: torch.Tensor) -> torch.Tensor:
        """w `[N, 512]` -> styles `[N, C_in]` fp32."""
        return torch.addmm(self.affine_bias, w.float(), self.affine_weight.t())


class TritonSynthesis(nn.Module):
    """StyleGAN2 synthesis from `kernels` ops: w_plus `[N, n_latent, 512]` -> img `[N, 3, R, R]` fp32.

    Args:
        generator: a loaded `reference.stylegan2.Generator` (its weights are copied and prepared).
        dtype: activation dtype (fp16 on GPU; fp32 for exact comparisons). Styles, demodulation
            coefficients, biases and the noise strength stay fp32.
        impl: "triton" (CUDA, or the CPU interpreter under TRITON_INTERPRET=1) or "ref" (the
            reference ops, same assembly: proves the assembly independently of the kernels).
        clamp: optional activation clamp (None: as the official generator).
    """

    def __init__(self, generator: Generator, dtype: torch.dtype = torch.float16, impl: str = "triton",
                 clamp: float | None = None):
        super().__init__()
        self.size = generator.size
        self.n_latent = generator.n_latent
        self.dtype = dtype
        self.impl = impl
        self.clamp = clamp
        # channels_last (NHWC in memory): the kernels' fast layout; outputs keep it
        self.register_buffer("const", generator.input.input.detach().to(dtype).contiguous(memory_format=torch.channels_last))
        self.conv1 = _Conv(generator.conv1, dtype)
        self.to_rgb1 = _Conv(generator.to_rgb1, dtype)
        self.convs = nn.ModuleList(_Conv(c, dtype) for c in generator.convs)
        self.to_rgbs = nn.ModuleList(_Conv(t, dtype) for t in generator.to_rgbs)
        for i, noise in enumerate(generator.stored_noise()):
            self.register_buffer(f"noise_{i}", noise.detach().to(dtype).contiguous())
        self.num_layers = generator.num_layers

    def _noise(self, i: int) -> torch.Tensor:
        return getattr(self, f"noise_{i}")

    def _styled(self, layer: _Conv, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return mc.styled_conv2d(
            x, layer.weight, layer.styles(w), noise=noise, noise_strength=layer.noise_strength, bias=layer.bias,
            demodulate=True, up=layer.up, fir=layer.fir, clamp=self.clamp, impl=self.impl,
            **self._cached(layer, wsq=layer.wsq),
        )

    def _rgb(self, layer: _Conv, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        return mc.to_rgb(x, layer.weight, layer.styles(w), layer.bias, skip=skip, fir=layer.skip_fir,
                         impl=self.impl, **self._cached(layer))

    def _cached(self, layer: _Conv, **extra) -> dict:
        """Precomputed operands for the triton path (the reference path takes none)."""
        return {"packed_weight": layer.packed_weight, **extra} if self.impl == "triton" else {}

    def forward(self, w_plus: torch.Tensor) -> torch.Tensor:
        """w_plus `[N, n_latent, 512]` (fp32) -> img `[N, 3, size, size]` fp32, unclamped."""
        if w_plus.ndim != 3 or w_plus.shape[1] != self.n_latent or w_plus.shape[2] != 512:
            raise ValueError(f"w_plus must be [N, {self.n_latent}, 512], got {tuple(w_plus.shape)}")
        n = w_plus.shape[0]
        x = self.const.expand(n, -1, -1, -1).contiguous(memory_format=torch.channels_last)
        x = self._styled(self.conv1, x, w_plus[:, 0], self._noise(0))
        skip = self._rgb(self.to_rgb1, x, w_plus[:, 1], None)
        i = 1
        for k, to_rgb in enumerate(self.to_rgbs):
            x = self._styled(self.convs[2 * k], x, w_plus[:, i], self._noise(2 * k + 1))
            x = self._styled(self.convs[2 * k + 1], x, w_plus[:, i + 1], self._noise(2 * k + 2))
            skip = self._rgb(to_rgb, x, w_plus[:, i + 2], skip)
            i += 2
        return skip.float()


class TritonPSP(nn.Module):
    """pSp with the synthesis network on `kernels` ops and the encoder on the reference (torch) path.

    Exposes the attributes and methods `engine.Engine` uses (`opts`, `input_nc`, `label_nc`,
    `output_size`, `n_styles`, `encode`, `synthesize`).

    Args:
        psp: a loaded `reference.PSP` (already on its device).
        dtype: synthesis activation dtype (fp16 on CUDA).
        impl: "triton" or "ref" (see `TritonSynthesis`).
    """

    def __init__(self, psp, dtype: torch.dtype = torch.float16, impl: str = "triton"):
        super().__init__()
        self.psp = psp
        self.synthesis = TritonSynthesis(psp.decoder, dtype=dtype, impl=impl)
        for name in ("opts", "input_nc", "label_nc", "output_size", "n_styles", "dataset_type"):
            setattr(self, name, getattr(psp, name))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, input_nc, 256, 256]` -> w_plus `[B, n_styles, 512]` fp32 (reference encoder)."""
        return self.psp.encode(x)

    def synthesize(self, w_plus: torch.Tensor, resize: bool = False) -> torch.Tensor:
        """w_plus `[B, n_styles, 512]` -> img `[B, 3, R, R]` fp32 (256 with `resize`)."""
        img = self.synthesis(w_plus)
        return self.psp.face_pool(img) if resize else img
