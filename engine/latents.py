"""Latent-space tools: style mixing (multi-modal synthesis), linear editing, interpolation, picture strips.

Sources:
- Style mixing: official eladrich/pixel2style2pixel@5cfff38 `scripts/style_mixing.py` and
  `scripts/inference.py --latent_mask` (restated in `shared/golden/spec/FORWARD_NOTES.md`): per
  output, z ~ N(0, I) `[1, 512]` goes through the StyleGAN2 mapping network (`net(z,
  input_code=True, return_latents=True)`: w repeated to `[n_styles, 512]`, no latent_avg), then
  `pSp.forward(x, latent_mask, inject_latent, alpha)` mixes it into the encoder's W+ on the styles
  of `latent_mask` (`reference.style_mix`). The official scripts draw z from numpy's global RNG and
  leave noise randomization on, so their outputs cannot be reproduced; here z comes from
  `mixing_z(seed, n_outputs)` and the generator always uses its stored noise, so a seed gives the
  same bytes on every run.
- Editing: a linear direction in W (InterFaceGAN, Shen et al. CVPR 2020, Sec. 2.2: `w + a*n`),
  applied per style in W+ (`w_plus + sum_i a_i * d_i`); a W direction `[512]` moves every style.
- Interpolation: linear in W+ (Karras et al. CVPR 2019, StyleGAN, Sec. 4.1: W is interpolated
  with lerp).

Conventions: `w` `[N, 512]`, `w_plus` `[N, n_styles, 512]`, float32; pictures are uint8 `[H, W, 3]`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch
from numpy.lib import format as npy_format
from PIL import Image


from reference.plumbing.errors import PSPError, UsageError

if TYPE_CHECKING:  # engine.api imports this module lazily (Engine.mapping); no import cycle at runtime
    from .api import Engine

Z_DIM = 512  # z and w width (StyleGAN2 style_dim)
FINE_START = 8  # first "fine" style: official docs mix styles 8-17 at 1024 (8-13 at 256)
JPEG_MAX_SIDE = 65535  # px, the JPEG format's limit on either side
# Style mixes per input (engine.run --n-outputs). Each input's grid is one row of K + 2 pictures held
# in memory: at 1024 px, 64 mixes are 198 MiB of uint8 and a row 67584 px wide, already past JPEG's
# 65535 px side (so scaled down). More variety is better had from other --seed values in other runs.
MAX_N_OUTPUTS = 64
MAX_NPY_BYTES = 256 * 2**20  # bytes: the largest array a latent or direction .npy may declare
MAX_LATENT_BATCH = 4096  # latents in one [B, n_styles, 512] file (4096 x 18 x 512 float32 = 144 MiB)
MAX_STYLES = 64  # W+ styles a direction may have before the checkpoint is known (18 at 1024 px)


class LatentFileError(PSPError, ValueError):
    """A latent or direction `.npy` file cannot be read or has a shape that does not fit the checkpoint."""


FLOAT32_MAX = float(np.finfo(np.float32).max)  # latents are float32: an edit beyond this overflows to Inf


# ------------------------------------------------------------------------------------------------
# Style mixing


def parse_latent_mask(spec: str, n_styles: int | None) -> list[int]:
    """Parse a `--latent-mask` spec into style indices.

    Source: official `scripts/inference.py` / `style_mixing.py` `--latent_mask` ("8,9,10", comma
    separated); ranges `a-b` (inclusive) are added here.

    Args:
        spec: comma-separated indices and inclusive ranges, e.g. "8-17" or "8,9,12-13"; spaces
            are ignored.
        n_styles: the checkpoint's number of styles (every index must be in [0, n_styles)), or
            None to check the syntax only.

    Returns:
        Sorted distinct indices (a repeated index is kept once).

    Raises:
        UsageError: an empty spec or item, a non-integer, a reversed range (9-8), or an index
            outside [0, n_styles); the message quotes the spec.
    """
    text = str(spec).replace(" ", "")
    where = f"--latent-mask {spec!r}"
    if not text:
        raise UsageError(f"{where}: empty; give style indices such as 8-13 or 8,9,12-13")
    out: set[int] = set()
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if m is None:
            raise UsageError(f"{where}: {item!r} is not an index or a range a-b (e.g. 8-13 or 8,9,12-13)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise UsageError(f"{where}: reversed range {item!r}; write it low-high ({hi}-{lo})")
        out.update(range(lo, hi + 1))
    if n_styles is not None:
        bad = sorted(i for i in out if i >= n_styles)
        if bad:
            raise UsageError(
                f"{where}: style index {bad[0]} out of range: this checkpoint has {n_styles} styles (0-{n_styles - 1})"
            )
    return sorted(out)


def default_latent_mask(n_styles: int) -> list[int]:
    """The fine styles `FINE_START..n_styles-1` (8-13 at 256 px, 8-17 at 1024, as the official docs use).

    Raises:
        UsageError: the checkpoint has no style at index 8 or above (output 32 px or smaller).
    """
    if n_styles <= FINE_START:
        raise UsageError(
            f"the default --latent-mask (the fine styles {FINE_START}..n_styles-1) is empty for a checkpoint "
            f"with {n_styles} styles; pass --latent-mask explicitly (indices 0-{n_styles - 1})"
        )
    return list(range(FINE_START, n_styles))


def check_alpha(alpha: float | None) -> float | None:
    """`alpha` if it is None (replace the styles) or a number in [0, 1], else UsageError."""
    if alpha is None:
        return None
    a = float(alpha)
    if not (math.isfinite(a) and 0.0 <= a <= 1.0):
        raise UsageError(f"mixing alpha must be in [0, 1] (or omitted to replace the styles), got {alpha!r}")
    return a


def mixing_z(seed: int, n_outputs: int) -> np.ndarray:
    """The z vectors of a style-mixing run: output k of every input uses row k.

    Source: the golden vectors' convention (`stylemix_z = np.random.RandomState(0).randn(4, 512)`);
    official `style_mixing.py` draws `np.random.randn(1, 512)` per output from the global RNG.
    Because row k depends only on (seed, k), columns are comparable across inputs, and a resumed
    run draws the same vectors.

    Args:
        seed: integer in [0, 2**32) (numpy `RandomState`).
        n_outputs: K >= 1.

    Returns:
        z `[n_outputs, 512]` float32 (`RandomState(seed).randn(n_outputs, 512)` cast to float32;
        the first rows do not depend on n_outputs).

    Raises:
        UsageError: seed out of range or n_outputs < 1.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
        raise UsageError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if isinstance(n_outputs, bool) or not isinstance(n_outputs, (int, np.integer)) or n_outputs < 1:
        raise UsageError(f"n_outputs must be a positive integer, got {n_outputs!r}")
    return np.random.RandomState(int(seed)).randn(int(n_outputs), Z_DIM).astype(np.float32)


