"""The super-resolution input degradation of official pSp: bicubic downsampling by an integer factor.

Source: eladrich/pixel2style2pixel@5cfff38 `datasets/augmentations.py` (`BicubicDownSample`,
`BilinearResize`) and `configs/transforms_config.py::SuperResTransforms` (the `transform_source` /
`transform_inference` pipeline: `Resize((256, 256))`, `BilinearResize(factors)`, `Resize((256, 256))`,
`ToTensor()`, `Normalize(0.5, 0.5)`). Restated in our own code; same arithmetic, in float32.

Despite its name, `BilinearResize` downsamples with a separable *bicubic* kernel (Keys, a = -0.5) of
`4 * factor` taps, reflect padding `3 * factor` split `floor / ceil`, stride `factor`: vertical pass
first, then horizontal. Factor 1 is not the identity: the 4-tap kernel blurs. The low-resolution
tensor is clamped to [0, 1] and turned back into an 8-bit PIL image by truncation (torchvision's
`ToPILImage` does `mul(255).byte()`), then upsampled back to 256 by PIL's bilinear resize.

One difference on purpose: the official transform draws the factor at random from `resize_factors`
on every call, so inference with a multi-factor checkpoint is not reproducible; here the caller
chooses one factor.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SR_SIZE = 256  # px, the side the official pipeline resizes to before and after the degradation


def bicubic_kernel(factor: int) -> torch.Tensor:
    """The official 1-D downsampling kernel: `4 * factor` taps of Keys' cubic (a = -0.5), normalised.

    Source: official `BicubicDownSample.__init__` / `bicubic_kernel` (tap i at
    `(i - floor(size / 2) + 0.5) / factor`), computed in float32 as there.

    Args:
        factor: downsampling factor, >= 1.

    Returns:
        `[4 * factor]` float32, sums to 1.

    Raises:
        ValueError: factor < 1 or not an integer.
    """
    factor = _check_factor(factor)
    size = 4 * factor
    a = -0.5
    half = torch.floor(torch.tensor(size / 2))  # float32, as official
    taps = []
    for i in range(size):
        x = torch.abs((i - half + 0.5) / factor)
        if x <= 1.0:
            taps.append((a + 2.0) * torch.pow(x, 3.0) - (a + 3.0) * torch.pow(x, 2.0) + 1)
        elif 1.0 < x < 2.0:
            taps.append(a * torch.pow(x, 3) - 5.0 * a * torch.pow(x, 2.0) + 8.0 * a * x - 4.0 * a)
        else:
            taps.append(torch.tensor(0.0))
    k = torch.stack([t.to(torch.float32) for t in taps])
    return k / torch.sum(k)


def bicubic_downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Downsample images by `factor` as official `BicubicDownSample(factor)(x)` (default arguments).

    Args:
        x: `[B, C, H, W]` float32, any range (official: ToTensor output in [0, 1]). H and W must
            exceed the reflect padding, `floor(3 * factor / 2)` and `ceil(3 * factor / 2)`.
        factor: integer >= 1.

    Returns:
        `[B, C, floor((H - factor) / factor) + 1, ...]` float32 (H / factor for H divisible by
        factor); not clamped.

    Raises:
        ValueError: a bad factor, x not 4-D float, or the image too small for the padding.
    """
    factor = _check_factor(factor)
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"bicubic_downsample expects float images [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
    size = 4 * factor
    pad = max(size - factor, 0)
    top, left = pad // 2, pad // 2
    bottom, right = pad - top, pad - left
    if min(x.shape[2], x.shape[3]) <= max(bottom, right):
        raise ValueError(f"image {tuple(x.shape[2:])} too small for downsampling by {factor} "
                         f"(reflect padding {bottom} px needs a larger side)")
    c = x.shape[1]
    k = bicubic_kernel(factor).to(x.dtype)
    k_vertical = k.reshape(1, 1, size, 1).repeat(c, 1, 1, 1)  # [C, 1, size, 1]
    k_horizontal = k.reshape(1, 1, 1, size).repeat(c, 1, 1, 1)  # [C, 1, 1, size]
    x = F.pad(x, (0, 0, top, bottom), mode="reflect")
    x = F.conv2d(x, k_vertical, stride=(factor, 1), groups=c)
    x = F.pad(x, (left, right, 0, 0), mode="reflect")
    return F.conv2d(x, k_horizontal, stride=(1, factor), groups=c)


def degrade(image: Image.Image, factor: int) -> Image.Image:
    """The official `BilinearResize` with one factor: a low-resolution 8-bit RGB image.

    `ToTensor` -> `bicubic_downsample` -> clamp to [0, 1] -> `ToPILImage` (`mul(255)` then truncation
    to uint8, as torchvision does).

    Args:
        image: a PIL image (converted to RGB); official pipeline: already resized to 256x256.
        factor: integer >= 1.

    Returns:
        RGB PIL image of `floor(side / factor)` px per side (256 / factor in the pipeline).

    Raises:
        ValueError: a bad factor or an image too small for it.
    """
    u8 = np.asarray(image.convert("RGB"))  # [H, W, 3]
    x = torch.from_numpy(u8.copy()).permute(2, 0, 1)[None].float().div(255)  # ToTensor
    lr = bicubic_downsample(x, factor)[0].clamp(0, 1)  # [3, h, w]
    out = lr.mul(255).byte().permute(1, 2, 0).contiguous().numpy()  # ToPILImage: truncation
    return Image.fromarray(out, "RGB")


def super_resolution_input(image: Image.Image, factor: int | None) -> Image.Image:
    """The official super-resolution source image before `ToTensor`/`Normalize`: 256x256 RGB.

    `Resize((256, 256))` (PIL bilinear) -> `degrade(factor)` -> `Resize((256, 256))`. With
    `factor=None` the input is taken as already low-resolution (a real low-resolution photo): it is
    only resized to 256x256, the step the official pipeline applies after its own degradation.

    Args:
        image: any PIL image (converted to RGB).
        factor: integer >= 1, or None.

    Returns:
        256x256 RGB PIL image.

    Raises:
        ValueError: a bad factor.
    """
    size = (SR_SIZE, SR_SIZE)
    rgb = image.convert("RGB")
    if factor is not None:
        rgb = degrade(rgb.resize(size, Image.BILINEAR), factor)
    return rgb.resize(size, Image.BILINEAR)


def parse_factors(resize_factors: str | None) -> list[int]:
    """Factors of an `opts['resize_factors']` string such as "1,2,4,8,16,32" (None or "" -> [])."""
    if not resize_factors:
        return []
    return [int(f) for f in str(resize_factors).split(",") if f.strip()]


def _check_factor(factor) -> int:
    if isinstance(factor, bool) or not float(factor).is_integer() or int(factor) < 1:
        raise ValueError(f"resize factor must be an integer >= 1, got {factor!r}")
    factor = int(factor)
    if factor > SR_SIZE // 2 or not math.isfinite(factor):
        raise ValueError(f"resize factor {factor} too large for a {SR_SIZE} px image (at most {SR_SIZE // 2})")
    return factor
