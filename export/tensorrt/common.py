"""What the TensorRT builder and runtime both need: the lazy `tensorrt` import and the CUDA probes,
the error family, the plan sidecar's kind, and the optimisation profiles with the batch chunking.

Source: the TensorRT Python API (10.x "IOptimizationProfile", "ICudaEngine.get_tensor_profile_shape")
and the CUDA driver API (`cuDeviceGetName`, `cuDeviceGetAttribute`) for the GPU probe.

`tensorrt` is imported inside `import_tensorrt` only: this module imports, and its profiles and
chunking run, without it.
"""

from __future__ import annotations

import argparse
import ctypes
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from reference.plumbing.errors import PSPError

PLAN_KIND = "tensorrt-plan"  # the artifact kind of a plan's sidecar (`reference.description`)

TRT_MISSING = ("tensorrt is not installed (its libraries cannot be installed on this CPU-only machine); "
               "on a machine with an NVIDIA GPU and CUDA: pip install tensorrt")


class TensorRTError(PSPError):
    """A TensorRT step failed for a reason the user can fix (bad ONNX, wrong plan, GPU mismatch)."""


class TensorRTUnavailableError(TensorRTError):
    """TensorRT or a CUDA device is missing on this machine."""


# ----------------------------------------------------------------------------------------------
# environment


def import_tensorrt():
    """Import the `tensorrt` module.

    Returns:
        The module.

    Raises:
        TensorRTUnavailableError: not installed, or its libraries do not load (no CUDA).
    """
    try:
        import tensorrt as trt  # noqa: PLC0415  (lazy by design)
    except ImportError as e:
        if getattr(e, "name", None) == "tensorrt":
            raise TensorRTUnavailableError(TRT_MISSING) from None
        raise TensorRTUnavailableError(f"tensorrt is installed but does not import ({e}); it needs CUDA and "
                                       "an NVIDIA driver") from None
    except OSError as e:  # a shared library that does not load
        raise TensorRTUnavailableError(f"tensorrt is installed but its libraries do not load ({e}); it needs "
                                       "CUDA and an NVIDIA driver") from None
    return trt


def tensorrt_major(trt) -> int:
    """The major version of an imported `tensorrt` module (10, 11, ...)."""
    return int(str(trt.__version__).split(".")[0])


def cuda_device(device: str | torch.device = "cuda") -> torch.device:
    """Check that torch can use the CUDA device a plan runs on.

    Args:
        device: "cuda" or "cuda:<index>".

    Returns:
        The `torch.device`, with its index filled in.

    Raises:
        TensorRTUnavailableError: torch has no CUDA (a CPU-only build or no GPU) or no such index.
        TensorRTError: a non-CUDA device.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        raise TensorRTError(f"TensorRT plans run on a CUDA device, got device {str(device)!r}; use --device cuda")
    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(f"no CUDA device (torch {torch.__version__} sees none): TensorRT plans need "
                                       "an NVIDIA GPU and a CUDA build of torch")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise TensorRTUnavailableError(f"device cuda:{index} requested, only {torch.cuda.device_count()} visible")
    return torch.device("cuda", index)


def gpu_info(index: int = 0) -> dict[str, Any]:
    """Name and compute capability of a GPU: from torch if it has CUDA, else from the driver (libcuda).

    Args:
        index: CUDA device ordinal.

    Returns:
        `{"name": str, "compute_capability": "8.6", "index": int}`.

    Raises:
        TensorRTUnavailableError: no CUDA device visible to either.
    """
    if torch.cuda.is_available() and index < torch.cuda.device_count():
        major, minor = torch.cuda.get_device_capability(index)
        return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}", "index": index}
    try:  # the driver API: stable entry points, no toolkit needed (TensorRT builds do not need torch)
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise TensorRTUnavailableError("no CUDA device: torch sees none and the NVIDIA driver (libcuda.so.1) is "
                                       "not installed") from None
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if (cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(dev), index) != 0
            or cuda.cuDeviceGetName(name, 256, dev) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) != 0    # ..._COMPUTE_CAPABILITY_MAJOR
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev) != 0):  # ..._COMPUTE_CAPABILITY_MINOR
        raise TensorRTUnavailableError(f"no CUDA device {index}: the NVIDIA driver reports none")
    return {"name": name.value.decode(), "compute_capability": f"{major.value}.{minor.value}", "index": index}


def dtype_name(trt, dtype) -> str:
    """The name of a TensorRT `DataType` ("float32", "float16", "int64", ...; else its str), as
    the plan sidecar records IO dtypes."""
    for name in ("float32", "float16", "bfloat16", "int8", "int32", "int64", "bool", "uint8"):
        if hasattr(trt, name) and dtype == getattr(trt, name):
            return name
    return str(dtype)


# ----------------------------------------------------------------------------------------------
# optimisation profiles and batching


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: the batch sizes (min, opt, max) every input's dim 0 takes in it."""

    name: str
    min: int
    opt: int
    max: int

    def covers(self, batch: int) -> bool:
        """True when `min <= batch <= max`."""
        return self.min <= batch <= self.max

    def as_dict(self) -> dict[str, Any]:
        """`{"name", "min", "opt", "max"}` for JSON."""
        return {"name": self.name, "min": self.min, "opt": self.opt, "max": self.max}


