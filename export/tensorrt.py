"""TensorRT plans from the ONNX export: build, run, compare, time; and the `tensorrt` engine backend.

Source: the TensorRT Python API (10.x "IBuilderConfig", "IOptimizationProfile", "ITimingCache",
"Onnx Parser", "Runtime", "ICudaEngine", "IExecutionContext" pages; 11.x "Migrating from TensorRT
10.x to 11.x") and Polygraphy's shape of things (`EngineFromNetwork(NetworkFromOnnxPath(p),
config=CreateConfig(fp16=True))`, runners as context managers, one comparator, results as JSON).
The ONNX files and their sidecars come from `python -m export.onnx`.

Pieces, each usable alone:
  * `build_engine(onnx, plan, ...)`: parse the ONNX, one optimisation profile per (min, opt, max)
    batch triple, FP16 with the style/demodulation/mapping layers pinned to fp32, a timing cache,
    optional version compatibility; writes `<plan>` and its sidecar `<plan>.json` atomically.
  * `TensorRTRunner(plan)`: a context manager that loads a plan and runs dicts of torch tensors,
    choosing the profile per batch size and splitting larger batches into chunks.
  * `parity_report` (a plan against the fp32 ONNX in ONNX Runtime) and `latency_report` (CUDA
    events, warm-up apart, p50/p90 ms and img/s per batch size), both written as JSON.
  * `load_tensorrt_backend(path, device)`: `encode`/`synthesize` on an encoder plan and a generator
    plan side by side (`<stem>.encoder.plan`, `<stem>.generator.plan`), for `engine.load`.
  * `python -m export.tensorrt --onnx M.onnx --plan M.plan [--fp16] [--profile 1,4,8] ...`.

Precision, by TensorRT version (decided once, in `precision_mode`):
  * TensorRT 10.x and an fp32 ONNX with `fp16=True`: weak typing, `BuilderFlag.FP16` plus
    `OBEY_PRECISION_CONSTRAINTS`, and every layer whose name contains one of
    `FP32_NODE_PATTERNS` gets `layer.precision = float32` and float32 outputs.
  * An ONNX that already holds fp16 tensors (`export.onnx --fp16`), or any build on TensorRT
    >= 11 (which removed the FP16 and precision-constraint flags: strong typing only): a strongly
    typed network; the precision is the ONNX's own, so the fp32 islands are the exporter's job.
    `fp16=True` with an fp32-only ONNX on TensorRT >= 11 is refused with the fix.
  * `fp16=False`: an fp32 plan with TF32 switched off (the builder enables it by default).

`tensorrt` is imported inside functions only: this module imports, and its pure parts (profiles,
chunking, the fp32 layer matcher, the sidecar, the CLI parser) run, without it. Outputs are compared by
the one comparator and tolerance table of `export.compare`.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from reference.cli import ArgumentParser, int_at_least, run_cli, say
from reference.errors import PSPError, UsageError
from reference.files import atomic_write_bytes, write_json

from reference.description import ModelDescription, read_sidecar, sidecar_path, write_sidecar

from .compare import TOL, compare_outputs, parity_tolerance

# Layers whose ONNX node names contain one of these stay fp32 in an FP16 build: the style affines,
# the demodulation coefficients (rsqrt of a sum of squares: overflows and underflows in fp16), the
# mapping network and its pixel norm. The names come from module paths in `export/engine_model.py`.
FP32_NODE_PATTERNS: tuple[str, ...] = ("/affine", "/demod", "/mapping", "/pixel_norm")

DEFAULT_WORKSPACE_MIB = 4096
PLAN_KIND = "tensorrt-plan"  # the artifact kind of a plan's sidecar (`reference.description`)
# what a plan sidecar's artifact part keeps of the ONNX's (`export.onnx.artifact_info`)
COPIED_ONNX_INFO = ("part", "resize", "image_size", "opset")
BUILD_KEYS = ("tensorrt_version", "gpu", "inputs", "outputs", "profiles", "flags", "build_time_s")

TRT_MISSING = ("tensorrt is not installed (its libraries cannot be installed on this CPU-only machine); "
               "on a machine with an NVIDIA GPU and CUDA: pip install tensorrt")


class TensorRTError(PSPError):
    """A TensorRT step failed for a reason the user can fix (bad ONNX, wrong plan, GPU mismatch)."""


class TensorRTUnavailableError(TensorRTError):
    """TensorRT or a CUDA device is missing on this machine."""


# ----------------------------------------------------------------------------------------------
# environment


def import_tensorrt():
    """Import the `tensorrt` module.

    Returns:
        The module.

    Raises:
        TensorRTUnavailableError: not installed, or its libraries do not load (no CUDA).
    """
    try:
        import tensorrt as trt  # noqa: PLC0415  (lazy by design)
    except ImportError as e:
        if getattr(e, "name", None) == "tensorrt":
            raise TensorRTUnavailableError(TRT_MISSING) from None
        raise TensorRTUnavailableError(f"tensorrt is installed but does not import ({e}); it needs CUDA and "
                                       "an NVIDIA driver") from None
    except OSError as e:  # a shared library that does not load
        raise TensorRTUnavailableError(f"tensorrt is installed but its libraries do not load ({e}); it needs "
                                       "CUDA and an NVIDIA driver") from None
    return trt


def tensorrt_major(trt) -> int:
    """The major version of an imported `tensorrt` module (10, 11, ...)."""
    return int(str(trt.__version__).split(".")[0])


def cuda_device(device: str | torch.device = "cuda") -> torch.device:
    """Check that torch can use the CUDA device a plan runs on.

    Args:
        device: "cuda" or "cuda:<index>".

    Returns:
        The `torch.device`, with its index filled in.

    Raises:
        TensorRTUnavailableError: torch has no CUDA (a CPU-only build or no GPU) or no such index.
        TensorRTError: a non-CUDA device.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        raise TensorRTError(f"TensorRT plans run on a CUDA device, got device {str(device)!r}; use --device cuda")
    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(f"no CUDA device (torch {torch.__version__} sees none): TensorRT plans need "
                                       "an NVIDIA GPU and a CUDA build of torch")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise TensorRTUnavailableError(f"device cuda:{index} requested, only {torch.cuda.device_count()} visible")
    return torch.device("cuda", index)


