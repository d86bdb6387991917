"""Checkpoint IO: read official pSp and rosinality StyleGAN2 checkpoints safely, validate strictly.

Source: official pSp `models/psp.py::load_weights` and `scripts/inference.py` (which opts it reads,
their defaults), `training/coach.py::__get_save_dict` (the file layout); rosinality
stylegan2-pytorch `convert_weight.py` (`{'g_ema', 'latent_avg'}`). Restated in
`shared/golden/spec/*.json.gz` (`checkpoint_file_layout`, `how_psp_loads_it`).
"""

from __future__ import annotations

import math
import os
import pickle
import re
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from .plumbing.errors import CheckpointError
from .plumbing.files import atomic_write

# Opts inference reads, with the defaults official `scripts/inference.py` applies when an old
# checkpoint lacks them.
INFERENCE_DEFAULTS = {
    "encoder_type": "GradualStyleEncoder",
    "input_nc": 3,
    "label_nc": 0,
    "output_size": 1024,
    "learn_in_w": False,
    "start_from_latent_avg": True,
    "dataset_type": "ffhq_encode",
    "resize_factors": None,
}


class UnsafeLoadWarning(UserWarning):
    """A checkpoint was loaded with full unpickling (`trust_pickle=True`), which runs code from the file."""


warnings.simplefilter("always", UnsafeLoadWarning)  # every unsafe load is announced, not only the first

# (magic bytes at offset 0, what the file is): files people pass as a checkpoint by mistake
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x93NUMPY", "a NumPy .npy array (a latent or direction?)"),
    (b"\x1f\x8b", "a gzip-compressed file (decompress it first)"),
    (b"%PDF", "a PDF document"),
    (b"\x7fELF", "a program (ELF executable)"),
)
_GRAPH_SUFFIXES = {".onnx": "an ONNX graph (the engine exports those from the .pt checkpoint itself)",
                   ".plan": "a TensorRT plan (for --backend tensorrt)",
                   ".engine": "a TensorRT plan (for --backend tensorrt)"}
_FIX = "pass the pSp checkpoint file (.pt, e.g. psp_ffhq_encode.pt) with --checkpoint"


def sniff(path: Path, head: bytes) -> str | None:
    """What a file that is not a PyTorch checkpoint is, from its first bytes and name (None: it may be one).

    PyTorch writes a zip archive holding `<name>/data.pkl` (torch >= 1.6) or a bare pickle
    (legacy, first byte 0x80); anything else is named: images by their signature, NumPy arrays,
    ONNX graphs and TensorRT plans by their extension, text files (an HTML page from a failed
    download, a Git LFS pointer).

    Args:
        path: the file (its zip directory is read when it is a zip archive).
        head: its first bytes (4 KiB is plenty).

    Returns:
        A phrase such as "a JPEG image", or None for a zip with a `data.pkl` or a pickle.
    """
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a truncated or damaged zip archive (an incomplete download? re-download it)"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return None
        if names and all(n.endswith(".npy") for n in names):
            return "a NumPy .npz archive"
        return f"a zip archive without a PyTorch checkpoint inside (it holds {', '.join(names[:3]) or 'nothing'})"
    if head[:1] == b"\x80":
        return None
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[:2] == b"BM" and len(head) >= 6 and int.from_bytes(head[2:6], "little") == path.stat().st_size:
        return "a BMP image"
    if path.suffix.lower() in _GRAPH_SUFFIXES:
        return _GRAPH_SUFFIXES[path.suffix.lower()]
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:
            text = head[: e.start].decode("utf-8") if e.start >= len(head) - 3 else None
        if text is not None:
            start = text.lstrip().lower()
            if start.startswith(("<!doctype html", "<html")):
                return "an HTML page (a download that failed or needs a confirmation click?)"
            if start.startswith("version https://git-lfs"):
                return "a Git LFS pointer, not the file itself (run git lfs pull)"
            return "a text file"
    return None


