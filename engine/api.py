"""The engine's Python API: `engine.load(...) -> Engine`, `Engine.invert(x) -> (img, w_plus)`.

Source: Richardson et al., "Encoding in Style" (CVPR 2021), Sec. 3: `pSp(x) = G(E(x) + w_avg)`;
inference as official `scripts/inference.py` (`randomize_noise=False`, `resize_outputs` default
False). The "reference" backend runs `reference.PSP` as is; faster backends will plug in behind the
same `Engine` with the same arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from reference import PSP, load_psp
from reference.errors import CheckpointError, UsageError
from reference.files import cache_dir
from reference.psp import load_mapping

from . import demo

ENCODER_SIZE = 256  # px, side of the encoder input


def _load_reference(path: Path, device: torch.device, trust_pickle: bool) -> PSP:
    return load_psp(path, trust_pickle=trust_pickle).to(device)


def _load_triton(path: Path, device: torch.device, trust_pickle: bool) -> torch.nn.Module:
    """Reference encoder + the synthesis network on the Triton kernels (fp16 activations on CUDA;
    fp32 in Triton's CPU interpreter, which only runs with TRITON_INTERPRET=1 and is for tests)."""
    from kernels._triton import check_impl, interpret_mode

    try:
        check_impl("engine backend 'triton'", "triton", torch.empty(0, device=device))
    except RuntimeError as e:  # KernelUnavailableError: no triton, no CUDA, no interpreter
        raise UsageError(str(e)) from None
    from kernels.generator import TritonPSP

    dtype = torch.float32 if interpret_mode() else torch.float16
    return TritonPSP(_load_reference(path, device, trust_pickle), dtype=dtype, impl="triton").to(device)


def _load_engine(path: Path, device: torch.device, trust_pickle: bool) -> torch.nn.Module:
    """The engine formulation (static weights, folded BatchNorm, batched heads) in torch eager."""
    from export.engine_model import EnginePSP

    return EnginePSP(_load_reference(path, device, trust_pickle)).to(device)


def _load_graph_backend(name: str, package: str, path: Path, device: torch.device, trust_pickle: bool):
    """A CPU backend running the cached ONNX graphs of the engine formulation (exported on first use;
    `path` must be a checkpoint file). `name` is the backend, `package` the Python package it needs."""
    import importlib

    if device.type != "cpu":
        raise UsageError(f"backend {name!r} runs on the CPU; use --device cpu (or backend 'triton'/'engine' on CUDA)")
    try:
        importlib.import_module(package)
    except ImportError:
        raise UsageError(f"backend {name!r} needs the {package} package (pip install {package})") from None
    from reference.checkpoint import read_checkpoint

    if not path.is_file():
        read_checkpoint(path)  # raises the CheckpointError naming the problem
    if name == "onnxruntime":
        from export.ort import load_ort as load_graphs
    else:
        from export.openvino import load_openvino as load_graphs
    return load_graphs(path, lambda: _load_reference(path, device, trust_pickle), cache_dir() / "onnx")


def _load_onnxruntime(path: Path, device: torch.device, trust_pickle: bool) -> torch.nn.Module:
    """The engine formulation exported to ONNX (cached under the engine cache) on ONNX Runtime's CPU provider."""
    return _load_graph_backend("onnxruntime", "onnxruntime", path, device, trust_pickle)


def _load_openvino(path: Path, device: torch.device, trust_pickle: bool) -> torch.nn.Module:
    """The same cached ONNX graphs as 'onnxruntime', compiled by OpenVINO's CPU plugin (fp32)."""
    return _load_graph_backend("openvino", "openvino", path, device, trust_pickle)


def _load_tensorrt(path: Path, device: torch.device, trust_pickle: bool):
    """TensorRT plans built by `python -m export.tensorrt` (`<stem>.encoder.plan` + `<stem>.generator.plan`);
    `path` names the plans, not a .pt checkpoint. CUDA only."""
    from export.tensorrt import TensorRTError, load_tensorrt_backend

    try:
        return load_tensorrt_backend(path, device)
    except TensorRTError as e:
        raise UsageError(str(e)) from None


BACKENDS: dict[str, Callable[[Path, torch.device, bool], torch.nn.Module]] = {
    "reference": _load_reference,
    "engine": _load_engine,
    "onnxruntime": _load_onnxruntime,
    "openvino": _load_openvino,
    "triton": _load_triton,
    "tensorrt": _load_tensorrt,
}
# What "auto" picks per device, fastest first (measured: benchmarks/RESULTS.md, "CPU engines"); a
# backend whose package is not installed is passed over.
AUTO_BACKEND = {"cpu": ("openvino", "onnxruntime", "engine"), "cuda": ("engine",)}
_BACKEND_PACKAGE = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


def resolve_backend(backend: str, device: torch.device) -> str:
    """`backend`, or for "auto" the fastest measured backend for the device type whose package is installed."""
    if backend != "auto":
        return backend
    import importlib.util

    for choice in AUTO_BACKEND[device.type]:
        package = _BACKEND_PACKAGE.get(choice)
        if package is None or importlib.util.find_spec(package) is not None:
            return choice
    return "reference"  # pragma: no cover - "engine" needs no extra package


DEVICES = ("cpu", "cuda")


def resolve_device(device: str | torch.device) -> torch.device:
    """Check a device name against what this machine has.

    Args:
        device: "cpu", "cuda" or "cuda:<index>".

    Returns:
        The `torch.device`.

    Raises:
        UsageError: an unknown device type, or CUDA asked for where torch has none.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"unknown device {device!r}; use one of: {', '.join(DEVICES)}") from None
    if dev.type not in DEVICES:
        raise UsageError(f"device {dev.type!r} is not supported; use one of: {', '.join(DEVICES)}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {str(device)!r} requested but CUDA is not available (torch {torch.__version__}, "
                "no usable GPU or a CPU-only build); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


class Engine:
    """A loaded pSp model ready for inference. Build with `engine.load`.

    Attributes:
        checkpoint: `Path` of the checkpoint file.
        is_demo: True for the built-in random-weight demo checkpoint.
        backend: backend name; device: `torch.device`.
        input_nc: encoder input channels (3 RGB, 1 sketch, label_nc for segmentation).
        label_nc: 0 RGB, 1 sketch, >1 number of segmentation classes.
        output_size: generator resolution R (256, 512 or 1024).
        n_styles: number of W+ style vectors (`2*log2(R) - 2`).
        opts: the checkpoint's opts (dict).
    """

    def __init__(self, model: torch.nn.Module, checkpoint: Path, backend: str, device: torch.device,
                 is_demo: bool):
        self.model = model
        self.checkpoint = checkpoint
        self.backend = backend
        self.device = device
        self.is_demo = is_demo
        self.opts: dict = dict(model.opts)
        self.input_nc: int = int(model.input_nc)
        self.label_nc: int = int(model.label_nc)
        self.output_size: int = int(model.output_size)
        self.n_styles: int = int(model.n_styles)

    def __repr__(self) -> str:
        return (f"Engine(checkpoint={str(self.checkpoint)!r}, backend={self.backend!r}, device={str(self.device)!r}, "
                f"input_nc={self.input_nc}, label_nc={self.label_nc}, output_size={self.output_size}, "
                f"n_styles={self.n_styles}, is_demo={self.is_demo})")

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (self.input_nc, ENCODER_SIZE, ENCODER_SIZE):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected x [B, {self.input_nc}, 256, 256] (input_nc={self.input_nc}), got {shape}")
        if x.dtype != torch.float32:
            raise ValueError(f"expected x float32, got {x.dtype}")
        return x.to(self.device)

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encode inputs into W+ (latent_avg added).

        Args:
            x: `[B, input_nc, 256, 256]` float32 from `reference.images.to_input_tensor`: RGB in
                [-1, 1], sketch in [0, 1], segmentation one-hot in {0, 1}.

        Returns:
            w_plus `[B, n_styles, 512]` float32 on `self.device`.

        Raises:
            ValueError: x of the wrong shape or dtype.
        """
        return self.model.encode(self._check_input(x))

    @torch.inference_mode()
    def synthesize(self, w_plus: torch.Tensor, resize: bool = False) -> torch.Tensor:
        """Render W+ latents with the checkpoint's fixed noise buffers.

        Args:
            w_plus: `[B, n_styles, 512]` float32.
            resize: average-pool the output to 256x256 (official `--resize_outputs`).

        Returns:
            img `[B, 3, R, R]` float32 on `self.device`, unclamped (about [-1, 1] for trained
            weights); R = output_size, or 256 with `resize`.

        Raises:
            ValueError: w_plus of the wrong shape.
        """
        if w_plus.ndim != 3 or tuple(w_plus.shape[1:]) != (self.n_styles, 512):
            raise ValueError(f"expected w_plus [B, {self.n_styles}, 512], got {tuple(w_plus.shape)}")
        return self.model.synthesize(w_plus.to(self.device), resize=resize)

    @torch.inference_mode()
    def invert(self, x: torch.Tensor, resize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and re-synthesize: the official pSp inference forward.

        Args:
            x: `[B, input_nc, 256, 256]` float32 (see `encode`).
            resize: average-pool the output to 256x256.

        Returns:
            `(img, w_plus)`: img `[B, 3, R, R]` float32 unclamped, w_plus `[B, n_styles, 512]`
            float32, both on `self.device` (inference tensors: no autograd; `.clone()` outside
            inference mode to differentiate through them).

        Raises:
            ValueError: x of the wrong shape or dtype.
        """
        w_plus = self.encode(x)
        return self.synthesize(w_plus, resize=resize), w_plus

    @torch.inference_mode()
    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """StyleGAN2 mapping network z -> w, as official `pSp.forward(z, input_code=True, return_latents=True)`
        before its repeat to n_styles (no latent_avg, no truncation; Karras et al. 2020: PixelNorm + 8
        EqualLinear, lr_mul 0.01).

        The reference, engine and triton backends use their model's mapping; onnxruntime and
        openvino hold no torch weights, so the mapping network alone is built once from the
        checkpoint's `decoder.style.*` keys (read memory-mapped, `weights_only=True`) and cached.

        Args:
            z: `[B, 512]` float32, standard normal (e.g. `engine.latents.mixing_z`).

        Returns:
            w `[B, 512]` float32 on `self.device`.

        Raises:
            ValueError: z of the wrong shape or dtype.
            UsageError: a backend with no checkpoint to take the mapping from (tensorrt plans).
            CheckpointError: the checkpoint's mapping keys are missing or mis-shaped (named).
        """
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != 512:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"expected z [B, 512], got {shape}")
        if z.dtype != torch.float32:
            raise ValueError(f"expected z float32, got {z.dtype}")
        net = self.__dict__.get("_mapping")
        if net is None:
            net = getattr(self.model, "mapping", None)  # reference.PSP.mapping, EnginePSP.mapping
            if net is None and getattr(self.model, "psp", None) is not None:  # kernels.generator.TritonPSP
                net = self.model.psp.mapping
            if net is None:
                if self.backend == "tensorrt" or not Path(self.checkpoint).is_file():
                    raise UsageError(
                        f"backend {self.backend!r} runs {self.checkpoint}, which holds no mapping network (z -> w) "
                        "for style mixing; use --backend engine (or reference) with the pSp checkpoint"
                    )
                net = load_mapping(self.checkpoint, getattr(self, "trust_pickle", False)).to(self.device)
            self._mapping = net
        return net(z.to(self.device)).float()


def load(checkpoint: str | os.PathLike | None = None, backend: str = "reference", device: str = "cpu",
         trust_pickle: bool = False, announce: Callable[[str], None] | None = None) -> Engine:
    """Load a pSp checkpoint into an `Engine`.

    Args:
        checkpoint: an official pSp `.pt` (`{'state_dict', 'opts', 'latent_avg'}`), or None for
            the built-in demo checkpoint (random weights; see `engine.demo`).
        backend: "auto" (the fastest measured for the device: `AUTO_BACKEND`) or one of `BACKENDS`:
            "reference" (the official formulation, fp32), "engine" (static-weight formulation,
            torch, fp32), "onnxruntime" (that formulation as ONNX, exported to the cache on first
            use; CPU, fp32), "triton" (reference encoder, synthesis on the Triton kernels: CUDA,
            fp16; on a CPU only under TRITON_INTERPRET=1, for tests), "tensorrt" (`checkpoint`
            names TensorRT plans built by `python -m export.tensorrt`; CUDA).
        device: "cpu" or "cuda[:i]".
        trust_pickle: allow full unpickling of old checkpoints that safe loading refuses; it
            runs code from the file, so only for files you trust.
        announce: receives one-line progress notes (e.g. the demo checkpoint being built).

    Returns:
        An `Engine` in inference mode, fp32.

    Raises:
        UsageError: unknown backend, unavailable device, or a backend that cannot run here (also a
            ValueError).
        CheckpointError: missing/unreadable file, a StyleGAN2 (not pSp) checkpoint, missing or
            mis-shaped keys (named in the message).
    """
    if backend not in BACKENDS and backend != "auto":
        raise UsageError(f"unknown backend {backend!r}; available: auto, {', '.join(BACKENDS)}")
    dev = resolve_device(device)
    backend = resolve_backend(backend, dev)
    is_demo = checkpoint is None
    path = demo.demo_checkpoint_path(announce) if is_demo else Path(checkpoint)
    try:
        model = BACKENDS[backend](path, dev, trust_pickle)
    except CheckpointError as e:
        if is_demo:
            raise CheckpointError(f"{e} (this is the cached demo checkpoint: delete {path} to rebuild it)") from None
        raise
    eng = Engine(model, path, backend, dev, is_demo)
    eng.trust_pickle = trust_pickle  # Engine.mapping re-reads the checkpoint for graph backends
    return eng