def gpu_info(index: int = 0) -> dict[str, Any]:
    """Name and compute capability of a GPU: from torch if it has CUDA, else from the driver (libcuda).

    Args:
        index: CUDA device ordinal.

    Returns:
        `{"name": str, "compute_capability": "8.6", "index": int}`.

    Raises:
        TensorRTUnavailableError: no CUDA device visible to either.
    """
    if torch.cuda.is_available() and index < torch.cuda.device_count():
        major, minor = torch.cuda.get_device_capability(index)
        return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}", "index": index}
    try:  # the driver API: stable entry points, no toolkit needed (TensorRT builds do not need torch)
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise TensorRTUnavailableError("no CUDA device: torch sees none and the NVIDIA driver (libcuda.so.1) is "
                                       "not installed") from None
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if (cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(dev), index) != 0
            or cuda.cuDeviceGetName(name, 256, dev) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) != 0    # ..._COMPUTE_CAPABILITY_MAJOR
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev) != 0):  # ..._COMPUTE_CAPABILITY_MINOR
        raise TensorRTUnavailableError(f"no CUDA device {index}: the NVIDIA driver reports none")
    return {"name": name.value.decode(), "compute_capability": f"{major.value}.{minor.value}", "index": index}


# ----------------------------------------------------------------------------------------------
# optimisation profiles and batching


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: the batch sizes (min, opt, max) every input's dim 0 takes in it."""

    name: str
    min: int
    opt: int
    max: int

    def covers(self, batch: int) -> bool:
        """True when `min <= batch <= max`."""
        return self.min <= batch <= self.max

    def as_dict(self) -> dict[str, Any]:
        """`{"name", "min", "opt", "max"}` for JSON."""
        return {"name": self.name, "min": self.min, "opt": self.opt, "max": self.max}


