"""Image IO: robust reading, the official pSp input transforms, tensor2im, atomic image writes.

Source: eladrich/pixel2style2pixel@5cfff38 `configs/transforms_config.py` (the test transforms of
`EncodeTransforms`, `SketchToImageTransforms`, `SegToImageTransforms`, and
`SuperResTransforms` via `reference.sr`),
`datasets/inference_dataset.py` (`convert('RGB')` when `label_nc == 0`, else `convert('L')`),
`datasets/augmentations.py::ToOneHot` and `utils/common.py::tensor2im`.

Where this module departs from the official loader, on purpose (each only changes inputs the
official code reads wrongly or not at all):
- EXIF orientation is applied (`ImageOps.exif_transpose`); official pSp ignores it, so a phone
  photo stored sideways is encoded sideways there.
- Transparency is composited over white, not dropped. PIL's `convert('RGB')` keeps whatever colour
  the transparent pixels happen to store (often black). White is the background of pSp's sketch
  inputs (black strokes on white) and of most cut-out photos.
- 16-bit images are scaled to 8 bits (`round(v / 257)`, so `v8 * 257` round-trips); PIL clips them.
  Mode "I" (32-bit integers, how Pillow opens some 16-bit files) is read as 16-bit: values must
  lie in 0..65535.
- Images are rejected before decoding when the header says they have more than `max_pixels`
  pixels, and when their smaller side is under `min_size` (32 px): the encoder sees 256x256, so
  anything smaller than 32 px is upsampled more than 8x and carries no usable face detail; such
  files are nearly always thumbnails, icons or broken exports, and rejecting them says so instead
  of returning a meaningless latent.
- Segmentation maps keep their class ids: a palette (`P`) map gives its indices, a 16-bit map its
  values, and a colour-coded map (RGB channels differ) is rejected because its luminance is not a
  class id. A grey map stored as RGB (equal channels) gives the same ids as `convert('L')`.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .description import ENCODER_SIZE  # px, the encoder's input side (official Resize((256, 256)))
from .plumbing.errors import InputImageError
from .plumbing.files import atomic_write
from .sr import super_resolution_input

MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS (a 0.25 GiB RGB bitmap)
MIN_SIZE = 32  # px, smaller side; see the module docstring
# Extensions picked up when scanning folders (official `IMG_EXTENSIONS` plus webp/gif/pgm).

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, IndexError)
_WHITE = (255, 255, 255, 255)


# ------------------------------------------------------------------------------------------------
# Reading


def read_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, min_size: int = MIN_SIZE,
               data: bytes | None = None) -> Image.Image:
    """Read a photo or sketch as an 8-bit PIL image, upright, with transparency over white.

    Source: official `inference_dataset.py` reads `Image.open(path).convert('RGB')`; this
    reader adds the checks and conversions listed in the module docstring.

    Args:
        path: image file in any format PIL decodes (JPEG, PNG, WebP, TIFF, BMP, GIF, ...).
        max_pixels: largest accepted width*height, checked from the header before decoding.
        min_size: smallest accepted min(width, height), in px.
        data: the file's content, already read (a file behind a URI, `engine.cluster.remote`); `path` then
            only names it in messages. None: read `path`.

    Returns:
        A loaded `PIL.Image` of mode "RGB" (colour sources: RGB, RGBA, P, CMYK, YCbCr, ...) or
        "L" (single-channel sources: L, LA, 1, I;16*, I), 8 bits per channel.

    Raises:
        InputImageError: missing or empty file, unknown format, truncated or corrupt data, too
            many pixels, too small, or a mode with no defined 8-bit meaning (F, I outside
            0..65535). The message starts with the path.
    """
    return _read(path, max_pixels, min_size, _to_8bit, data)


def read_label_map(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, min_size: int = MIN_SIZE,
                   data: bytes | None = None) -> Image.Image:
    """Read a segmentation map: one class id per pixel, upright, ids unchanged.

    Source: official `inference_dataset.py` reads label maps with `convert('L')`; for mode L
    (CelebAMask-HQ masks, the official notebook's `input_mask.png`) this returns the same ids.

    Args:
        path: image file with one class id per pixel (modes L, P, 1, I;16*, I, or RGB with
            equal channels; alpha is ignored).
        max_pixels: largest accepted width*height, checked from the header before decoding.
        min_size: smallest accepted min(width, height), in px.
        data: as `read_image`.

    Returns:
        A `PIL.Image` of mode "L" (ids 0..255) or "I" (ids above 255, left for
        `to_input_tensor` to reject against `label_nc`).

    Raises:
        InputImageError: as `read_image`, and for a colour-coded map (RGB channels differ) or
            negative ids.
    """
    return _read(path, max_pixels, min_size, _to_label_map, data)


def read_input(path: str | os.PathLike, label_nc: int, max_pixels: int = MAX_PIXELS,
               min_size: int = MIN_SIZE, data: bytes | None = None) -> Image.Image:
    """Read one encoder input of the kind a checkpoint's `label_nc` asks for.

    Args:
        path: image file.
        label_nc: 0 photo (RGB), 1 sketch, >1 segmentation map with that many classes.
        max_pixels, min_size, data: as `read_image`.

    Returns:
        `read_label_map(path)` when `label_nc > 1`, else `read_image(path)`.

    Raises:
        InputImageError: as `read_image` / `read_label_map`.
    """
    reader = read_label_map if label_nc > 1 else read_image
    return reader(path, max_pixels=max_pixels, min_size=min_size, data=data)


def _read(path: str | os.PathLike, max_pixels: int, min_size: int,
          convert: Callable[[Image.Image, str], Image.Image], data: bytes | None = None) -> Image.Image:
    """Open (the file at `path`, or `data` named `path`), check the header size, decode, apply EXIF
    orientation and `convert`; errors named."""
    name = str(path)
    if data is None:
        p = Path(path)
        if not p.exists():
            raise InputImageError(f"{name}: no such file")
        if not p.is_file():
            raise InputImageError(f"{name}: not a regular file")
        if p.stat().st_size == 0:
            raise InputImageError(f"{name}: empty file (0 bytes)")
        source = p
    else:
        if not data:
            raise InputImageError(f"{name}: empty file (0 bytes)")
        source = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            # The size is checked below against max_pixels, before any pixel is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise InputImageError(
                        f"{name}: {w}x{h} = {w * h:,} pixels is above the limit of {max_pixels:,} "
                        "(raise it with --max-pixels if the file is trusted)"
                    )
                if min(w, h) < min_size:
                    raise InputImageError(
                        f"{name}: {w}x{h} is too small: the smaller side must be at least {min_size} px "
                        "(the encoder works at 256x256)"
                    )
                im.load()
                upright = ImageOps.exif_transpose(im)
                return convert(upright, name)
    except InputImageError:
        raise
    except UnidentifiedImageError:
        raise InputImageError(f"{name}: not an image file PIL can read (unknown format or not an image)") from None
    except Image.DecompressionBombError as e:  # above 2x Image.MAX_IMAGE_PIXELS: Pillow refuses to open it
        raise InputImageError(f"{name}: {e} (Pillow's own hard limit, which max_pixels cannot raise)") from None
    except _DECODE_ERRORS as e:
        raise InputImageError(f"{name}: cannot decode the image ({type(e).__name__}: {e})") from None


def _scale_16bit(a: np.ndarray, name: str) -> np.ndarray:
    """[H, W] integer array with values 0..65535 -> uint8 `round(v / 257)`."""
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise InputImageError(
            f"{name}: 32-bit integer image with values in [{a.min()}, {a.max()}], outside 0..65535; "
            "save it as an 8- or 16-bit image"
        )
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _over_white(im: Image.Image) -> Image.Image:
    """Composite an image with alpha over opaque white -> "RGB"."""
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _to_8bit(im: Image.Image, name: str) -> Image.Image:
    """Any PIL mode -> "RGB" or "L", 8 bits, alpha composited over white."""
    mode = im.mode
    if mode in ("RGB", "L"):
        return im
    if mode.startswith("I;16") or mode == "I":
        return Image.fromarray(_scale_16bit(np.asarray(im), name), "L")
    if mode == "F":
        raise InputImageError(f"{name}: 32-bit float image: its value range is unknown; save it as an 8- or 16-bit image")
    if mode == "1":
        return im.convert("L")
    if mode in ("LA", "La"):
        return _over_white(im.convert("LA")).convert("L")  # equal channels: L is exact
    has_alpha = "A" in mode or "a" in mode or "transparency" in im.info
    if mode == "P" and im.palette is not None and im.palette.mode == "RGBA":
        has_alpha = True
    if has_alpha:
        return _over_white(im)
    return im.convert("RGB")  # P, CMYK, YCbCr, RGBX, ...


def _to_label_map(im: Image.Image, name: str) -> Image.Image:
    """Any single-channel PIL mode -> class ids as "L" (or "I" when an id exceeds 255)."""
    mode = im.mode
    if mode in ("L", "LA", "La"):
        return im.getchannel(0) if mode != "L" else im
    if mode in ("P", "PA", "1"):
        ids = np.asarray(im.getchannel(0) if mode == "PA" else im).astype(np.uint8)  # palette indices / 0-1
        return Image.fromarray(ids, "L")
    if mode.startswith("I;16") or mode == "I":
        ids = np.asarray(im).astype(np.int64)
        if ids.size and ids.min() < 0:
            raise InputImageError(f"{name}: segmentation map has a negative class id ({ids.min()})")
        if ids.size and ids.max() > 255:
            return Image.fromarray(ids.astype(np.int32), "I")
        return Image.fromarray(ids.astype(np.uint8), "L")
    rgb = np.asarray(im.convert("RGB"))
    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
        raise InputImageError(
            f"{name}: colour image ({mode}) given as a segmentation map; this checkpoint needs one class id "
            "per pixel (a grey-level or palette PNG, e.g. a CelebAMask-HQ mask), not a colour visualisation"
        )
    return Image.fromarray(np.ascontiguousarray(rgb[..., 0]), "L")


# ------------------------------------------------------------------------------------------------
# Tensors


def input_channels(label_nc: int) -> int:
    """Channels of the encoder input the official transform makes for `label_nc`: 3 RGB, 1 sketch, else label_nc."""
    return 3 if label_nc == 0 else label_nc


def to_input_tensor(images: Sequence[Image.Image], label_nc: int, names: Sequence[str] | None = None,
                    degrade_factor: int | None = None) -> torch.Tensor:
    """Convert images to the encoder input exactly as the official test transforms do.

    Source: official `configs/transforms_config.py`: RGB (`label_nc == 0`)
    `Resize((256, 256)), ToTensor(), Normalize([0.5]*3, [0.5]*3)`; sketch (`label_nc == 1`)
    `Resize((256, 256)), ToTensor()`; segmentation (`label_nc > 1`) `Resize((256, 256)),
    ToOneHot(label_nc), ToTensor()`. torchvision's Resize on a PIL image is
    `img.resize((256, 256), Image.BILINEAR)`. Note that the official code resizes the class-id
    map *bilinearly*, so boundary pixels get ids interpolated between their neighbours' (e.g. 6
    between 2 and 10); this is reproduced, not fixed, because trained seg_to_face checkpoints
    saw exactly these inputs.

    Args:
        images: PIL images of any size; from `read_input` (photos/sketches any mode,
            segmentation maps "L"/"I" class ids).
        label_nc: 0 RGB, 1 sketch, >1 segmentation with `label_nc` classes.
        names: file names for error messages (default "image <i>").
        degrade_factor: super-resolution checkpoints only (RGB): the official SR source transform,
            `Resize(256)`, bicubic downsampling by this factor, `Resize(256)`
            (`reference.sr.super_resolution_input`), before `ToTensor`/`Normalize`. None: no
            degradation (the plain RGB transform, which is also what an already low-resolution
            input needs).

    Returns:
        x `[B, C, 256, 256]` float32: C=3 in [-1, 1] (`(u8/255 - 0.5)/0.5`); C=1 in [0, 1];
        C=label_nc one-hot in {0, 1}.

    Raises:
        InputImageError: a class id >= label_nc (names the file, the id and label_nc).
        ValueError: no images, label_nc < 0, a bad degrade_factor, or degrade_factor with label_nc != 0.
    """
    if not images:
        raise ValueError("to_input_tensor needs at least one image")
    if label_nc < 0:
        raise ValueError(f"label_nc must be >= 0, got {label_nc}")
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    size = (ENCODER_SIZE, ENCODER_SIZE)
    if degrade_factor is not None:
        if label_nc != 0:
            raise ValueError(f"degrade_factor applies to RGB (super-resolution) inputs, not label_nc={label_nc}")
        images = [super_resolution_input(im, degrade_factor) for im in images]  # 256x256 RGB
    if label_nc == 0:
        u8 = np.stack([np.asarray(im.convert("RGB").resize(size, Image.BILINEAR)) for im in images])  # [B,H,W,3]
        x = torch.from_numpy(u8).permute(0, 3, 1, 2).float().div(255)
        return x.sub(0.5).div(0.5).contiguous()
    if label_nc == 1:
        u8 = np.stack([np.asarray(im.convert("L").resize(size, Image.BILINEAR)) for im in images])  # [B,H,W]
        return torch.from_numpy(u8)[:, None].float().div(255)
    onehots = []
    for im, name in zip(images, names):
        ids = np.asarray(_to_label_map(im, name))
        bad = int(ids.max()) if ids.size else 0
        if bad >= label_nc:
            raise InputImageError(
                f"{name}: segmentation map has class id {bad}, but this checkpoint has label_nc={label_nc} "
                f"(ids 0..{label_nc - 1})"
            )
        resized = np.asarray(Image.fromarray(ids.astype(np.uint8), "L").resize(size, Image.BILINEAR))  # [H,W]
        # Bilinear weights are a convex combination, so resized ids stay below label_nc.
        onehots.append(resized[None] == np.arange(label_nc, dtype=np.uint8)[:, None, None])  # [C,H,W]
    return torch.from_numpy(np.stack(onehots)).float()


def tensor_to_uint8(img: torch.Tensor) -> np.ndarray:
    """Generator output to 8-bit RGB, as official `tensor2im`.

    Source: official `utils/common.py::tensor2im`: `clamp((x + 1) / 2, 0, 1) * 255` in float32,
    then truncated (not rounded) to uint8.

    Args:
        img: `[B, 3, H, W]` (or `[3, H, W]`) float, nominally in [-1, 1].

    Returns:
        `[B, H, W, 3]` (or `[H, W, 3]`) uint8 RGB, C-contiguous.
    """
    a = img.detach().to("cpu", torch.float32).numpy()
    a = np.moveaxis(a, -3, -1)  # [..., H, W, 3]
    a = np.clip((a + 1) / 2, 0, 1) * 255
    return np.ascontiguousarray(a.astype(np.uint8))


def display_rgb(image: Image.Image, label_nc: int) -> np.ndarray:
    """An input image as 8-bit RGB for side-by-side display.

    Args:
        image: from `read_input`.
        label_nc: 0/1 photo or sketch (shown as is); >1 class-id map, shown as grey levels
            `id * 255 // (label_nc - 1)`.

    Returns:
        `[H, W, 3]` uint8.
    """
    if label_nc <= 1:
        return np.asarray(image.convert("RGB"))
    ids = np.asarray(image).astype(np.int64)
    grey = np.clip(ids * 255 // (label_nc - 1), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def couple(input_rgb: np.ndarray, output_rgb: np.ndarray) -> np.ndarray:
    """Input and output side by side, the input resized to the output's height (aspect kept).

    Source: official `scripts/inference.py` `--couple_outputs` (there the input is squashed to
    the output's square size; here its aspect ratio is kept).

    Args:
        input_rgb: `[h, w, 3]` uint8, any size.
        output_rgb: `[H, W, 3]` uint8.

    Returns:
        `[H, W' + W, 3]` uint8, input on the left; W' = round(w * H / h).
    """
    h, w = input_rgb.shape[:2]
    height = output_rgb.shape[0]
    width = max(1, round(w * height / h))
    resized = np.asarray(Image.fromarray(input_rgb).resize((width, height), Image.BICUBIC))
    return np.concatenate([resized, output_rgb], axis=1)


# ------------------------------------------------------------------------------------------------
# Atomic image and array writes (through the one `reference.plumbing.files.atomic_write`)


# zlib level of every PNG written (engine.run's outputs, the service's answers): 1 of 0..9, optimize off.
# Measured on real 1024x1024 faces (`python -m benchmarks.cpu_engines --png-levels`, benchmarks/RESULTS.md,
# "Issue 20"): about 4x faster to write than Pillow's default 6 (92 against 371 ms per image), for files
# about 18% larger (0.86 against 0.72 MiB). Lossless at any level.
PNG_COMPRESS_LEVEL = 1


def save_image(f: BinaryIO, array: np.ndarray, fmt: str, quality: int = 95) -> None:
    """Encode an 8-bit image into the binary file `f`: the one encoder of every image file and PNG answer.

    Source: Pillow's `Image.save` (https://pillow.readthedocs.io, "Image file formats"); PNG at
    `PNG_COMPRESS_LEVEL` (no `optimize`), JPEG and WebP at `quality`.

    Args:
        f: a binary file object open for writing.
        array: `[H, W, 3]` uint8 RGB or `[H, W]` uint8 grey.
        fmt: a Pillow format name ("PNG", "JPEG", ...).
        quality: JPEG/WebP quality (ignored for the other formats).

    Raises:
        ValueError: not uint8, or a bad shape; OSError or KeyError: a format Pillow cannot write.
    """
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"expected an [H, W, 3] or [H, W] uint8 image, got {array.shape} {array.dtype}")
    options = ({"quality": quality} if fmt in ("JPEG", "WEBP") else
               {"compress_level": PNG_COMPRESS_LEVEL} if fmt == "PNG" else {})
    Image.fromarray(array).save(f, format=fmt, **options)


def png_bytes(array: np.ndarray) -> bytes:
    """`[H, W, 3]` or `[H, W]` uint8 -> PNG bytes, identical to the `.png` file `atomic_write_image` writes.

    Raises:
        ValueError: not uint8, or a bad shape.
    """
    buf = io.BytesIO()
    save_image(buf, array, "PNG")
    return buf.getvalue()


def atomic_write_image(path: str | os.PathLike, array: np.ndarray, quality: int = 95) -> Path:
    """Save an 8-bit image atomically (`save_image`); the format comes from the extension (.png lossless).

    Args:
        path: destination; `.png`, `.jpg`/`.jpeg` (JPEG at `quality`), or any extension PIL knows.
        array: `[H, W, 3]` uint8 RGB or `[H, W]` uint8 grey.
        quality: JPEG/WebP quality (ignored for PNG).

    Returns:
        The destination `Path`.

    Raises:
        ValueError: not uint8, a bad shape, or an extension PIL cannot write.
    """
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"atomic_write_image expects [H, W, 3] or [H, W] uint8, got {array.shape} {array.dtype}")
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image extension {Path(path).suffix!r}")
    return atomic_write(path, lambda f: save_image(f, array, fmt, quality))


def atomic_write_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save an array as `.npy` atomically (`np.save` format, no pickles).

    Args:
        path: destination (kept as given; `np.save`'s automatic `.npy` suffix does not apply).
        array: any numeric array.

    Returns:
        The destination `Path`.
    """
    array = np.asarray(array)
    return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
