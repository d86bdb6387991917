"""TensorRT plans from the ONNX export: build, run, compare, time; and the `tensorrt` engine backend.

Where each piece is (each usable alone; `tensorrt` itself is imported inside functions only, so
every module imports, and the pure parts run, without it):
  * `common`: the lazy `import_tensorrt` and the CUDA probes (`cuda_device`, `gpu_info`), the
    errors (`TensorRTError`, `TensorRTUnavailableError`), `PLAN_KIND`, and the optimisation
    profiles with the batch chunking (`Profile`, `normalize_profiles`, `plan_chunks`, ...).
  * `builder`: `build_engine(onnx, plan, ...)`: parse the ONNX, one optimisation profile per
    (min, opt, max) batch triple, FP16 with the style/demodulation/mapping layers pinned to fp32
    (`FP32_NODE_PATTERNS`, `match_fp32_layers`, `precision_mode`), a timing cache, optional version
    compatibility; writes `<plan>` and its sidecar `<plan>.json` (`write_plan_sidecar`) atomically.
  * `runtime`: `TensorRTRunner(plan)`, a context manager that runs dicts of torch tensors, choosing
    the profile per batch size and splitting larger batches into chunks; the `tensorrt` backend
    `load_tensorrt_backend(path, device)` -> `TensorRTPSP` (an `export.backends.BackendModel`:
    `encode`/`synthesize` on `<stem>.encoder.plan` and `<stem>.generator.plan`, for `engine.load`).
  * `report`: `parity_report` (a plan against the fp32 ONNX in ONNX Runtime, by the one comparator
    and tolerance table of `export.compare`) and `latency_report` (CUDA events, warm-up apart,
    p50/p90 ms and img/s per batch size), both written as JSON.
  * `cli`: `python -m export.tensorrt --onnx M.onnx --plan M.plan [--fp16] [--profile 1,4,8] ...`.

Source: the TensorRT Python API (10.x and 11.x) and Polygraphy's shape of things; see each module.
The names below are re-exported so that `from export.tensorrt import build_engine` (and the other
public names this module had before it became a package) keep working.
"""

from .builder import (DEFAULT_WORKSPACE_MIB, FP32_NODE_PATTERNS, build_engine, match_fp32_layers, onnx_fp16_count,
                      plan_artifact_info, precision_mode, write_plan_sidecar)
from .cli import build_parser, main
from .common import (PLAN_KIND, TRT_MISSING, Chunk, Profile, TensorRTError, TensorRTUnavailableError, cuda_device,
                     gpu_info, import_tensorrt, normalize_profiles, parse_profile_arg, plan_chunks, profile_shapes,
                     select_profile, tensorrt_major)
from .report import default_inputs, latency_report, parity_report, plan_tolerance
from .runtime import (TensorRTPSP, TensorRTRunner, check_compute_capability, check_plan_pair, load_tensorrt_backend,
                      plan_pair_description, resolve_plan_pair)

__all__ = [
    "DEFAULT_WORKSPACE_MIB", "FP32_NODE_PATTERNS", "PLAN_KIND", "TRT_MISSING", "Chunk", "Profile", "TensorRTError",
    "TensorRTPSP", "TensorRTRunner", "TensorRTUnavailableError", "build_engine", "build_parser",
    "check_compute_capability", "check_plan_pair", "cuda_device", "default_inputs", "gpu_info", "import_tensorrt",
    "latency_report", "load_tensorrt_backend", "main", "match_fp32_layers", "normalize_profiles", "onnx_fp16_count",
    "parity_report", "parse_profile_arg", "plan_artifact_info", "plan_chunks", "plan_pair_description",
    "plan_tolerance", "precision_mode", "profile_shapes", "resolve_plan_pair", "select_profile", "tensorrt_major",
    "write_plan_sidecar",
]