def _triple(value: Any, what: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = (value, value, value)
    try:
        mn, opt, mx = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected (min, opt, max) batch sizes, got {value!r}") from None
    if not 1 <= mn <= opt <= mx:
        raise ValueError(f"{what}: need 1 <= min <= opt <= max, got ({mn}, {opt}, {mx})")
    return mn, opt, mx


def normalize_profiles(profiles: Sequence[Any] | Mapping[str, Any]) -> list[Profile]:
    """Profiles from a list of (min, opt, max) triples (named p0, p1, ...) or a dict name -> triple.

    Args:
        profiles: e.g. `[(1, 1, 1), (2, 4, 8)]` or `{"single": (1, 1, 1), "batch": (2, 4, 8)}`; an
            int `b` stands for `(b, b, b)`.

    Returns:
        The `Profile`s in order (profile index i is the i-th).

    Raises:
        ValueError: an empty list, a bad triple, or duplicate names.
    """
    items = list(profiles.items()) if isinstance(profiles, Mapping) else [(f"p{i}", p) for i, p in enumerate(profiles)]
    if not items:
        raise ValueError("at least one optimisation profile is needed")
    out = [Profile(str(name), *_triple(value, f"profile {name!r}")) for name, value in items]
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ValueError(f"profile names must be unique, got {names}")
    return out


def parse_profile_arg(text: str) -> tuple[int, int, int]:
    """`--profile` text: "1,4,8" -> (1, 4, 8); "4" -> (4, 4, 4).

    Raises:
        argparse.ArgumentTypeError: not one or three positive integers in order.
    """
    try:
        values = [int(v) for v in text.split(",")]
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise ValueError("need 1 or 3 values")
        return _triple(values, "--profile")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--profile {text!r}: {e}; use MIN,OPT,MAX batch sizes, e.g. 1,4,8") from None


def profile_shapes(shape: Sequence[int], profile: Profile) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The min/opt/max shapes of one input in one profile: its shape with dim 0 set to the batch sizes.

    Args:
        shape: the network input's shape, `-1` (or None) for dynamic dims, e.g. `(-1, 3, 256, 256)`.
        profile: the batch sizes.

    Returns:
        `(min_shape, opt_shape, max_shape)`.

    Raises:
        ValueError: a dynamic dim other than the batch (the ONNX contract has only "batch").
    """
    dims = [-1 if d is None else int(d) for d in shape]
    if not dims:
        raise ValueError("a scalar input has no batch dim")
    if any(d < 0 for d in dims[1:]):
        raise ValueError(f"input shape {tuple(dims)}: only dim 0 (batch) may be dynamic")
    rest = tuple(dims[1:])
    return (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest)


def select_profile(profiles: Sequence[Profile], batch: int) -> int | None:
    """Index of the profile to run a batch in: it covers the batch, its opt is nearest, its range narrowest.

    Returns:
        The index, or None when no profile covers `batch`.
    """
    covering = [(abs(p.opt - batch), p.max - p.min, i) for i, p in enumerate(profiles) if p.covers(batch)]
    return min(covering)[2] if covering else None


@dataclass(frozen=True)
class Chunk:
    """A slice `[start, stop)` of a batch, run as `run_batch` samples (padded by repeating the last) in a profile."""

    start: int
    stop: int
    run_batch: int
    profile: int


def plan_chunks(n: int, profiles: Sequence[Profile]) -> list[Chunk]:
    """Split a batch of `n` into chunks the profiles can run: full chunks of the largest max batch,
    the remainder as is if a profile covers it, else padded up to the smallest profile min above it.

    Args:
        n: the batch size asked for (>= 1).
        profiles: the plan's profiles.

    Returns:
        The chunks in order; padding only ever appears in the last one.
    """
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    top = max(p.max for p in profiles)
    chunks, start = [], 0
    while start < n:
        size = min(top, n - start)
        run = size
        index = select_profile(profiles, size)
        if index is None:  # size is below every covering range: pad to the nearest min above it
            run = min(p.min for p in profiles if p.min > size)
            index = select_profile(profiles, run)
        chunks.append(Chunk(start, start + size, run, index))
        start += size
    return chunks


# ----------------------------------------------------------------------------------------------
# precision


def match_fp32_layers(names: Iterable[str], patterns: Sequence[str] = FP32_NODE_PATTERNS) -> list[str]:
    """The names (ONNX nodes or TensorRT layers) that contain one of the fp32 patterns, in order.

    TensorRT's ONNX parser names layers after the ONNX nodes (sometimes with a suffix), so a
    substring test works for both. Dots count as slashes, so that names made from parameter paths
    (`decoder.convs.0.conv.affine.weight`, initializers and their constant layers) match too.
    """
    return [name for name in names if any(p in name.replace(".", "/") for p in patterns)]


def onnx_fp16_count(onnx_path: str | os.PathLike) -> int:
    """How many fp16 tensors an ONNX declares: fp16 initializers, value infos, IO and Casts to fp16.

    Zero means an fp32 graph (TensorRT 10 can still run it in FP16 with weak typing); more means a
    mixed-precision graph (`export.onnx --fp16`) that must be built strongly typed.
    """
    import onnx  # noqa: PLC0415

    model = onnx.load(str(onnx_path), load_external_data=False)
    fp16 = onnx.TensorProto.FLOAT16
    g = model.graph
    count = sum(t.data_type == fp16 for t in g.initializer)
    count += sum(v.type.tensor_type.elem_type == fp16 for v in list(g.value_info) + list(g.input) + list(g.output))
    for node in g.node:
        if node.op_type == "Cast":
            count += sum(a.name == "to" and a.i == fp16 for a in node.attribute)
        if node.op_type == "Constant":
            count += sum(a.name == "value" and a.t.data_type == fp16 for a in node.attribute)
    return count


def precision_mode(fp16: bool, onnx_has_fp16: bool, weak_typing: bool) -> str:
    """How a plan gets its precision.

    Args:
        fp16: FP16 asked for.
        onnx_has_fp16: the ONNX holds fp16 tensors (`onnx_fp16_count > 0`).
        weak_typing: this TensorRT has `BuilderFlag.FP16` (10.x; removed in 11.x).

    Returns:
        "strong" (strongly typed: the ONNX's own types), "fp16-weak" (FP16 flag + fp32 pinning), or
        "fp32" (weakly typed fp32, TF32 off).

    Raises:
        TensorRTError: FP16 asked for on TensorRT >= 11 from an fp32-only ONNX.
    """
    if onnx_has_fp16:
        return "strong"
    if not fp16:
        return "fp32" if weak_typing else "strong"
    if weak_typing:
        return "fp16-weak"
    raise TensorRTError("this TensorRT has no FP16 builder flag (TensorRT 11 builds strongly typed networks only) "
                        "and the ONNX is fp32; export the fp16 ONNX (python -m export.onnx --fp16) and build from it")


# ----------------------------------------------------------------------------------------------
# files


def _file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path), "size": path.stat().st_size, "sha256": h.hexdigest()}


def plan_artifact_info(onnx_info: Mapping[str, Any], build: Mapping[str, Any]) -> dict[str, Any]:
    """The artifact part of a plan's sidecar: what the ONNX was (part, resize, image size, opset) and
    how the plan was built.

    Args:
        onnx_info: the ONNX sidecar's artifact info (`read_sidecar(onnx, "onnx")[1]`); `part` required.
        build: `tensorrt_version`, `gpu` (`{"name", "compute_capability", ...}`), `inputs` and
            `outputs` (`[{"name", "shape" (-1 for dynamic), "dtype"}]`), `profiles`
            (`[{"name", "min", "opt", "max"}]`), `flags` (dict), `build_time_s`; optional `onnx`
            (file digest), `fp32_layers` (names), `built_at`.

    Returns:
        The keyword arguments of `write_sidecar(plan, description, PLAN_KIND, **info)`:
        part, resize, image_size, opset, inputs, outputs, profiles, tensorrt_version, gpu
        (`{"name", "index"}`), compute_capability, flags, fp32_layers, build_time_s, built_at, onnx.

    Raises:
        TensorRTError: a required key of either argument is missing (named).
    """
    if "part" not in onnx_info:
        raise TensorRTError("ONNX sidecar lacks part; re-export with python -m export.onnx")
    missing = [k for k in BUILD_KEYS if k not in build]
    if missing:
        raise TensorRTError(f"build info lacks {', '.join(missing)}")
    gpu = dict(build["gpu"])
    if "compute_capability" not in gpu:
        raise TensorRTError("build info: gpu lacks compute_capability")

    def tensors(items):
        return [{"name": str(t["name"]), "shape": [int(d) for d in t["shape"]], "dtype": str(t["dtype"])}
                for t in items]

    info: dict[str, Any] = {k: onnx_info[k] for k in COPIED_ONNX_INFO if k in onnx_info}
    info.update({
        "inputs": tensors(build["inputs"]),
        "outputs": tensors(build["outputs"]),
        "profiles": [Profile(str(p["name"]), *_triple((p["min"], p["opt"], p["max"]), "profile")).as_dict()
                     for p in build["profiles"]],
        "tensorrt_version": str(build["tensorrt_version"]),
        "compute_capability": str(gpu.pop("compute_capability")),
        "gpu": gpu,
        "flags": dict(build["flags"]),
        "fp32_layers": list(build.get("fp32_layers", [])),
        "build_time_s": round(float(build["build_time_s"]), 3),
        "built_at": build.get("built_at") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    if "onnx" in build:
        info["onnx"] = dict(build["onnx"])
    return info


def write_plan_sidecar(plan_path: str | os.PathLike, description: ModelDescription, onnx_info: Mapping[str, Any],
                       build: Mapping[str, Any]) -> Path:
    """Write `<plan>.json` (`M.plan.json`), the one sidecar schema of `reference.description`, kind
    "tensorrt-plan": the ONNX's model description with the plan's precision (`build["flags"]
    ["precision"]`, default fp32) and `plan_artifact_info(onnx_info, build)`.

    Returns:
        The sidecar path.

    Raises:
        TensorRTError: as `plan_artifact_info`.
    """
    info = plan_artifact_info(onnx_info, build)
    precision = info["flags"].get("precision", "fp32")
    return write_sidecar(plan_path, description.replace(precision=precision), PLAN_KIND, **info)


# ----------------------------------------------------------------------------------------------
# build


def _dtype_name(trt, dtype) -> str:
    for name in ("float32", "float16", "bfloat16", "int8", "int32", "int64", "bool", "uint8"):
        if hasattr(trt, name) and dtype == getattr(trt, name):
            return name
    return str(dtype)


def _parser_errors(parser) -> list[str]:
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = f"node {err.node()}"
        if hasattr(err, "node_name"):  # TensorRT >= 10: the ONNX node's name and operator
            where += f" {err.node_name()!r} ({err.node_operator()})"
        lines.append(f"{where}: {err.desc()}")
    return lines


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, fp16: bool = True,
                 profiles: Sequence[Any] | Mapping[str, Any] = ((1, 1, 1),),
                 timing_cache: str | os.PathLike | None = None, version_compatible: bool = False,
                 exclude_lean_runtime: bool = False, workspace_mib: int = DEFAULT_WORKSPACE_MIB,
                 fp32_patterns: Sequence[str] = FP32_NODE_PATTERNS, verbose: bool = False) -> Path:
    """Build a TensorRT plan from an `export.onnx` file and write it with its sidecar.

    Source: TensorRT Python API: `Builder`, `OnnxParser.parse_from_file`, `IBuilderConfig`
    (`set_flag`, `set_memory_pool_limit`, `add_optimization_profile`, `create_timing_cache`,
    `set_timing_cache`), `ILayer.precision` / `set_output_type`, `build_serialized_network`.

    Args:
        onnx_path: ONNX from `python -m export.onnx` (its `<name>.onnx.json` sidecar beside it).
        plan_path: where to write the plan (atomically); the sidecar goes to `<plan>.json`.
        fp16: FP16 (see the module docstring for how, per TensorRT version); False: fp32, TF32 off.
        profiles: (min, opt, max) batch sizes per optimisation profile, a list or a dict
            name -> triple; each applies to dim 0 of every input.
        timing_cache: file read before the build (if it exists) and rewritten after it.
        version_compatible: `BuilderFlag.VERSION_COMPATIBLE` (the plan runs on later TensorRT
            runtimes of the same major version; the runtime must allow host code).
        exclude_lean_runtime: also `EXCLUDE_LEAN_RUNTIME` (smaller plan; the lean runtime library
            must then be given to the runtime); only with `version_compatible`.
        workspace_mib: builder workspace limit, MiB.
        fp32_patterns: layer-name substrings pinned to fp32 in a weakly typed FP16 build.
        verbose: TensorRT's verbose log.

    Returns:
        `Path(plan_path)`.

    Raises:
        TensorRTUnavailableError: no tensorrt, or no GPU for the builder.
        TensorRTError: a missing file or sidecar, ONNX parser errors (listed with node names), bad
            options, or a failed build.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise TensorRTError(f"{onnx_path}: no such ONNX file; export one with python -m export.onnx")
    description, onnx_info = read_sidecar(onnx_path, "onnx")
    profs = normalize_profiles(profiles)
    if exclude_lean_runtime and not version_compatible:
        raise TensorRTError("--exclude-lean-runtime only applies to version-compatible plans; add --version-compatible")
    trt = import_tensorrt()
    onnx_fp16 = onnx_fp16_count(onnx_path) > 0
    mode = precision_mode(fp16, onnx_fp16, hasattr(trt.BuilderFlag, "FP16"))
    gpu = gpu_info(0)

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except RuntimeError as e:
        raise TensorRTUnavailableError(f"TensorRT could not create a builder ({e}): no usable CUDA device?") from None
    if not builder:
        raise TensorRTUnavailableError("TensorRT could not create a builder (no usable CUDA device)")
    flags = 0
    if mode == "strong" and tensorrt_major(trt) < 11:  # always on (and the flag deprecated) from 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    errors = _parser_errors(parser)
    if not ok or errors:
        raise TensorRTError(f"{onnx_path}: TensorRT's ONNX parser failed: " + "; ".join(errors or ["no detail"]))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    for prof in profs:
        op = builder.create_optimization_profile()
        for t in inputs:
            try:
                mn, opt, mx = profile_shapes(tuple(t.shape), prof)
            except ValueError as e:
                raise TensorRTError(f"{onnx_path}: input {t.name!r}: {e}; re-export with only the batch "
                                    "dynamic") from None
            op.set_shape(t.name, mn, opt, mx)
        config.add_optimization_profile(op)

    pinned: list[str] = []
    if mode == "fp16-weak":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        floats = (trt.float32, trt.float16)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if not match_fp32_layers([layer.name], fp32_patterns):
                continue
            outs = [j for j in range(layer.num_outputs)
                    if layer.get_output(j) is not None and layer.get_output(j).dtype in floats]
            if not outs:  # shape / index arithmetic: no precision to pin
                continue
            layer.precision = trt.float32
            for j in outs:
                layer.set_output_type(j, trt.float32)
            pinned.append(layer.name)
    fp16_plan = mode == "fp16-weak" or (mode == "strong" and onnx_fp16)
    if not fp16_plan and hasattr(trt.BuilderFlag, "TF32"):  # an fp32 plan: no TF32 (on by default)
        config.clear_flag(trt.BuilderFlag.TF32)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if exclude_lean_runtime:
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)

    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if serialized is None:
        raise TensorRTError(f"{onnx_path}: TensorRT built no plan (its log above says why; if it mentions memory, "
                            "raise --workspace-mib)")
    atomic_write_bytes(plan_path, bytes(serialized))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))

    build = {
        "tensorrt_version": trt.__version__,
        "gpu": gpu,
        "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": _dtype_name(trt, t.dtype)} for t in inputs],
        "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": _dtype_name(trt, t.dtype)} for t in outputs],
        "profiles": [p.as_dict() for p in profs],
        "flags": {
            "precision": "fp16" if fp16_plan else "fp32",
            "precision_mode": mode,
            "strongly_typed": mode == "strong",
            "fp16_flag": mode == "fp16-weak",
            "obey_precision_constraints": mode == "fp16-weak",
            "tf32": bool(config.get_flag(trt.BuilderFlag.TF32)) if hasattr(trt.BuilderFlag, "TF32") else None,
            "version_compatible": bool(version_compatible),
            "exclude_lean_runtime": bool(exclude_lean_runtime),
            "workspace_mib": int(workspace_mib),
            "timing_cache": str(cache_path) if cache_path else None,
            "fp32_patterns": list(fp32_patterns),
        },
        "fp32_layers": pinned,
        "build_time_s": build_s,
        "onnx": _file_digest(onnx_path),
    }
    write_plan_sidecar(plan_path, description, onnx_info, build)
    return plan_path


