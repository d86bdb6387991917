"""AOTInductor packages of pSp: `torch.export` + `aoti_compile_and_package`, a `.pt2` any C++ host can run.

Source: PyTorch 2.13 AOTInductor (`torch._inductor.aoti_compile_and_package`,
`torch._inductor.aoti_load_package`, C++ `torch::inductor::AOTIModelPackageLoader`); the model is
`pSp(x) = G(E(x) + w_avg)` (Richardson et al. 2021, Sec. 3) through `encode` / `synthesize`.

Two parts can be packaged:
  * `psp`: `PSPPipeline`, x `[B, input_nc, 256, 256]` -> (img `[B, 3, R, R]`, w_plus `[B, n_styles, 512]`);
  * `generator`: `GeneratorPipeline`, w_plus `[B, n_styles, 512]` -> img `[B, 3, R, R]`.

Dynamic batch and the modulated convolution. The official formulation (`fused_modconv=True`) runs a
grouped convolution with `groups = B`. Inductor's convolution lowering specialises `groups` to the
example's value (`V.graph.sizevars.guard_int(groups)`, torch/_inductor/kernel/conv.py), and an
AOTInductor package has no guards: exported with a dynamic batch, the package silently computes
the example batch size whatever it is given (measured on torch 2.13: a batch of 3 or 1 returns 2
images). So with `dynamic_batch=True`, `package_model` exports every reference `ModulatedConv2d`
in the activation-modulation formulation (`x * styles -> conv(static weight) -> * dcoefs`, equal to
fp32 rounding; the model is restored afterwards) and refuses any exported graph that still has a
convolution whose `groups` depends on the batch. With `dynamic_batch=False` the model is exported
as it is, at the example's batch size.

CLI:
    python -m export.aoti --checkpoint CKPT --out model.pt2 [--resize] [--part psp|generator]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.export.graph_signature import OutputKind

from reference.plumbing.cli import ArgumentParser, run_cli
from reference.description import ENCODER_SIZE, ModelDescription, describe, read_sidecar, sidecar_path, write_sidecar
from reference.plumbing.errors import PSPError
from reference.psp import face_pool

PARTS = ("psp", "generator")
AOTI_KIND = "aoti-package"  # the artifact kind of a package's sidecar (`reference.description`)
STYLE_DIM = 512


class AOTIError(PSPError):
    """A model that cannot be packaged as asked, or a package that cannot be read or run as given."""


# ----------------------------------------------------------------------------------------------
# What gets exported


class PSPPipeline(nn.Module):
    """The whole pSp inference forward as one module: `x -> (img, encode(x))`, img =
    `synthesize(encode(x))`, pooled by `reference.psp.face_pool` with `resize`.

    Source: official `models/psp.py::pSp.forward` (`randomize_noise=False`), as `reference.PSP.forward`.

    Args:
        model: a backend model with `encode(x) -> w_plus` and `synthesize(w_plus) -> img` at full
            resolution (`reference.PSP`, or `export.backends.engine_model.EnginePSP`); used as is, not copied.
        resize: average-pool img to 256x256 (official `--resize_outputs`).
    """

    PART = "psp"
    INPUT_NAMES = ("x",)
    OUTPUT_NAMES = ("img", "w_plus")

    def __init__(self, model: nn.Module, resize: bool = False):
        super().__init__()
        _require_methods(model, ("encode", "synthesize"))
        self.model = model
        self.resize = bool(resize)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[B, input_nc, 256, 256]` float32 -> (img `[B, 3, R, R]`, w_plus `[B, n_styles, 512]`) float32."""
        w_plus = self.model.encode(x)
        img = self.model.synthesize(w_plus)
        return (face_pool(img) if self.resize else img), w_plus


class GeneratorPipeline(nn.Module):
    """The synthesis network alone: `w_plus -> synthesize(w_plus)` (stored noise), pooled by
    `reference.psp.face_pool` with `resize`.

    Args:
        model: a backend model with `synthesize(w_plus) -> img` at full resolution; used as is.
        resize: average-pool img to 256x256.
    """

    PART = "generator"
    INPUT_NAMES = ("w_plus",)
    OUTPUT_NAMES = ("img",)

    def __init__(self, model: nn.Module, resize: bool = False):
        super().__init__()
        _require_methods(model, ("synthesize",))
        self.model = model
        self.resize = bool(resize)

    def forward(self, w_plus: torch.Tensor) -> torch.Tensor:
        """w_plus `[B, n_styles, 512]` float32 -> img `[B, 3, R, R]` float32 (unclamped)."""
        img = self.model.synthesize(w_plus)
        return face_pool(img) if self.resize else img


