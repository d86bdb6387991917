"""pSp encoders on an IR-SE-50 backbone, in the official state_dict layout (`encoder.*`).

Source: Richardson et al., "Encoding in Style" (CVPR 2021), Sec. 3 and Fig. 2; module structure
and names as eladrich/pixel2style2pixel `models/encoders/helpers.py` and
`models/encoders/psp_encoders.py` (the IR-SE-50 body comes from ArcFace, Deng et al. 2019).
"""

from __future__ import annotations

import math
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from .stylegan2 import EqualLinear

Bottleneck = namedtuple("Bottleneck", ["in_channel", "depth", "stride"])

# IR-50: four stages of (in, depth, units); the first unit of each stage has stride 2.
IR50_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))


def ir50_units() -> list[Bottleneck]:
    """The 24 bottleneck units of IR-SE-50 (official `get_blocks(50)`)."""
    units = []
    for in_channel, depth, n in IR50_STAGES:
        units.append(Bottleneck(in_channel, depth, 2))
        units += [Bottleneck(depth, depth, 1) for _ in range(n - 1)]
    return units


class SEModule(nn.Module):
    """Squeeze-and-excitation: avg -> 1x1 C->C/16 -> ReLU -> 1x1 C/16->C -> sigmoid -> scale."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * s


class BottleneckIRSE(nn.Module):
    """IR-SE unit: `res_layer(x) + shortcut_layer(x)`, no activation after the add.

    res_layer: BN -> conv3x3 s1 -> PReLU -> conv3x3 (unit stride) -> BN -> SE.
    shortcut: `MaxPool2d(1, stride)` when in == depth, else conv1x1(stride) -> BN.
    """

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def _input_layer(input_nc: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(input_nc, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))


def _body() -> nn.Sequential:
    return nn.Sequential(*[BottleneckIRSE(u.in_channel, u.depth, u.stride) for u in ir50_units()])


class GradualStyleBlock(nn.Module):
    """map2style: log2(spatial) x [conv3x3 s2 + LeakyReLU(0.01)] down to 1x1, then EqualLinear."""

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        self.out_c = out_c
        self.spatial = spatial
        num_pools = int(math.log2(spatial))
        modules: list[nn.Module] = [nn.Conv2d(in_c, out_c, kernel_size=3, stride=2, padding=1), nn.LeakyReLU()]
        for _ in range(num_pools - 1):
            modules += [nn.Conv2d(out_c, out_c, kernel_size=3, stride=2, padding=1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*modules)
        self.linear = EqualLinear(out_c, out_c, lr_mul=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[N, 512, spatial, spatial]` -> style `[N, 512]`."""
        return self.linear(self.convs(x).view(-1, self.out_c))


class GradualStyleEncoder(nn.Module):
    """pSp's feature-pyramid encoder (Richardson et al. 2021, Fig. 2).

    Styles 0-2 from the 16x16 map, 3-6 from the 32x32 pyramid level, 7.. from the 64x64 level.

    Args:
        input_nc: input channels (3 RGB, 1 sketch, label_nc for segmentation).
        n_styles: number of W+ styles (`2*log2(output_size) - 2`).
    """

    coarse_ind = 3
    middle_ind = 7

    def __init__(self, input_nc: int, n_styles: int):
        super().__init__()
        if n_styles < self.middle_ind:
            raise ValueError(
                f"GradualStyleEncoder needs n_styles >= {self.middle_ind} (output_size >= 32), got {n_styles}: "
                "the official forward indexes the middle styles 3..6 unconditionally"
            )
        self.input_layer = _input_layer(input_nc)
        self.body = _body()
        self.styles = nn.ModuleList()
        self.style_count = n_styles
        for i in range(n_styles):
            spatial = 16 if i < self.coarse_ind else 32 if i < self.middle_ind else 64
            self.styles.append(GradualStyleBlock(512, 512, spatial))
        self.latlayer1 = nn.Conv2d(256, 512, kernel_size=1, stride=1, padding=0)
        self.latlayer2 = nn.Conv2d(128, 512, kernel_size=1, stride=1, padding=0)

    @staticmethod
    def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Body taps c1 `[N,128,64,64]` (unit 6), c2 `[N,256,32,32]` (unit 20), c3 `[N,512,16,16]` (unit 23)."""
        x = self.input_layer(x)
        c1 = c2 = None
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i == 6:
                c1 = x
            elif i == 20:
                c2 = x
        return c1, c2, x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[N, input_nc, 256, 256]` -> codes `[N, n_styles, 512]` (before latent_avg)."""
        c1, c2, c3 = self.features(x)
        latents = [self.styles[j](c3) for j in range(self.coarse_ind)]
        p2 = self._upsample_add(c3, self.latlayer1(c2))
        latents += [self.styles[j](p2) for j in range(self.coarse_ind, self.middle_ind)]
        p1 = self._upsample_add(p2, self.latlayer2(c1))
        latents += [self.styles[j](p1) for j in range(self.middle_ind, self.style_count)]
        return torch.stack(latents, dim=1)


class BackboneEncoderUsingLastLayerIntoW(nn.Module):
    """IR-SE-50 -> global average pool -> EqualLinear(512, 512): one w `[N, 512]` (pSp `learn_in_w`)."""

    def __init__(self, input_nc: int, n_styles: int | None = None):
        super().__init__()
        self.input_layer = _input_layer(input_nc)
        self.output_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = EqualLinear(512, 512, lr_mul=1)
        self.body = _body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[N, input_nc, 256, 256]` -> codes `[N, 512]`."""
        x = self.body(self.input_layer(x))
        return self.linear(self.output_pool(x).view(-1, 512))


class BackboneEncoderUsingLastLayerIntoWPlus(nn.Module):
    """IR-SE-50 -> BN -> avgpool 7x7 -> Linear(25088, 512) -> EqualLinear(512, 512*n_styles)."""

    def __init__(self, input_nc: int, n_styles: int):
        super().__init__()
        self.n_styles = n_styles
        self.input_layer = _input_layer(input_nc)
        self.output_layer_2 = nn.Sequential(
            nn.BatchNorm2d(512), nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), nn.Linear(512 * 7 * 7, 512)
        )
        self.linear = EqualLinear(512, 512 * n_styles, lr_mul=1)
        self.body = _body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[N, input_nc, 256, 256]` -> codes `[N, n_styles, 512]`."""
        x = self.body(self.input_layer(x))
        x = self.linear(self.output_layer_2(x))
        return x.view(-1, self.n_styles, 512)


ENCODER_TYPES = {
    "GradualStyleEncoder": GradualStyleEncoder,
    "BackboneEncoderUsingLastLayerIntoW": BackboneEncoderUsingLastLayerIntoW,
    "BackboneEncoderUsingLastLayerIntoWPlus": BackboneEncoderUsingLastLayerIntoWPlus,
}
