"""The backend registry: every way this project runs pSp, one row each, read by everything that lists backends.

`engine.load`, `--backend auto`, the `--backend`/`--precision` help texts, `export.parity` and the
benchmarks all read `BACKENDS`; a new backend is one module (its loader) plus one row here.

Each loader returns a *backend model*: an object with
- `description`: a `reference.description.ModelDescription` (sizes, n_styles, precision, backend),
- `encode(x)`: x `[B, input_nc, 256, 256]` float32 -> w_plus `[B, n_styles, 512]` float32,
- `synthesize(w_plus)`: -> img `[B, 3, R, R]` float32 at full resolution (the `Engine` applies the
  official 256 resize once, for every backend),
- optionally `mapping(z)`: z `[B, 512]` -> w `[B, 512]` (else the engine builds it from the checkpoint).

Precision: "fp32", "bf16" or "fp16" is the activation dtype; the style affines, demodulation,
mapping and PixelNorm stay fp32 in every precision and the IO is fp32. `resolve` picks the backend
and precision for "auto" and says why.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from reference.errors import UsageError
from reference.platform import bf16_units, cpu_model

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class LoadRequest:
    """What a loader gets.

    Attributes:
        path: the checkpoint file (for "tensorrt": the plans' stem).
        device: the torch device.
        precision: a concrete precision this backend offers on this device.
        trust_pickle: allow full unpickling of an old checkpoint (see `reference.read_checkpoint`).
        cache: the engine cache folder (`reference.files.cache_dir()`).
        announce: one-line progress notes (exports, builds), or None.
    """

    path: Path
    device: torch.device
    precision: str
    trust_pickle: bool
    cache: Path
    announce: Callable[[str], None] | None = None

    def reference(self):
        """The `reference.PSP` of `path` on `device` (fp32, eval)."""
        from reference import load_psp

        return load_psp(self.path, trust_pickle=self.trust_pickle).to(self.device)


@dataclass(frozen=True)
class Backend:
    """One registry row.

    Attributes:
        name: the `--backend` value.
        summary: one phrase for help texts.
        precisions: device type -> the precisions offered there, best first.
        package: the Python package it needs (None: torch only).
        load: `LoadRequest -> backend model`.
        takes: "checkpoint" (a pSp .pt) or "plans" (TensorRT plans' stem).
    """

    name: str
    summary: str
    precisions: dict[str, tuple[str, ...]]
    package: str | None
    load: Callable[[LoadRequest], object]
    takes: str = "checkpoint"

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(self.precisions)

    def installed(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None


# ------------------------------------------------------------------------------------------------
# Loaders


def _load_reference(req: LoadRequest):
    from reference.description import describe

    psp = req.reference()
    psp.description = describe(psp, req.path, precision="fp32", backend="reference")
    return psp


def _load_engine(req: LoadRequest):
    from .engine_model import EnginePSP

    if req.device.type == "cpu" and req.precision == "bf16" and not bf16_units() and req.announce:
        req.announce(f"warning: this CPU ({cpu_model()}) has no bf16 units: torch emulates bf16 through fp32, "
                     "measured 4-130x slower than fp32 per convolution (benchmarks/RESULTS.md); use --precision fp32")

    return EnginePSP(req.reference(), impl="torch", precision=req.precision, checkpoint=str(req.path),
                     backend="engine").to(req.device)


def _load_triton(req: LoadRequest):
    from kernels._triton import KernelUnavailableError, check_impl

    try:
        check_impl("backend 'triton'", "triton", torch.empty(0, device=req.device))
    except KernelUnavailableError as e:
        raise UsageError(str(e).replace("impl='triton'", "--backend triton")
                         .replace(", or use impl='ref'", "")) from None
    from .engine_model import EnginePSP

    model = EnginePSP(req.reference(), impl="triton", precision=req.precision, checkpoint=str(req.path),
                      backend="triton").to(req.device)
    if req.device.type == "cuda":
        model.encoder.to(memory_format=torch.channels_last)
    return model


def _graph_loader(runtime: str) -> Callable[[LoadRequest], object]:
    def load(req: LoadRequest):
        from reference.checkpoint import read_checkpoint

        from .graph import ReferenceLoader, load_graph_backend

        if not req.path.is_file():
            read_checkpoint(req.path)  # raises the CheckpointError naming the problem
        # the export (first use only) runs in a child process: its torch memory does not stay here
        return load_graph_backend(runtime, req.path, ReferenceLoader(req.path, req.trust_pickle), req.cache,
                                  req.precision, req.announce)

    load.__doc__ = f"The cached ONNX graphs of the engine formulation on {runtime} (exported on first use)."
    return load


def _load_tensorrt(req: LoadRequest):
    from .tensorrt import TensorRTError, load_tensorrt_backend

    try:
        return load_tensorrt_backend(req.path, req.device)
    except TensorRTError as e:
        raise UsageError(str(e)) from None


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("reference", "the official formulation (reference/)", {"cpu": ("fp32",), "cuda": ("fp32",)},
            None, _load_reference),
    Backend("engine", "the static-weight engine formulation in torch", {"cpu": ("bf16", "fp32"), "cuda": ("fp16", "bf16", "fp32")},
            None, _load_engine),
    Backend("onnxruntime", "that formulation as ONNX graphs (cached) on ONNX Runtime", {"cpu": ("fp32",)},
            "onnxruntime", _graph_loader("onnxruntime")),
    Backend("openvino", "the same ONNX graphs compiled by OpenVINO's CPU plugin", {"cpu": ("bf16", "fp32")},
            "openvino", _graph_loader("openvino")),
    Backend("triton", "engine formulation with the synthesis on the Triton kernels (CPU only under "
            "TRITON_INTERPRET=1, for tests)", {"cuda": ("fp16", "fp32"), "cpu": ("fp32",)}, "triton", _load_triton),
    Backend("tensorrt", "TensorRT plans from python -m export.tensorrt (--checkpoint names the plans)",
            {"cuda": ("fp16",)}, "tensorrt", _load_tensorrt, takes="plans"),
)}

# What "auto" picks, per (device type, precision), fastest first; a backend whose package is not
# installed is passed over. CPU: measured side by side (benchmarks/RESULTS.md "CPU engines"). CUDA:
# no measurement yet (no GPU has been at hand): the Triton kernels in fp16, as issue 12 prescribes,
# until `python -m benchmarks.gpu_suite` records one.
AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("cpu", "fp32"): ("openvino", "onnxruntime", "engine"),
    ("cpu", "bf16"): ("openvino", "engine"),
    ("cuda", "fp16"): ("triton", "engine"),
    ("cuda", "bf16"): ("engine",),
    ("cuda", "fp32"): ("engine",),
}


def auto_precision(device: torch.device) -> tuple[str, str]:
    """The default precision for a device and the reason: CUDA fp16; CPU bf16 where it has bf16 units
    (AMX-BF16 or AVX512-BF16, read from its flags), else fp32."""
    if device.type == "cuda":
        return "fp16", "CUDA: fp16 (tensor cores)"
    units = bf16_units()
    if units:
        return "bf16", f"this CPU ({cpu_model()}) has bf16 units ({', '.join(units)})"
    return "fp32", f"this CPU ({cpu_model()}) has no bf16 units (no amx_bf16 or avx512_bf16 flag)"


def resolve(backend: str, device: torch.device, precision: str = "auto") -> tuple[str, str, str]:
    """The backend and precision to run, and why.

    Args:
        backend: "auto" or a `BACKENDS` name.
        device: the torch device.
        precision: "auto" or one of `PRECISIONS`.

    Returns:
        `(backend, precision, reason)`.

    Raises:
        UsageError: an unknown backend or precision, a backend that does not run on this device or
            in this precision (the message lists what does), or one whose package is missing.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; available: auto, {', '.join(BACKENDS)}")
    if precision != "auto" and precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; available: auto, {', '.join(PRECISIONS)}")
    dev = device.type
    if precision == "auto":
        precision, why = auto_precision(device)
        if backend != "auto":
            offered = BACKENDS[backend].precisions.get(dev, ())
            if precision not in offered and offered:
                precision, why = ("fp32" if "fp32" in offered else offered[0]), f"{why}; {backend} runs {offered[0]}"
    else:
        why = "asked for"
    if backend == "auto":
        for name in AUTO_ORDER.get((dev, precision), ()):
            if BACKENDS[name].installed():
                return name, precision, f"precision {precision}: {why}; backend {name}: the fastest measured installed"
        raise UsageError(f"no installed backend runs {precision} on {dev}; use --precision fp32")
    b = BACKENDS[backend]
    if dev not in b.precisions:
        raise UsageError(f"backend {backend!r} does not run on {dev} (it runs on: {', '.join(b.devices)})")
    if precision not in b.precisions[dev]:
        raise UsageError(f"backend {backend!r} offers {', '.join(b.precisions[dev])} on {dev}, not {precision}; "
                         f"backends with {precision} on {dev}: "
                         f"{', '.join(n for n, r in BACKENDS.items() if precision in r.precisions.get(dev, ())) or 'none'}")
    if not b.installed():
        raise UsageError(f"backend {backend!r} needs the {b.package} package (pip install {b.package})")
    return backend, precision, f"precision {precision}: {why}; backend {backend}: asked for"


def help_text() -> str:
    """The `--backend` help: every row, with its precisions per device (from the registry)."""
    rows = []
    for b in BACKENDS.values():
        where = "; ".join(f"{d}: {'/'.join(p)}" for d, p in b.precisions.items())
        rows.append(f"{b.name} = {b.summary} ({where})")
    return ("implementation (default auto: per device and precision the fastest measured that is installed: "
            + ", ".join(f"{d} {p}: {'/'.join(o)}" for (d, p), o in AUTO_ORDER.items()) + "). " + "; ".join(rows))


def markdown_table() -> str:
    """The README's backend table, from the registry (a test keeps the README equal to it)."""
    lines = ["| backend (`--backend`, `engine.load(backend=...)`) | what runs | precisions (`--precision`) per device | needs |",
             "|---|---|---|---|"]
    for b in BACKENDS.values():
        precs = "; ".join(f"{d}: {', '.join(p)}" for d, p in b.precisions.items())
        lines.append(f"| `{b.name}` | {b.summary} | {precs} | {b.package or 'torch'} |")
    return "\n".join(lines)