@torch.inference_mode()
def mix_with_w(w_plus: torch.Tensor, w: torch.Tensor, latent_mask: Iterable[int],
               alpha: float | None = None) -> torch.Tensor:
    """Mix K mapped vectors into every W+ latent (all pairs).

    Source: official `pSp.forward(x, latent_mask, inject_latent=w repeated, alpha)`; the rule
    is `reference.style_mix` (used as is).

    Args:
        w_plus: `[B, n_styles, 512]` float32, the encoder's latents (latent_avg added).
        w: `[K, 512]` float32, mapping-network outputs (`Engine.mapping(z)`), repeated to all styles.
        latent_mask: style indices in [0, n_styles) to take from w.
        alpha: None replaces those styles with w; a number in [0, 1] blends
            `alpha * w + (1 - alpha) * w_plus` on them.

    Returns:
        `[B, K, n_styles, 512]` float32 on `w_plus`'s device: entry [b, k] is input b mixed with w[k].

    Raises:
        ValueError: bad shapes. UsageError: alpha outside [0, 1], an index out of range.
    """
    if w_plus.ndim != 3 or w_plus.shape[2] != Z_DIM:
        raise ValueError(f"expected w_plus [B, n_styles, 512], got {tuple(w_plus.shape)}")
    if w.ndim != 2 or w.shape[1] != Z_DIM:
        raise ValueError(f"expected w [K, 512], got {tuple(w.shape)}")
    alpha = check_alpha(alpha)
    n_styles = w_plus.shape[1]
    mask = [int(i) for i in latent_mask]
    bad = [i for i in mask if not 0 <= i < n_styles]
    if bad:
        raise UsageError(f"latent mask indices {bad} out of range: the latents have {n_styles} styles")
    from reference import style_mix

    inject = w.to(w_plus.device, w_plus.dtype)[:, None, :].expand(-1, n_styles, -1)  # [K, n_styles, 512]
    mixed = [style_mix(w_plus, inject[k : k + 1], mask, alpha) for k in range(w.shape[0])]
    return torch.stack(mixed, dim=1)


