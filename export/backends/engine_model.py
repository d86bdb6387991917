"""The engine formulation of pSp: the same function as `reference.PSP`, with static weights everywhere.

Source: Richardson et al. 2021 (pSp) and Karras et al. 2020 (StyleGAN2, Sec. 2.2, Eqs. 1-3); the
reference it must equal is `reference/` (checked in `tests/test_engine_model.py` and against the
official golden vectors).

What changes against the official formulation (all exact up to fp32 rounding):
  * Modulation on the activations, demodulation as a per-(sample, channel) output scale computed
    in fp32 from a precomputed `wsq = Σ_k W²` (`dcoefs = rsqrt(s² @ wsq.T + 1e-8)`): one convolution
    with a static weight for the whole batch instead of a grouped convolution with per-sample
    weights. This is what makes export clean and per-image time flat in the batch size.
  * The upsampling convolution as a transposed convolution with the static weight, then the FIR
    blur as a depthwise convolution; the ToRGB skip upsample as a depthwise stride-2 transposed
    convolution (equal to upfirdn2d(up=2, pad=(2,1)) for the symmetric 4x4 filter).
  * Eval-mode BatchNorm folded into the convolution or linear layer that precedes it; a BatchNorm
    that precedes a zero-padded convolution (the first op of each IR-SE residual branch) stays a
    per-channel affine, since folding it would change the border pixels.
  * The stored noise buffers as constants; `noise_strength * noise` precomputed.
  * The map2style heads of a pyramid level batched: their first convolutions (same input) as one
    convolution, the following ones as one grouped convolution, the final EqualLinears as one
    batched matmul (the 11 fine heads of a 1024 model share one 512 -> 5632 convolution).

Module names matter for export: the fp32-critical math lives in modules named `affine` (the style
affines), `demod` (demodulation coefficients), `mapping` and `pixel_norm`, so ONNX node names carry
them (TensorRT FP16 builds keep those layers in fp32: `export/tensorrt/builder.py`).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from reference import encoders as enc
from reference import stylegan2 as sg
from reference.psp import PSP

LRELU_GAIN = math.sqrt(2.0)


# ----------------------------------------------------------------------------------------------
# folding helpers


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as `x * scale + shift`, per channel, fp32."""
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.detach().float() + bn.eps)
    shift = bn.bias.detach().float() - bn.running_mean.detach().float() * scale
    return scale, shift


def _conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> nn.Conv2d:
    """A copy of `conv` with a following eval BatchNorm folded in (bias added)."""
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(w.shape[0])
    if bn is not None:
        scale, shift = _bn_scale_shift(bn)
        w = w * scale[:, None, None, None]
        b = b * scale + shift
    out = skip_init(nn.Conv2d, w.shape[1] * conv.groups, w.shape[0], w.shape[2:], conv.stride, conv.padding,
                    groups=conv.groups, bias=True)  # no random init: the weights are copied in
    out.weight.data.copy_(w)
    out.bias.data.copy_(b)
    return out.requires_grad_(False)