# ----------------------------------------------------------------------------------------------
# run


def check_compute_capability(info: Mapping[str, Any], actual: Mapping[str, Any], plan_path: str | os.PathLike) -> None:
    """A plan runs only on the GPU architecture it was built for: compare the sidecar with this GPU.

    Args:
        info: the plan sidecar's artifact info (`compute_capability`, `gpu` `{"name", ...}`).
        actual: `gpu_info` of this GPU.

    Raises:
        TensorRTError: the compute capabilities differ (the message names both GPUs and the fix).
    """
    built = info.get("compute_capability")
    if str(built) != str(actual.get("compute_capability")):
        raise TensorRTError(
            f"{plan_path}: built for compute capability {built} ({info.get('gpu', {}).get('name')}), this "
            f"GPU is {actual.get('compute_capability')} ({actual.get('name')}); rebuild the plan on this GPU with "
            "python -m export.tensorrt")


def _torch_dtype(trt, dtype) -> torch.dtype:
    name = _dtype_name(trt, dtype)
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
             "int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "uint8": torch.uint8}
    if name not in table:
        raise TensorRTError(f"unsupported TensorRT tensor type {name}")
    return table[name]


class TensorRTRunner:
    """Runs a TensorRT plan on dicts of torch tensors: a context manager, like Polygraphy's runners.

    Source: TensorRT Python API `Runtime.deserialize_cuda_engine`, `ICudaEngine` (`num_io_tensors`,
    `get_tensor_name`, `get_tensor_mode`, `get_tensor_profile_shape`), `IExecutionContext`
    (`set_optimization_profile_async`, `set_input_shape`, `set_tensor_address`, `execute_async_v3`).

    Device memory is torch CUDA tensors; one execution context per profile (made on first use),
    all on one CUDA stream. A batch larger than every profile is split into chunks (`plan_chunks`).

    Example:
        with TensorRTRunner("psp.encoder.plan") as r:
            w_plus = r.infer({"x": x})["w_plus"]     # x [B, 3, 256, 256] float32
    """

    def __init__(self, plan_path: str | os.PathLike, device: str | torch.device = "cuda", *,
                 lean_runtime: str | os.PathLike | None = None, verbose: bool = False):
        """
        Args:
            plan_path: a plan from `build_engine` (its `<plan>.json` sidecar beside it).
            device: the CUDA device to run on.
            lean_runtime: the TensorRT lean runtime library, for plans built with
                `exclude_lean_runtime` (`Runtime.load_runtime`).
            verbose: TensorRT's verbose log.
        """
        self.plan_path = Path(plan_path)
        self.device_arg = device
        self.lean_runtime = lean_runtime
        self.verbose = verbose
        self.engine = None
        self.description: ModelDescription | None = None
        self.info: dict[str, Any] = {}

    # -- lifetime
    def __enter__(self) -> TensorRTRunner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> TensorRTRunner:
        """Load the plan (checks the sidecar's GPU against this one) and make the stream.

        Raises:
            TensorRTUnavailableError: no tensorrt or no CUDA.
            TensorRTError: missing plan or sidecar, another GPU architecture, a plan that does not
                deserialize (another TensorRT version), or a plan without a batch dim.
        """
        if self.engine is not None:
            return self
        if not self.plan_path.is_file():
            raise TensorRTError(f"{self.plan_path}: no such plan; build one with python -m export.tensorrt")
        self.description, self.info = read_sidecar(self.plan_path, PLAN_KIND)
        trt = import_tensorrt()
        self.device = cuda_device(self.device_arg)
        check_compute_capability(self.info, gpu_info(self.device.index), self.plan_path)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.VERBOSE if self.verbose else trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        flags = self.info.get("flags", {})
        if flags.get("version_compatible"):
            runtime.engine_host_code_allowed = True  # a version-compatible plan carries its lean runtime
            if flags.get("exclude_lean_runtime"):
                if self.lean_runtime is None:
                    raise TensorRTError(f"{self.plan_path}: built without its lean runtime (--exclude-lean-runtime); "
                                        "pass the lean runtime library (lean_runtime=...)")
                if not hasattr(runtime, "load_runtime"):
                    raise TensorRTError(f"tensorrt {trt.__version__} cannot load a lean runtime "
                                        "(no Runtime.load_runtime)")
                runtime = runtime.load_runtime(str(self.lean_runtime))
        self._runtime = runtime
        with torch.cuda.device(self.device):
            engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if engine is None:
            raise TensorRTError(f"{self.plan_path}: TensorRT {trt.__version__} could not load this plan (built with "
                                f"{self.info.get('tensorrt_version')}); rebuild it with this TensorRT")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.shapes = {n: tuple(engine.get_tensor_shape(n)) for n in names}
        self.dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        first = self.input_names[0]
        self.profiles = []
        for i in range(engine.num_optimization_profiles):
            mn, opt, mx = engine.get_tensor_profile_shape(first, i)
            sidecar = self.info.get("profiles", [])
            name = sidecar[i]["name"] if i < len(sidecar) else f"p{i}"
            self.profiles.append(Profile(name, int(mn[0]), int(opt[0]), int(mx[0])))
        self.engine = engine
        self.stream = torch.cuda.Stream(self.device)
        self._contexts: dict[int, Any] = {}
        return self

    def deactivate(self) -> None:
        """Free the contexts, the engine and the runtime."""
        if self.engine is None:
            return
        self.stream.synchronize()
        self._contexts.clear()
        self.engine = None
        self._runtime = None

    # -- running
    @property
    def max_batch(self) -> int:
        """The largest batch one execution takes (the largest profile max)."""
        return max(p.max for p in self.profiles)

    def _context(self, profile: int):
        ctx = self._contexts.get(profile)
        if ctx is None:
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise TensorRTError(f"{self.plan_path}: TensorRT could not create an execution context (GPU memory?)")
            if not ctx.set_optimization_profile_async(profile, self.stream.cuda_stream):
                raise TensorRTError(f"{self.plan_path}: could not select optimisation profile {profile}")
            self._contexts[profile] = ctx
        return ctx

    def _check_feed(self, feed: Mapping[str, torch.Tensor]) -> int:
        if self.engine is None:
            raise RuntimeError("TensorRTRunner is not active: use it in a `with` block or call activate()")
        if set(feed) != set(self.input_names):
            raise ValueError(f"{self.plan_path.name}: inputs {sorted(self.input_names)} expected, got {sorted(feed)}")
        batches = set()
        for name, t in feed.items():
            want = self.shapes[name]
            if t.ndim != len(want) or any(w >= 0 and w != s for w, s in zip(want[1:], t.shape[1:])):
                raise ValueError(f"{self.plan_path.name}: input {name!r} must be {list(want)} (-1: any), "
                                 f"got {list(t.shape)}")
            batches.add(int(t.shape[0]))
        if len(batches) != 1 or 0 in batches:
            raise ValueError(f"{self.plan_path.name}: inputs need one batch size >= 1, got {sorted(batches)}")
        return batches.pop()

    def _enqueue(self, feed: Mapping[str, torch.Tensor], profile: int) -> dict[str, torch.Tensor]:
        """Enqueue one execution on `self.stream` (inputs already on the device, right dtype, contiguous)."""
        ctx = self._context(profile)
        for name, t in feed.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"{self.plan_path.name}: input {name!r} shape {list(t.shape)} is outside profile "
                                 f"{self.profiles[profile].as_dict()}")
            ctx.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.output_names:
            out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outs[name] = out
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise TensorRTError(f"{self.plan_path}: execution failed (TensorRT's log above says why)")
        return outs

    def _prepare(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t.to(self.device, self.dtypes[n], non_blocking=True).contiguous() for n, t in feed.items()}

    def enqueue(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Enqueue `infer` on `self.stream` without waiting (for timing; `infer` is the safe call).

        Inputs are used as given when already on the device in the right dtype; the outputs are
        valid once `self.stream` is synchronised.
        """
        n = self._check_feed(feed)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            dev = self._prepare(feed)
            self._keep = [dev]  # inputs stay alive until the stream is synchronised
            parts = []
            for c in plan_chunks(n, self.profiles):
                chunk = {k: v[c.start:c.stop] for k, v in dev.items()}  # dim-0 slices: contiguous
                if c.run_batch > c.stop - c.start:  # pad by repeating the last sample; dropped below
                    pad = c.run_batch - (c.stop - c.start)
                    chunk = {k: torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for k, v in chunk.items()}
                    self._keep.append(chunk)
                out = self._enqueue(chunk, c.profile)
                parts.append({k: v[: c.stop - c.start] for k, v in out.items()})
            if len(parts) == 1:
                return parts[0]
            return {k: torch.cat([p[k] for p in parts]) for k in self.output_names}

    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the plan.

        Args:
            feed: input name -> tensor `[B, ...]` (any device; cast to the plan's input dtype).

        Returns:
            output name -> CUDA tensor `[B, ...]` in the plan's output dtype, computed.

        Raises:
            ValueError: wrong input names, shapes or batch sizes.
            TensorRTError: execution failed.
        """
        outs = self.enqueue(feed)
        self.stream.synchronize()
        self._keep = None
        return outs


# ----------------------------------------------------------------------------------------------
# reports


def default_inputs(description: ModelDescription, info: Mapping[str, Any], batch: int,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for a plan: `x` uniform in [-1, 1]; `w_plus` = latent_avg + 0.5 N(0, 1).

    Args:
        description: the plan's model description (latent_avg `[n_styles][512]`).
        info: the plan sidecar's artifact info (input names and shapes).
        batch: batch size.
        seed: numpy seed.

    Returns:
        input name -> float32 array `[batch, ...]`.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for t in info["inputs"]:
        shape = (batch, *t["shape"][1:])
        if t["name"] == "w_plus":
            avg = np.asarray(description.latent_avg, dtype=np.float32)
            out[t["name"]] = (avg[None] + 0.5 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[t["name"]] = rng.uniform(-1.0, 1.0, shape).astype(np.float32)
    return out


def _plan_precision(info: Mapping[str, Any]) -> str:
    return "fp16" if info.get("flags", {}).get("precision") == "fp16" else "fp32"


def plan_tolerance(output: str, precision: str) -> dict[str, float]:
    """The bounds of one output of a plan against the fp32 ONNX, from the one table (`export.compare.TOL`).

    Args:
        output: the output's name ("img", "w_plus"; any other name is held to the "img" bound).
        precision: the plan's, "fp16" or "fp32".

    Returns:
        fp16: the precision parity contract (`parity_tolerance`); fp32: `TOL[("tensorrt", "float32")]`.
    """
    if precision == "fp32":
        return dict(TOL[("tensorrt", "float32")])
    return parity_tolerance(output if output in ("img", "w_plus") else "img", precision)


def parity_report(plan_path: str | os.PathLike, reference_onnx: str | os.PathLike, *,
                  batch_sizes: Sequence[int] = (1,), seed: int = 0, device: str = "cuda",
                  inputs: Mapping[str, np.ndarray] | None = None,
                  tolerances: Mapping[str, Mapping[str, float]] | None = None,
                  out: str | os.PathLike | None = None) -> dict[str, Any]:
    """A plan against the fp32 reference: the same inputs through the plan and through the fp32 ONNX
    in ONNX Runtime (CPU), compared per output (`compare_outputs`); written as JSON.

    Args:
        plan_path: the plan under test (FP16 or FP32).
        reference_onnx: the fp32 ONNX of the same part (the one exported without --fp16).
        batch_sizes: batch sizes to check (each runs `default_inputs(description, info, b, seed)`).
        seed: input seed.
        device: CUDA device.
        inputs: explicit inputs (name -> array) instead of the seeded ones; `batch_sizes` ignored.
        tolerances: output name -> bounds; default `plan_tolerance(name, precision)`.
        out: JSON path (default `<plan>.parity.json`).

    Returns:
        `{"plan", "reference", "precision", "tensorrt_version", "gpu", "passed", "runs": [...]}`.

    Raises:
        TensorRTUnavailableError / TensorRTError: as `TensorRTRunner`.
    """
    import onnxruntime as ort  # noqa: PLC0415

    plan_path = Path(plan_path)
    with TensorRTRunner(plan_path, device) as runner:
        info = runner.info
        precision = _plan_precision(info)
        tol = dict(tolerances) if tolerances is not None else {
            o["name"]: plan_tolerance(o["name"], precision) for o in info["outputs"]}
        session = ort.InferenceSession(str(reference_onnx), providers=["CPUExecutionProvider"])
        feeds = [dict(inputs)] if inputs is not None else [default_inputs(runner.description, info, b, seed)
                                                           for b in batch_sizes]
        runs = []
        for feed in feeds:
            got = runner.infer({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()})
            got = {k: v.float().cpu().numpy() for k, v in got.items()}
            names = [o.name for o in session.get_outputs()]
            ref = dict(zip(names, session.run(names, {k: v.astype(np.float32) for k, v in feed.items()})))
            cmp = compare_outputs(got, {k: ref[k] for k in got if k in ref}, tol, backend="tensorrt",
                                  against="onnxruntime fp32")
            runs.append({"batch": int(next(iter(feed.values())).shape[0]), **cmp})
    report = {
        "plan": str(plan_path), "reference": str(reference_onnx), "precision": precision,
        "tensorrt_version": info.get("tensorrt_version"), "gpu": gpu_info(cuda_device(device).index),
        "inputs": "given" if inputs is not None else
                  f"seeded (seed {seed}): x ~ U[-1, 1], w_plus ~ latent_avg + 0.5 N(0, 1)",
        "passed": all(r["passed"] for r in runs), "runs": runs,
    }
    write_json(out or f"{plan_path}.parity.json", report)
    return report


def latency_report(plan_path: str | os.PathLike, *, batch_sizes: Sequence[int] | None = None,
                   warmup: int = 10, iters: int = 50, device: str = "cuda",
                   out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Latency of a plan per batch size: CUDA events around each execution (inputs already on the
    device), the first call and the warm-up reported apart, median of `iters` runs.

    Args:
        plan_path: the plan.
        batch_sizes: default: each profile's opt and max.
        warmup: untimed runs after the first call.
        iters: timed runs.
        device: CUDA device.
        out: JSON path (default `<plan>.latency.json`).

    Returns:
        `{"plan", "gpu", "tensorrt_version", "precision", "results": [{"batch", "first_call_ms",
        "p50_ms", "p90_ms", "mean_ms", "img_per_s", "chunks"}]}`; img/s = batch / p50.
    """
    plan_path = Path(plan_path)
    with TensorRTRunner(plan_path, device) as runner:
        sizes = list(batch_sizes) if batch_sizes else sorted({b for p in runner.profiles for b in (p.opt, p.max)})
        results = []
        for b in sizes:
            feed = {k: torch.from_numpy(v).to(runner.device) for k, v in default_inputs(runner.description, runner.info, b).items()}
            t0 = time.perf_counter()
            runner.infer(feed)
            first_ms = (time.perf_counter() - t0) * 1e3
            for _ in range(warmup):
                runner.enqueue(feed)
            runner.stream.synchronize()
            times = []
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(runner.stream)
                runner.enqueue(feed)
                end.record(runner.stream)
                end.synchronize()
                times.append(start.elapsed_time(end))
            p50, p90 = (float(v) for v in np.percentile(times, [50, 90]))
            results.append({"batch": b, "first_call_ms": first_ms, "p50_ms": p50, "p90_ms": p90,
                            "mean_ms": float(np.mean(times)), "img_per_s": b / (p50 / 1e3),
                            "chunks": len(plan_chunks(b, runner.profiles)), "warmup": warmup, "iters": iters})
        report = {"plan": str(plan_path), "gpu": gpu_info(runner.device.index),
                  "tensorrt_version": runner.info.get("tensorrt_version"), "precision": _plan_precision(runner.info),
                  "results": results}
    write_json(out or f"{plan_path}.latency.json", report)
    return report


# ----------------------------------------------------------------------------------------------
# the engine backend


def resolve_plan_pair(path: str | os.PathLike) -> tuple[Path, Path]:
    """The encoder and generator plans a `tensorrt` backend loads, from any of their names.

    `M.encoder.plan`, `M.generator.plan`, `M.plan` and `M` all mean the pair
    `M.encoder.plan` + `M.generator.plan` (a "psp" plan, both parts in one, is for Triton and the
    C++ runner: the engine needs encode and synthesize apart).

    Raises:
        TensorRTError: either plan is missing (both names given, with the commands that build them).
    """
    p = str(path)
    for suffix in (".encoder.plan", ".generator.plan", ".plan"):
        if p.endswith(suffix):
            p = p[: -len(suffix)]
            break
    enc, gen = Path(p + ".encoder.plan"), Path(p + ".generator.plan")
    missing = [str(x) for x in (enc, gen) if not x.is_file()]
    if missing:
        raise TensorRTError(
            f"the tensorrt backend needs {enc} and {gen}; missing: {', '.join(missing)}. Build them with "
            f"python -m export.onnx --part encoder/generator, then python -m export.tensorrt --onnx <part>.onnx "
            f"--plan {p}.<part>.plan --fp16")
    return enc, gen


def check_plan_pair(encoder: tuple[ModelDescription, Mapping[str, Any]],
                    generator: tuple[ModelDescription, Mapping[str, Any]]) -> None:
    """The two plans of a backend must be an encoder and a generator of one checkpoint.

    Args:
        encoder, generator: `(description, info)` of each plan's sidecar (`read_sidecar(plan, PLAN_KIND)`).

    Raises:
        TensorRTError: wrong parts, or different checkpoint, n_styles or output_size.
    """
    (enc_desc, enc_info), (gen_desc, gen_info) = encoder, generator
    if enc_info.get("part") != "encoder" or gen_info.get("part") != "generator":
        raise TensorRTError(f"expected an encoder plan and a generator plan, got parts {enc_info.get('part')!r} "
                            f"and {gen_info.get('part')!r}")
    for key in ("n_styles", "output_size", "checkpoint"):
        a, b = getattr(enc_desc, key), getattr(gen_desc, key)
        if a != b:
            raise TensorRTError(f"encoder and generator plans disagree on {key} ({a!r} vs {b!r}): export both parts "
                                "from the same checkpoint")


class TensorRTPSP:
    """pSp on two TensorRT plans: `encode` on the encoder plan, `synthesize` on the generator plan.

    Attributes (those `engine.api.Engine` reads): `description` (the encoder plan's sidecar), and from
    it `opts`, `input_nc`, `label_nc`, `output_size`, `n_styles`, `dataset_type`; plus `latent_avg`
    `[n_styles, 512]` (already inside the encoder plan: informational) and `encoder` / `generator`
    (the `TensorRTRunner`s).
    """

    def __init__(self, encoder_plan: str | os.PathLike, generator_plan: str | os.PathLike,
                 device: str | torch.device = "cuda"):
        self.encoder = TensorRTRunner(encoder_plan, device)
        self.generator = TensorRTRunner(generator_plan, device)
        enc, gen = read_sidecar(encoder_plan, PLAN_KIND), read_sidecar(generator_plan, PLAN_KIND)
        check_plan_pair(enc, gen)
        self.encoder.activate()
        try:
            self.generator.activate()
        except BaseException:
            self.encoder.deactivate()
            raise
        self.device = self.encoder.device
        self.description = d = enc[0]
        self.opts: dict = dict(d.opts)
        self.input_nc, self.label_nc, self.output_size, self.n_styles = d.input_nc, d.label_nc, d.output_size, d.n_styles
        self.dataset_type = d.dataset_type or self.opts.get("dataset_type")
        self.generator_resized = bool(gen[1].get("resize"))
        self.latent_avg = torch.tensor(d.latent_avg, dtype=torch.float32)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, input_nc, 256, 256]` float32 -> w_plus `[B, n_styles, 512]` float32 (latent_avg added)."""
        return self.encoder.infer({"x": x})["w_plus"].float()

    def synthesize(self, w_plus: torch.Tensor, resize: bool = False) -> torch.Tensor:
        """w_plus `[B, n_styles, 512]` -> img `[B, 3, R, R]` float32 (R = 256 with `resize`).

        `resize` average-pools to 256x256 as official `face_pool` does, unless the generator plan
        was exported with --resize (then its output is already 256).

        Raises:
            TensorRTError: `resize=False` with a generator plan exported with --resize.
        """
        img = self.generator.infer({"w_plus": w_plus})["img"].float()
        if self.generator_resized and not resize:
            raise TensorRTError(f"{self.generator.plan_path}: exported with --resize (256 px output); use "
                                "--resize-outputs, or export and build the generator without --resize")
        if resize and img.shape[-1] != 256:
            img = torch.nn.functional.adaptive_avg_pool2d(img, (256, 256))
        return img

    def close(self) -> None:
        """Free both plans."""
        self.encoder.deactivate()
        self.generator.deactivate()


def load_tensorrt_backend(plan_path: str | os.PathLike, device: str | torch.device = "cuda") -> TensorRTPSP:
    """The `tensorrt` engine backend: `TensorRTPSP` on `<stem>.encoder.plan` + `<stem>.generator.plan`.

    Args:
        plan_path: `<stem>`, `<stem>.plan`, or either plan of the pair (`resolve_plan_pair`).
        device: CUDA device.

    Raises:
        TensorRTUnavailableError: no tensorrt or no CUDA (one line, the reason).
        TensorRTError: a missing plan or sidecar, mismatched plans, another GPU architecture.
    """
    enc, gen = resolve_plan_pair(plan_path)
    return TensorRTPSP(enc, gen, device)


# ----------------------------------------------------------------------------------------------
# CLI


def _batch_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def build_parser() -> ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(
        prog="python -m export.tensorrt",
        description="Build a TensorRT plan from an export.onnx file (writes <plan> and <plan>.json), and/or "
                    "report its parity against the fp32 ONNX or its latency (JSON beside the plan).",
        epilog="Exit codes: 0 ok, 1 a parity report outside its tolerances, 2 usage error, TensorRT or CUDA "
               "missing, or a TensorRT error (one line), 130 interrupted.")
    p.add_argument("--onnx", metavar="M.onnx", help="ONNX from python -m export.onnx; given: build the plan")
    p.add_argument("--plan", metavar="M.plan", required=True, help="the plan to write (with --onnx) or to report on")
    p.add_argument("--fp16", action="store_true",
                   help="FP16 plan (style affines, demodulation and mapping kept fp32); default fp32 (TF32 off)")
    p.add_argument("--profile", type=parse_profile_arg, action="append", metavar="MIN,OPT,MAX",
                   help="batch sizes of one optimisation profile (repeat for more; default 1,1,1)")
    p.add_argument("--timing-cache", metavar="FILE", help="timing cache read before and written after the build")
    p.add_argument("--version-compatible", action="store_true",
                   help="a plan later TensorRT versions of the same major can run (may be slower)")
    p.add_argument("--exclude-lean-runtime", action="store_true",
                   help="with --version-compatible: leave the lean runtime out of the plan")
    p.add_argument("--workspace-mib", type=int_at_least(1), default=DEFAULT_WORKSPACE_MIB, metavar="MiB",
                   help=f"builder workspace limit (default {DEFAULT_WORKSPACE_MIB})")
    p.add_argument("--report", action="append", choices=("parity", "latency"),
                   help="after the build (or on an existing plan): parity against the fp32 ONNX, or latency")
    p.add_argument("--reference-onnx", metavar="R.onnx",
                   help="fp32 ONNX for --report parity (default: --onnx when it is fp32)")
    p.add_argument("--batch-sizes", type=_batch_list, metavar="1,4,8",
                   help="batch sizes for the reports (default: parity 1; latency each profile's opt and max)")
    p.add_argument("--iters", type=int_at_least(1), default=50, help="timed runs per batch size for --report latency")
    p.add_argument("--warmup", type=int_at_least(0), default=10, help="untimed runs after the first call for --report latency")
    p.add_argument("--device", default="cuda", help="CUDA device for reports (default cuda)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return p


def _body(args: argparse.Namespace) -> int:
    if not args.onnx and not args.report:
        raise UsageError("nothing to do: give --onnx to build, and/or --report parity|latency")
    import_tensorrt()
    if args.onnx:
        build_engine(args.onnx, args.plan, fp16=args.fp16, profiles=args.profile or [(1, 1, 1)],
                     timing_cache=args.timing_cache, version_compatible=args.version_compatible,
                     exclude_lean_runtime=args.exclude_lean_runtime, workspace_mib=args.workspace_mib,
                     verbose=args.verbose)
        say(f"wrote {args.plan} and {sidecar_path(args.plan)}")
    code = 0
    for kind in args.report or []:
        if kind == "parity":
            ref = args.reference_onnx or args.onnx
            if ref is None or onnx_fp16_count(ref):
                raise TensorRTError("--report parity needs the fp32 ONNX: give --reference-onnx (the part exported "
                                    "without --fp16)")
            rep = parity_report(args.plan, ref, batch_sizes=args.batch_sizes or (1,), device=args.device)
            for run in rep["runs"]:
                summary = ", ".join(
                    f"{k} rel {v.get('rel', float('nan')):.2e} (nan {v.get('nan')}, inf {v.get('inf')})"
                    for k, v in run["outputs"].items())
                status = "ok" if run["passed"] else "FAILED"
                say(f"parity batch {run['batch']}: {status}: {summary}")
            code = max(code, 0 if rep["passed"] else 1)
        else:
            rep = latency_report(args.plan, batch_sizes=args.batch_sizes, warmup=args.warmup, iters=args.iters,
                                 device=args.device)
            for r in rep["results"]:
                say(f"latency batch {r['batch']}: p50 {r['p50_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms, "
                    f"{r['img_per_s']:.1f} img/s (first call {r['first_call_ms']:.1f} ms)")
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments without the program name (default `sys.argv[1:]`).

    Returns:
        The exit code (0 ok, 1 parity failed, 2 usage / unavailable / TensorRT error, 130 interrupted).
    """
    return run_cli(build_parser(), _body, argv, errors=(PSPError, OSError, ValueError),
                   interrupted="no plan was written (plans and sidecars appear whole or not at all); rerun the command")


if __name__ == "__main__":
    sys.exit(main())
