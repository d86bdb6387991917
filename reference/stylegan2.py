"""StyleGAN2 generator in the rosinality state_dict layout (the pSp decoder).

Source: Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (CVPR 2020);
module structure, parameter names and forward computation as rosinality stylegan2-pytorch
`model.py`, which official pSp checkpoints (`decoder.*`) and rosinality checkpoints (`g_ema`)
use. Only inference is implemented (no discriminator, no random noise sampling unless asked).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .ops import fused_leaky_relu, modulated_conv2d, setup_filter, upfirdn2d

STYLE_DIM = 512
N_MLP = 8
LR_MLP = 0.01
BLUR_KERNEL = (1, 3, 3, 1)


def channels_for(resolution: int, channel_multiplier: int = 2) -> int:
    """Feature channels of the synthesis layers at `resolution` (rosinality `Generator.channels`)."""
    table = {
        4: 512,
        8: 512,
        16: 512,
        32: 512,
        64: 256 * channel_multiplier,
        128: 128 * channel_multiplier,
        256: 64 * channel_multiplier,
        512: 32 * channel_multiplier,
        1024: 16 * channel_multiplier,
    }
    return table[resolution]


def n_latent_for(size: int) -> int:
    """Number of W+ styles of a generator of output `size`: `2*log2(size) - 2` (14 at 256, 18 at 1024)."""
    return int(math.log2(size)) * 2 - 2


def check_size(size: int) -> None:
    """Raise ValueError unless `size` is a power of two in [16, 1024]."""
    if size < 16 or size > 1024 or size & (size - 1):
        raise ValueError(f"StyleGAN2 output size must be a power of two in [16, 1024], got {size}")


class PixelNorm(nn.Module):
    """`x * rsqrt(mean(x^2, dim=1) + 1e-8)` (Karras et al. 2018, Sec. 4.2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Equalized-learning-rate linear layer (rosinality `EqualLinear`).

    `y = x @ (W * lr_mul/sqrt(in)).T + b * lr_mul`, then `fused_leaky_relu` if
    `activation="fused_lrelu"`. The stored weight is `randn / lr_mul` at init.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim).fill_(bias_init)) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation:
            out = nn.functional.linear(x, self.weight * self.scale)
            return fused_leaky_relu(out, self.bias * self.lr_mul)
        bias = self.bias * self.lr_mul if self.bias is not None else None
        return nn.functional.linear(x, self.weight * self.scale, bias=bias)


class ConstantInput(nn.Module):
    """The learned 4x4 constant the synthesis network starts from, `[1, 512, 4, 4]`."""

    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.repeat(batch, 1, 1, 1)


