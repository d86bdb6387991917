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
mapping and PixelNorm stay fp32 in every precision and the IO is fp32. "int8" (openvino only) runs
NNCF-quantized graphs (`export.quantize`: int8 convolutions where the recipe quantizes, the rest in
bf16 where the CPU has bf16 units, else fp32); `auto` never picks it. `resolve` picks the backend
and precision for "auto" and says why.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Protocol, runtime_checkable

import torch

from reference.description import ModelDescription
from reference.plumbing.errors import UsageError
from reference.plumbing.files import cache_dir
from reference.plumbing.platform import bf16_units, cpu_model

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
BASELINE = "reference"  # the row every other row is compared against (parity, benchmarks): the official formulation


class Choice(NamedTuple):
    """What `resolve` picked, once per load: the row, the precision it runs in, and why.

    Attributes:
        backend: a `BACKENDS` name.
        precision: a concrete precision that row offers on the device ("fp32", "bf16", "fp16").
        reason: one phrase: auto's choice and its grounds, or "asked for".
    """

    backend: str
    precision: str
    reason: str


@dataclass(frozen=True)
class LoadRequest:
    """What a loader gets.

    Attributes:
        path: the checkpoint file (for "tensorrt": the plans' stem).
        device: the torch device.
        precision: a concrete precision this backend offers on this device.
        trust_pickle: allow full unpickling of an old checkpoint (see `reference.read_checkpoint`).
        cache: the engine cache folder (`reference.plumbing.files.cache_dir()`).
        announce: one-line progress notes (exports, builds), or None.
        calibration: int8 only: a folder of example inputs to calibrate the quantization on (None:
            the self-made set, `export.quantize.Calibration`).
    """

    path: Path
    device: torch.device
    precision: str
    trust_pickle: bool
    cache: Path
    announce: Callable[[str], None] | None = None
    calibration: Path | None = None

    def reference(self):
        """The `reference.PSP` of `path` on `device` (fp32, eval)."""
        from reference import load_psp

        return load_psp(self.path, trust_pickle=self.trust_pickle).to(self.device)


