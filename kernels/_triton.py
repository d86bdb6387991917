"""What every Triton op shares: where it may run, the `impl` switch, and AOT specs for inspection.

Triton kernels run on CUDA GPUs. On a machine without one they run only in Triton's interpreter
(`TRITON_INTERPRET=1` in the environment *before* `triton`/`kernels` are imported), which executes
each program instance with numpy on the CPU: exact, slow, for tests. Nothing falls back silently:
asking for `impl="triton"` where it cannot run raises `KernelUnavailableError` saying why.

Source: house style `shared/docs/STYLE.md` (pairing rule: `impl="ref"` calls `reference/`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch

IMPLS = ("ref", "triton")


class KernelUnavailableError(RuntimeError):
    """`impl="triton"` was asked for where Triton cannot run (no triton, no CUDA, no interpreter)."""


def triton_installed() -> bool:
    """True when the `triton` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    """True when Triton's CPU interpreter is on (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_impl(op: str, impl: str, *tensors: torch.Tensor | None) -> None:
    """Validate `impl` and, for "triton", that the tensors can go to a Triton kernel.

    Args:
        op: the op's name, for the message.
        impl: "ref" or "triton".
        tensors: the op's tensor arguments (None entries are ignored).

    Raises:
        ValueError: unknown `impl`.
        KernelUnavailableError: triton missing; CPU tensors without the interpreter; CUDA
            tensors under the interpreter (it only runs on the CPU).
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "ref":
        return
    if not triton_installed():
        raise KernelUnavailableError(f"{op}: impl='triton' needs the triton package (pip install 'psp-engine[triton]')")
    devices = {t.device.type for t in tensors if t is not None}
    if interpret_mode():
        if devices - {"cpu"}:
            raise KernelUnavailableError(
                f"{op}: TRITON_INTERPRET=1 runs kernels on the CPU only; got tensors on {sorted(devices)}"
            )
        return
    if devices != {"cuda"}:
        raise KernelUnavailableError(
            f"{op}: impl='triton' needs CUDA tensors (got {sorted(devices)}); on a machine without a GPU run "
            "the kernels in Triton's interpreter by setting TRITON_INTERPRET=1 before importing kernels "
            "(slow; for tests), or use impl='ref'"
        )


def jit_function(kernel: Any) -> Any:
    """The compilable `JITFunction` of a `@triton.jit` kernel, even under the interpreter
    (where `@triton.jit` returns an `InterpretedFunction` wrapping the Python function)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    fn = getattr(kernel, "fn", None)
    if fn is None:
        raise TypeError(f"not a triton kernel: {kernel!r}")
    return JITFunction(fn)


@dataclass(frozen=True)
class KernelSpec:
    """One kernel configuration to compile ahead of time (`python -m kernels.inspect`).

    Attributes:
        kernel: a readable name, e.g. `"_styled_conv_kernel[512->512 up2 64px]"`.
        fn: the `@triton.jit` function.
        signature: `triton.compiler.ASTSource` signature: argument -> type string ("*fp16",
            "*fp32", "i32", "fp32", "constexpr").
        constexprs: values of the `constexpr` arguments (block sizes, flags).
        num_warps, num_stages: launch/compile options.
        flops: floating-point operations per call (multiply-add = 2).
        min_bytes: compulsory DRAM traffic per call in bytes (each input read once, each output
            written once).
        layer: the generator layer(s) this configuration serves.
        calls: how many times one 1024 generator forward calls it.
        used: False for a configuration the triton generator does not launch (e.g. bias_act,
            fused into the convolution's epilogue): inspected, left out of the roofline sum.
    """

    kernel: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    flops: float = 0.0
    min_bytes: float = 0.0
    layer: str = ""
    calls: int = 1
    used: bool = True
