"""TensorRT plans from the ONNX export: the fp32 layer matcher, the precision decision, the plan
sidecar, and `build_engine`.

Source: the TensorRT Python API (10.x "IBuilderConfig", "IOptimizationProfile", "ITimingCache",
"Onnx Parser"; 11.x "Migrating from TensorRT 10.x to 11.x") and Polygraphy's shape of things
(`EngineFromNetwork(NetworkFromOnnxPath(p), config=CreateConfig(fp16=True))`). The ONNX files and
their sidecars come from `python -m export.onnx`.

Precision, by TensorRT version (decided once, in `precision_mode`):
  * TensorRT 10.x and an fp32 ONNX with `fp16=True`: weak typing, `BuilderFlag.FP16` plus
    `OBEY_PRECISION_CONSTRAINTS`, and every layer whose name contains one of
    `FP32_NODE_PATTERNS` gets `layer.precision = float32` and float32 outputs.
  * An ONNX that already holds fp16 tensors (`export.onnx --fp16`), or any build on TensorRT
    >= 11 (which removed the FP16 and precision-constraint flags: strong typing only): a strongly
    typed network; the precision is the ONNX's own, so the fp32 islands are the exporter's job.
    `fp16=True` with an fp32-only ONNX on TensorRT >= 11 is refused with the fix.
  * `fp16=False`: an fp32 plan with TF32 switched off (the builder enables it by default).

`tensorrt` is imported inside `build_engine` only: the matcher, the precision decision and the
sidecar writer run without it.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from reference.description import ModelDescription, read_sidecar, write_sidecar
from reference.plumbing.digests import file_records
from reference.plumbing.files import atomic_write_bytes

from .common import (PLAN_KIND, Profile, TensorRTError, TensorRTUnavailableError, batch_triple, dtype_name,
                     gpu_info, import_tensorrt, normalize_profiles, profile_shapes, tensorrt_major)

# Layers whose ONNX node names contain one of these stay fp32 in an FP16 build: the style affines,
# the demodulation coefficients (rsqrt of a sum of squares: overflows and underflows in fp16), the
# mapping network and its pixel norm. The names come from module paths in `export/backends/engine_model.py`.
FP32_NODE_PATTERNS: tuple[str, ...] = ("/affine", "/demod", "/mapping", "/pixel_norm")

DEFAULT_WORKSPACE_MIB = 4096
# what a plan sidecar's artifact part keeps of the ONNX's (`export.onnx.artifact_info`)
COPIED_ONNX_INFO = ("part", "resize", "image_size", "opset")
BUILD_KEYS = ("tensorrt_version", "gpu", "inputs", "outputs", "profiles", "flags", "build_time_s")


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
# the plan sidecar


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
        "profiles": [Profile(str(p["name"]), *batch_triple((p["min"], p["opt"], p["max"]), "profile")).as_dict()
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
        "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": dtype_name(trt, t.dtype)} for t in inputs],
        "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": dtype_name(trt, t.dtype)} for t in outputs],
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
        "onnx": {"path": str(onnx_path), **file_records([onnx_path])[onnx_path.name]},
    }
    write_plan_sidecar(plan_path, description, onnx_info, build)
    return plan_path