class ChannelAffine(nn.Module):
    """`x * scale[c] + shift[c]`: an eval BatchNorm that cannot be folded (it precedes a padded conv)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        scale, shift = _bn_scale_shift(bn)
        self.register_buffer("scale", scale[None, :, None, None].contiguous())
        self.register_buffer("shift", shift[None, :, None, None].contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


# ----------------------------------------------------------------------------------------------
# encoder


class Unit(nn.Module):
    """IR-SE unit with folded BatchNorms (see module docstring)."""

    def __init__(self, unit: enc.BottleneckIRSE):
        super().__init__()
        bn1, conv1, prelu, conv2, bn2, se = unit.res_layer
        self.bn1 = ChannelAffine(bn1)
        self.conv1 = _conv_bn(conv1, None)
        self.prelu = prelu
        self.conv2 = _conv_bn(conv2, bn2)
        self.se_fc1, self.se_fc2 = se.fc1, se.fc2
        if isinstance(unit.shortcut_layer, nn.MaxPool2d):
            self.shortcut = None
            self.stride = unit.shortcut_layer.stride
        else:
            self.shortcut = _conv_bn(unit.shortcut_layer[0], unit.shortcut_layer[1])
            self.stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.conv2(self.prelu(self.conv1(self.bn1(x))))
        s = torch.sigmoid(self.se_fc2(F.relu(self.se_fc1(r.mean(dim=(2, 3), keepdim=True)))))
        short = self.shortcut(x) if self.shortcut is not None else x[:, :, :: self.stride, :: self.stride]
        return r * s + short


class Backbone(nn.Module):
    """IR-SE-50 with folded BatchNorms; returns the taps the encoders use."""

    def __init__(self, input_layer: nn.Sequential, body: nn.Sequential):
        super().__init__()
        conv, bn, prelu = input_layer
        self.input_conv = _conv_bn(conv, bn)
        self.input_prelu = prelu
        self.units = nn.ModuleList(Unit(u) for u in body)

    def forward(self, x: torch.Tensor, taps: tuple[int, ...] = ()) -> list[torch.Tensor]:
        """x `[B, input_nc, 256, 256]` -> feature maps after the units in `taps`, then the last."""
        x = self.input_prelu(self.input_conv(x.to(self.input_conv.weight.dtype)))
        out = []
        for i, unit in enumerate(self.units):
            x = unit(x)
            if i in taps:
                out.append(x)
        return out + [x]


class StyleHeads(nn.Module):
    """The map2style heads of one pyramid level, batched: `[B, 512, s, s]` -> `[B, h, 512]`."""

    def __init__(self, heads: list[enc.GradualStyleBlock]):
        super().__init__()
        self.h = len(heads)
        n_convs = len(heads[0].convs) // 2
        convs = []
        for j in range(n_convs):
            w = torch.cat([hd.convs[2 * j].weight.detach().float() for hd in heads])  # [h*512, 512, 3, 3]
            b = torch.cat([hd.convs[2 * j].bias.detach().float() for hd in heads])
            groups = 1 if j == 0 else self.h
            # built on the meta device, then given the concatenated tensors (new memory, owned
            # here): no random init and no second copy of the ~0.9 GB of head weights at 1024 px
            conv = nn.Conv2d(512 * (1 if j == 0 else self.h), 512 * self.h, 3, 2, 1, groups=groups, device="meta")
            conv.weight = nn.Parameter(w, requires_grad=False)
            conv.bias = nn.Parameter(b, requires_grad=False)
            convs.append(conv)
        self.convs = nn.ModuleList(convs)
        lin = [hd.linear for hd in heads]
        self.register_buffer("lin_weight", torch.stack([l.weight.detach().float() * l.scale for l in lin]))  # [h,o,i]
        self.register_buffer("lin_bias", torch.stack([l.bias.detach().float() * l.lr_mul for l in lin]))  # [h, o]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.01)
        x = x.reshape(x.shape[0], self.h, 512)  # the spatial size is 1x1 now
        return torch.einsum("bhi,hoi->bho", x, self.lin_weight) + self.lin_bias


class GradualStyleEncoderE(nn.Module):
    """`GradualStyleEncoder` in the engine formulation: codes `[B, n_styles, 512]`."""

    def __init__(self, e: enc.GradualStyleEncoder):
        super().__init__()
        self.backbone = Backbone(e.input_layer, e.body)
        self.coarse = StyleHeads(list(e.styles[: e.coarse_ind]))
        self.middle = StyleHeads(list(e.styles[e.coarse_ind : e.middle_ind]))
        self.fine = StyleHeads(list(e.styles[e.middle_ind :])) if e.style_count > e.middle_ind else None
        self.latlayer1 = _conv_bn(e.latlayer1, None)
        self.latlayer2 = _conv_bn(e.latlayer2, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3 = self.backbone(x, taps=(6, 20))
        p2 = F.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer1(c2)
        codes = [self.coarse(c3), self.middle(p2)]
        if self.fine is not None:
            p1 = F.interpolate(p2, size=c1.shape[-2:], mode="bilinear", align_corners=True) + self.latlayer2(c1)
            codes.append(self.fine(p1))
        return torch.cat(codes, dim=1)


def _adaptive_pool_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """`[out, in]` averaging matrix of `AdaptiveAvgPool1d(out)` (PyTorch's bin edges)."""
    m = torch.zeros(out_size, in_size)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m


class WPlusEncoderE(nn.Module):
    """`BackboneEncoderUsingLastLayerIntoWPlus`: BN, 7x7 adaptive pool and Linear folded into one matmul."""

    def __init__(self, e: enc.BackboneEncoderUsingLastLayerIntoWPlus, feature_size: int = 16):
        super().__init__()
        self.backbone = Backbone(e.input_layer, e.body)
        bn, _, _, linear = e.output_layer_2
        scale, shift = _bn_scale_shift(bn)
        p = _adaptive_pool_matrix(feature_size, 7)  # [7, 16]
        pool = torch.kron(p, p)  # [49, 256]: (h*7+w, y*16+x)
        w = linear.weight.detach().float().reshape(512, 512, 49)  # [o, c, 49]
        w_full = torch.einsum("ocq,qp->ocp", w, pool)  # [o, c, 256]
        bias = linear.bias.detach().float() + torch.einsum("ocp,c->o", w_full, shift)
        w_full = w_full * scale[None, :, None]
        self.register_buffer("head_weight", w_full.reshape(512, 512 * feature_size**2).contiguous())
        self.register_buffer("head_bias", bias)
        self.n_styles = e.n_styles
        self.register_buffer("lin_weight", (e.linear.weight.detach().float() * e.linear.scale).contiguous())
        self.register_buffer("lin_bias", e.linear.bias.detach().float() * e.linear.lr_mul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (f,) = self.backbone(x)
        h = F.linear(f.flatten(1), self.head_weight, self.head_bias)
        return F.linear(h, self.lin_weight, self.lin_bias).reshape(-1, self.n_styles, 512)


class WEncoderE(nn.Module):
    """`BackboneEncoderUsingLastLayerIntoW`: global average pool -> EqualLinear: `[B, 512]`."""

    def __init__(self, e: enc.BackboneEncoderUsingLastLayerIntoW):
        super().__init__()
        self.backbone = Backbone(e.input_layer, e.body)
        self.register_buffer("lin_weight", (e.linear.weight.detach().float() * e.linear.scale).contiguous())
        self.register_buffer("lin_bias", e.linear.bias.detach().float() * e.linear.lr_mul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (f,) = self.backbone(x)
        return F.linear(f.mean(dim=(2, 3)), self.lin_weight, self.lin_bias)


# ----------------------------------------------------------------------------------------------
# generator


class Affine(nn.Module):
    """Style affine of one layer: w `[B, 512]` -> styles `[B, C_in]`, fp32."""

    def __init__(self, lin: sg.EqualLinear):
        super().__init__()
        self.register_buffer("weight", (lin.weight.detach().float() * lin.scale).contiguous())
        self.register_buffer("bias", lin.bias.detach().float() * lin.lr_mul)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return F.linear(w.float(), self.weight, self.bias)


class Demod(nn.Module):
    """Demodulation coefficients `rsqrt(styles² @ wsq.T + 1e-8)` `[B, C_out]`, fp32 (Eq. 3)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("wsq", weight.float().square().sum(dim=(2, 3)).contiguous())  # [O, I]

    def forward(self, styles: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(F.linear(styles.float().square(), self.wsq) + 1e-8)


IMPLS = ("torch", "triton", "ref")  # who runs the prepared layers: torch ops, Triton kernels, the kernels' ref twins


class ModConv(nn.Module):
    """One StyledConv or ToRGB with its constants prepared once; run by torch ops or by the kernels.

    `impl="torch"` (exportable): `conv(x * s, W) * dcoefs` (+ noise, bias, lrelu), the upsampling
    conv as a static transposed conv + depthwise blur, the ToRGB skip upsample as a depthwise
    transposed conv. `impl="triton"` / `"ref"`: `kernels.modulated_conv2d.styled_conv2d` / `to_rgb`
    (one fused kernel per layer: modulation on load, implicit GEMM, demodulation from `wsq`, noise,
    bias, leaky ReLU; the ToRGB kernel adds the upsampled skip), or their reference twins.

    Args:
        layer: a rosinality `StyledConv` or `ToRGB`.
        noise: the stored noise buffer `[1, 1, H, W]` of a StyledConv.
        impl: "torch", "triton" or "ref".
        dtype: activation dtype of the kernel path (its packed weights are made in it); the torch
            path is built in fp32 and cast afterwards (`cast_activations`).
    """

    def __init__(self, layer: sg.StyledConv | sg.ToRGB, noise: torch.Tensor | None = None, impl: str = "torch",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        conv = layer.conv
        weight = (conv.scale * conv.weight.detach()[0]).float()  # [O, I, k, k]
        self.impl = impl
        self.affine = Affine(conv.modulation)
        self.demod = Demod(weight) if conv.demodulate else None
        self.up = conv.upsample
        self.padding = conv.padding
        self.is_rgb = isinstance(layer, sg.ToRGB)
        fir = conv.blur.kernel.detach().float() if self.up else None
        if impl == "torch":
            if self.up:
                self.register_buffer("weight", weight.transpose(0, 1).contiguous())  # conv_transpose: [I, O, k, k]
                c = weight.shape[0]
                self.register_buffer("blur", torch.flip(fir, [0, 1])[None, None].repeat(c, 1, 1, 1).contiguous())
            else:
                self.register_buffer("weight", weight.contiguous())
        else:
            from kernels import modulated_conv2d as mc

            self.register_buffer("weight", weight.to(dtype).contiguous())  # [O, I, k, k]
            self.register_buffer("fir", fir)
            self.register_buffer("packed_weight", mc.pack_weight(weight, 2 if self.up else 1, fir, dtype)
                                 if impl == "triton" else None)
        if not self.is_rgb:
            scaled = layer.noise.weight.detach().float() * noise.float()  # noise_strength * noise, [1, 1, H, W]
            self.register_buffer("noise", (scaled if impl == "torch" else scaled.to(dtype)).contiguous())
            bias = layer.activate.bias.detach().float()
            self.register_buffer("bias", (bias[None, :, None, None] if impl == "torch" else bias).contiguous())
            self.skip_up = None
        else:
            self.noise = None
            self.register_buffer("bias", layer.bias.detach().float().contiguous())  # [1, 3, 1, 1]
            up = getattr(layer, "upsample", None)
            if impl == "torch":
                self.skip_up = SkipUp(up) if up is not None else None
            else:
                self.skip_up = None
                self.register_buffer("skip_fir", up.kernel.detach().float() if up is not None else None)

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """x `[N, C_in, H, W]`, w `[N, 512]` (and for ToRGB the previous `skip` `[N, 3, H/2, W/2]`)
        -> `[N, C_out, H', W']` (ToRGB: the new skip, `[N, 3, H, W]`)."""
        styles = self.affine(w)
        if self.impl != "torch":
            return self._kernel_forward(x, styles, skip)
        x = x * styles[:, :, None, None].to(x.dtype)
        if self.up:
            x = F.conv_transpose2d(x, self.weight, stride=2)
            x = F.conv2d(x, self.blur, padding=1, groups=x.shape[1])
        else:
            x = F.conv2d(x, self.weight, padding=self.padding)
        if self.demod is not None:
            x = x * self.demod(styles)[:, :, None, None].to(x.dtype)
        if self.noise is not None:
            return F.leaky_relu(x + self.noise + self.bias, 0.2) * LRELU_GAIN
        x = x + self.bias
        return x if skip is None else x + self.skip_up(skip)

    def _kernel_forward(self, x: torch.Tensor, styles: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        from kernels import modulated_conv2d as mc

        cached = {"packed_weight": self.packed_weight} if self.impl == "triton" else {}
        if self.is_rgb:
            return mc.to_rgb(x, self.weight, styles, self.bias, skip=skip, fir=self.skip_fir, impl=self.impl,
                             **cached)
        return mc.styled_conv2d(x, self.weight, styles, noise=self.noise, noise_strength=1.0, bias=self.bias,
                                demodulate=True, up=2 if self.up else 1, fir=self.fir, impl=self.impl,
                                wsq=self.demod.wsq if self.impl == "triton" else None, **cached)


class SkipUp(nn.Module):
    """ToRGB skip `upfirdn2d(up=2, pad=(2, 1))` as a depthwise stride-2 transposed convolution."""

    def __init__(self, upsample: sg.Upsample):
        super().__init__()
        k = upsample.kernel.detach().float()
        assert upsample.pad == (2, 1) and k.shape == (4, 4), "rosinality Upsample([1,3,3,1]) layout"
        # conv_transpose correlates with the flipped kernel: a true convolution, as upfirdn2d
        self.register_buffer("kernel", k[None, None].repeat(3, 1, 1, 1).contiguous())

    def forward(self, skip: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(skip, self.kernel.to(skip.dtype), stride=2, padding=1, groups=3)


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class Mapping(nn.Module):
    """z `[B, 512]` -> w `[B, 512]`: PixelNorm + 8 EqualLinear (lr_mul 0.01, folded) with lrelu·√2."""

    def __init__(self, style: nn.Sequential):
        super().__init__()
        self.pixel_norm = PixelNorm()
        lins = list(style)[1:]
        self.register_buffer("weights", torch.stack([l.weight.detach().float() * l.scale for l in lins]))
        self.register_buffer("biases", torch.stack([l.bias.detach().float() * l.lr_mul for l in lins]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.pixel_norm(z.float())
        for i in range(self.weights.shape[0]):
            x = F.leaky_relu(F.linear(x, self.weights[i], self.biases[i]), 0.2) * LRELU_GAIN
        return x


def own_memory(module: nn.Module, source: nn.Module) -> nn.Module:
    """Clone, in place, every parameter and buffer of `module` that shares memory with one of
    `source`, so that changing `module` (`emulate_rounding`, `cast_activations`) never changes the
    model it was built from (`.float()` / `.detach()` of an fp32 tensor alias it).

    Returns:
        `module`.
    """
    shared_modules = {id(m) for m in source.modules()}
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in shared_modules:  # a source layer reused as is
                parent._modules[name] = copy.deepcopy(child)
    storages = {t.untyped_storage().data_ptr() for t in list(source.parameters()) + list(source.buffers())}
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is not None and t.untyped_storage().data_ptr() in storages:
                    clone = t.detach().clone()
                    table[name] = nn.Parameter(clone, requires_grad=False) if table is mod._parameters else clone
    return module


class Synthesis(nn.Module):
    """StyleGAN2 synthesis in the engine formulation: w_plus `[B, n_latent, 512]` -> img `[B, 3, R, R]`.

    The one layer loop of the fast paths: per-layer constants prepared once (`ModConv`), run by
    torch ops (`impl="torch"`, exportable) or by the Triton kernels (`impl="triton"`; `"ref"` runs
    the kernels' reference twins: proves the assembly without the kernels).

    Args:
        g: a rosinality `Generator` (weights copied and prepared).
        impl: "torch", "triton" or "ref".
        dtype: activation dtype of the kernel path (fp16 on CUDA; fp32 for exact comparisons);
            styles, demodulation and biases stay fp32. The torch path is cast by `cast_activations`.
    """

    def __init__(self, g: sg.Generator, impl: str = "torch", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.n_latent = g.n_latent
        self.size = g.size
        self.impl = impl
        noise = g.stored_noise()
        const = g.input.input.detach().float()
        if impl != "torch":  # channels_last (NHWC in memory): the kernels' layout; outputs keep it
            const = const.to(dtype).contiguous(memory_format=torch.channels_last)
        self.register_buffer("const", const.contiguous() if impl == "torch" else const)
        self.conv1 = ModConv(g.conv1, noise[0], impl, dtype)
        self.to_rgb1 = ModConv(g.to_rgb1, None, impl, dtype)
        self.convs = nn.ModuleList(ModConv(c, noise[i + 1], impl, dtype) for i, c in enumerate(g.convs))
        self.to_rgbs = nn.ModuleList(ModConv(t, None, impl, dtype) for t in g.to_rgbs)
        own_memory(self, g)

    def forward(self, w_plus: torch.Tensor) -> torch.Tensor:
        """w_plus `[N, n_latent, 512]` (fp32) -> img `[N, 3, size, size]` in the activation dtype, unclamped."""
        if w_plus.ndim != 3 or w_plus.shape[1] != self.n_latent or w_plus.shape[2] != 512:
            raise ValueError(f"w_plus must be [N, {self.n_latent}, 512], got {tuple(w_plus.shape)}")
        x = self.const.expand(w_plus.shape[0], -1, -1, -1)
        if self.impl != "torch":
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv1(x, w_plus[:, 0])
        skip = self.to_rgb1(x, w_plus[:, 1])
        i = 1
        for k, to_rgb in enumerate(self.to_rgbs):
            x = self.convs[2 * k](x, w_plus[:, i])
            x = self.convs[2 * k + 1](x, w_plus[:, i + 1])
            skip = to_rgb(x, w_plus[:, i + 2], skip)
            i += 2
        return skip


# ----------------------------------------------------------------------------------------------
# the model


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# modules whose math stays fp32 in every precision (FORWARD_NOTES "FP16 hazards"; measured for bf16:
# benchmarks/RESULTS.md "Precision")
FP32_MODULES = (Affine, Demod, Mapping)


def cast_activations(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast, in place, the floating-point parameters and buffers of `module` to `dtype`, except inside
    the fp32 modules (`FP32_MODULES`: style affines, demodulation, mapping) and `latent_avg`.

    Returns:
        `module`.
    """
    keep = {id(x) for mod in module.modules() if isinstance(mod, FP32_MODULES) for x in mod.modules()}
    for mod in module.modules():
        if id(mod) in keep:
            continue
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is None or not t.is_floating_point() or name == "latent_avg" or t.dtype == dtype:
                continue
            cast = t.detach().to(dtype)
            if name in mod._parameters:
                mod._parameters[name] = nn.Parameter(cast, requires_grad=False)
            else:
                mod._buffers[name] = cast
    return module


class EnginePSP(nn.Module):
    """pSp in the engine formulation, built from a loaded `reference.PSP`; the same interface.

    Used by the `engine` backend (torch ops), the `triton` backend (synthesis on the Triton kernels)
    and the ONNX export (torch ops).

    Args:
        psp: a `reference.PSP` (fp32, eval); its weights are copied and transformed.
        impl: who runs the synthesis layers: "torch", "triton" or "ref" (`Synthesis`).
        precision: "fp32", "bf16" or "fp16": the activation dtype of the encoder and the synthesis
            network; the style affines, demodulation, mapping and latent_avg stay fp32, and the IO
            (x, w_plus, img) is fp32 in every precision.
        checkpoint, backend: recorded in `description`.

    Attributes:
        description: the `reference.description.ModelDescription` (sizes, n_styles, learn_in_w, opts,
            precision, backend): the model's one record of its facts (`export.backends.BackendModel`).
    """

    def __init__(self, psp: PSP, impl: str = "torch", precision: str = "fp32",
                 checkpoint: str | None = None, backend: str = ""):
        super().__init__()
        from reference.description import describe

        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {tuple(DTYPES)}, got {precision!r}")
        dtype = DTYPES[precision]
        self.description = describe(psp, checkpoint, precision=precision, backend=backend)
        e = psp.encoder
        if isinstance(e, enc.GradualStyleEncoder):
            self.encoder = GradualStyleEncoderE(e)
        elif isinstance(e, enc.BackboneEncoderUsingLastLayerIntoWPlus):
            self.encoder = WPlusEncoderE(e)
        elif isinstance(e, enc.BackboneEncoderUsingLastLayerIntoW):
            self.encoder = WEncoderE(e)
        else:  # pragma: no cover - ENCODER_TYPES is closed
            raise TypeError(f"unsupported encoder {type(e).__name__}")
        self.synthesis = Synthesis(psp.decoder, impl=impl, dtype=dtype)
        self.mapping = Mapping(psp.decoder.style)
        la = psp.latent_avg.detach().float() if psp.start_from_latent_avg else torch.zeros(psp.n_styles, 512)
        self.register_buffer("latent_avg", (la[0] if psp.learn_in_w else la).contiguous())
        own_memory(self, psp)  # emulate_rounding / cast_activations must never reach `psp`
        if dtype != torch.float32:
            cast_activations(self.encoder, dtype)
            if impl == "torch":
                cast_activations(self.synthesis, dtype)
        self.eval().requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, input_nc, 256, 256]` -> w_plus `[B, n_styles, 512]` fp32 (latent_avg added)."""
        codes = self.encoder(x).float() + self.latent_avg
        if self.description.learn_in_w:
            codes = codes[:, None, :].expand(-1, self.description.n_styles, -1)
        return codes

    def synthesize(self, w_plus: torch.Tensor) -> torch.Tensor:
        """w_plus `[B, n_styles, 512]` -> img `[B, 3, R, R]` fp32 at full resolution (the `Engine` resizes)."""
        return self.synthesis(w_plus.float()).float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[B, input_nc, 256, 256]` -> (img `[B, 3, R, R]`, w_plus `[B, n_styles, 512]`), fp32."""
        w_plus = self.encode(x)
        return self.synthesize(w_plus), w_plus

    def with_precision(self, precision: str) -> "EnginePSP":
        """A copy computing in `precision` (torch-op synthesis only; used for the fp16 ONNX variant)."""
        m = copy.deepcopy(self)
        if precision != "fp32":
            cast_activations(m.encoder, DTYPES[precision])
            cast_activations(m.synthesis, DTYPES[precision])
        m.description = self.description.replace(precision=precision)
        return m

    def half_activations(self) -> "EnginePSP":
        """`with_precision("fp16")`: fp16 convolution weights and activations, fp32 style math and IO."""
        return self.with_precision("fp16")


def emulate_rounding(model: EnginePSP, precision: str = "bf16",
                     keep_fp32: Callable[[str, nn.Module], bool] = lambda name, module: False) -> EnginePSP:
    """Emulate a lower precision on an fp32 `EnginePSP`, in place, for measuring its error anywhere.

    The weights outside `FP32_MODULES` are rounded to `precision`, and the activation entering and
    leaving every layer is rounded to it (forward hooks), with fp32 arithmetic in between: what a
    bf16/fp16 runtime with fp32 accumulation (oneDNN, AMX, tensor cores) computes, up to where it
    rounds inside fused ops. Used where the CPU has no bf16 units (real bf16 would be emulated by
    torch at 4-130x the fp32 time) and to measure which layers should stay fp32.

    Args:
        model: an fp32 `EnginePSP` with `impl="torch"`.
        precision: "bf16" or "fp16".
        keep_fp32: `(qualified module name, module) -> bool`: layers left in fp32 (e.g. the 1024 px
            convolutions, the ToRGBs).

    Returns:
        `model`.
    """
    dtype = DTYPES[precision]

    def rounded(t):
        return t.to(dtype).float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    keep = {id(x) for mod in model.modules() if isinstance(mod, FP32_MODULES) for x in mod.modules()}
    for name, mod in model.named_modules():
        if keep_fp32(name, mod):
            keep.update(id(x) for x in mod.modules())
    for name, mod in list(model.encoder.named_modules(prefix="encoder")) + list(model.synthesis.named_modules(prefix="synthesis")):
        if id(mod) in keep or mod is model.encoder or mod is model.synthesis:
            continue
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t is not None and t.is_floating_point():
                t.data.copy_(rounded(t.data))
        if isinstance(mod, ModConv) or not list(mod.children()):
            mod.register_forward_pre_hook(lambda m, args: (rounded(args[0]), *args[1:]))
            mod.register_forward_hook(lambda m, args, out: rounded(out))
    model.description = model.description.replace(precision=f"{precision} (emulated)")
    return model