def pipeline_for(model: nn.Module, part: str = "psp", resize: bool = False) -> nn.Module:
    """`PSPPipeline` or `GeneratorPipeline` around `model`, by `part` (one of `PARTS`)."""
    if part == "psp":
        return PSPPipeline(model, resize=resize)
    if part == "generator":
        return GeneratorPipeline(model, resize=resize)
    raise ValueError(f"part must be one of {PARTS}, got {part!r}")


def example_inputs_for(model: nn.Module, part: str = "psp", batch: int = 2) -> tuple[torch.Tensor]:
    """Example inputs for tracing: x `[batch, input_nc, 256, 256]` in [-1, 1] or w_plus `[batch, n_styles, 512]`.

    Batch 2 by default: export specialises sizes 0 and 1, so an example batch of 1 would pin the batch.
    """
    g = torch.Generator().manual_seed(0)
    if part == "psp":
        return (torch.rand(batch, model.description.input_nc, ENCODER_SIZE, ENCODER_SIZE, generator=g) * 2 - 1,)
    if part == "generator":
        return (torch.randn(batch, model.description.n_styles, STYLE_DIM, generator=g),)
    raise ValueError(f"part must be one of {PARTS}, got {part!r}")


# ----------------------------------------------------------------------------------------------
# Packaging


