"""TensorRT plans at run time: `TensorRTRunner` (a plan on dicts of torch tensors) and the `tensorrt`
engine backend (`TensorRTPSP`, `load_tensorrt_backend`) on an encoder plan and a generator plan.

Source: the TensorRT Python API (10.x "Runtime", "ICudaEngine", "IExecutionContext" pages) and
Polygraphy's runners (context managers that load a plan and run feeds). The plans and their
sidecars come from `export.tensorrt.builder.build_engine` (`python -m export.tensorrt`).

`tensorrt` is imported when a runner is activated: this module imports, and the plan-pair checks
run, without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from reference.description import ModelDescription, read_sidecar

from .common import (PLAN_KIND, Profile, TensorRTError, cuda_device, dtype_name, gpu_info, import_tensorrt,
                     plan_chunks)


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
    name = dtype_name(trt, dtype)
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


def plan_pair_description(encoder_plan: str | os.PathLike, generator_plan: str | os.PathLike) -> ModelDescription:
    """The description of the `tensorrt` backend on two plans, from their sidecars (no TensorRT needed).

    Args:
        encoder_plan, generator_plan: the plans (`<plan>.json` beside each).

    Returns:
        The encoder plan's description with `backend="tensorrt"` and the plans' precision ("fp16"
        for `--fp16` builds; "mixed: encoder fp32, generator fp16" where the two differ).

    Raises:
        CheckpointError: a missing or unreadable sidecar (named).
        TensorRTError: as `check_plan_pair`; or a generator plan exported with --resize (256 px
            output: the backend synthesizes at full resolution and the `Engine` resizes).
    """
    enc, gen = read_sidecar(encoder_plan, PLAN_KIND), read_sidecar(generator_plan, PLAN_KIND)
    check_plan_pair(enc, gen)
    if gen[1].get("resize"):
        raise TensorRTError(f"{generator_plan}: exported with --resize (256 px output), but the tensorrt backend "
                            "synthesizes at full resolution (--resize-outputs resizes after it); export and build "
                            "the generator again without --resize")
    d, gen_precision = enc[0], gen[0].precision
    precision = d.precision if d.precision == gen_precision else f"mixed: encoder {d.precision}, generator {gen_precision}"
    return d.replace(backend="tensorrt", precision=precision, dataset_type=d.dataset_type or d.opts.get("dataset_type"))


class TensorRTPSP:
    """pSp on two TensorRT plans: `encode` on the encoder plan, `synthesize` on the generator plan; an
    `export.backends.BackendModel`.

    Attributes:
        description: `plan_pair_description` (the encoder plan's model description, backend
            "tensorrt", the plans' precision); the model's facts are read there.
        encoder, generator: the `TensorRTRunner`s.
        device: the CUDA device both run on.
    """

    def __init__(self, encoder_plan: str | os.PathLike, generator_plan: str | os.PathLike,
                 device: str | torch.device = "cuda"):
        """
        Raises:
            TensorRTUnavailableError: no tensorrt or no CUDA.
            TensorRTError / CheckpointError: as `plan_pair_description` and `TensorRTRunner.activate`.
        """
        self.description: ModelDescription = plan_pair_description(encoder_plan, generator_plan)
        self.encoder = TensorRTRunner(encoder_plan, device)
        self.generator = TensorRTRunner(generator_plan, device)
        self.encoder.activate()
        try:
            self.generator.activate()
        except BaseException:
            self.encoder.deactivate()
            raise
        self.device = self.encoder.device

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, input_nc, 256, 256]` float32 -> w_plus `[B, n_styles, 512]` float32 (latent_avg added)."""
        return self.encoder.infer({"x": x})["w_plus"].float()

    def synthesize(self, w_plus: torch.Tensor) -> torch.Tensor:
        """w_plus `[B, n_styles, 512]` float32 -> img `[B, 3, R, R]` float32 at full resolution
        R = output_size (the `Engine` applies the official 256 resize)."""
        return self.generator.infer({"w_plus": w_plus})["img"].float()

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
        TensorRTError: a missing plan, mismatched plans, a generator plan exported with --resize,
            another GPU architecture.
        CheckpointError: a missing or unreadable sidecar.
    """
    enc, gen = resolve_plan_pair(plan_path)
    return TensorRTPSP(enc, gen, device)