def mix(eng: "Engine", w_plus: torch.Tensor, z: np.ndarray | torch.Tensor, latent_mask: Iterable[int],
        alpha: float | None = None) -> torch.Tensor:
    """Multi-modal synthesis latents: each input's W+ mixed with each z (official `style_mixing.py`).

    Args:
        eng: a loaded `Engine` (its `mapping` maps z to w).
        w_plus: `[B, n_styles, 512]` float32 (`eng.encode(x)`, possibly edited).
        z: `[K, 512]` float32 (`mixing_z(seed, K)`), numpy or torch.
        latent_mask: style indices to take from the mapped z (`parse_latent_mask`/`default_latent_mask`).
        alpha: None (replace, as official) or a blend weight in [0, 1] (see `mix_with_w`).

    Returns:
        `[B, K, n_styles, 512]` float32 on `w_plus`'s device; render with
        `eng.synthesize(out.flatten(0, 1))`.

    Raises:
        ValueError: bad shapes. UsageError: bad alpha or mask; a backend without a mapping
            network (see `Engine.mapping`).
    """
    z_t = torch.as_tensor(np.asarray(z, dtype=np.float32)) if not isinstance(z, torch.Tensor) else z.float()
    if w_plus.ndim == 3 and w_plus.shape[1] != eng.n_styles:
        raise ValueError(f"expected w_plus [B, {eng.n_styles}, 512] for this checkpoint, got {tuple(w_plus.shape)}")
    return mix_with_w(w_plus, eng.mapping(z_t), latent_mask, alpha)


# ------------------------------------------------------------------------------------------------
# Latent files, editing, interpolation


