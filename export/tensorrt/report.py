"""Reports on a TensorRT plan: parity against the fp32 ONNX on ONNX Runtime, and latency per batch
size; both returned and written as JSON beside the plan.

Source: Polygraphy's comparison of a runner against ONNX Runtime (one comparator, per-output
tolerances, results as JSON): here `export.compare.compare_outputs` and its one tolerance table;
timing with CUDA events (`torch.cuda.Event`), warm-up apart, median of many runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from reference.description import ModelDescription
from reference.plumbing.files import write_json

from ..compare import TOL, compare_outputs, parity_tolerance
from .common import cuda_device, gpu_info, plan_chunks
from .runtime import TensorRTRunner


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