def batch_triple(value: Any, what: str) -> tuple[int, int, int]:
    """One profile's batch sizes `(min, opt, max)` from a triple or an int `b` (= `(b, b, b)`).

    Args:
        value: the triple or int.
        what: names the value in the error ("profile 'p0'", "--profile").

    Raises:
        ValueError: not three integers with `1 <= min <= opt <= max`.
    """
    if isinstance(value, int):
        value = (value, value, value)
    try:
        mn, opt, mx = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected (min, opt, max) batch sizes, got {value!r}") from None
    if not 1 <= mn <= opt <= mx:
        raise ValueError(f"{what}: need 1 <= min <= opt <= max, got ({mn}, {opt}, {mx})")
    return mn, opt, mx


def normalize_profiles(profiles: Sequence[Any] | Mapping[str, Any]) -> list[Profile]:
    """Profiles from a list of (min, opt, max) triples (named p0, p1, ...) or a dict name -> triple.

    Args:
        profiles: e.g. `[(1, 1, 1), (2, 4, 8)]` or `{"single": (1, 1, 1), "batch": (2, 4, 8)}`; an
            int `b` stands for `(b, b, b)`.

    Returns:
        The `Profile`s in order (profile index i is the i-th).

    Raises:
        ValueError: an empty list, a bad triple, or duplicate names.
    """
    items = list(profiles.items()) if isinstance(profiles, Mapping) else [(f"p{i}", p) for i, p in enumerate(profiles)]
    if not items:
        raise ValueError("at least one optimisation profile is needed")
    out = [Profile(str(name), *batch_triple(value, f"profile {name!r}")) for name, value in items]
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ValueError(f"profile names must be unique, got {names}")
    return out


def parse_profile_arg(text: str) -> tuple[int, int, int]:
    """`--profile` text: "1,4,8" -> (1, 4, 8); "4" -> (4, 4, 4).

    Raises:
        argparse.ArgumentTypeError: not one or three positive integers in order.
    """
    try:
        values = [int(v) for v in text.split(",")]
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise ValueError("need 1 or 3 values")
        return batch_triple(values, "--profile")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--profile {text!r}: {e}; use MIN,OPT,MAX batch sizes, e.g. 1,4,8") from None


def profile_shapes(shape: Sequence[int], profile: Profile) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The min/opt/max shapes of one input in one profile: its shape with dim 0 set to the batch sizes.

    Args:
        shape: the network input's shape, `-1` (or None) for dynamic dims, e.g. `(-1, 3, 256, 256)`.
        profile: the batch sizes.

    Returns:
        `(min_shape, opt_shape, max_shape)`.

    Raises:
        ValueError: a dynamic dim other than the batch (the ONNX contract has only "batch").
    """
    dims = [-1 if d is None else int(d) for d in shape]
    if not dims:
        raise ValueError("a scalar input has no batch dim")
    if any(d < 0 for d in dims[1:]):
        raise ValueError(f"input shape {tuple(dims)}: only dim 0 (batch) may be dynamic")
    rest = tuple(dims[1:])
    return (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest)


def select_profile(profiles: Sequence[Profile], batch: int) -> int | None:
    """Index of the profile to run a batch in: it covers the batch, its opt is nearest, its range narrowest.

    Returns:
        The index, or None when no profile covers `batch`.
    """
    covering = [(abs(p.opt - batch), p.max - p.min, i) for i, p in enumerate(profiles) if p.covers(batch)]
    return min(covering)[2] if covering else None


@dataclass(frozen=True)
class Chunk:
    """A slice `[start, stop)` of a batch, run as `run_batch` samples (padded by repeating the last) in a profile."""

    start: int
    stop: int
    run_batch: int
    profile: int


def plan_chunks(n: int, profiles: Sequence[Profile]) -> list[Chunk]:
    """Split a batch of `n` into chunks the profiles can run: full chunks of the largest max batch,
    the remainder as is if a profile covers it, else padded up to the smallest profile min above it.

    Args:
        n: the batch size asked for (>= 1).
        profiles: the plan's profiles.

    Returns:
        The chunks in order; padding only ever appears in the last one.
    """
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    top = max(p.max for p in profiles)
    chunks, start = [], 0
    while start < n:
        size = min(top, n - start)
        run = size
        index = select_profile(profiles, size)
        if index is None:  # size is below every covering range: pad to the nearest min above it
            run = min(p.min for p in profiles if p.min > size)
            index = select_profile(profiles, run)
        chunks.append(Chunk(start, start + size, run, index))
        start += size
    return chunks