def read_npy(path: str | os.PathLike, what: str = "latent",
             check_shape: Callable[[tuple[int, ...]], None] | None = None,
             max_bytes: int = MAX_NPY_BYTES) -> tuple[np.ndarray, str]:
    """Read one numeric array from a `.npy` file, never unpickling, checking its header first.

    Source: the NPY format (`numpy.lib.format`: magic, version, header dict with "descr",
    "fortran_order" and "shape"). The header is read with `read_magic` and
    `read_array_header_1_0/2_0` and checked before any array is allocated: a real (float or
    integer) dtype, the shape against `check_shape`, the declared size against `max_bytes` and
    against the bytes the file holds. So a 1 KiB file declaring `(1000000, 14, 512)` is refused
    naming the file, not read into a MemoryError.

    Args:
        path: the file.
        what: what the file is, for messages ("latent", "direction").
        check_shape: raises `LatentFileError` for a declared shape the caller cannot use (called
            before allocation); None: any shape.
        max_bytes: the most array bytes accepted (default `MAX_NPY_BYTES`, 256 MiB).

    Returns:
        `(array, sha256)`: the array as stored (float or integer) and the hex SHA-256 of the file's bytes.

    Raises:
        LatentFileError: missing or unreadable file, not a `.npy` (a `.npz` archive, a pickle), an
            object, structured or non-numeric dtype, a shape `check_shape` refuses, a declared size
            beyond `max_bytes` or other than the file holds, or NaN/Inf values. The message starts
            with the path.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(6)
            if head[:4] == b"PK\x03\x04":
                raise LatentFileError(f"{p}: a .npz archive; save the {what} as one array with np.save (.npy)")
            if head[:1] == b"\x80":  # a pickle protocol 2+ header (torch.save, pickle.dump)
                raise LatentFileError(f"{p}: a Python pickle, which is never loaded; save a numeric array with "
                                      "np.save(..., allow_pickle=False)")
            if head != b"\x93NUMPY":
                raise LatentFileError(f"{p}: not a .npy array file (no NPY header); save the {what} with np.save")
            f.seek(0)
            shape, fortran, dtype, offset = _npy_header(f, p, what)
            file_size = os.fstat(f.fileno()).st_size
            if check_shape is not None:
                check_shape(shape)
            declared = math.prod(shape) * dtype.itemsize
            if declared > max_bytes:
                raise LatentFileError(f"{p}: its header declares a {what} of shape {list(shape)} {dtype} "
                                      f"({declared / 2**20:.0f} MiB), more than the {max_bytes / 2**20:.0f} MiB "
                                      f"accepted; split it into smaller files")
            if file_size - offset != declared:
                raise LatentFileError(f"{p}: its header declares shape {list(shape)} {dtype} ({declared} bytes of data) "
                                      f"but the file holds {file_size - offset}; the file is truncated or not a "
                                      f"{what} saved with np.save")
            f.seek(0)
            data = f.read(offset + declared)
    except FileNotFoundError:
        raise LatentFileError(f"{p}: {what} file not found") from None
    except OSError as e:
        raise LatentFileError(f"{p}: cannot read the {what} file ({type(e).__name__}: {e})") from None
    a = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    a = a.reshape(shape[::-1]).transpose() if fortran else a.reshape(shape)
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise LatentFileError(f"{p}: {what} holds NaN or Inf values")
    return a.copy(), hashlib.sha256(data).hexdigest()


def _npy_header(f, p: Path, what: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """`(shape, fortran_order, dtype, data offset)` of an open `.npy` file, checked (see `read_npy`)."""
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(f)
        else:  # 3.0 only adds utf-8 field names, i.e. structured dtypes, which are refused anyway
            raise ValueError(f"NPY format version {version[0]}.{version[1]} (a structured array)")
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise LatentFileError(f"{p}: holds pickled Python objects, which are never loaded; save a numeric "
                                  f"array with np.save(..., allow_pickle=False)") from None
        raise LatentFileError(f"{p}: not a .npy array file ({' '.join(str(e).split())[:200]})") from None
    if dtype.hasobject:
        raise LatentFileError(f"{p}: holds pickled Python objects, which are never loaded; save a numeric "
                              f"array with np.save(..., allow_pickle=False)")
    if dtype.kind not in "fiu" or dtype.fields is not None or dtype.subdtype is not None:
        raise LatentFileError(f"{p}: {what} has dtype {dtype}; expected float32 (any real number type is accepted)")
    return tuple(int(n) for n in shape), bool(fortran), dtype, f.tell()


def _latent_shape(shape: tuple[int, ...], n_styles: int, path) -> None:
    """Refuse a latent file's shape that `load_latents` cannot use (before it is allocated)."""
    if shape in ((Z_DIM,), (1, Z_DIM), (n_styles, Z_DIM)):
        return
    if len(shape) == 3 and shape[1:] == (n_styles, Z_DIM) and 1 <= shape[0] <= MAX_LATENT_BATCH:
        return
    if len(shape) == 3 and shape[1:] == (n_styles, Z_DIM) and shape[0] > MAX_LATENT_BATCH:
        raise LatentFileError(f"{path}: a batch of {shape[0]} latents; at most {MAX_LATENT_BATCH} per file are "
                              "rendered; split it into smaller files")
    raise LatentFileError(
        f"{path}: latent of shape {list(shape)} does not fit this checkpoint ({n_styles} styles); expected "
        f"[{n_styles}, 512] (W+), [B, {n_styles}, 512] (a batch) or [512] (w, repeated to every style)"
    )