@runtime_checkable
class BackendModel(Protocol):
    """What every registry row's loader returns (checked over the registry by
    tests/test_backend_interface.py).

    Attributes:
        description: the model's facts (`reference.description.ModelDescription`: sizes, n_styles,
            opts, latent_avg, checkpoint), with the backend's name and the precision it runs;
            everyone reads the facts here, no one copies them.

    Methods:
        encode(x): x `[B, input_nc, 256, 256]` float32 -> w_plus `[B, n_styles, 512]` float32.
        synthesize(w_plus): -> img `[B, 3, R, R]` float32 at full resolution R = output_size (the
            `Engine` is the one place that applies the official 256 resize).

    Optional: `mapping` (a module z `[B, 512]` -> w `[B, 512]`); without it the `Engine` builds the
    mapping network from the checkpoint (rows with `takes == "checkpoint"` only).

    Nothing else is part of the interface: sizes, n_styles, opts, backend and precision are read from
    `description`, and no backend model resizes (`synthesize` has no `resize` parameter).
    """

    description: ModelDescription

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def synthesize(self, w_plus: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Backend:
    """One registry row.

    Attributes:
        name: the `--backend` value.
        summary: one phrase for help texts.
        precisions: device type -> the precisions offered there, best first.
        package: the Python package it needs (None: torch only).
        load: `LoadRequest -> BackendModel`; call it through `load_model`, which checks the result.
        takes: "checkpoint" (a pSp .pt) or "plans" (TensorRT plans' stem).
        emulated_on: device types where the row runs only emulated or interpreted, for tests, not
            for speed (the Triton kernels on a CPU under TRITON_INTERPRET=1); benchmarks pass them over.
    """

    name: str
    summary: str
    precisions: dict[str, tuple[str, ...]]
    package: str | None
    load: Callable[[LoadRequest], BackendModel]
    takes: str = "checkpoint"
    emulated_on: tuple[str, ...] = ()

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

        from .graph import GraphPSP, ReferenceLoader, cached_graphs, check_openvino_precision, load_graph_backend

        if not req.path.is_file():
            read_checkpoint(req.path)  # raises the CheckpointError naming the problem
        loader = ReferenceLoader(req.path, req.trust_pickle)
        if req.precision != "int8":
            # the export (first use only) runs in a child process: its torch memory does not stay here
            return load_graph_backend(runtime, req.path, loader, req.cache, req.precision, req.announce)
        from ..quantize import Calibration, cached_int8_graphs

        check_openvino_precision("int8")  # before any export or quantization
        paths = cached_int8_graphs(cached_graphs(req.path, loader, req.cache / "onnx", req.announce), req.path,
                                   Calibration(req.calibration), announce=req.announce)
        return GraphPSP(paths["encoder"], paths["generator"], runtime, "int8", req.cache, announce=req.announce)

    load.__doc__ = f"The cached ONNX graphs of the engine formulation on {runtime} (exported on first use)."
    return load


def _load_tensorrt(req: LoadRequest):
    from ..tensorrt.common import TensorRTError
    from ..tensorrt.runtime import load_tensorrt_backend

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
    Backend("openvino", "the same ONNX graphs compiled by OpenVINO's CPU plugin (int8: NNCF-quantized, opt-in)",
            {"cpu": ("bf16", "fp32", "int8")},
            "openvino", _graph_loader("openvino")),
    Backend("triton", "engine formulation with the synthesis on the Triton kernels (CPU only under "
            "TRITON_INTERPRET=1, for tests)", {"cuda": ("fp16", "fp32"), "cpu": ("fp32",)}, "triton", _load_triton,
            emulated_on=("cpu",)),
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
    ("cpu", "int8"): ("openvino",),  # only when asked for: auto_precision never picks int8
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


def resolve(backend: str, device: torch.device, precision: str = "auto") -> Choice:
    """The backend and precision to run, and why: resolved once per load, then carried (`load_model`
    gives the `Choice` to the row's loader, whose model's `description` records it).

    Args:
        backend: "auto" or a `BACKENDS` name.
        device: the torch device.
        precision: "auto" (never "int8": its error on a user's trained weights cannot be proven here;
            `python -m export.parity --precision int8` checks it) or one of `PRECISIONS`.

    Returns:
        `Choice(backend, precision, reason)` (a named tuple).

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
                return Choice(name, precision, f"precision {precision}: {why}; backend {name}: the fastest measured installed")
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
    return Choice(backend, precision, f"precision {precision}: {why}; backend {backend}: asked for")


def check_calibration(precision: str, calibration: object) -> None:
    """Refuse a calibration folder for a precision that is not quantized.

    Raises:
        UsageError: `calibration` given and `precision` is not "int8".
    """
    if calibration is not None and precision != "int8":
        raise UsageError(f"--calibration applies to --precision int8 only (this run's precision is {precision}); "
                         "leave it out or add --precision int8")


def load_model(choice: Choice, path: Path, device: torch.device, trust_pickle: bool = False,
               cache: Path | None = None, announce: Callable[[str], None] | None = None,
               calibration: Path | None = None) -> BackendModel:
    """Load `path` with the row `choice` names, in the precision it resolved (no second resolution).

    Args:
        choice: from `resolve` (for this `device`).
        path, device, trust_pickle, announce, calibration: as in `LoadRequest`; cache: default
            `reference.plumbing.files.cache_dir()`.

    Returns:
        The row's `BackendModel`, whose `description.backend` is `choice.backend` and, for rows that
        take a checkpoint, whose `description.precision` is `choice.precision` (TensorRT plans
        record the precision they were built in).

    Raises:
        UsageError, CheckpointError: as the row's loader raises them; UsageError: a calibration
            folder for a precision other than int8.
        TypeError: a loader whose model does not present the interface or misstates its facts (a
            bug of that loader, named).
    """
    row = BACKENDS[choice.backend]
    check_calibration(choice.precision, calibration)
    model = row.load(LoadRequest(Path(path), device, choice.precision, trust_pickle, cache or cache_dir(), announce,
                                 None if calibration is None else Path(calibration)))
    d = getattr(model, "description", None)
    problems = [] if isinstance(model, BackendModel) else ["no encode/synthesize/description"]
    if d is not None and d.backend != choice.backend:
        problems.append(f"description.backend {d.backend!r}")
    if d is not None and row.takes == "checkpoint" and d.precision != choice.precision:
        problems.append(f"description.precision {d.precision!r} for {choice.precision!r}")
    if problems:
        raise TypeError(f"the {choice.backend!r} loader returned a {type(model).__name__} that does not present "
                        f"export.backends.BackendModel: {'; '.join(problems)}")
    return model


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
