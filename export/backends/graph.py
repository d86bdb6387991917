"""The graph backends: the engine formulation's ONNX graphs run by ONNX Runtime or OpenVINO.

Source: `export.onnx` (the `encoder` and `generator` parts, fp32, dynamic batch), the ONNX Runtime
Python API (`InferenceSession`, `SessionOptions`) and the OpenVINO Runtime Python API
(`Core.compile_model` with the CPU plugin properties `PERFORMANCE_HINT`, `INFERENCE_NUM_THREADS`,
`NUM_STREAMS`, `INFERENCE_PRECISION_HINT`, `CACHE_DIR`; `Model.reshape`, `AsyncInferQueue`;
`OPTIMIZATION_CAPABILITIES` tells whether the CPU has bf16).

One implementation, `GraphPSP`, runs both: the graphs are exported once per checkpoint into the
engine cache (`cached_graphs`) and shared by the two runtimes; a runtime is a small adapter that
compiles a graph into a callable. Each part runs in chunks of images: a runtime keeps the buffers
of the largest batch it has run, so chunking bounds peak memory (1024 px activations are ~0.5 GB
per image) at no cost in speed (static weights: the per-image cost does not depend on the batch).
OpenVINO compiles the generator for a static batch of its chunk (1), which it plans ahead (1.3-1.4x);
its streams (several images at once, one per core) are measured but not the default (memory).

Precision: ONNX Runtime runs fp32. OpenVINO runs fp32 (`INFERENCE_PRECISION_HINT=f32`: pinned, since
on CPUs with AVX512-BF16 or AMX the plugin would otherwise pick bf16 by itself) or bf16 where the
CPU plugin reports BF16 among its capabilities (the same fp32 graphs, compiled with the bf16 hint),
or int8 where it reports INT8: the NNCF-quantized graphs of `export.quantize` (made once per
checkpoint and calibration set, cached beside the fp32 ones), their float layers compiled with the
bf16 hint where the plugin has BF16, else f32.
Compiled OpenVINO models are cached in `<cache>/ov_cache/<graph>/`, so a second process starts fast.

Integrity: the graphs' files and OpenVINO's blobs are checked against the sizes and sha256 recorded
in their sidecars before a process first uses them (`graph_problems`, `compiled_problems`); a damaged
one is announced in one line and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from reference.description import ModelDescription, read_sidecar, sidecar_path, verify_artifact, write_sidecar
from reference.plumbing.digests import checkpoint_identity
from reference.plumbing.errors import UsageError
from reference.plumbing.platform import mapped_files, page_out

EXPORT_VERSION = "4"  # part of the cache key: bump when the exported graphs or their sidecars change (4: file digests)
PARTS = ("encoder", "generator")
COMPILED_DIR = "ov_cache"  # under the engine cache: OpenVINO's compiled blobs, one folder per graph
COMPILED_KIND = "openvino-cache"  # the sidecar kind of such a folder
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
    """Where the `encoder` and `generator` graphs of `checkpoint` are cached: keyed by the
    checkpoint's identity (`reference.plumbing.digests.checkpoint_identity`: resolved path, size and sha256,
    the identity the run manifest fingerprints too) and the export version.

    Raises:
        OSError: the checkpoint cannot be read.
    """
    ident = checkpoint_identity(checkpoint)
    key = hashlib.sha256(f"{ident['path']}|{ident['size']}|{ident['sha256']}|{EXPORT_VERSION}".encode()).hexdigest()[:16]
    return {part: cache / f"{checkpoint.stem}-{key}.{part}.onnx" for part in PARTS}


def graph_problems(paths: dict[str, Path]) -> dict[str, list[str]]:
    """Per part, what is wrong with its cached graph against its sidecar's sizes and digests
    (`reference.description.verify_artifact`); {} when every part is as exported. A part whose
    graph does not exist yet reads `["missing"]`."""
    problems = {part: ["missing"] if not p.is_file() else verify_artifact(p) for part, p in paths.items()}
    return {part: probs for part, probs in problems.items() if probs}


def _unwritable(folder: Path, why: str) -> UsageError:
    return UsageError(f"the engine cache {folder} is not writable and {why}; set PSP_ENGINE_CACHE to a writable "
                      "folder (or run once as a user who can write it)")


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
                 on_loaded: Callable[[], None] = lambda: None,
                 say: Callable[[str], None] = lambda line: None) -> list[str]:
    """Load the reference, build the engine formulation and export each part to its path.

    Args:
        on_loaded: called once the checkpoint has loaded (a bad one fails before it).
        say: called as each part starts (`"  encoder: exporting <N> MiB of weights to <file> ..."`:
            its weights' size, about that of its `.onnx.data`) and as it ends (the returned line), so
            that a user sees which graph the seconds of its export go to while they pass.

    Returns:
        One line per part (name, size of its weights in MiB, seconds).
    """
    from .engine_model import EnginePSP
    from ..onnx import export_onnx

    psp = load_reference()
    on_loaded()
    model = EnginePSP(psp, checkpoint=str(checkpoint))
    del psp  # the reference is not needed once the engine formulation holds the weights
    lines = []
    for part, path in paths.items():
        module = model.encoder if part == "encoder" else model.synthesis
        mib = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers())) / 2**20
        say(f"  {part}: exporting {mib:,.0f} MiB of weights to {path.name} ...")
        t1 = time.perf_counter()
        export_onnx(model, path, part=part, checkpoint=checkpoint)
        lines.append(f"  {part}: {path.name}, {mib:,.0f} MiB, {time.perf_counter() - t1:.1f} s")
        say(lines[-1])
    return lines


def _export_worker(load_reference: ReferenceLoader, checkpoint: Path, paths: dict[str, Path],
                   notify: Callable[[tuple[str, str]], None]) -> list[str]:
    """`export_parts` in the child process of `cached_graphs` (`reference.plumbing.child.call_in_child`): the
    torch memory of the load and the export (2.7 GB at its peak for a 1024 px model) ends with the
    child instead of staying in this process, which next compiles the graphs (OpenVINO: 3.9 GiB
    working set for that model). Sends `("loaded", "")` once the checkpoint has loaded, then
    `("line", text)` as each part starts and ends (`export_parts`' `say`), which the parent prints
    as they arrive."""
    return export_parts(load_reference, checkpoint, paths, lambda: notify(("loaded", "")),
                        lambda line: notify(("line", line)))


def cached_graphs(checkpoint: Path, load_reference: Callable[[], object], cache: Path,
                  announce: Callable[[str], None] | None = None) -> dict[str, Path]:
    """The fp32 `encoder` and `generator` ONNX graphs of `checkpoint` in `cache`, exported first if missing.

    Args:
        checkpoint: the pSp checkpoint file (the cache key: `cache_paths`).
        load_reference: returns the loaded `reference.PSP`; called only when the graphs must be
            exported, so a cached run never holds the torch weights (peak memory). A
            `ReferenceLoader` is called in a child process (`_export_worker`), any other callable
            in this one.
        cache: the folder of the cached graphs.
        announce: receives one line once the checkpoint has loaded (before the export), and per part
            one as its export starts (which, how big) and one as it ends (how long), as they happen.

    Returns:
        `{"encoder": path, "generator": path}` (each with its weights `<path>.data` and its sidecar
        `<path>.json` beside it).

    Two processes that need the same missing graphs at once do not both export: the export holds a
    lock file (`<name>.lock` beside the graphs, `filelock.FileLock`), the other process announces
    that it waits, then finds the graphs cached.

    Every use checks the graphs against the sizes and digests their sidecars recorded at the export
    (`graph_problems`; the digests are remembered per file version, `reference.plumbing.digests`, so only the
    first use after a change reads the files). A damaged part (truncated, changed bytes, missing
    weights or sidecar) is never used: it is announced in one line, removed and exported again.

    Raises:
        CheckpointError: a bad checkpoint (from the load).
        UsageError: graphs must be exported and the cache folder is not writable.
    """
    paths = cache_paths(checkpoint, cache)
    if not graph_problems(paths):  # as exported: a stat per file once this version's digests are known
        return paths
    from filelock import FileLock, Timeout

    try:
        cache.mkdir(parents=True, exist_ok=True)
        if not os.access(cache, os.W_OK):
            raise PermissionError(f"no write permission on {cache}")
        # Two processes that need the same graphs at once (two runs, two test workers): one exports, the
        # other waits for it and then finds them cached (`filelock`: an OS lock, freed if its holder dies).
        lock = FileLock(paths["encoder"].with_name(paths["encoder"].name.split(".", 1)[0] + ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if announce is not None:
                announce(f"another process is exporting {checkpoint.name} to {cache}; waiting for it")
            lock.acquire()
    except OSError as e:
        raise _unwritable(cache, f"the ONNX graphs of {checkpoint.name} must be exported into it ({e})") from None
    try:
        problems = graph_problems(paths)
        if not problems:
            return paths
        damaged = {part: probs for part, probs in problems.items() if probs != ["missing"]}
        if damaged:  # never used: removed, then exported again
            if announce is not None:
                announce("damaged cached graph " + "; ".join(f"{paths[part].name} ({', '.join(probs)})"
                                                             for part, probs in damaged.items())
                         + ": not used, exporting it again")
            for part in damaged:
                for f in (paths[part], paths[part].with_name(paths[part].name + ".data"), sidecar_path(paths[part])):
                    f.unlink(missing_ok=True)
        _export_graphs(checkpoint, load_reference, {part: paths[part] for part in problems}, announce)
        return paths
    finally:
        lock.release()


def _export_graphs(checkpoint: Path, load_reference: Callable[[], object], paths: dict[str, Path],
                   announce: Callable[[str], None] | None) -> dict[str, Path]:
    """The export of `cached_graphs` (under its lock)."""
    cache = next(iter(paths.values())).parent  # paths: the parts to export (all, or the damaged ones)
    say = announce or (lambda msg: None)
    t0 = time.perf_counter()
    def loaded() -> None:  # after the load: a bad checkpoint fails before anything is announced
        say(f"exporting {checkpoint.name} to ONNX graphs in {cache} (once per checkpoint; reused by the "
            "onnxruntime and openvino backends)")

    if isinstance(load_reference, ReferenceLoader):
        from reference.plumbing.child import call_in_child

        def progress(message: tuple[str, str]) -> None:  # `_export_worker`'s messages, as they arrive
            kind, line = message
            if kind == "loaded":
                loaded()
            else:
                say(line)

        call_in_child(_export_worker, (load_reference, checkpoint, paths), progress, what="ONNX export process")
    else:
        export_parts(load_reference, checkpoint, paths, loaded, say)
        gc.collect()
    say(f"exported in {time.perf_counter() - t0:.1f} s (python -m engine.cache lists and removes cache entries)")
    return paths


# ------------------------------------------------------------------------------------------------
# Runtimes


def ort_runner(onnx_path: Path, input_name: str, output_name: str, precision: str, cache: Path,
               threads: int | None = None, announce: Callable[[str], None] | None = None) -> Runner:
    """An ONNX Runtime CPU session of `onnx_path` as a callable (all graph optimisations, `threads`
    intra-op threads, default `physical_cores()`, no inter-op parallelism: the graph is a chain). fp32
    only. `announce` is unused (the runtimes' common signature: ONNX Runtime keeps no compiled cache)."""
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
    return "BF16" in openvino_capabilities()


def openvino_capabilities() -> list[str]:
    """OpenVINO's CPU plugin `OPTIMIZATION_CAPABILITIES` on this CPU (e.g. FP32, BF16, INT8)."""
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def check_openvino_precision(precision: str) -> None:
    """Refuse a precision OpenVINO's CPU plugin does not report among its capabilities on this CPU.

    Raises:
        UsageError: bf16 without BF16 (AVX512-BF16 or AMX needed), int8 without INT8.
    """
    caps = openvino_capabilities()
    need = {"bf16": ("BF16", "it needs AVX512-BF16 or AMX"), "int8": ("INT8", "it needs AVX2, AVX512 or AMX")}
    if precision in need and need[precision][0] not in caps:
        from reference.plumbing.platform import cpu_model

        cap, why = need[precision]
        raise UsageError(f"backend 'openvino' cannot run {precision} on this CPU ({cpu_model()}: OpenVINO reports no "
                         f"{cap} capability, only {', '.join(caps)}; {why}); use --precision fp32")


def compiled_cache_dir(onnx_path: Path, cache: Path) -> Path:
    """The folder of OpenVINO's compiled blobs of one cached graph: `<cache>/ov_cache/<graph name
    without .onnx or .xml>` (OpenVINO's `CACHE_DIR` for that graph only, so its blobs can be told apart)."""
    return cache / COMPILED_DIR / graph_stem(onnx_path.name)


def graph_stem(name: str) -> str:
    """A cached graph's file name without its suffix: `.onnx` (fp32 graphs) or `.xml` (int8 IR)."""
    return name.removesuffix(".onnx").removesuffix(".xml")


def compiled_problems(folder: Path, onnx_path: Path) -> list[str]:
    """What is wrong with a compiled-model cache folder (`compiled_cache_dir`): its blobs against the
    sizes and digests its sidecar (`<folder>.json`, kind "openvino-cache") recorded after the compile
    that wrote them, an unrecorded file, or blobs compiled from other graph files than the ones now
    cached (the `graph_files` it records against the graph's sidecar). [] for an empty folder.

    OpenVINO has no check of its own: a blob with changed bytes loads and computes wrong images.
    """
    if not folder.is_dir() or not any(p.is_file() for p in folder.iterdir()):
        return []
    problems = verify_artifact(folder)
    if not problems and _recorded(folder, "graph_files") != _recorded(onnx_path, "files"):
        problems.append(f"compiled from other graph files than {onnx_path.name}")
    return problems


def _recorded(artifact: Path, key: str) -> object:
    """`files` (top level) or an `artifact` field of `artifact`'s sidecar; None when unreadable or absent."""
    try:
        meta = json.loads(sidecar_path(artifact).read_text())
        return meta.get(key) if key == "files" else meta["artifact"].get(key)
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None


_warned_unwritable: set[str] = set()  # compiled-model caches this process has warned about


@contextlib.contextmanager
def compiled_model_cache(onnx_path: Path, cache: Path, announce: Callable[[str], None] | None) -> Iterator[Path | None]:
    """OpenVINO's `CACHE_DIR` for compiling `onnx_path`, checked: for the block, the folder
    (`compiled_cache_dir`) with only blobs that match their recorded digests, or None where it
    cannot be written (a read-only cache: the block compiles without a compiled-model cache; one
    warning per process).

    Damaged or unrecorded blobs (`compiled_problems`) are announced in one line and removed before
    the block, so OpenVINO never loads them; after it, blobs the compile wrote are recorded in the
    folder's sidecar. The block holds a lock (`<folder>.lock`, `filelock`): a second process
    compiling the same graph waits, then loads the recorded blob.
    """
    from filelock import FileLock

    folder = compiled_cache_dir(onnx_path, cache)
    lock = FileLock(folder.with_name(folder.name + ".lock"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"no write permission on {folder}")
        lock.acquire()
    except OSError as e:
        root = str(folder.parent)
        if announce is not None and root not in _warned_unwritable:
            announce(f"warning: the compiled-model cache {root} cannot be written ({e}); OpenVINO compiles the graphs "
                     "in every process instead (a slower start). Set PSP_ENGINE_CACHE to a writable folder to cache them")
        _warned_unwritable.add(root)
        folder = None
    if folder is None:
        yield None
        return
    try:
        problems = compiled_problems(folder, onnx_path)
        if problems:
            if announce is not None:
                announce(f"damaged compiled-model cache {folder} ({', '.join(problems)}): not used, compiling again")
            for p in folder.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        listing = lambda: sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())  # noqa: E731
        before = listing()
        yield folder
        if listing() != before or problems:  # the compile wrote a blob: record what it wrote
            write_sidecar(folder, None, COMPILED_KIND, graph=onnx_path.name, graph_files=_recorded(onnx_path, "files"))
    finally:
        lock.release()


MAX_STREAMS = 4  # OpenVINO streams of a batch call at most: each holds one image's activations (1024 px: ~0.5 GB)


def openvino_streams(threads: int) -> int:
    """How many OpenVINO streams to ask of `openvino_runner` (`streams=`) for calls with >= 2 images:
    one per core, at most `MAX_STREAMS` (each stream holds one image's activations), so
    `threads // streams` threads per stream; 1 (no streams) where `threads` is 1. Not the default:
    on 2 Zen 3 cores 2 streams ran 1.09-1.15x (encoder) and 1.17-1.31x (generator) faster than the
    latency path but raised the peak RSS at batch 8 at 1024 px from 2.9 to 3.7 GiB (a second
    compiled model holds a second copy of the weights), where the static generator gives 1.40x for
    +0.16 GiB (benchmarks/RESULTS.md "Issue 20: OpenVINO streams"); `python -m benchmarks.cpu_engines
    --ov-streams` measures it again."""
    return max(1, min(int(threads), MAX_STREAMS))


class OpenVINORunner:
    """An OpenVINO CPU compiled model of one cached graph as a callable `a [B, ...] float32 -> [B, ...]
    float32` (see `openvino_runner`, which builds it).

    The latency model (LATENCY hint, one stream of `threads` threads, one request; with
    `static_batch`, compiled for that batch) is compiled at construction and runs a call of 1 image,
    or any call when `streams` is 1. With `streams` >= 2, the first call of >= 2 images compiles the
    streams model (THROUGHPUT hint, `NUM_STREAMS=streams`, `threads // streams` threads per stream;
    a second copy of the weights), which runs such calls one image per request on an
    `openvino.AsyncInferQueue` of `streams` requests, `streams` images at once, each on its own
    cores, and returns them in input order.

    Attributes:
        streams: streams of the calls with >= 2 images; 1 runs every call on the latency path
            (benchmarks set it to compare the two paths on one compiled model).
        last_path: the path the last call took: "latency" or "streams" (None before the first call).
    """

    def __init__(self, onnx_path: Path, input_name: str, output_name: str, float_hint: str, cache: Path,
                 threads: int, streams: int, release_pages: bool, announce: Callable[[str], None] | None,
                 static_batch: int | None = None):
        self.path, self.input_name, self.output_name = Path(onnx_path), input_name, output_name
        self.float_hint, self.cache, self.threads, self.streams = float_hint, cache, int(threads), int(streams)
        self.static_batch = static_batch
        self.release_pages, self.announce = release_pages, announce
        self._mapped_before = mapped_files()
        self._lock = threading.Lock()  # the lazy compile of the streams model
        latency = self._compile({"PERFORMANCE_HINT": "LATENCY"}, static_batch)
        self._request, self._latency_output = latency.create_infer_request(), latency.output(output_name)
        self._queue = None  # the streams model's AsyncInferQueue, once a call with >= 2 images came
        self._paged_out = [False, False]  # latency, streams: their first call gave back the mapped pages
        self.last_path: str | None = None

    def _compile(self, props: dict, batch: int | None = None):
        """The graph compiled with `props` over the runner's threads and precision hint; with `batch`,
        its input reshaped to that static batch first (`Model.reshape`)."""
        import openvino as ov

        core = ov.Core()
        with compiled_model_cache(self.path, self.cache, self.announce) as cache_dir:
            if cache_dir is not None:
                core.set_property({"CACHE_DIR": str(cache_dir)})
            model = str(self.path)
            if batch is not None:
                model = core.read_model(model)
                model.reshape({self.input_name: [batch, *model.input(self.input_name).get_partial_shape()[1:]]})
            compiled = core.compile_model(model, "CPU", {
                "INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": self.float_hint, **props})
            del model
        if self.release_pages:  # the weight pages the compile read (a static reshape reads the graph's)
            page_out(mapped_files() - self._mapped_before)
        return compiled

    def _page_out(self, which: int) -> None:
        # A model's first inference reordered the weights into the plugin's own buffers; the mapped
        # file (the graph's .onnx.data, or its compiled blob in the cache) stays resident although it
        # is never read again: give its pages back (1.0 GiB for the 1024 px demo; benchmarks/RESULTS.md
        # "ONNX export, first run ...").
        if self.release_pages and not self._paged_out[which]:
            self._paged_out[which] = True
            page_out(mapped_files() - self._mapped_before)

    def __call__(self, a: np.ndarray) -> np.ndarray:
        if len(a) < 2 or self.streams < 2:
            n = self.static_batch or len(a)
            outs = []
            for i in range(0, len(a), n):
                chunk = a[i : i + n]
                if len(chunk) < n:  # a static batch: the last chunk padded with its last image
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], n - len(chunk), axis=0)])
                res = self._request.infer({self.input_name: chunk})  # copies the outputs (share_outputs=False)
                outs.append(np.array(res[self._latency_output], dtype=np.float32, copy=True)[: len(a) - i])
            out = outs[0] if len(outs) == 1 else np.concatenate(outs)
            self._page_out(0)
            self.last_path = "latency"
            return out
        with self._lock:
            if self._queue is None:
                import openvino as ov

                compiled = self._compile({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": self.streams},
                                         1 if self.static_batch else None)
                self._queue = ov.AsyncInferQueue(compiled, self.streams)
                self._streams_output = compiled.output(self.output_name)
            queue, output = self._queue, self._streams_output
            outs: list[np.ndarray | None] = [None] * len(a)

            def done(request, i: int) -> None:  # on OpenVINO's thread as request i ends: copy its output
                outs[i] = np.array(request.get_tensor(output).data, dtype=np.float32, copy=True)

            queue.set_callback(done)
            for i in range(len(a)):  # one image per request; start_async waits for a free request
                queue.start_async({self.input_name: a[i : i + 1]}, i)
            queue.wait_all()
            self._page_out(1)
            self.last_path = "streams"
        if any(o is None for o in outs):
            raise RuntimeError(f"OpenVINO returned no output for an image of {self.path.name}")
        return np.concatenate(outs)


def openvino_runner(onnx_path: Path, input_name: str, output_name: str, precision: str, cache: Path,
                    threads: int | None = None, release_pages: bool = True,
                    announce: Callable[[str], None] | None = None, streams: int = 1,
                    static_batch: int | None = None) -> OpenVINORunner:
    """An OpenVINO CPU compiled model of `onnx_path` (an ONNX graph, or the IR `.xml` of an int8 one) as
    a callable `OpenVINORunner` `a [B, ...] float32 -> [B, ...] float32`, in input order.

    Paths: the latency path (LATENCY hint, one stream, `threads` threads on one request, default
    `physical_cores()`) runs every call when `streams` is 1 (the default), else calls of 1 image;
    with `streams` >= 2 (`openvino_streams` gives one per core) a call of >= 2 images runs on a
    second compiled model with that many streams, one image per request, `streams` at once (faster
    on 2 Zen 3 cores, but a second copy of the weights: not the default, see `openvino_streams`).
    `static_batch`: the latency model is compiled for that fixed batch (`Model.reshape` before the
    compile; calls run in chunks of it, a short last chunk padded): the generator with its chunk of
    1 ran 1.29x (256 px) and 1.40x (1024 px) faster than with a dynamic batch on 2 Zen 3 cores, for
    +0.16 GiB peak RSS at 1024 px batch 8 (benchmarks/RESULTS.md "Issue 20: OpenVINO streams").

    Precision hint f32 or bf16 (int8: bf16 where the plugin has BF16, else f32, for the layers left
    float); compiled blobs cached under `<cache>/ov_cache/<graph>` (one per compile setting) and
    checked before use (`compiled_model_cache`; a cache that cannot be written: compiled every time,
    with one warning to `announce`). After each compile and after each compiled model's first call,
    the pages of the weight files the compiles mapped are given back
    (`reference.plumbing.platform.page_out`): results are unchanged, the resident set is ~1 GiB smaller for
    the 1024 px model (`release_pages=False` keeps them: `benchmarks/openvino_memory.py` compares).

    Source: OpenVINO Runtime Python API (`Core.compile_model`, `AsyncInferQueue`; CPU plugin
    properties `PERFORMANCE_HINT`, `NUM_STREAMS`, `INFERENCE_NUM_THREADS`, `INFERENCE_PRECISION_HINT`).

    Raises:
        UsageError: bf16 (int8) asked for where the CPU plugin has no BF16 (INT8) capability.
    """
    check_openvino_precision(precision)
    float_hint = "bf16" if precision == "bf16" or (precision == "int8" and openvino_has_bf16()) else "f32"
    return OpenVINORunner(Path(onnx_path), input_name, output_name, float_hint, cache, int(threads or physical_cores()),
                          int(streams), release_pages, announce, static_batch)


# runtime name -> (compile, max images per encoder call, per generator call); chunk sizes measured
# (benchmarks/RESULTS.md "CPU engines": OpenVINO peak RSS 5.0 GiB with chunks (8, 2), 3.8 GiB with (2, 1)).
# OpenVINO's chunks apply to its latency path only: with streams (not the default), a call's images run
# one per request, `streams` at once (`OpenVINORunner`).
# openvino's generator compiled for a static batch of its chunk (1): 1.29x (256 px) / 1.40x (1024 px)
# synthesis on 2 Zen 3 cores, +0.16 GiB peak RSS (benchmarks/RESULTS.md "Issue 20: OpenVINO streams").
# The encoder keeps a dynamic batch: its chunk of 2 would need a second compile (weights) or padding.
# A quantized generator (int8 IR `.xml`) keeps a dynamic batch too: its static compile's images differ
# from its dynamic one's by 2-5e-2 relative (fp32: 9e-7), not yet checked against the int8 contract;
# int8's default recipe leaves the generator float (its fp32 `.onnx`), which gets the static batch.
OPENVINO_STATIC_GENERATOR = True
RUNTIMES: dict[str, tuple[Callable[..., Runner], int, int]] = {
    "onnxruntime": (ort_runner, 8, 2),
    "openvino": (openvino_runner, 2, 1),
}


class GraphPSP(nn.Module):
    """pSp on an ONNX runtime (CPU): `encode` and `synthesize` run the exported encoder and generator.

    Args:
        encoder_onnx, generator_onnx: the exported fp32 parts (their sidecars give the description),
            or for int8 the parts `export.quantize.cached_int8_graphs` gives (IR `.xml` or fp32 `.onnx`).
        runtime: a `RUNTIMES` name ("onnxruntime" or "openvino").
        precision: "fp32", "bf16" (openvino on a CPU with bf16 units) or "int8" (openvino).
        cache: the engine cache (OpenVINO's compiled-model cache lives under it).
        threads: intra-op threads (default: the CPUs available to this process).
        announce: receives one-line notes of the compile (a damaged compiled-model cache not used, a
            cache that cannot be written).
        streams: openvino only: streams of the calls with >= 2 images (default 1: every call on
            the latency path, in chunks; see `openvino_streams`).

    Attributes:
        description: the model description (precision and backend set).

    Raises:
        UsageError: a precision the runtime cannot run here.
        CheckpointError: a missing or stale sidecar.
    """

    def __init__(self, encoder_onnx: Path, generator_onnx: Path, runtime: str, precision: str, cache: Path,
                 threads: int | None = None, announce: Callable[[str], None] | None = None,
                 streams: int | None = None):
        super().__init__()
        compile_graph, self.max_encoder_batch, self.max_generator_batch = RUNTIMES[runtime]
        description, _ = read_sidecar(generator_onnx)
        self.description: ModelDescription = description.replace(precision=precision, backend=runtime)
        more = {} if streams is None else {"streams": streams}
        self.encoder = compile_graph(Path(encoder_onnx), "x", "w_plus", precision, cache, threads, announce=announce,
                                     **more)
        if runtime == "openvino" and OPENVINO_STATIC_GENERATOR and Path(generator_onnx).suffix == ".onnx":
            more["static_batch"] = self.max_generator_batch
        self.generator = compile_graph(Path(generator_onnx), "w_plus", "img", precision, cache, threads,
                                       announce=announce, **more)

    @staticmethod
    def _chunks(run: Runner, a: torch.Tensor, n: int) -> torch.Tensor:
        """`run` on `a` in chunks of at most `n` images, in order; a runner with streams
        (`OpenVINORunner.streams` >= 2) takes a call of >= 2 images whole (one image per request)."""
        a = np.ascontiguousarray(a.detach().cpu().numpy(), np.float32)
        if a.shape[0] >= 2 and getattr(run, "streams", 1) >= 2:
            n = a.shape[0]
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
    (`load_reference` is called only then). int8 is loaded by the registry's loader, which
    quantizes these graphs first (`export.quantize.cached_int8_graphs`).

    Raises:
        UsageError: a precision this runtime cannot run on this CPU (checked before any export);
            see also `cached_graphs`.
    """
    if runtime == "openvino":
        check_openvino_precision(precision)
    paths = cached_graphs(checkpoint, load_reference, cache / "onnx", announce)
    return GraphPSP(paths["encoder"], paths["generator"], runtime, precision, cache, threads, announce)
