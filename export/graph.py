"""The graph backends: the engine formulation's ONNX graphs run by ONNX Runtime or OpenVINO.

Source: `export.onnx` (the `encoder` and `generator` parts, fp32, dynamic batch), the ONNX Runtime
Python API (`InferenceSession`, `SessionOptions`) and the OpenVINO Runtime Python API
(`Core.compile_model` with the CPU plugin properties `PERFORMANCE_HINT`, `INFERENCE_NUM_THREADS`,
`INFERENCE_PRECISION_HINT`, `CACHE_DIR`; `OPTIMIZATION_CAPABILITIES` tells whether the CPU has bf16).

One implementation, `GraphPSP`, runs both: the graphs are exported once per checkpoint into the
engine cache (`cached_graphs`) and shared by the two runtimes; a runtime is a small adapter that
compiles a graph into a callable. Each part runs in chunks of images: a runtime keeps the buffers
of the largest batch it has run, so chunking bounds peak memory (1024 px activations are ~0.5 GB
per image) at no cost in speed (static weights: the per-image cost does not depend on the batch).

Precision: ONNX Runtime runs fp32. OpenVINO runs fp32 (`INFERENCE_PRECISION_HINT=f32`: pinned, since
on CPUs with AVX512-BF16 or AMX the plugin would otherwise pick bf16 by itself) or bf16 where the
CPU plugin reports BF16 among its capabilities (the same fp32 graphs, compiled with the bf16 hint).
Compiled OpenVINO models are cached in `<cache>/ov_cache/`, so a second process starts fast.
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from reference.description import ModelDescription, read_sidecar
from reference.errors import UsageError
from reference.platform import mapped_files, page_out

EXPORT_VERSION = "3"  # part of the cache key: bump when the exported graphs or their sidecars change
PARTS = ("encoder", "generator")
Runner = Callable[[np.ndarray], np.ndarray]


def physical_cores() -> int:
    """Intra-op threads for ONNX Runtime and OpenVINO when none are asked for: `$OMP_NUM_THREADS`
    when it is a positive integer (the variable torch's and OpenBLAS's thread pools follow, so one
    setting sizes every runtime of the process: e.g. several processes sharing a machine), else the
    CPUs this process may run on (`os.sched_getaffinity`; 2 on CI)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------
# The cached graphs


def cache_paths(checkpoint: Path, cache: Path) -> dict[str, Path]:
    """Where the `encoder` and `generator` graphs of `checkpoint` are cached (keyed by the checkpoint's
    resolved path, size and mtime, and the export version)."""
    st = checkpoint.stat()
    key = hashlib.sha256(f"{checkpoint.resolve()}|{st.st_size}|{st.st_mtime_ns}|{EXPORT_VERSION}".encode()).hexdigest()[:16]
    return {part: cache / f"{checkpoint.stem}-{key}.{part}.onnx" for part in PARTS}


@dataclass(frozen=True)
class ReferenceLoader:
    """Loads the `reference.PSP` of a checkpoint on the CPU; picklable, so that `cached_graphs` can
    run the export in a child process.

    Attributes:
        path: the pSp checkpoint.
        trust_pickle: allow full unpickling of an old checkpoint (`reference.read_checkpoint`).
    """

    path: Path
    trust_pickle: bool = False

    def __call__(self):
        from reference import load_psp

        return load_psp(self.path, trust_pickle=self.trust_pickle)


def export_parts(load_reference: Callable[[], object], checkpoint: Path, paths: dict[str, Path],
                 on_loaded: Callable[[], None] = lambda: None) -> list[str]:
    """Load the reference, build the engine formulation and export each part to its path.

    Args:
        on_loaded: called once the checkpoint has loaded (a bad one fails before it).

    Returns:
        One line per part (name, size of its weights, seconds).
    """
    from .engine_model import EnginePSP
    from .onnx import export_onnx

    psp = load_reference()
    on_loaded()
    model = EnginePSP(psp, checkpoint=str(checkpoint))
    del psp  # the reference is not needed once the engine formulation holds the weights
    lines = []
    for part, path in paths.items():
        module = model.encoder if part == "encoder" else model.synthesis
        mib = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers())) / 2**20
        t1 = time.perf_counter()
        export_onnx(model, path, part=part, checkpoint=checkpoint)
        lines.append(f"  {part}: {path.name}, {mib:,.0f} MiB, {time.perf_counter() - t1:.1f} s")
    return lines


