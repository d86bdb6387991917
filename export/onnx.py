"""ONNX export of pSp in the engine formulation: the full pipeline and its parts, fp32 and fp16.

Source: ONNX operator set 17 (https://onnx.ai/onnx/operators/); the model is
`export.engine_model.EnginePSP`, equal to the official pSp (`tests/test_engine_model.py`). The
graph has static weights everywhere and no custom ops, so ONNX Runtime, OpenVINO and TensorRT run
it as is.

Parts and names (dynamic axis `batch` on dim 0 of every input and output; IO always float32):
  * `psp`: `x` `[batch, input_nc, 256, 256]` -> `img` `[batch, 3, R, R]`, `w_plus` `[batch, n_styles, 512]`
  * `encoder`: `x` -> `w_plus`
  * `generator`: `w_plus` -> `img`
R is the output size, or 256 when exported with `resize=True`. `x` is the encoder input exactly as
`reference.images.to_input_tensor` makes it (RGB: resized to 256 bilinear, `(u8/255 - 0.5)/0.5`).
A JSON sidecar `<file>.json` records the part, sizes, preprocessing, latent_avg and the checkpoint.

CLI: `python -m export.onnx --checkpoint CKPT --out DIR [--part psp|encoder|generator] [--fp16] [--resize]`
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from reference.files import atomic_path, write_json

from .engine_model import EnginePSP

OPSET = 17
PARTS = ("psp", "encoder", "generator")
IO_NAMES = {"psp": (["x"], ["img", "w_plus"]), "encoder": (["x"], ["w_plus"]), "generator": (["w_plus"], ["img"])}
PREPROCESSING = {
    "rgb": "PIL resize((256, 256), BILINEAR), then (uint8 / 255 - 0.5) / 0.5, RGB channel order, NCHW float32",
    "sketch": "grayscale ('L'), PIL resize((256, 256), BILINEAR), uint8 / 255, 1 channel",
    "segmentation": "class-id map ('L'), PIL resize((256, 256), BILINEAR) as the official transform, one-hot label_nc channels",
}


class _Part(nn.Module):
    """One exported part of an `EnginePSP` (forward signature = the ONNX graph's IO)."""

    def __init__(self, model: EnginePSP, part: str, resize: bool):
        super().__init__()
        self.model, self.part, self.resize = model, part, resize

    def forward(self, inp: torch.Tensor):
        if self.part == "encoder":
            return self.model.encode(inp)
        if self.part == "generator":
            return self.model.synthesize(inp, resize=self.resize)
        w_plus = self.model.encode(inp)
        return self.model.synthesize(w_plus, resize=self.resize), w_plus


def example_input(model: EnginePSP, part: str, batch: int = 2) -> torch.Tensor:
    """A valid example input of `part` (fp32): encoder input in [-1, 1], or W+ around latent_avg."""
    g = torch.Generator().manual_seed(0)
    if part == "generator":
        return model.latent_avg.float().expand(batch, model.n_styles, 512) + 0.1 * torch.randn(
            batch, model.n_styles, 512, generator=g)
    return torch.rand(batch, model.input_nc, 256, 256, generator=g) * 2 - 1


def export_onnx(model: EnginePSP, path: str | os.PathLike, part: str = "psp", resize: bool = False,
                fp16: bool = False, opset: int = OPSET, checkpoint: str | os.PathLike | None = None) -> Path:
    """Export one part of `model` to ONNX, check it, and write its JSON sidecar.

    Args:
        model: an `EnginePSP` (fp32; not modified).
        path: the `.onnx` file to write (atomically: temp file + rename).
        part: "psp", "encoder" or "generator" (see the module docstring).
        resize: output 256x256 (the official `face_pool`) instead of the full resolution.
        fp16: activations and convolution weights in fp16; style affines, demodulation, the mapping
            and normalisation in fp32; IO stays float32.
        opset: ONNX opset (>= 17).
        checkpoint: the source checkpoint, recorded in the sidecar.

    Returns:
        The path written.

    Raises:
        ValueError: unknown part or opset < 17.
        onnx.checker.ValidationError: the graph fails the ONNX checker (a bug, not a user error).
    """
    import onnx

    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    src = model.half_activations() if fp16 else model
    wrapper = _Part(src, part, resize).eval()
    inputs, outputs = IO_NAMES[part]
    dynamic_axes = {name: {0: "batch"} for name in inputs + outputs}
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(wrapper, (example_input(model, part),), tmp, input_names=inputs,
                              output_names=outputs, dynamic_axes=dynamic_axes, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
        onnx.checker.check_model(str(tmp), full_check=True)  # includes strict shape inference
    write_sidecar(model, path, part, resize, fp16, opset, checkpoint)
    return path


def _checkpoint_info(checkpoint: str | os.PathLike | None) -> dict | None:
    if checkpoint is None:
        return None
    p = Path(checkpoint)
    with open(p, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"path": str(p.resolve()), "size": p.stat().st_size, "sha256_first_mib": head}


def write_sidecar(model: EnginePSP, path: Path, part: str, resize: bool, fp16: bool, opset: int,
                  checkpoint: str | os.PathLike | None) -> Path:
    """`<path>.json`: what a runtime needs besides the graph (IO, sizes, preprocessing, latent_avg)."""
    kind = "rgb" if model.label_nc == 0 else "sketch" if model.label_nc == 1 else "segmentation"
    r = 256 if resize else model.output_size
    shapes = {"x": ["batch", model.input_nc, 256, 256], "w_plus": ["batch", model.n_styles, 512],
              "img": ["batch", 3, r, r]}
    inputs, outputs = IO_NAMES[part]
    la = model.latent_avg.float()
    side = {
        "part": part,
        "inputs": {n: {"shape": shapes[n], "dtype": "float32"} for n in inputs},
        "outputs": {n: {"shape": shapes[n], "dtype": "float32"} for n in outputs},
        "output_size": model.output_size,
        "image_size": r,
        "n_styles": model.n_styles,
        "input_nc": model.input_nc,
        "label_nc": model.label_nc,
        "dataset_type": model.dataset_type,
        "resize": resize,
        "precision": "fp16 activations, fp32 styles/demodulation/mapping" if fp16 else "fp32",
        "latent_avg": (la[None].expand(model.n_styles, 512) if la.ndim == 1 else la).tolist(),
        "preprocessing": {"input": kind, "steps": PREPROCESSING[kind]},
        "postprocessing": "img is unclamped; display as clamp((img + 1) / 2, 0, 1) * 255 truncated to uint8",
        "checkpoint": _checkpoint_info(checkpoint),
        "opset": opset,
        "opts": {k: v for k, v in model.opts.items() if isinstance(v, (str, int, float, bool, type(None)))},
    }
    out = path.with_suffix(".json")
    return write_json(out, side)


def main(argv: list[str] | None = None) -> int:
    """`python -m export.onnx`: export a pSp checkpoint's pipeline or parts. Exit 0 ok, 2 on bad input."""
    from reference import load_psp
    from reference.errors import PSPError

    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="official pSp checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--part", choices=PARTS + ("all",), default="psp", help="what to export (default psp)")
    p.add_argument("--fp16", action="store_true", help="fp16 activations (styles, demodulation, mapping stay fp32)")
    p.add_argument("--resize", action="store_true", help="output 256x256 (official face_pool)")
    p.add_argument("--opset", type=int, default=OPSET)
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of an old checkpoint you trust")
    args = p.parse_args(argv)
    try:
        model = EnginePSP(load_psp(args.checkpoint, trust_pickle=args.trust_pickle))
    except PSPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parts = PARTS if args.part == "all" else (args.part,)
    stem = Path(args.checkpoint).stem
    for part in parts:
        name = f"{stem}.{part}{'.resize' if args.resize else ''}{'.fp16' if args.fp16 else ''}.onnx"
        out = export_onnx(model, Path(args.out) / name, part, args.resize, args.fp16, args.opset, args.checkpoint)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB) and {out.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
