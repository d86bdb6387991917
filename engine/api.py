"""The engine's Python API: `engine.load(...) -> Engine`, `Engine.invert(x) -> (img, w_plus)`.

Source: Richardson et al., "Encoding in Style" (CVPR 2021), Sec. 3: `pSp(x) = G(E(x) + w_avg)`;
inference as official `scripts/inference.py` (`randomize_noise=False`, `resize_outputs` default
False). The backends are the rows of `export.backends.BACKENDS` (each returns a model with `encode`,
`synthesize` at full resolution and a `description`: `export.backends.BackendModel`); the `Engine`
checks inputs, applies the official 256 resize once for all of them, and reads every fact of the
model (sizes, n_styles, backend, precision) from that description. The backend and precision are
resolved once per load (`plan_load`: the registry's `resolve`), before anything is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from reference.plumbing.errors import CheckpointError, UsageError
from reference.plumbing.files import cache_dir
from reference.description import ModelDescription
from reference.images import MAX_PIXELS, read_input, to_input_tensor
from reference.psp import face_pool, load_mapping

from export.backends import BACKENDS, Choice, check_calibration, load_model, resolve

from . import demo


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


@dataclass(frozen=True)
class LoadPlan:
    """What a load will load and run, resolved once (`plan_load`) before anything is loaded.

    Attributes:
        checkpoint: `Path` of the checkpoint file (TensorRT: the plans' stem; the demo: its cache
            path, built by `load_planned` when missing).
        device: the `torch.device`.
        choice: the registry's `export.backends.Choice` (backend, precision, reason).
        is_demo: the built-in random-weight demo checkpoint.
        trust_pickle: full unpickling allowed (see `engine.load`).
        calibration: int8: the folder of example inputs the quantization is calibrated on (None:
            the set the model makes itself; see `engine.load`).
    """

    checkpoint: Path
    device: torch.device
    choice: Choice
    is_demo: bool = False
    trust_pickle: bool = False
    calibration: Path | None = None


class Facts:
    """A model's facts, read from its `description` and the `LoadPlan` that loads it, never copied:
    what run options and manifests depend on. The base of `Engine`; `engine.run` builds one from a
    checkpoint's opts to check its manifest without loading the model.

    Args:
        description: the `reference.description.ModelDescription` (its backend and precision are
            those that run).
        plan: the `LoadPlan`.

    Attributes (read-only):
        backend, precision: what runs ("engine", "bf16", ...), from the description; reason: why
            (auto's choice, or asked for), from the plan's `Choice`.
        checkpoint, device, is_demo, trust_pickle, calibration: from the plan.
        input_nc: encoder input channels (3 RGB, 1 sketch, label_nc for segmentation).
        label_nc: 0 RGB, 1 sketch, >1 number of segmentation classes.
        output_size: generator resolution R (256, 512 or 1024).
        n_styles: number of W+ style vectors (`2*log2(R) - 2`).
        encoder_size: the encoder input's side (256 px).
        dataset_type, opts: the checkpoint's (opts a dict copy).
    """

    def __init__(self, description: ModelDescription, plan: LoadPlan):
        self._description = description
        self.plan = plan

    @property
    def description(self) -> ModelDescription:
        return self._description

    backend = property(lambda self: self.description.backend)
    precision = property(lambda self: self.description.precision)
    input_nc = property(lambda self: self.description.input_nc)
    label_nc = property(lambda self: self.description.label_nc)
    output_size = property(lambda self: self.description.output_size)
    n_styles = property(lambda self: self.description.n_styles)
    encoder_size = property(lambda self: self.description.encoder_size)
    dataset_type = property(lambda self: self.description.dataset_type)
    opts = property(lambda self: dict(self.description.opts))
    reason = property(lambda self: self.plan.choice.reason)
    checkpoint = property(lambda self: self.plan.checkpoint)
    device = property(lambda self: self.plan.device)
    is_demo = property(lambda self: self.plan.is_demo)
    trust_pickle = property(lambda self: self.plan.trust_pickle)
    calibration = property(lambda self: self.plan.calibration)


class Engine(Facts):
    """A loaded pSp model ready for inference. Build with `engine.load` (or `Engine.around` for a
    backend model already loaded).

    Args:
        model: the backend model (`export.backends.BackendModel`).
        plan: the `LoadPlan` it was loaded by.

    Attributes:
        model: the backend model; description: its `ModelDescription` (`model.description`).
        The facts of `Facts` (backend, precision, reason, checkpoint, device, is_demo, sizes, n_styles,
        opts), read from the description and the plan.
    """

    def __init__(self, model, plan: LoadPlan):  # noqa: super().__init__ not called: the description is the model's
        self.model = model
        self.plan = plan

    @property
    def description(self) -> ModelDescription:
        return self.model.description

    @classmethod
    def around(cls, model, checkpoint: str | os.PathLike, device: str | torch.device = "cpu",
               is_demo: bool = False, reason: str = "asked for", trust_pickle: bool = False) -> "Engine":
        """An `Engine` around a backend model loaded elsewhere (e.g. a `reference.PSP` built in
        memory): its plan records the model's own backend and precision (`description`).

        Args:
            model: an `export.backends.BackendModel`.
            checkpoint: the file it came from (used for `mapping` where the model has none, and
                recorded in manifests).
            device, is_demo, reason, trust_pickle: as in `LoadPlan` (reason for `Choice`).
        """
        d = model.description
        return cls(model, LoadPlan(Path(checkpoint), torch.device(device), Choice(d.backend, d.precision, reason),
                                   is_demo, trust_pickle))

    def __repr__(self) -> str:
        return (f"Engine(checkpoint={str(self.checkpoint)!r}, backend={self.backend!r}, precision={self.precision!r}, "
                f"device={str(self.device)!r}, input_nc={self.input_nc}, label_nc={self.label_nc}, "
                f"output_size={self.output_size}, n_styles={self.n_styles}, is_demo={self.is_demo})")

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        s = self.encoder_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (self.input_nc, s, s):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected x [B, {self.input_nc}, {s}, {s}] (input_nc={self.input_nc}), got {shape}")
        if x.dtype != torch.float32:
            raise ValueError(f"expected x float32, got {x.dtype}")
        return x.to(self.device)

    def read_inputs(self, paths: Sequence[str | os.PathLike], degrade_factor: int | None = None,
                    max_pixels: int = MAX_PIXELS) -> torch.Tensor:
        """Read image files into this checkpoint's encoder input `x`: the conversion `engine.run`
        applies (no face alignment: inputs must already be aligned crops, or use `engine.align`).

        Per the checkpoint's `label_nc`: photos (0) are read as RGB, sketches (1) as grayscale,
        segmentation maps (>1) as class-id images (`reference.images.read_input`), then resized and
        normalised as the official test transforms do (`reference.images.to_input_tensor`, source:
        official `configs/transforms_config.py`).

        Args:
            paths: image files (PNG, JPEG, ... as Pillow reads them), any size.
            degrade_factor: super-resolution checkpoints: degrade each input by this factor first
                (official bicubic downsampling, as `engine.run --resize-factor F`); None: no
                degradation (other checkpoints, or inputs that are already low-resolution).
            max_pixels: refuse images above this many pixels before decoding them (as `--max-pixels`).

        Returns:
            x `[len(paths), input_nc, 256, 256]` float32 on `self.device`: RGB in [-1, 1], sketch in
            [0, 1], segmentation one-hot in {0, 1}; ready for `encode` / `invert`.

        Raises:
            InputImageError: a file that is missing, not an image, too large or too small, or a
                segmentation map with an id >= label_nc (the message names the file).
            ValueError: no paths, or a degrade_factor on a checkpoint that takes no RGB input.
        """
        names = [str(p) for p in paths]
        images = [read_input(p, self.label_nc, max_pixels=max_pixels) for p in names]
        return to_input_tensor(images, self.label_nc, names=names, degrade_factor=degrade_factor).to(self.device)

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encode inputs into W+ (latent_avg added).

        Args:
            x: `[B, input_nc, 256, 256]` float32 from `read_inputs` (image files): RGB in
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
        img = self.model.synthesize(w_plus.to(self.device))
        return face_pool(img) if resize else img

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
            if net is None:
                row = BACKENDS.get(self.backend)
                if (row is not None and row.takes != "checkpoint") or not Path(self.checkpoint).is_file():
                    raise UsageError(
                        f"backend {self.backend!r} runs {self.checkpoint}, which holds no mapping network (z -> w) "
                        "for style mixing; use --backend engine (or reference) with the pSp checkpoint"
                    )
                net = load_mapping(self.checkpoint, self.trust_pickle).to(self.device)
            self._mapping = net
        return net(z.to(self.device)).float()


def plan_load(checkpoint: str | os.PathLike | None = None, backend: str = "auto", device: str = "cpu",
              precision: str = "auto", trust_pickle: bool = False,
              calibration: str | os.PathLike | None = None) -> LoadPlan:
    """Resolve what `load` would load and run, without loading anything: the device, the registry's
    `Choice` (backend, precision, reason; "auto" resolved here, once) and the checkpoint path.

    Args:
        as `load`.

    Returns:
        The `LoadPlan` (`load_planned` loads it).

    Raises:
        UsageError: unknown backend or precision, unavailable device, or a backend that cannot run
            here or in that precision; a calibration folder for a precision other than int8.
    """
    dev = resolve_device(device)
    choice = resolve(backend, dev, precision)
    check_calibration(choice.precision, calibration)
    is_demo = checkpoint is None
    return LoadPlan(demo.demo_path() if is_demo else Path(checkpoint), dev, choice, is_demo, trust_pickle,
                    None if calibration is None else Path(calibration))


def load_planned(plan: LoadPlan, announce: Callable[[str], None] | None = None) -> Engine:
    """Load a `LoadPlan` with the row and precision it resolved (`export.backends.load_model`; no second
    resolution), building the demo checkpoint first where it is planned and missing.

    Args:
        plan: from `plan_load`.
        announce: as in `load`.

    Returns:
        An `Engine` whose backend and precision are the plan's, read from the model's description.

    Raises:
        CheckpointError: as `load`.
    """
    if plan.is_demo:
        plan = replace(plan, checkpoint=demo.demo_checkpoint_path(announce))  # built (or checked) now
    path = plan.checkpoint
    try:
        model = load_model(plan.choice, path, plan.device, plan.trust_pickle, cache_dir(), announce, plan.calibration)
    except CheckpointError as e:
        if plan.is_demo:
            raise CheckpointError(f"{e} (this is the cached demo checkpoint: delete {path} to rebuild it)") from None
        raise
    return Engine(model, plan)


def load(checkpoint: str | os.PathLike | None = None, backend: str = "auto", device: str = "cpu",
         precision: str = "auto", trust_pickle: bool = False,
         announce: Callable[[str], None] | None = None, calibration: str | os.PathLike | None = None) -> Engine:
    """Load a pSp checkpoint into an `Engine`.

    Args:
        checkpoint: an official pSp `.pt` (`{'state_dict', 'opts', 'latent_avg'}`), or None for
            the built-in demo checkpoint (random weights; see `engine.demo`); for "tensorrt", the
            plans' stem.
        backend: "auto" (per device and precision the fastest measured installed backend:
            `export.backends.AUTO_ORDER`) or a `BACKENDS` name (see `export.backends.BACKENDS`:
            "reference", "engine", "onnxruntime", "openvino", "triton", "tensorrt").
        device: "cpu" or "cuda[:i]".
        precision: "auto" (CUDA fp16; CPU bf16 where it has AMX-BF16/AVX512-BF16 units, else fp32),
            "fp32", "bf16" or "fp16": the activation dtype; inputs and outputs are fp32 always.
            "int8" (backend openvino, never picked by auto): NNCF post-training quantization
            (`export.quantize`), made on first use and cached; check it on your own weights and
            faces first (`python -m export.parity --precision int8 --checkpoint CKPT --faces DIR`).
        trust_pickle: allow full unpickling of old checkpoints that safe loading refuses; it
            runs code from the file, so only for files you trust.
        announce: receives one-line progress notes (the demo checkpoint being built, a first export).
        calibration: int8 only: a folder of example inputs (images of the kind the checkpoint
            encodes; required for sketch and segmentation encoders) to calibrate the quantization
            on; None: the set the model makes itself (W+ through its mapping network, the images
            the generator renders from them).

    Returns:
        An `Engine` in inference mode; `engine.backend`, `.precision` and `.reason` say what runs and why.

    Raises:
        UsageError: unknown backend or precision, unavailable device, or a backend that cannot run
            here or in that precision (also a ValueError).
        CheckpointError: missing/unreadable file, a StyleGAN2 (not pSp) checkpoint, missing or
            mis-shaped keys (named in the message).
    """
    return load_planned(plan_load(checkpoint, backend, device, precision, trust_pickle, calibration), announce)