def load_latents(path: str | os.PathLike, n_styles: int) -> tuple[np.ndarray, bool]:
    """Read saved latents for rendering (`engine.run --save-latents` writes `[n_styles, 512]`).

    Args:
        path: a `.npy` of shape `[n_styles, 512]` (one W+), `[B, n_styles, 512]` (a batch of at
            most `MAX_LATENT_BATCH`), or `[512]` / `[1, 512]` (one w, repeated to every style).
        n_styles: the checkpoint's number of styles.

    Returns:
        `(w_plus, batched)`: w_plus `[B, n_styles, 512]` float32 (B = 1 unless the file is a
        batch) and whether the file held a batch (3-D), which decides the output names.

    Raises:
        LatentFileError: as `read_npy`, or a shape that fits none of the above (the message
            names the file, its shape and the accepted shapes), checked from the header before
            the array is read.
    """
    a, _ = read_npy(path, "latent", check_shape=lambda shape: _latent_shape(shape, n_styles, path))
    if a.shape in ((Z_DIM,), (1, Z_DIM)):
        return np.broadcast_to(a.reshape(1, 1, Z_DIM), (1, n_styles, Z_DIM)).astype(np.float32), False
    if a.shape == (n_styles, Z_DIM):
        return a[None].astype(np.float32), False
    return a.astype(np.float32), True


def _direction_shape(shape: tuple[int, ...], n_styles: int | None, path) -> None:
    """Refuse a direction file's shape that `load_direction` cannot use (before it is allocated);
    `n_styles` None (not known yet): any `[512]`-wide shape of at most `MAX_STYLES` styles."""
    if shape in ((Z_DIM,), (1, Z_DIM)):
        return
    if n_styles is None:
        if len(shape) in (2, 3) and shape[-1] == Z_DIM and math.prod(shape[:-1]) <= MAX_STYLES:
            return
        raise LatentFileError(f"{path}: direction of shape {list(shape)} is neither a W direction ([512] or [1, 512]) "
                              f"nor a W+ direction ([n_styles, 512], at most {MAX_STYLES} styles)")
    if shape in ((n_styles, Z_DIM), (1, n_styles, Z_DIM)):
        return
    styles = n_styles
    raise LatentFileError(
        f"{path}: direction of shape {list(shape)} does not fit this checkpoint ({styles} styles); expected "
        f"[512] or [1, 512] (a W direction, applied to every style) or [{styles}, 512] (a W+ direction)"
    )


def load_direction(path: str | os.PathLike, n_styles: int) -> np.ndarray:
    """Read an editing direction (`np.load(allow_pickle=False)`).

    Args:
        path: a `.npy` of shape `[512]` or `[1, 512]` (a W direction, applied to every style),
            `[n_styles, 512]` or `[1, n_styles, 512]` (a W+ direction, per style).
        n_styles: the checkpoint's number of styles.

    Returns:
        d `[n_styles, 512]` float32.

    Raises:
        LatentFileError: as `read_npy`, or another shape (the message names the file, its shape
            and the accepted shapes), checked from the header before the array is read.
    """
    return _direction(read_direction(path, n_styles)[0], n_styles, path)


def read_direction(path: str | os.PathLike, n_styles: int | None = None) -> tuple[np.ndarray, str]:
    """`read_npy` of a direction file, its shape checked from the header (`n_styles` None: before
    the checkpoint is known, any W or W+ shape up to `MAX_STYLES` styles).

    Raises:
        LatentFileError: as `read_npy`, or a shape that is no direction.
    """
    return read_npy(path, "direction", check_shape=lambda shape: _direction_shape(shape, n_styles, path))


def _direction(a: np.ndarray, n_styles: int, path: str | os.PathLike) -> np.ndarray:
    if a.size and float(np.abs(a).max()) > FLOAT32_MAX:
        raise LatentFileError(f"{path}: direction values up to {float(np.abs(a).max()):.3g} overflow float32 (the "
                              f"latents' type, at most {FLOAT32_MAX:.3g}); save a direction of ordinary magnitude")
    _direction_shape(a.shape, n_styles, path)
    if a.shape in ((Z_DIM,), (1, Z_DIM)):
        return np.broadcast_to(a.reshape(1, Z_DIM), (n_styles, Z_DIM)).astype(np.float32)
    return a.reshape(n_styles, Z_DIM).astype(np.float32)


@dataclass(frozen=True)
class Edit:
    """One `--edit`: a direction file and its strength; `direction` and `sha256` once loaded (`load_edit`).

    Attributes:
        path: the `.npy` file.
        strength: the multiplier a (dimensionless; 0 leaves the latents unchanged).
        direction: `[n_styles, 512]` float32, or None before loading.
        sha256: hex digest of the file's bytes (for the run fingerprint), or None before loading.
    """

    path: Path
    strength: float = 1.0
    direction: np.ndarray | None = field(default=None, repr=False, compare=False)
    sha256: str | None = None


