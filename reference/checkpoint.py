"""Checkpoint IO: read official pSp and rosinality StyleGAN2 checkpoints safely, validate strictly.

Source: official pSp `models/psp.py::load_weights` and `scripts/inference.py` (which opts it reads,
their defaults), `training/coach.py::__get_save_dict` (the file layout); rosinality
stylegan2-pytorch `convert_weight.py` (`{'g_ema', 'latent_avg'}`). Restated in
`shared/golden/spec/*.json.gz` (`checkpoint_file_layout`, `how_psp_loads_it`).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CheckpointError
from .files import atomic_write

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


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """Load a checkpoint file into a dict of tensors and plain values, on the CPU.

    Uses `torch.load(..., weights_only=True)` (memory-mapped where the file format allows).
    Old checkpoints whose pickles hold other objects fail there; `trust_pickle=True` retries
    with full unpickling, which runs code from the file: only for files you trust.

    Args:
        path: a `.pt`/`.pth` file.
        trust_pickle: allow full unpickling (never the default).

    Returns:
        The loaded object (a dict for every supported layout).

    Raises:
        CheckpointError: missing/unreadable file, not a torch checkpoint, or a pickle that
            `weights_only` refuses (the message says how to opt in).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: the file holds Python objects that safe loading (weights_only=True) refuses "
                f"({str(e).splitlines()[0][:200]}). If it is an old official checkpoint you trust, load it "
                "with trust_pickle=True (CLI: --trust-pickle); never do so for a file from an unknown source."
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001 - any failure here is a bad file
            raise CheckpointError(f"{path}: cannot read the checkpoint even with trust_pickle: {e2}") from None
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return dict(obj)


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
    """Strict key and shape check of `given` against a model's `expected` state dict.

    Raises:
        CheckpointError: naming the missing, unexpected and mis-shaped keys (the first few of
            each, with counts) and `hint` (the likely cause).
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