class Blur(nn.Module):
    """FIR low-pass after the transposed convolution (rosinality `Blur`); buffer `kernel` [4, 4]."""

    def __init__(self, kernel=BLUR_KERNEL, pad=(1, 1), upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", setup_filter(kernel, gain=upsample_factor**2))
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p0, p1 = self.pad
        return upfirdn2d(x, self.kernel, padding=(p0, p1, p0, p1))


class Upsample(nn.Module):
    """2x FIR upsampling of the RGB skip (rosinality `Upsample`): `upfirdn2d(up=2, pad=(2, 1))`."""

    def __init__(self, kernel=BLUR_KERNEL, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", setup_filter(kernel, gain=factor**2))
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p0, p1 = self.pad
        return upfirdn2d(x, self.kernel, up=self.factor, padding=(p0, p1, p0, p1))


class ModulatedConv2d(nn.Module):
    """Modulated convolution with the rosinality parameter layout.

    Parameters: `weight` `[1, C_out, C_in, k, k]` (plain randn; scaled by `1/sqrt(C_in*k*k)` at
    run time), `modulation` (EqualLinear 512 -> C_in, bias init 1), and for `upsample=True` the
    buffer `blur.kernel`. `fused_modconv` selects the formulation (see `ops.modulated_conv2d`).
    """

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int = STYLE_DIM,
                 demodulate: bool = True, upsample: bool = False, blur_kernel=BLUR_KERNEL):
        super().__init__()
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.kernel_size = kernel_size
        self.upsample = upsample
        self.demodulate = demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.fused_modconv = True

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x `[N, C_in, H, W]`, w `[N, 512]` -> `[N, C_out, H*up, W*up]`."""
        styles = self.modulation(w)
        return modulated_conv2d(
            x,
            self.scale * self.weight[0],
            styles,
            demodulate=self.demodulate,
            up=2 if self.upsample else 1,
            padding=self.padding,
            fir=self.blur.kernel if self.upsample else None,
            fused_modconv=self.fused_modconv,
        )


class NoiseInjection(nn.Module):
    """`x + weight * noise`, the noise `[N or 1, 1, H, W]` broadcast over channels; `weight` `[1]`."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + self.weight * noise


class FusedLeakyReLU(nn.Module):
    """Bias + leaky ReLU (0.2) * sqrt(2) with a `[C]` parameter `bias`."""

    def __init__(self, channel: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


class StyledConv(nn.Module):
    """Modulated conv -> noise -> bias + leaky ReLU (rosinality `StyledConv`)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int = STYLE_DIM,
                 upsample: bool = False, blur_kernel=BLUR_KERNEL):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim,
                                    upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, w), noise))


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB (no demodulation) + bias, plus the 2x upsampled skip."""

    def __init__(self, in_channel: int, style_dim: int = STYLE_DIM, upsample: bool = True,
                 blur_kernel=BLUR_KERNEL):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, w) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class Generator(nn.Module):
    """StyleGAN2 generator, rosinality layout: `Generator(size, 512, 8, channel_multiplier=2)`.

    State_dict keys (as pSp `decoder.*` minus the prefix, or a rosinality `g_ema`): `style.1..8`
    (mapping), `input.input`, `conv1`, `to_rgb1`, `convs.0..`, `to_rgbs.0..`, `noises.noise_0..`.

    Args:
        size: output resolution, a power of two in [16, 1024].
    """

    def __init__(self, size: int, style_dim: int = STYLE_DIM, n_mlp: int = N_MLP,
                 channel_multiplier: int = 2, blur_kernel=BLUR_KERNEL, lr_mlp: float = LR_MLP):
        super().__init__()
        check_size(size)
        self.size = size
        self.style_dim = style_dim
        layers: list[nn.Module] = [PixelNorm()]
        for _ in range(n_mlp):
            layers.append(EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu"))
        self.style = nn.Sequential(*layers)

        ch = lambda r: channels_for(r, channel_multiplier)  # noqa: E731
        self.input = ConstantInput(ch(4))
        self.conv1 = StyledConv(ch(4), ch(4), 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(ch(4), style_dim, upsample=False)
        self.log_size = int(math.log2(size))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # empty; kept for layout parity with rosinality
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = (layer_idx + 5) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2**res, 2**res))
        in_channel = ch(4)
        for i in range(3, self.log_size + 1):
            out_channel = ch(2**i)
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim, upsample=True,
                                         blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim))
            in_channel = out_channel
        self.n_latent = self.log_size * 2 - 2

    def set_fused_modconv(self, fused: bool) -> None:
        """Choose the modulated-conv formulation of every layer (True: official grouped conv)."""
        for m in self.modules():
            if isinstance(m, ModulatedConv2d):
                m.fused_modconv = fused

    def stored_noise(self) -> list[torch.Tensor]:
        """The `num_layers` stored noise buffers `[1, 1, 2^res, 2^res]` (randomize_noise=False)."""
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """Mapping network: z `[N, 512]` -> w `[N, 512]` (PixelNorm, 8 x EqualLinear lr_mul 0.01)."""
        return self.style(z)

    def synthesis(self, w_plus: torch.Tensor, noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Synthesis network: w_plus `[N, n_latent, 512]` -> img `[N, 3, size, size]` (unclamped).

        Args:
            w_plus: one style per layer; a `[N, 512]` w is repeated to all layers.
            noise: `num_layers` tensors `[N or 1, 1, res, res]`; default the stored buffers.

        Raises:
            ValueError: w_plus of the wrong shape.
        """
        if w_plus.ndim == 2:
            w_plus = w_plus[:, None, :].repeat(1, self.n_latent, 1)
        if w_plus.ndim != 3 or w_plus.shape[1] != self.n_latent or w_plus.shape[2] != self.style_dim:
            raise ValueError(
                f"w_plus must be [N, {self.n_latent}, {self.style_dim}] for a {self.size}px generator, "
                f"got {tuple(w_plus.shape)}"
            )
        if noise is None:
            noise = self.stored_noise()
        out = self.input(w_plus.shape[0])
        out = self.conv1(out, w_plus[:, 0], noise[0])
        skip = self.to_rgb1(out, w_plus[:, 1])
        i = 1
        for conv_up, conv, noise1, noise2, to_rgb in zip(
            self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs
        ):
            out = conv_up(out, w_plus[:, i], noise1)
            out = conv(out, w_plus[:, i + 1], noise2)
            skip = to_rgb(out, w_plus[:, i + 2], skip)
            i += 2
        return skip

    def forward(self, w_plus: torch.Tensor) -> torch.Tensor:
        """`synthesis(w_plus)` with the stored noise."""
        return self.synthesis(w_plus)