def _refused_global(message: str) -> str | None:
    """The global that `weights_only` refused, in full (e.g. "argparse.Namespace"), or None."""
    m = re.search(r"Unsupported global: GLOBAL (\S+?) was not", message) or re.search(r"GLOBAL (\S+)", message)
    if m:
        return m.group(1)
    m = re.search(r"unrecognized function `?([^`\s]+)", message)
    return m.group(1) if m else None


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """Load a checkpoint file into a dict of tensors and plain values, on the CPU.

    Uses `torch.load(..., weights_only=True)` (memory-mapped where the file format allows).
    Old checkpoints whose pickles hold other objects fail there; `trust_pickle=True` retries
    with full unpickling, which runs code from the file: only for files you trust. When it does,
    an `UnsafeLoadWarning` says so (the CLIs print it as one line).

    Args:
        path: a `.pt`/`.pth` file.
        trust_pickle: allow full unpickling (never the default).

    Returns:
        The loaded object (a dict for every supported layout).

    Raises:
        CheckpointError: naming the file and the fix: missing; a folder; not a regular file (a
            FIFO, a device); permission denied; empty; another kind of file (an image, an .npy, an
            ONNX graph, text, ...: see `sniff`); damaged; or a pickle that `weights_only` refuses
            (naming the refused global in full, and how to opt in).
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found; {_FIX}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot access the checkpoint ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        inside = sorted(p.name for p in path.glob("*.pt*"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file: pass the .pt file inside it{hint}")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a pipe, socket or device): {_FIX}")
    if st.st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty (an interrupted download or copy?); {_FIX}")
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied: make the checkpoint readable (chmod u+r) or pass a copy "
                              "you can read") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    what = sniff(path, head)
    if what is not None:
        raise CheckpointError(f"{path} is {what}, not a PyTorch checkpoint: {_FIX}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        if refused is None:
            detail = " ".join(str(e).split("WeightsUnpickler error:")[-1].split())[:200]
            raise CheckpointError(f"{path}: damaged or not a PyTorch checkpoint (its pickle cannot be read: "
                                  f"{detail}); re-download it") from None
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: the file holds a Python object of type {refused}, which safe loading (weights_only) "
                "refuses. If it is an old official checkpoint you trust, rerun with --trust-pickle, "
                "which runs code from the file; never do so for a file from an unknown source."
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001 - any failure here is a bad file
            raise CheckpointError(f"{path}: cannot read the checkpoint even with full unpickling "
                                  f"({type(e2).__name__}: {e2}); re-download it") from None
        warnings.warn(f"{path}: loaded with full unpickling (--trust-pickle) because it holds an object of type "
                      f"{refused}; this ran code from the file", UnsafeLoadWarning, stacklevel=2)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip, damaged pickle, ...
        raise CheckpointError(f"{path}: damaged or not a PyTorch checkpoint ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}); re-download it") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}; {_FIX}")
    return dict(obj)


def check_finite(tensors: Mapping[str, Any], source: str) -> None:
    """Refuse floating tensors holding NaN or Inf (a corrupt file would give NaN latents and black images).

    One `torch.aminmax` per tensor: its minimum and maximum are finite exactly when every value is
    (NaN propagates to both; +Inf is the maximum, -Inf the minimum). One read of the data without a
    temporary: ~9x less CPU than `torch.isfinite(v).all()`, which writes a bool per value first
    (0.12 instead of 1.0-1.4 CPU-s for the 240 M values of a 256 px checkpoint on one thread).

    Raises:
        CheckpointError: naming the first bad key (in `tensors`' order) and the fix.
    """
    f32_max = torch.finfo(torch.float32).max
    for key, v in tensors.items():
        if not (isinstance(v, torch.Tensor) and v.is_floating_point()) or not v.numel():
            continue
        lo, hi = (float(t) for t in torch.aminmax(v))
        ok = math.isfinite(lo) and math.isfinite(hi)
        if ok and v.dtype == torch.float64:  # loaded as float32: must also fit its range
            ok = -f32_max <= lo and hi <= f32_max
        if not ok:
            raise CheckpointError(f"{source}: {key} holds NaN/Inf values (in float32); the file is corrupt: "
                                  "re-download it (or re-export it from a healthy training run)")


def save_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a checkpoint with `torch.save`, atomically (temp file in the same folder + rename).

    Returns:
        The path written.
    """
    return atomic_write(path, lambda f: torch.save(dict(ckpt), f))


def checkpoint_kind(ckpt: Mapping[str, Any]) -> str:
    """Tell the layout of a loaded checkpoint.

    Returns:
        "psp" (`{'state_dict': {encoder.*, decoder.*}, ...}`), "psp_state_dict" (a bare pSp state
        dict), "stylegan2" (rosinality `{'g_ema', ...}`), "stylegan2_state_dict" (bare generator
        keys), "encoder_only" (IR-SE50 ArcFace-like weights), or "unknown".
    """
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        keys = ckpt["state_dict"].keys()
        if any(k.startswith("encoder.") for k in keys) or any(k.startswith("decoder.") for k in keys):
            return "psp"
        return "unknown"
    if "g_ema" in ckpt:
        return "stylegan2"
    keys = list(ckpt.keys())
    if any(isinstance(k, str) and k.startswith(("encoder.", "decoder.")) for k in keys):
        return "psp_state_dict"
    if "style.1.weight" in ckpt and "conv1.conv.weight" in ckpt:
        return "stylegan2_state_dict"
    if "input_layer.0.weight" in ckpt and any(str(k).startswith("body.") for k in keys):
        return "encoder_only"
    return "unknown"


def infer_opts_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    """Architecture opts read off a pSp state dict's keys and shapes (used when `opts` is absent
    and to explain mismatches)."""
    opts: dict = {}
    w = sd.get("encoder.input_layer.0.weight")
    if isinstance(w, torch.Tensor) and w.ndim == 4:
        opts["input_nc"] = int(w.shape[1])
    n_noise = sum(1 for k in sd if k.startswith("decoder.noises.noise_"))
    if n_noise:
        opts["output_size"] = 2 ** ((n_noise - 1) // 2 + 2)
    if any(k.startswith("encoder.styles.") for k in sd):
        opts["encoder_type"] = "GradualStyleEncoder"
    elif any(k.startswith("encoder.output_layer_2.") for k in sd):
        opts["encoder_type"] = "BackboneEncoderUsingLastLayerIntoWPlus"
    elif "encoder.linear.weight" in sd:
        opts["encoder_type"] = "BackboneEncoderUsingLastLayerIntoW"
        opts["learn_in_w"] = True
    return opts


def validate_state_dict(
    given: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    source: str,
    hint: str = "",
) -> None:
    """Strict key and shape check of `given` against a model's `expected` state dict, then a
    check that every floating tensor is finite (`check_finite`).

    Raises:
        CheckpointError: naming the missing, unexpected and mis-shaped keys (the first few of
            each, with counts) and `hint` (the likely cause); or the first key holding NaN/Inf.
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in given and isinstance(given[k], torch.Tensor) and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    not_tensor = [k for k in expected if k in given and not isinstance(given[k], torch.Tensor)]
    if not (missing or unexpected or misshaped or not_tensor):
        check_finite({k: given[k] for k in expected}, source)
        return

    def some(items: list[str]) -> str:
        more = f", ... (+{len(items) - 5} more)" if len(items) > 5 else ""
        return ", ".join(items[:5]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {some(unexpected)}")
    if misshaped:
        parts.append(f"{len(misshaped)} mis-shaped key(s): {some(misshaped)}")
    if not_tensor:
        parts.append(f"{len(not_tensor)} non-tensor value(s): {some(not_tensor)}")
    msg = f"{source}: state dict does not match the architecture: " + "; ".join(parts)
    if hint:
        msg += f". Likely cause: {hint}"
    raise CheckpointError(msg)


def describe_mismatch(opts: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> str:
    """A human explanation of why a state dict may not fit its opts (or '' when none is found)."""
    inferred = infer_opts_from_state_dict(sd)
    reasons = []
    for key in ("output_size", "input_nc", "encoder_type"):
        if key in inferred and key in opts and inferred[key] != opts[key]:
            reasons.append(f"opts say {key}={opts[key]!r} but the weights look like {key}={inferred[key]!r}")
    if not any(k.startswith("encoder.") for k in sd):
        reasons.append("the state dict has no encoder.* keys (a generator-only checkpoint?)")
    if not any(k.startswith("decoder.") for k in sd):
        reasons.append("the state dict has no decoder.* keys (an encoder-only checkpoint?)")
    if not reasons:
        reasons.append("the file was truncated, edited, or saved by a different pSp version")
    return "; ".join(reasons)