def parse_edit(text: str) -> Edit:
    """Parse `DIR.npy:STRENGTH` (strength optional, default 1.0).

    The text after the LAST colon is the strength when it parses as a number; otherwise the
    whole text is the path (so `C:\\dirs\\smile.npy` works, and `smile.npy` means strength 1).

    Args:
        text: e.g. "smile.npy:1.5", "age.npy:-2", "pose.npy".

    Returns:
        An unloaded `Edit` (`load_edit` reads the file).

    Raises:
        UsageError: an empty path, or a strength that is NaN, infinite or beyond float32's range.
    """
    path, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            strength = float(tail)
        except ValueError:
            pass
        else:
            path = head
    if not path:
        raise UsageError(f"--edit {text!r}: no file; write DIR.npy:STRENGTH (e.g. smile.npy:1.5)")
    if not math.isfinite(strength) or abs(strength) > FLOAT32_MAX:
        raise UsageError(f"--edit {text!r}: strength must be a finite number within float32's range "
                         f"(|strength| <= {FLOAT32_MAX:.3g}), got {tail!r}")
    return Edit(Path(path), strength)


def load_edit(edit: Edit, n_styles: int) -> Edit:
    """`edit` with its direction `[n_styles, 512]` and the file's SHA-256 filled in (file read once).

    Raises:
        LatentFileError: see `load_direction`; or strength x direction overflows float32.
    """
    a, digest = read_direction(edit.path, n_styles)
    loaded = replace(edit, direction=_direction(a, n_styles, edit.path), sha256=digest)
    _edit_delta([loaded])
    return loaded


def load_edits(edits: Sequence[Edit], n_styles: int) -> tuple[Edit, ...]:
    """`load_edit` of each, then a check that their sum fits float32 (what `apply_edits` adds).

    Raises:
        LatentFileError: a file as `load_edit`; or the edits' sum overflows float32.
    """
    loaded = tuple(load_edit(e, n_styles) for e in edits)
    _edit_delta(loaded)
    return loaded


def _edit_delta(edits: Sequence[Edit]) -> np.ndarray | None:
    """`sum_i strength_i * d_i` `[n_styles, 512]` float32 over the nonzero-strength loaded edits (None: none).

    Formed in float64 and rounded once, so it does not depend on the device.

    Raises:
        ValueError: an edit not loaded, or directions of different shapes.
        LatentFileError: the sum overflows float32 (naming the edits and the fix).
    """
    active = [e for e in edits if e.strength != 0]
    if not active:
        return None
    delta = np.zeros(active[0].direction.shape if active[0].direction is not None else (0,), np.float64)
    for e in active:
        if e.direction is None:
            raise ValueError(f"{e.path}: edit not loaded; call load_edit(edit, n_styles) first")
        if e.direction.shape != delta.shape:
            raise ValueError(f"{e.path}: direction {list(e.direction.shape)} does not match {list(delta.shape)}")
        delta += e.strength * e.direction.astype(np.float64)
    peak = float(np.abs(delta).max()) if delta.size else 0.0
    if not peak <= FLOAT32_MAX:
        names = ", ".join(f"{e.path}:{e.strength:g}" for e in active)
        raise LatentFileError(f"--edit {names}: strength x direction reaches {peak:.3g}, beyond float32's range "
                              f"({FLOAT32_MAX:.3g}): the latents would be Inf/NaN; use a smaller strength")
    return delta.astype(np.float32)