def package_model(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    dynamic_batch: bool = True,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    description: ModelDescription | None = None,
) -> Path:
    """Export `model` with `torch.export` and compile it into an AOTInductor `.pt2` package (CPU).

    Writes `path` and its sidecar `<path>.json` (`model.pt2.json`), the one sidecar schema of
    `reference.description` (kind "aoti-package"): the model description (sizes, n_styles, opts,
    latent_avg, precision fp32) and the package's part, input and output names and shapes
    (`"batch"` for a dynamic dimension), torch version, the modulated-conv formulation, export and
    compile time. The names also go into the package's metadata (`input_names`, `output_names`,
    comma-separated), which the C++ runner reads. The kernels are compiled at -O3, the wrapper that
    only sequences them at -O0 (half its compile time; same outputs and run time, measured).

    Args:
        model: an eval-mode module, typically `PSPPipeline` / `GeneratorPipeline`; its parameters
            become the package's constants.
        example_inputs: float32 CPU tensors, the positional arguments of `model.forward`.
        path: the package file; must end in `.pt2`. Parent folders are created.
        dynamic_batch: make dim 0 of every input one dynamic `Dim("batch", min=1)`; reference
            `ModulatedConv2d`s are exported in the activation-modulation formulation (see the
            module docstring). False: every shape fixed to the example's.
        input_names, output_names: default the pipeline's `INPUT_NAMES` / `OUTPUT_NAMES`, else
            `input_0..`, `output_0..`.
        description: the model's description for the sidecar; default `model.model.description`
            where it has one, else `describe(model.model)` (a `reference.PSP` or `EnginePSP`).

    Returns:
        The package path.

    Raises:
        AOTIError: `path` not ending in `.pt2`; a model in training mode; with `dynamic_batch`, a
            convolution whose `groups` depends on the batch (inductor would silently pin it); no
            `description` given for a model that is not a pSp.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise AOTIError(f"{path}: an AOTInductor package must end in .pt2; pass e.g. {path.with_suffix('.pt2')}")
    if any(m.training for m in model.modules()):
        raise AOTIError(f"{type(model).__name__} is in training mode (BatchNorm would use batch statistics); "
                        "call model.eval() before packaging")
    example_inputs = tuple(example_inputs)
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in example_inputs):
        raise AOTIError("example_inputs must be CPU tensors (this build packages for the CPU)")
    input_names = list(input_names or getattr(model, "INPUT_NAMES", None)
                       or [f"input_{i}" for i in range(len(example_inputs))])
    if len(input_names) != len(example_inputs):
        raise AOTIError(f"{len(input_names)} input names {input_names} for {len(example_inputs)} example inputs")

    inner = getattr(model, "model", model)
    with contextlib.ExitStack() as stack:
        if dynamic_batch:
            stack.enter_context(_activation_modulation(model))
        formulation = _formulation(model)
        with torch.no_grad():
            dynamic_shapes = None
            if dynamic_batch:
                batch = torch.export.Dim("batch", min=1)
                dynamic_shapes = tuple({0: batch} for _ in example_inputs)
            t0 = time.perf_counter()
            exported = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
            t_export = time.perf_counter() - t0
        if dynamic_batch:
            _check_no_symbolic_groups(exported, type(model).__name__)
    outputs = _traced_outputs(exported)

    output_names = list(output_names or getattr(model, "OUTPUT_NAMES", None)
                        or [f"output_{i}" for i in range(len(outputs))])
    if len(output_names) != len(outputs):
        raise AOTIError(f"{len(output_names)} output names {output_names} for {len(outputs)} outputs")

    if description is None:
        description = getattr(inner, "description", None)
    if description is None:
        try:
            description = describe(inner, precision="fp32")
        except AttributeError as e:
            raise AOTIError(f"{type(inner).__name__} is not a pSp model ({e}); pass description= "
                            "(a reference.description.ModelDescription) for its sidecar") from None

    def shape(t: torch.Tensor) -> list:
        return (["batch"] if dynamic_batch else []) + list(t.shape[1 if dynamic_batch else 0:])

    meta: dict[str, Any] = {
        "part": getattr(model, "PART", "custom"),
        "inputs": {n: {"shape": shape(t), "dtype": str(t.dtype).replace("torch.", "")}
                   for n, t in zip(input_names, example_inputs)},
        "outputs": {n: {"shape": shape(t), "dtype": str(t.dtype).replace("torch.", "")}
                    for n, t in zip(output_names, outputs)},
        "input_names": input_names,
        "output_names": output_names,
        "dynamic_batch": bool(dynamic_batch),
        "example_batch": int(example_inputs[0].shape[0]) if example_inputs[0].ndim else None,
        "resize": getattr(model, "resize", None),
        "modulated_conv": formulation,
        "device": "cpu",
        "torch_version": torch.__version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(
        exported,
        package_path=str(path),
        inductor_configs={
            # batch 1 passes the runtime input checks (AOTI_RUNTIME_CHECK_INPUTS=1, which the C++
            # runner turns on); without this they demand >= 2, export's lower bound for a dynamic dim
            "aot_inductor.check_lowerbound": False,
            # the wrapper (run_impl: allocations and one call per kernel, no math) at -O0 instead
            # of -O1 halves its g++ time (13 instead of 26 CPU-s for the tests' 16 px pSp); the
            # kernels stay -O3. Measured: outputs bitwise equal, run time the same within 2 %.
            "aot_inductor.compile_wrapper_opt_level": "O0",
            "aot_inductor.metadata": {
                "input_names": ",".join(input_names),
                "output_names": ",".join(output_names),
                "part": meta["part"],
            },
        },
    )
    meta["export_s"] = round(t_export, 2)
    meta["compile_s"] = round(time.perf_counter() - t0, 2)
    write_sidecar(path, description, AOTI_KIND, **meta)
    return path


class PackagedModel:
    """A loaded `.pt2` package: call it with the inputs, get the outputs as a tuple.

    Checks the inputs against the sidecar first (an AOTInductor package does not check shapes
    unless `AOTI_RUNTIME_CHECK_INPUTS=1`, and reads out of bounds on a wrong shape).

    Attributes:
        description: the sidecar's model description, or None when there is no sidecar.
        info: the sidecar's artifact info (part, inputs, outputs, ...), or None when there is none
            (then nothing is checked).
        compiled: the `torch._inductor` `AOTICompiledModel`.
    """

    def __init__(self, compiled: Any, description: ModelDescription | None, info: dict | None):
        self.compiled = compiled
        self.description = description
        self.info = info

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the package on float32 CPU tensors; returns the outputs in `info["output_names"]` order."""
        if self.info is not None:
            self._check(inputs)
        with torch.inference_mode():
            out = self.compiled(*inputs)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)

    def _check(self, inputs: Sequence[torch.Tensor]) -> None:
        specs = self.info["inputs"]
        if len(inputs) != len(specs):
            raise ValueError(f"this package takes {len(specs)} inputs ({', '.join(specs)}), got {len(inputs)}")
        batch = None
        for (name, spec), t in zip(specs.items(), inputs):
            want = spec["shape"]
            ok = (isinstance(t, torch.Tensor) and t.dtype == getattr(torch, spec["dtype"]) and t.ndim == len(want)
                  and all(w == "batch" or w == s for w, s in zip(want, t.shape)))
            if ok and want and want[0] == "batch":
                ok = t.shape[0] >= 1 and (batch is None or t.shape[0] == batch)
                batch = t.shape[0]
            if not ok:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"input {name!r} must be {spec['dtype']} {want}, got {got}")
            if not t.is_contiguous():
                raise ValueError(f"input {name!r} must be contiguous (call .contiguous())")


