"""The op table: every Triton op once, with its reference, fast path, test, benchmark, tolerance and specs.

One row per public op function (`kernels/<file>.py`, `impl="ref"` / `impl="triton"`). The readers:
`python -m kernels.inspect` (the spec modules to compile), `python -m benchmarks.gpu_kernels` and
`python -m benchmarks.gpu_suite` (the benchmark of each op, the kernel test files), and the tests
(each op's tolerance key; tests/test_op_table.py checks every row resolves).

`modulated_conv2d`, `styled_conv2d` and `to_rgb` are three ops of one file and one Triton kernel
(`_modulated_conv2d_kernel`, three epilogues): each is its own public function with its own
`torch.ops.psp.<name>`, reference, tolerance and benchmark, and they share the file, its test file and
its `aot_specs`. The generator on Triton (`export.backends.engine_model`) calls `styled_conv2d` and `to_rgb`;
the others run fused into those and stand alone for tests, benchmarks and other callers.

Everything here is a string (dotted paths, repository paths): this module imports neither torch nor
a kernel (so `TRITON_INTERPRET` can still be set after reading it), nor a floor above `kernels/`
(the benchmarks); `resolve` imports on demand.

Source: house style shared/docs/STYLE.md ("a kernel is three pieces", the pairing rule); Liger-Kernel's
one table of ops that its tests, benchmarks and docs read; issue 19, item 3.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Op:
    """One public Triton op.

    Attributes:
        name: the public function's name, also its `torch.ops.psp.<name>` and its benchmark's op
            name (`benchmarks.gpu_kernels --ops`).
        module: the kernels module that holds it (`fast`), whose `aot_specs(output_size)` lists its
            compiled configurations (`python -m kernels.inspect`).
        reference: dotted path of what `impl="ref"` pairs with: a `reference.ops` function with the
            same leading arguments, or for the layer-shaped ops the rosinality layer
            (`reference.stylegan2`) whose forward the op computes from precomputed styles.
        test: the test file, relative to the repository root (its `gpu`-marked tests are the
            kernel parity the GPU suite runs on CUDA).
        benchmark: dotted path of the op's benchmark module (`cases(output_size, batch)`,
            `impls(case, device, dtype, seed, impls)`), read by `benchmarks.gpu_kernels`.
        tolerance: the key of `export.compare.TOL` for `impl="triton"` against the fp32 reference.
        generator: the Triton generator (`export.backends.engine_model`) calls this op itself (the others
            run fused into these).
    """

    name: str
    module: str
    reference: str
    test: str
    benchmark: str
    tolerance: str
    generator: bool = False

    @property
    def fast(self) -> str:
        """Dotted path of the public function (`impl="ref"` and `impl="triton"`)."""
        return f"{self.module}.{self.name}"


OPS: tuple[Op, ...] = (
    Op("bias_act", "kernels.bias_act", "reference.ops.bias_act", "tests/test_bias_act.py",
       "benchmarks.kernel_ops.bias_act", "bias_act_triton"),
    Op("upfirdn2d", "kernels.upfirdn2d", "reference.ops.upfirdn2d", "tests/test_upfirdn2d.py",
       "benchmarks.kernel_ops.upfirdn2d", "upfirdn2d_triton"),
    Op("modulated_conv2d", "kernels.modulated_conv2d", "reference.ops.modulated_conv2d",
       "tests/test_modulated_conv2d.py", "benchmarks.kernel_ops.modulated_conv2d", "modulated_conv2d_triton"),
    Op("styled_conv2d", "kernels.modulated_conv2d", "reference.stylegan2.StyledConv",
       "tests/test_modulated_conv2d.py", "benchmarks.kernel_ops.styled_conv2d", "styled_conv2d_triton",
       generator=True),
    Op("to_rgb", "kernels.modulated_conv2d", "reference.stylegan2.ToRGB",
       "tests/test_modulated_conv2d.py", "benchmarks.kernel_ops.to_rgb", "to_rgb_triton", generator=True),
)
NAMES: tuple[str, ...] = tuple(o.name for o in OPS)


def op(name: str) -> Op:
    """The row of `name`.

    Raises:
        KeyError: no such op (the message lists the table's names).
    """
    for o in OPS:
        if o.name == name:
            return o
    raise KeyError(f"no op {name!r} in kernels.ops.OPS; the ops are {', '.join(NAMES)}")


def _unique(values: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def spec_modules() -> tuple[str, ...]:
    """The kernels modules whose `aot_specs` `python -m kernels.inspect` compiles, each once, in table order."""
    return _unique([o.module for o in OPS])


def kernel_test_files() -> tuple[str, ...]:
    """The kernel test files (repository-relative), each once, in table order."""
    return _unique([o.test for o in OPS])


def resolve(path: str) -> Any:
    """The object a dotted path names: `"pkg.module.attr"` (the longest importable module prefix,
    then attributes) or `"pkg.module"`.

    Raises:
        ImportError: no prefix of `path` is an importable module, or an attribute is missing.
    """
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # this prefix is not a module: try a shorter one
                continue
            raise
        for attr in parts[i:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise ImportError(f"{path}: {name} has no {'.'.join(parts[i:])}") from None
        return obj
    raise ImportError(f"{path}: no importable module")
