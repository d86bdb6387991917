"""ONNX export of pSp in the engine formulation: the full pipeline and its parts, fp32 and fp16.

Source: ONNX operator set 18 (https://onnx.ai/onnx/operators/), written by PyTorch's
torch.export-based exporter (`torch.onnx.export(..., dynamo=True)`, onnxscript); the model is
`export.backends.engine_model.EnginePSP`, equal to the official pSp (`tests/test_engine_model.py`). The
graph has static weights everywhere and no custom ops, so ONNX Runtime, OpenVINO and TensorRT run
it as is. The weights are ONNX external data in `<file>.onnx.data` beside the graph (streamed from
the torch tensors: exporting the 1 GB encoder of a 1024 px model adds no copy of it to the peak
memory, where the TorchScript exporter held three); keep the two files together.

Parts and names (dynamic axis `batch` on dim 0 of every input and output; IO always float32):
  * `psp`: `x` `[batch, input_nc, 256, 256]` -> `img` `[batch, 3, R, R]`, `w_plus` `[batch, n_styles, 512]`
  * `encoder`: `x` -> `w_plus`
  * `generator`: `w_plus` -> `img`
R is the output size, or 256 when exported with `resize=True`. `x` is the encoder input exactly as
`reference.images.to_input_tensor` makes it (RGB: resized to 256 bilinear, `(u8/255 - 0.5)/0.5`).
A JSON sidecar `<file>.onnx.json` (the one schema of `reference.description`, kind "onnx") records
the model description (sizes, opts, preprocessing, latent_avg, checkpoint, precision) and the part's IO.

CLI: `python -m export.onnx --checkpoint CKPT --out DIR [--part psp|encoder|generator] [--fp16] [--resize]`
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from reference.plumbing.cli import ArgumentParser, int_at_least, run_cli
from reference.description import (ENCODER_SIZE, ModelDescription, checkpoint_info, describe, sidecar_path,
                                   write_sidecar)
from reference.plumbing.files import atomic_files
from reference.psp import face_pool

from .backends.engine_model import EnginePSP

OPSET = 18  # the torch.export-based exporter's own opset (17 is reached by its version converter)
MAX_BATCH = 4096  # the upper bound of the dynamic `batch` axis (torch.export needs one)
PARTS = ("psp", "encoder", "generator")
IO_NAMES = {"psp": (["x"], ["img", "w_plus"]), "encoder": (["x"], ["w_plus"]), "generator": (["w_plus"], ["img"])}


class _Part(nn.Module):
    """One exported part of an `EnginePSP` (forward signature = the ONNX graph's IO); with `resize`
    the image is pooled by `reference.psp.face_pool` (the backend model synthesizes at full resolution)."""

    def __init__(self, model: EnginePSP, part: str, resize: bool):
        super().__init__()
        self.model, self.part, self.resize = model, part, resize

    def forward(self, inp: torch.Tensor):
        if self.part == "encoder":
            return self.model.encode(inp)
        if self.part == "generator":
            return self._image(inp)
        w_plus = self.model.encode(inp)
        return self._image(w_plus), w_plus

    def _image(self, w_plus: torch.Tensor) -> torch.Tensor:
        img = self.model.synthesize(w_plus)
        return face_pool(img) if self.resize else img


def data_path(path: str | os.PathLike) -> Path:
    """The external-data file `<path>.data` of an exported graph (its weights; beside it, loaded with it)."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def name_nodes_by_module(graph) -> None:
    """Name every node of an exported graph after the module that made it, as the TorchScript
    exporter did: `/model/synthesis/convs.0/affine/Gemm_12` (module path, op type, a number). The
    torch.export-based exporter names nodes after aten ops (`node_linear_3`) and keeps the module
    path in the node's metadata (`pkg.torch.onnx.name_scopes`); TensorRT names its layers after the
    nodes, and `export.tensorrt.FP32_NODE_PATTERNS` (`/affine`, `/demod`, ...) finds the layers that
    stay fp32 by these names.

    Args:
        graph: an `onnx_ir.Graph` (`torch.onnx.ONNXProgram.model.graph`), renamed in place.
    """
    import ast

    for i, node in enumerate(graph):
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        try:
            scopes = ast.literal_eval(scopes) if scopes else []
        except (ValueError, SyntaxError):
            scopes = []
        module = scopes[-2] if len(scopes) >= 2 else ""  # the last entry is the aten op's own name
        parts: list[str] = []
        for p in module.split(".") if module else []:
            if p.isdigit() and parts:  # a ModuleList index stays with its list: convs.0
                parts[-1] += "." + p
            else:
                parts.append(p)
        node.name = "/" + "/".join(parts + [f"{node.op_type}_{i}"])


def example_input(model: EnginePSP, part: str, batch: int = 2) -> torch.Tensor:
    """A valid example input of `part` (fp32): encoder input in [-1, 1], or W+ around latent_avg."""
    g = torch.Generator().manual_seed(0)
    d = model.description
    if part == "generator":
        return model.latent_avg.float().expand(batch, d.n_styles, 512) + 0.1 * torch.randn(
            batch, d.n_styles, 512, generator=g)
    return torch.rand(batch, d.input_nc, d.encoder_size, d.encoder_size, generator=g) * 2 - 1


def export_onnx(model: EnginePSP, path: str | os.PathLike, part: str = "psp", resize: bool = False,
                fp16: bool = False, opset: int = OPSET, checkpoint: str | os.PathLike | None = None) -> Path:
    """Export one part of `model` to ONNX, check it, and write its JSON sidecar.

    Args:
        model: an `EnginePSP` (fp32; not modified).
        path: the `.onnx` file to write, with its weights in `data_path(path)` (both atomically:
            written in a temp folder, then renamed, the graph last).
        part: "psp", "encoder" or "generator" (see the module docstring).
        resize: output 256x256 (the official `face_pool`) instead of the full resolution.
        fp16: activations and convolution weights in fp16; style affines, demodulation, the mapping
            and normalisation in fp32; IO stays float32.
        opset: ONNX opset (>= 17; the exporter's own is 18, others go through its converter).
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
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed. Skipping torchvision::nms" etc.
    level = quiet.level
    with atomic_files(path) as tmp:
        try:
            quiet.setLevel(logging.ERROR)
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), \
                    contextlib.redirect_stdout(io.StringIO()):  # the exporter's step-by-step progress lines
                warnings.simplefilter("ignore")
                program = torch.onnx.export(wrapper, (example_input(model, part),), None, input_names=inputs,
                                            output_names=outputs, dynamic_shapes=({0: batch},), opset_version=opset,
                                            dynamo=True, external_data=True, optimize=True, verbose=False)
                name_nodes_by_module(program.model.graph)
                program.save(tmp / path.name, external_data=True)  # weights streamed to <name>.data
        finally:
            quiet.setLevel(level)
        del program
        onnx.checker.check_model(str(tmp / path.name), full_check=True)  # includes strict shape inference
        stale = data_path(path)
        if stale.exists() and not data_path(tmp / path.name).exists():
            stale.unlink()  # an older export's weights file this graph does not use
    write_onnx_sidecar(model, path, part, resize, fp16, opset, checkpoint)
    return path


def model_description(model: EnginePSP, checkpoint: str | os.PathLike | None = None,
                      precision: str = "fp32") -> ModelDescription:
    """The description an artifact of `model` carries: `model.description` where the model has one,
    else `reference.description.describe(model)`; the checkpoint recorded when given.

    Args:
        model: an `EnginePSP` (or any model with the pSp attributes `describe` reads).
        checkpoint: the source checkpoint file (`checkpoint_info` recorded), or None to keep what
            the model's description has.
        precision: the artifact's precision ("fp32", "fp16").
    """
    desc = getattr(model, "description", None)
    if desc is None:
        return describe(model, checkpoint, precision=precision)
    changes = {"precision": precision} if checkpoint is None else {"precision": precision,
                                                                   "checkpoint": checkpoint_info(checkpoint)}
    return desc.replace(**changes)


def artifact_info(description: ModelDescription, part: str, resize: bool, opset: int) -> dict:
    """The ONNX-specific part of the sidecar: part, IO names with shapes and dtypes, image size, resize, opset.

    Returns:
        `{"part", "inputs": {name: {"shape", "dtype"}}, "outputs": {...}, "image_size", "resize",
        "opset"}`; shapes name the dynamic batch "batch"; IO is always float32.
    """
    r = ENCODER_SIZE if resize else description.output_size
    s = description.encoder_size
    shapes = {"x": ["batch", description.input_nc, s, s], "w_plus": ["batch", description.n_styles, 512],
              "img": ["batch", 3, r, r]}
    inputs, outputs = IO_NAMES[part]
    return {"part": part,
            "inputs": {n: {"shape": shapes[n], "dtype": "float32"} for n in inputs},
            "outputs": {n: {"shape": shapes[n], "dtype": "float32"} for n in outputs},
            "image_size": r, "resize": bool(resize), "opset": int(opset)}


def write_onnx_sidecar(model: EnginePSP, path: Path, part: str, resize: bool, fp16: bool, opset: int,
                       checkpoint: str | os.PathLike | None) -> Path:
    """`<path>.json` (`m.onnx.json`), the one sidecar schema (`reference.description.write_sidecar`,
    kind "onnx"): the model description (sizes, opts, latent_avg, preprocessing, checkpoint,
    precision "fp16" or "fp32") and `artifact_info`."""
    description = model_description(model, checkpoint, precision="fp16" if fp16 else "fp32")
    return write_sidecar(path, description, "onnx", **artifact_info(description, part, resize, opset))


def build_parser() -> ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n\n")[0],
                       epilog="Exit codes: 0 written, 2 bad arguments, checkpoint or file (one line), 130 interrupted.")
    p.add_argument("--checkpoint", required=True, help="official pSp checkpoint (.pt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--part", choices=PARTS + ("all",), default="psp", help="what to export (default psp)")
    p.add_argument("--fp16", action="store_true", help="fp16 activations (styles, demodulation, mapping stay fp32)")
    p.add_argument("--resize", action="store_true", help="output 256x256 (official face_pool)")
    p.add_argument("--opset", type=int_at_least(17), default=OPSET, help=f"ONNX opset, >= 17 (default {OPSET})")
    p.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of an old checkpoint you trust")
    return p


def _body(args: argparse.Namespace) -> int:
    from reference import load_psp

    model = EnginePSP(load_psp(args.checkpoint, trust_pickle=args.trust_pickle))
    parts = PARTS if args.part == "all" else (args.part,)
    stem = Path(args.checkpoint).stem
    for part in parts:
        name = f"{stem}.{part}{'.resize' if args.resize else ''}{'.fp16' if args.fp16 else ''}.onnx"
        out = export_onnx(model, Path(args.out) / name, part, args.resize, args.fp16, args.opset, args.checkpoint)
        data = data_path(out)
        mib = sum(f.stat().st_size for f in (out, data) if f.is_file()) / 2**20
        also = f", {data.name}" if data.is_file() else ""
        print(f"wrote {out} ({mib:.0f} MiB with its weights{also}) and {sidecar_path(out).name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m export.onnx`: export a pSp checkpoint's pipeline or parts. Exit 0 ok, 2 on bad input, 130 interrupted."""
    return run_cli(build_parser(), _body, argv, interrupted="nothing half-written is left; rerun the same command")


if __name__ == "__main__":
    sys.exit(main())