def load_package(path: str | Path) -> PackagedModel:
    """Load a `.pt2` written by `package_model` (`torch._inductor.aoti_load_package`) with its sidecar
    `<path>.json` where there is one.

    Raises:
        AOTIError: the file is missing or is not an AOTInductor package.
        CheckpointError: the sidecar is there but unreadable, of another version or another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise AOTIError(f"{path}: no such package; build it with python -m export.aoti --checkpoint CKPT --out {path}")
    try:
        compiled = torch._inductor.aoti_load_package(str(path))
    except (RuntimeError, OSError) as e:
        raise AOTIError(f"{path}: not a loadable AOTInductor package ({str(e).splitlines()[0]}); rebuild it with "
                        f"python -m export.aoti (packages are tied to the torch version that built them)") from None
    if not sidecar_path(path).is_file():
        return PackagedModel(compiled, None, None)
    description, info = read_sidecar(path, AOTI_KIND)
    return PackagedModel(compiled, description, info)


def runner_build_command(source: str | Path, output: str | Path, cxx: str = "g++") -> list[str]:
    """The plain compiler command that builds `examples/cpp/aoti_runner/main.cpp` against the installed torch.

    Include and library folders from `torch.utils.cpp_extension`, `-D_GLIBCXX_USE_CXX11_ABI` from
    `torch._C._GLIBCXX_USE_CXX11_ABI`, an rpath to torch/lib (no LD_LIBRARY_PATH needed), C++20
    (what torch 2.13's headers need), linking torch, torch_cpu (which holds
    `AOTIModelPackageLoader`) and c10.
    """
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    lib_dirs = cpp_extension.library_paths()
    return [
        cxx, "-std=c++20", "-O2", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *includes, str(source), "-o", str(output),
        *[f"-L{d}" for d in lib_dirs], *[f"-Wl,-rpath,{d}" for d in lib_dirs],
        "-ltorch", "-ltorch_cpu", "-lc10",
    ]


# ----------------------------------------------------------------------------------------------
# Helpers


def _require_methods(model: Any, names: Sequence[str]) -> None:
    """TypeError unless `model` has each of `names` as a method."""
    missing = [n for n in names if not callable(getattr(model, n, None))]
    if missing:
        raise TypeError(f"{type(model).__name__} has no {', '.join(missing)}: expected a pSp model "
                        "(reference.PSP or export.backends.engine_model.EnginePSP)")


def _modulated_convs(model: nn.Module) -> list[nn.Module]:
    """Every reference `ModulatedConv2d` in `model` (other implementations are not recognised)."""
    from reference.stylegan2 import ModulatedConv2d

    return [m for m in model.modules() if isinstance(m, ModulatedConv2d)]


def _traced_outputs(exported: torch.export.ExportedProgram) -> list[torch.Tensor]:
    """The user outputs of `exported` as export traced them (fake tensors: shape and dtype, no data).

    The sidecar's output shapes and dtypes come from these, not from an eager forward (a whole
    256 px IR-SE50 at the example batch, ~3.5 CPU-s for the tests' 16 px pSp).
    """
    values = exported.graph.output_node().args[0]
    return [node.meta["val"] for spec, node in zip(exported.graph_signature.output_specs, values)
            if spec.kind == OutputKind.USER_OUTPUT]


def _formulation(model: nn.Module) -> str:
    """How the reference `ModulatedConv2d`s in `model` compute, for the sidecar."""
    fused = {m.fused_modconv for m in _modulated_convs(model)}
    if not fused:
        return "as given (no reference ModulatedConv2d)"
    if fused == {True}:
        return "grouped conv (fused_modconv=True)"
    if fused == {False}:
        return "activation modulation (fused_modconv=False)"
    return "mixed"


@contextlib.contextmanager
def _activation_modulation(model: nn.Module) -> Iterator[int]:
    """Switch reference `ModulatedConv2d`s to `fused_modconv=False` for the block; yields how many switched."""
    switched = [m for m in _modulated_convs(model) if m.fused_modconv]
    for m in switched:
        m.fused_modconv = False
    try:
        yield len(switched)
    finally:
        for m in switched:
            m.fused_modconv = True


def _check_no_symbolic_groups(exported: torch.export.ExportedProgram, name: str) -> None:
    """AOTIError if a node's `groups` argument is symbolic (inductor pins it to the example's value)."""
    bad = []
    for node in exported.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.name != "groups":
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get("groups")
            if isinstance(value, torch.fx.Node) and isinstance(value.meta.get("val"), torch.SymInt):
                bad.append(f"{node.target} ({node.name}, groups={value.meta['val']})")
    if bad:
        raise AOTIError(
            f"{name}: with a dynamic batch, {len(bad)} convolution(s) have a batch-dependent groups argument "
            f"({bad[0]}{', ...' if len(bad) > 1 else ''}); AOTInductor would pin them to the example batch and "
            "silently compute the wrong batch size. Use the activation-modulation formulation "
            "(set_fused_modconv(False)) or package with a static batch (dynamic_batch=False / --static-batch)."
        )


# ----------------------------------------------------------------------------------------------
# CLI


def build_parser() -> ArgumentParser:
    """The CLI's argument parser."""
    ap = ArgumentParser(
        prog="python -m export.aoti",
        description="Compile a pSp checkpoint into an AOTInductor package (.pt2, CPU) with a JSON sidecar "
                    "(<out>.json). Run it from Python (export.aoti.load_package) or C++ "
                    "(examples/cpp/aoti_runner).",
        epilog="Exit codes: 0 written, 2 bad arguments, checkpoint or file (one line), 130 interrupted.",
    )
    ap.add_argument("--checkpoint", required=True, metavar="PATH", help="official pSp checkpoint (reference.load_psp)")
    ap.add_argument("--out", required=True, metavar="PATH", help="package file to write, ending in .pt2")
    ap.add_argument("--part", choices=PARTS, default="psp",
                    help="psp: x -> (img, w_plus); generator: w_plus -> img (default psp)")
    ap.add_argument("--resize", action="store_true", help="average-pool img to 256x256 (official --resize_outputs)")
    ap.add_argument("--static-batch", action="store_true",
                    help="fix the batch size to --batch (default: dynamic batch, activation-modulation formulation)")
    ap.add_argument("--batch", type=int, default=2, metavar="N",
                    help="example batch size for tracing; with --static-batch the only one the package "
                         "accepts (default 2)")
    ap.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of OLD checkpoints you trust")
    return ap