def _export_worker(load_reference: ReferenceLoader, checkpoint: Path, paths: dict[str, Path],
                   notify: Callable[[str], None]) -> list[str]:
    """`export_parts` in the child process of `cached_graphs` (`reference.child.call_in_child`): the
    torch memory of the load and the export (2.7 GB at its peak for a 1024 px model) ends with the
    child instead of staying in this process, which next compiles the graphs (OpenVINO: 3.9 GiB
    working set for that model). Sends "loaded" once the checkpoint has loaded."""
    return export_parts(load_reference, checkpoint, paths, lambda: notify("loaded"))


def cached_graphs(checkpoint: Path, load_reference: Callable[[], object], cache: Path,
                  announce: Callable[[str], None] | None = None) -> dict[str, Path]:
    """The fp32 `encoder` and `generator` ONNX graphs of `checkpoint` in `cache`, exported first if missing.

    Args:
        checkpoint: the pSp checkpoint file (the cache key: resolved path, size, mtime, export version).
        load_reference: returns the loaded `reference.PSP`; called only when the graphs must be
            exported, so a cached run never holds the torch weights (peak memory). A
            `ReferenceLoader` is called in a child process (`_export_worker`), any other callable
            in this one.
        cache: the folder of the cached graphs.
        announce: receives one line once the checkpoint has loaded (before the export) and one per
            exported part (what, how big, how long).

    Returns:
        `{"encoder": path, "generator": path}` (each with its weights `<path>.data` and its sidecar
        `<path>.json` beside it).

    Two processes that need the same missing graphs at once do not both export: the export holds a
    lock file (`<name>.lock` beside the graphs, `filelock.FileLock`), the other process announces
    that it waits, then finds the graphs cached.

    Raises:
        CheckpointError: a bad checkpoint (from the load).
    """
    from reference.description import sidecar_path

    paths = cache_paths(checkpoint, cache)
    if all(p.is_file() and sidecar_path(p).is_file() for p in paths.values()):
        return paths
    from filelock import FileLock

    cache.mkdir(parents=True, exist_ok=True)
    # Two processes that need the same graphs at once (two runs, two test workers): one exports, the
    # other waits for it and then finds them cached (`filelock`: an OS lock, freed if its holder dies).
    from filelock import Timeout

    lock = FileLock(paths["encoder"].with_name(paths["encoder"].name.split(".", 1)[0] + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if announce is not None:
            announce(f"another process is exporting {checkpoint.name} to {cache}; waiting for it")
        lock.acquire()
    try:
        if all(p.is_file() and sidecar_path(p).is_file() for p in paths.values()):
            return paths
        return _export_graphs(checkpoint, load_reference, paths, announce)
    finally:
        lock.release()


def _export_graphs(checkpoint: Path, load_reference: Callable[[], object], paths: dict[str, Path],
                   announce: Callable[[str], None] | None) -> dict[str, Path]:
    """The export of `cached_graphs` (under its lock)."""
    cache = paths["encoder"].parent
    say = announce or (lambda msg: None)
    t0 = time.perf_counter()
    def loaded() -> None:  # after the load: a bad checkpoint fails before anything is announced
        say(f"exporting {checkpoint.name} to ONNX graphs in {cache} (once per checkpoint; reused by the "
            "onnxruntime and openvino backends)")

    if isinstance(load_reference, ReferenceLoader):
        from reference.child import call_in_child

        lines = call_in_child(_export_worker, (load_reference, checkpoint, paths), lambda message: loaded(),
                              what="ONNX export process")
    else:
        lines = export_parts(load_reference, checkpoint, paths, loaded)
        gc.collect()
    for line in lines:
        say(line)
    say(f"exported in {time.perf_counter() - t0:.1f} s (python -m engine.cache lists and removes cache entries)")
    return paths


# ------------------------------------------------------------------------------------------------
# Runtimes


def ort_runner(onnx_path: Path, input_name: str, output_name: str, precision: str, cache: Path,
               threads: int | None = None) -> Runner:
    """An ONNX Runtime CPU session of `onnx_path` as a callable (all graph optimisations, `threads`
    intra-op threads, default `physical_cores()`, no inter-op parallelism: the graph is a chain). fp32 only."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    return lambda a: session.run([output_name], {input_name: a})[0]


def openvino_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 on this CPU (`OPTIMIZATION_CAPABILITIES` has BF16)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_runner(onnx_path: Path, input_name: str, output_name: str, precision: str, cache: Path,
                    threads: int | None = None, release_pages: bool = True) -> Runner:
    """An OpenVINO CPU compiled model of `onnx_path` as a callable: latency hint (one stream, `threads`
    threads on one request, default `physical_cores()`), precision hint f32 or bf16, compiled blobs cached under `<cache>/ov_cache`.
    After the first call, the pages of the weight files the compile mapped are given back
    (`reference.platform.page_out`): results are unchanged, the resident set is ~1 GiB smaller for
    the 1024 px model (`release_pages=False` keeps them: `benchmarks/openvino_memory.py` compares).

    Raises:
        UsageError: bf16 asked for where the CPU plugin has no BF16 capability.
    """
    import openvino as ov

    core = ov.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        from reference.platform import cpu_model

        raise UsageError(f"backend 'openvino' cannot run bf16 on this CPU ({cpu_model()}: OpenVINO reports no BF16 "
                         "capability; it needs AVX512-BF16 or AMX); use --precision fp32")
    core.set_property({"CACHE_DIR": str(cache / "ov_cache")})
    mapped_before = mapped_files()
    compiled = core.compile_model(str(onnx_path), "CPU", {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": int(threads or physical_cores()),
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
    })
    # the weight files the compile mapped (the graph's .onnx.data, or its compiled blob in the cache)
    weight_files = mapped_files() - mapped_before
    request = compiled.create_infer_request()
    output = compiled.output(output_name)
    first_call = [True]

    def run(a: np.ndarray) -> np.ndarray:
        res = request.infer({input_name: a})  # copies the outputs (share_outputs=False)
        out = np.array(res[output], dtype=np.float32, copy=True)
        if first_call[0] and release_pages:
            # The first inference reordered the weights into the plugin's own buffers; the mapped file
            # stays resident although the encoder never reads it again: give its pages back
            # (1.0 GiB for the 1024 px demo; benchmarks/RESULTS.md "ONNX export, first run ...").
            first_call[0] = False
            page_out(weight_files)
        return out

    return run


# runtime name -> (compile, max images per encoder call, per generator call); chunk sizes measured
# (benchmarks/RESULTS.md "CPU engines": OpenVINO peak RSS 5.0 GiB with chunks (8, 2), 3.8 GiB with (2, 1))
RUNTIMES: dict[str, tuple[Callable[..., Runner], int, int]] = {
    "onnxruntime": (ort_runner, 8, 2),
    "openvino": (openvino_runner, 2, 1),
}


class GraphPSP(nn.Module):
    """pSp on an ONNX runtime (CPU): `encode` and `synthesize` run the exported encoder and generator.

    Args:
        encoder_onnx, generator_onnx: the exported fp32 parts (their sidecars give the description).
        runtime: a `RUNTIMES` name ("onnxruntime" or "openvino").
        precision: "fp32", or "bf16" (openvino on a CPU with bf16 units).
        cache: the engine cache (OpenVINO's compiled-model cache lives under it).
        threads: intra-op threads (default: the CPUs available to this process).

    Attributes:
        description: the model description (precision and backend set).

    Raises:
        UsageError: a precision the runtime cannot run here.
        CheckpointError: a missing or stale sidecar.
    """

    def __init__(self, encoder_onnx: Path, generator_onnx: Path, runtime: str, precision: str, cache: Path,
                 threads: int | None = None):
        super().__init__()
        compile_graph, self.max_encoder_batch, self.max_generator_batch = RUNTIMES[runtime]
        description, _ = read_sidecar(generator_onnx, "onnx")
        self.description: ModelDescription = description.replace(precision=precision, backend=runtime)
        self.encoder = compile_graph(Path(encoder_onnx), "x", "w_plus", precision, cache, threads)
        self.generator = compile_graph(Path(generator_onnx), "w_plus", "img", precision, cache, threads)

    @staticmethod
    def _chunks(run: Runner, a: torch.Tensor, n: int) -> torch.Tensor:
        a = np.ascontiguousarray(a.detach().cpu().numpy(), np.float32)
        return torch.cat([torch.from_numpy(np.asarray(run(np.ascontiguousarray(a[i : i + n])), np.float32))
                          for i in range(0, a.shape[0], n)])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, input_nc, 256, 256]` float32 -> w_plus `[B, n_styles, 512]` float32."""
        return self._chunks(self.encoder, x, self.max_encoder_batch)

    def synthesize(self, w_plus: torch.Tensor) -> torch.Tensor:
        """w_plus `[B, n_styles, 512]` -> img `[B, 3, R, R]` float32, full resolution."""
        return self._chunks(self.generator, w_plus, self.max_generator_batch)


def load_graph_backend(runtime: str, checkpoint: Path, load_reference: Callable[[], object], cache: Path,
                       precision: str = "fp32", announce: Callable[[str], None] | None = None,
                       threads: int | None = None) -> GraphPSP:
    """`GraphPSP` of `checkpoint` on `runtime`: the cached graphs, exported first if missing
    (`load_reference` is called only then)."""
    paths = cached_graphs(checkpoint, load_reference, cache / "onnx", announce)
    return GraphPSP(paths["encoder"], paths["generator"], runtime, precision, cache, threads)