def apply_edits(w_plus: torch.Tensor | np.ndarray, edits: Sequence[Edit]) -> torch.Tensor | np.ndarray:
    """`w_plus + sum_i strength_i * d_i` (InterFaceGAN-style linear editing, per style in W+).

    The sum of the directions is formed in float64 and added once in float32, so the result does
    not depend on the device; edits of strength 0 are skipped, so they are an exact identity.

    Args:
        w_plus: `[B, n_styles, 512]` or `[n_styles, 512]` float32 (torch or numpy).
        edits: loaded `Edit`s (`load_edit`), directions `[n_styles, 512]`.

    Returns:
        The edited latents, same type, shape, dtype and device as `w_plus` (`w_plus` itself
        when no edit has a nonzero strength).

    Raises:
        ValueError: an edit not loaded, or a direction whose shape does not match `w_plus`.
        LatentFileError: the edits' sum overflows float32.
    """
    delta32 = _edit_delta(edits)
    if delta32 is None:
        return w_plus
    if delta32.shape != tuple(w_plus.shape[-2:]):
        raise ValueError(f"edit directions {list(delta32.shape)} do not match latents {list(w_plus.shape)}")
    if isinstance(w_plus, torch.Tensor):
        return w_plus + torch.from_numpy(delta32).to(w_plus.device, w_plus.dtype)
    return (w_plus + delta32).astype(w_plus.dtype, copy=False)


def interpolate(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, steps: int) -> np.ndarray:
    """`steps` latents from `a` to `b`, linear in W+: `(1 - t) * a + t * b`, t = 0, 1/(steps-1), ..., 1.

    Args:
        a, b: `[n_styles, 512]` (or `[1, n_styles, 512]`) float32, the same shape.
        steps: number of frames, >= 2 (the first is exactly `a`, the last exactly `b`).

    Returns:
        `[steps, n_styles, 512]` float32 (numpy).

    Raises:
        ValueError: steps < 2 or shapes that differ.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, np.float32)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, np.float32)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if b.ndim == 3 and b.shape[0] == 1:
        b = b[0]
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"interpolate needs two latents of one shape [n_styles, 512], got {list(a.shape)} and {list(b.shape)}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 2:
        raise ValueError(f"interpolate needs steps >= 2 (both ends are included), got {steps!r}")
    t = np.linspace(0.0, 1.0, int(steps), dtype=np.float32)[:, None, None]
    return ((1 - t) * a[None] + t * b[None]).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Pictures


def _to_height(img: np.ndarray, height: int) -> np.ndarray:
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"pictures must be uint8 [H, W, 3] (or [H, W]), got {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    if h == height:
        return img
    width = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC))


def strip(images: Sequence[np.ndarray], height: int | None = None) -> np.ndarray:
    """Pictures side by side in one row, each resized to `height` with its aspect kept.

    Source: the row layout of official `scripts/style_mixing.py` (input, then the outputs).

    Args:
        images: uint8 `[H, W, 3]` (or `[H, W]` grey) pictures of any sizes.
        height: row height in px (default the tallest picture's).

    Returns:
        uint8 `[height, sum of widths, 3]`.

    Raises:
        ValueError: no pictures, or one that is not uint8 `[H, W, 3]`/`[H, W]`.
    """
    if not len(images):
        raise ValueError("strip needs at least one picture")
    height = int(height or max(im.shape[0] for im in images))
    return np.concatenate([_to_height(np.asarray(im), height) for im in images], axis=1)


def grid(rows: Sequence[Sequence[np.ndarray]], height: int | None = None, fill: int = 255) -> np.ndarray:
    """Rows of pictures (each a `strip`) stacked top to bottom, shorter rows padded on the right.

    Args:
        rows: one sequence of uint8 pictures per row (e.g. per input: the input, its inversion,
            its mixes).
        height: height of every row in px (default the tallest picture's).
        fill: grey level of the padding (255 white).

    Returns:
        uint8 `[len(rows) * height, widest row, 3]`.

    Raises:
        ValueError: no rows, an empty row, or a picture that is not uint8 `[H, W, 3]`/`[H, W]`.
    """
    if not len(rows):
        raise ValueError("grid needs at least one row")
    height = int(height or max(im.shape[0] for row in rows for im in row))
    strips = [strip(row, height) for row in rows]
    width = max(s.shape[1] for s in strips)
    return np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=fill)
                           for s in strips], axis=0)


def fit_jpeg(picture: np.ndarray) -> np.ndarray:
    """`picture` scaled down (aspect kept) so no side exceeds JPEG's 65535 px; unchanged if it fits."""
    h, w = picture.shape[:2]
    if max(h, w) <= JPEG_MAX_SIDE:
        return picture
    s = JPEG_MAX_SIDE / max(h, w)
    size = (max(1, int(w * s)), max(1, int(h * s)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.BICUBIC))