def _body(args: argparse.Namespace) -> int:
    from reference import load_psp

    if args.batch < 1 or (not args.static_batch and args.batch < 2):
        raise AOTIError(f"--batch {args.batch}: the example batch must be >= 2 for a dynamic batch "
                        "(export pins sizes 0 and 1) and >= 1 with --static-batch")
    psp = load_psp(args.checkpoint, trust_pickle=args.trust_pickle)
    pipe = pipeline_for(psp, args.part, resize=args.resize).eval()
    t0 = time.perf_counter()
    out = package_model(pipe, example_inputs_for(psp, args.part, args.batch), args.out,
                        dynamic_batch=not args.static_batch, description=describe(psp, args.checkpoint))
    _, info = read_sidecar(out, AOTI_KIND)
    shapes = "; ".join(f"{n} {v['shape']}" for n, v in {**info["inputs"], **info["outputs"]}.items())
    print(f"wrote {out} and {sidecar_path(out).name} ({out.stat().st_size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - t0:.1f} s): {shapes}; modulated conv: {info['modulated_conv']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m export.aoti`: package a pSp checkpoint (whole model or generator) as an AOTInductor `.pt2`.

    Returns:
        0 written, 2 bad arguments, checkpoint or file (one line), 130 interrupted.
    """
    return run_cli(build_parser(), _body, argv, interrupted="no package was written; rerun the same command")


if __name__ == "__main__":
    sys.exit(main())
