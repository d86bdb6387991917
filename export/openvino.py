"""OpenVINO backend: the engine-formulation ONNX graphs (the same ones `export.ort` runs) on OpenVINO's CPU plugin.

Source: OpenVINO Runtime Python API (`openvino.Core.compile_model`, `CompiledModel.create_infer_request`,
`InferRequest.infer`) and its CPU-plugin properties (`PERFORMANCE_HINT`, `INFERENCE_NUM_THREADS`,
`INFERENCE_PRECISION_HINT`). The graphs come from `export.onnx` (encoder and generator parts,
fp32), exported once per checkpoint and cached by `export.ort.cached_graphs`.

Precision is pinned to fp32 (`INFERENCE_PRECISION_HINT=f32`): on CPUs with AVX512-BF16 or AMX the
CPU plugin would otherwise run in bf16 by default, which is far outside the fp32 parity bound.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .engine_model import face_pool
from .ort import cached_graphs, physical_cores


def compile_config(threads: int | None = None) -> dict:
    """CPU-plugin properties: latency hint (one stream, all cores on one request), fp32 inference."""
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": int(threads or physical_cores()),
        "INFERENCE_PRECISION_HINT": "f32",
    }


class OpenVinoPSP(nn.Module):
    """pSp on OpenVINO (CPU): `encode` and `synthesize` run the exported encoder and generator.

    Exposes what `engine.Engine` uses: `opts`, `input_nc`, `label_nc`, `output_size`, `n_styles`,
    `dataset_type`, `encode`, `synthesize`.

    Args:
        encoder_onnx, generator_onnx: the exported fp32 parts (their JSON sidecars give the attributes).
        threads: inference threads (default: the CPUs available to this process).
        max_encoder_batch, max_generator_batch: each part runs in chunks of at most this many
            images. An OpenVINO infer request keeps the intermediate buffers of the largest batch it
            has run, so chunking is what bounds peak memory: at 1024 px, batch 8, measured peak RSS
            5.0 GiB with chunks (8, 2), 3.8 GiB with (2, 1) (benchmarks/RESULTS.md). The per-image
            cost hardly depends on the batch (static weights).

    Raises:
        ImportError: the `openvino` package is missing.
    """

    def __init__(self, encoder_onnx: Path, generator_onnx: Path, threads: int | None = None,
                 max_encoder_batch: int = 2, max_generator_batch: int = 1):
        super().__init__()
        import openvino as ov

        side = json.loads(Path(generator_onnx).with_suffix(".json").read_text())
        self.opts = side["opts"]
        for name in ("input_nc", "label_nc", "output_size", "n_styles", "dataset_type"):
            setattr(self, name, side[name])
        core = ov.Core()
        config = compile_config(threads)
        self.encoder = core.compile_model(str(encoder_onnx), "CPU", config)
        self.generator = core.compile_model(str(generator_onnx), "CPU", config)
        self._encoder_req = self.encoder.create_infer_request()
        self._generator_req = self.generator.create_infer_request()
        self.max_encoder_batch = max_encoder_batch
        self.max_generator_batch = max_generator_batch

    @staticmethod
    def _run(req, compiled, name: str, output: str, a: np.ndarray) -> torch.Tensor:
        res = req.infer({name: a})  # copies the outputs (share_outputs=False)
        return torch.from_numpy(np.array(res[compiled.output(output)], dtype=np.float32, copy=True))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, input_nc, 256, 256]` float32 -> w_plus `[B, n_styles, 512]` float32."""
        a = np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)
        n = self.max_encoder_batch
        return torch.cat([self._run(self._encoder_req, self.encoder, "x", "w_plus", np.ascontiguousarray(a[i : i + n]))
                          for i in range(0, a.shape[0], n)])

    def synthesize(self, w_plus: torch.Tensor, resize: bool = False) -> torch.Tensor:
        """w_plus `[B, n_styles, 512]` -> img `[B, 3, R, R]` float32 (256 with `resize`)."""
        w = np.ascontiguousarray(w_plus.detach().cpu().numpy(), np.float32)
        out = []
        for i in range(0, w.shape[0], self.max_generator_batch):
            img = self._run(self._generator_req, self.generator, "w_plus", "img",
                            np.ascontiguousarray(w[i : i + self.max_generator_batch]))
            out.append(face_pool(img) if resize else img)
        return torch.cat(out)


def load_openvino(checkpoint: Path, load_reference: Callable[[], object], cache: Path,
                  threads: int | None = None) -> OpenVinoPSP:
    """`OpenVinoPSP` of `checkpoint`: the cached ONNX graphs (shared with the onnxruntime backend),
    exported first if missing; `load_reference` is called only then."""
    paths = cached_graphs(checkpoint, load_reference, cache)
    return OpenVinoPSP(paths["encoder"], paths["generator"], threads=threads)
