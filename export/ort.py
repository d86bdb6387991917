"""ONNX Runtime backend: the engine-formulation ONNX graphs run by ONNX Runtime's CPU provider.

Source: ONNX Runtime Python API (`onnxruntime.InferenceSession`, `SessionOptions`); the graphs
come from `export.onnx` (encoder and generator parts, fp32), exported once per checkpoint and
cached.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .engine_model import EnginePSP, face_pool
from .onnx import export_onnx

EXPORT_VERSION = "1"  # part of the cache key: bump when the exported graph changes


def physical_cores() -> int:
    """Cores to use for intra-op threads: the CPUs this process may run on (2 on CI)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None):
    """Tuned CPU session options: all graph optimisations, one intra-op thread per core, no inter-op
    parallelism (the graph is a chain), memory pattern planning on."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.enable_mem_pattern = True
    so.enable_cpu_mem_arena = True
    so.log_severity_level = 3
    return so


def cache_paths(checkpoint: Path, cache: Path) -> dict[str, Path]:
    """Where the `encoder` and `generator` graphs of `checkpoint` are cached (keyed by the checkpoint's
    resolved path, size and mtime, and the export version)."""
    st = checkpoint.stat()
    key = hashlib.sha256(f"{checkpoint.resolve()}|{st.st_size}|{st.st_mtime_ns}|{EXPORT_VERSION}".encode()).hexdigest()[:16]
    return {part: cache / f"{checkpoint.stem}-{key}.{part}.onnx" for part in ("encoder", "generator")}


class OrtPSP(nn.Module):
    """pSp on ONNX Runtime (CPU): `encode` and `synthesize` run the exported encoder and generator.

    Exposes what `engine.Engine` uses: `opts`, `input_nc`, `label_nc`, `output_size`, `n_styles`,
    `dataset_type`, `encode`, `synthesize`.

    Args:
        encoder_onnx, generator_onnx: the exported parts (their JSON sidecars give the attributes).
        threads: intra-op threads (default: the CPUs available to this process).
        max_generator_batch: the generator runs in chunks of at most this many images, which bounds
            peak memory at 1024 px (activations of one 1024 image are ~0.5 GB) without costing speed
            (static weights: per-image cost does not depend on the batch).
    """

    def __init__(self, encoder_onnx: Path, generator_onnx: Path, threads: int | None = None,
                 max_generator_batch: int = 2):
        super().__init__()
        import onnxruntime as ort

        side = json.loads(Path(generator_onnx).with_suffix(".json").read_text())
        self.opts = side["opts"]
        for name in ("input_nc", "label_nc", "output_size", "n_styles", "dataset_type"):
            setattr(self, name, side[name])
        so = session_options(threads)
        providers = ["CPUExecutionProvider"]
        self.encoder = ort.InferenceSession(str(encoder_onnx), so, providers=providers)
        self.generator = ort.InferenceSession(str(generator_onnx), so, providers=providers)
        self.max_generator_batch = max_generator_batch

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, input_nc, 256, 256]` float32 -> w_plus `[B, n_styles, 512]` float32."""
        (w_plus,) = self.encoder.run(["w_plus"], {"x": np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)})
        return torch.from_numpy(w_plus)

    def synthesize(self, w_plus: torch.Tensor, resize: bool = False) -> torch.Tensor:
        """w_plus `[B, n_styles, 512]` -> img `[B, 3, R, R]` float32 (256 with `resize`)."""
        w = np.ascontiguousarray(w_plus.detach().cpu().numpy(), np.float32)
        out = []
        for i in range(0, w.shape[0], self.max_generator_batch):
            (img,) = self.generator.run(["img"], {"w_plus": w[i : i + self.max_generator_batch]})
            img = torch.from_numpy(img)
            out.append(face_pool(img) if resize else img)
        return torch.cat(out)


def load_ort(checkpoint: Path, load_reference: Callable[[], object], cache: Path, threads: int | None = None) -> OrtPSP:
    """`OrtPSP` of `checkpoint`: the cached graphs, exported first if missing.

    Args:
        checkpoint: the pSp checkpoint file (the cache key).
        load_reference: returns the loaded `reference.PSP`; called only when the graphs must be
            exported, so a cached run never holds the torch weights (peak memory).
        cache: the folder of the cached graphs.
    """
    paths = cached_graphs(checkpoint, load_reference, cache)
    return OrtPSP(paths["encoder"], paths["generator"], threads=threads)


def cached_graphs(checkpoint: Path, load_reference: Callable[[], object], cache: Path) -> dict[str, Path]:
    """The fp32 `encoder` and `generator` ONNX graphs of `checkpoint` in `cache`, exported first if missing.

    Shared by the ONNX Runtime and OpenVINO backends (both run the same graphs).

    Args:
        checkpoint: the pSp checkpoint file (the cache key: resolved path, size, mtime, export version).
        load_reference: returns the loaded `reference.PSP`; called only when the graphs must be
            exported, so a cached run never holds the torch weights (peak memory).
        cache: the folder of the cached graphs.

    Returns:
        `{"encoder": path, "generator": path}` (each with its `.json` sidecar beside it).
    """
    paths = cache_paths(checkpoint, cache)
    if not all(p.is_file() and p.with_suffix(".json").is_file() for p in paths.values()):
        model = EnginePSP(load_reference())
        for part, path in paths.items():
            export_onnx(model, path, part=part, checkpoint=checkpoint)
        del model
        gc.collect()
    return paths
