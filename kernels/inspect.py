"""Compile every Triton kernel configuration for sm_80 / sm_90 without a GPU and report what ptxas made of it.

    python -m kernels.inspect [--json] [--arch 80,90] [--output-size 1024] [--jobs N]

For each `KernelSpec` of the kernels modules of the op table (`kernels.ops.spec_modules()`: their
`aot_specs(output_size)`) and each target: registers per thread, spilled bytes, shared memory per
block, whether tensor-core MMA instructions (HMMA on sm_80, HGMMA/HMMA on sm_90) appear in the
SASS, and the roofline time of one call from the spec's FLOPs and compulsory bytes. No kernel runs:
compilation needs no GPU (Triton's `triton.compile(ASTSource(...), target=GPUTarget(...))`, ptxas,
cuobjdump and nvdisasm shipped in the triton wheel).

Where the numbers come from:
  * registers, spill stores / loads, stack frame: the `ptxas -v` log of Triton's own ptxas call
    (`TRITON_DUMP_PTXAS_LOG`); the register count is cross-checked with `cuobjdump
    --dump-resource-usage` (REG), which also gives the local memory per thread (LOCAL);
  * shared memory: Triton's dynamic allocation (`metadata.shared`) plus the cubin's static
    shared memory (`SHARED` in the resource usage); a block uses both;
  * MMA: the opcodes of the SASS: each cubin's code sections (its executable ELF sections, what
    `cuobjdump -sass` disassembles) go to one `nvdisasm --binary SM<arch>` call per arch for all
    the kernels a process compiled (nvdisasm costs ~0.5 CPU-s per call whatever the size, so one
    call per kernel would cost more than the compiles it reads);
  * roofline per call: `max(flops / peak, min_bytes / bandwidth)` on the GPU of the arch
    (`PEAKS`: sm_80 an A100 SXM4 80 GB, sm_90 an H100 SXM5; fp16 tensor-core dense peaks); the
    final line sums `calls x roofline` over the specs the generator runs (`KernelSpec.used`; the
    others are listed but left out of the sum).

Triton's interpreter (`TRITON_INTERPRET=1`, set by the test suite) turns every `@triton.jit`
function, helpers included, into an `InterpretedFunction` the compiler cannot inline. So when it
is on (and whenever `--jobs` > 1) the compilation runs in worker processes started with the
variable removed; the caller's environment is never changed. Triton's cache goes to a temporary
directory that is deleted afterwards: every run compiles afresh and nothing is cached in the repo.

Exit codes: 0 every configuration compiled without spills; 1 a compile failed or a kernel spills
(each named on stderr); 2 usage error (a spec module missing or without `aot_specs`).

Source: Triton 3.9 `triton/compiler/compiler.py` (`compile`, `ASTSource`),
`triton/backends/nvidia/compiler.py` (`make_cubin`: the ptxas call and its `-v` log); the ELF-64
section header layout (System V gABI) for the code sections of a cubin.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from kernels._triton import KernelSpec, interpret_mode, jit_function
from kernels.ops import spec_modules
from reference.plumbing.cli import ArgumentParser, run_cli, say
from reference.plumbing.errors import PSPError

SPEC_MODULES = spec_modules()  # the op table's kernels modules (kernels/ops.py)
DEFAULT_ARCHS = (80, 90)
REPO = Path(__file__).resolve().parent.parent

# Tensor-core matrix instructions in SASS (base opcode, before the first "."): HMMA fp16/bf16
# (sm_70+ warp-level mma.sync), HGMMA (sm_90 warpgroup wgmma), and the integer/fp8/fp64 kinds.
MMA_OPCODES = frozenset({"HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA", "BMMA", "BGMMA", "UTCHMMA", "UTCQMMA"})

@dataclass(frozen=True)
class Peak:
    """Dense peak throughput of one GPU, for the roofline.

    Attributes:
        gpu: the part the figures are for.
        flops: FP16 tensor-core FLOP/s, dense (no sparsity).
        bytes_per_s: DRAM bandwidth in B/s.
    """

    gpu: str
    flops: float
    bytes_per_s: float

    def seconds(self, flops: float, nbytes: float) -> tuple[float, str]:
        """Roofline time of one call, `max(flops / peak, bytes / bandwidth)`, and "compute"/"memory"."""
        t_c, t_m = flops / self.flops, nbytes / self.bytes_per_s
        return max(t_c, t_m), ("compute" if t_c > t_m else "memory")


# NVIDIA datasheets: H100 SXM5 989 TFLOP/s fp16 tensor dense, 3.35 TB/s HBM3; A100 SXM4 80 GB
# 312 TFLOP/s fp16 tensor dense, 2.039 TB/s HBM2e.
PEAKS = {
    80: Peak("A100 SXM4 80GB", 312e12, 2.039e12),
    90: Peak("H100 SXM5", 989e12, 3.35e12),
}


class InspectError(PSPError):
    """The kernels to inspect cannot be found (a spec module missing or without `aot_specs`)."""


# ----------------------------------------------------------------------------------------------
# loading the specs


def _load_source(source: str, output_size: int) -> list[KernelSpec]:
    """Specs of one source: `"pkg.module"` (its `aot_specs`), `"pkg.module:func"` or `"path.py:func"`.

    `func(output_size)` must return a list of `KernelSpec`.
    """
    target, _, attr = source.partition(":")
    attr = attr or "aot_specs"
    if target.endswith(".py"):
        path = Path(target).resolve()
        if not path.is_file():
            raise InspectError(f"{source}: no such file")
        name = f"_kernels_inspect_src_{path.stem}"
        module = sys.modules.get(name)
        if module is None or getattr(module, "__file__", None) != str(path):
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name and target.startswith(e.name):
                raise InspectError(
                    f"{target}: module not found ({target.replace('.', '/')}.py); every kernel module must "
                    f"exist and expose aot_specs(output_size) -> list[KernelSpec]"
                ) from None
            raise
    func = getattr(module, attr, None)
    if not callable(func):
        raise InspectError(
            f"{target}: has no {attr}(output_size) -> list[KernelSpec]; add it so its kernels can be inspected"
        )
    specs = list(func(output_size))
    for s in specs:
        if not isinstance(s, KernelSpec):
            raise InspectError(f"{source}: {attr}() returned {type(s).__name__}, not KernelSpec")
    if not specs:
        raise InspectError(f"{source}: {attr}({output_size}) returned no specs")
    return specs


def load_specs(sources: Sequence[str] = SPEC_MODULES, output_size: int = 1024) -> list[KernelSpec]:
    """Every `KernelSpec` of `sources` (see `_load_source`), in order.

    Raises:
        InspectError: a module is missing, has no `aot_specs`, or returns no/odd specs.
    """
    specs: list[KernelSpec] = []
    for source in sources:
        specs.extend(_load_source(source, output_size))
    return specs


def spec_key(spec: KernelSpec) -> str:
    """What decides the compiled code: kernel function, signature, constexprs, warps, stages.

    Specs that differ only in name, FLOPs, bytes, layer or calls (the same kernel serving several
    layers with runtime sizes) share one compilation. Stable across processes.
    """
    fn = getattr(spec.fn, "fn", spec.fn)  # JITFunction / InterpretedFunction -> the Python function
    sig = ",".join(f"{k}:{v}" for k, v in spec.signature.items())
    const = ",".join(f"{k}={v!r}" for k, v in sorted(spec.constexprs.items(), key=lambda kv: str(kv[0])))
    return f"{fn.__module__}.{fn.__qualname__}({sig})[{const}]w{spec.num_warps}s{spec.num_stages}"


# ----------------------------------------------------------------------------------------------
# parsing ptxas / cuobjdump output (fixtures in tests/test_inspect.py)

_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_TARGET = re.compile(r"Compiling entry function '([^']+)' for '(sm_[0-9]+[a-z]?)'")
_PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(text: str) -> dict[str, dict[str, int]]:
    """Per function: `registers`, `stack_bytes`, `spill_stores`, `spill_loads` from a `ptxas -v` log.

    The log (ptxas and ptxas-blackwell alike, prefix "ptxas info    :" or
    "ptxas-blackwell info    :") reads:
        Compiling entry function '_k' for 'sm_80'
        Function properties for _k
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        Used 79 registers, used 1 barriers, 392 bytes cmem[0]
    "Function properties" also appears for non-entry functions; "Used N registers" follows the
    entry it belongs to.
    """
    out: dict[str, dict[str, int]] = {}
    entry = props = None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            entry = props = m.group(1)
            out.setdefault(entry, {})
        elif m := _PTXAS_PROPS.search(line):
            props = m.group(1)
        elif m := _PTXAS_FRAME.search(line):
            if props is not None:
                d = out.setdefault(props, {})
                d["stack_bytes"], d["spill_stores"], d["spill_loads"] = (int(g) for g in m.groups())
        elif m := _PTXAS_REGS.search(line):
            if entry is not None:
                out[entry]["registers"] = int(m.group(1))
    return out


_RU_FUNC = re.compile(r"^\s*Function (\S+?):?\s*$")
_RU_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """Per function: the `KEY:value` fields of `cuobjdump --dump-resource-usage` (REG, STACK, SHARED, LOCAL, ...).

    Output format:
        Resource usage:
         Common:
          GLOBAL:0
         Function _k:
          REG:79 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:392 TEXTURE:0 SURFACE:0 SAMPLER:0
    """
    out: dict[str, dict[str, int]] = {}
    func = None
    for line in text.splitlines():
        if m := _RU_FUNC.match(line):
            func = m.group(1)
            out[func] = {}
        elif func is not None and (fields := _RU_FIELD.findall(line)):
            out[func].update({k: int(v) for k, v in fields})
    return out


# `/*0aa0*/   @!P0 HGMMA.64x64x16.F32 R24, gdesc[UR4].tnspB, RZ, !UPT ;   /* 0x40e0... */`
_SASS_INSTR = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)")


def sass_opcodes(text: str) -> Counter:
    """Count of each instruction of `cuobjdump -sass` / `nvdisasm` output, by full opcode (`HMMA.16816.F32`)."""
    return Counter(m.group(1) + m.group(2) for line in text.splitlines() if (m := _SASS_INSTR.match(line)))


def sass_opcodes_by_offset(text: str, starts: Sequence[int]) -> list[Counter]:
    """`sass_opcodes` of `nvdisasm --binary` output of several code blobs laid end to end, one
    Counter per blob: an instruction at byte offset `o` (its `/*o*/` label) belongs to the last
    blob with `starts[i] <= o`."""
    out = [Counter() for _ in starts]
    for line in text.splitlines():
        if m := _SASS_INSTR.match(line):
            offset = int(line.split("/*", 1)[1].split("*/", 1)[0], 16)
            out[bisect.bisect_right(starts, offset) - 1][m.group(1) + m.group(2)] += 1
    return out


_SHF_EXECINSTR = 0x4


def cubin_code(cubin: bytes) -> bytes:
    """The instructions of a cubin: its executable sections (`.text.<function>`, the ones
    `cuobjdump -sass` disassembles), in section order, end to end.

    Raises:
        ValueError: not a little-endian ELF-64 file.
    """
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2 or cubin[5] != 1:
        raise ValueError("not a little-endian ELF-64 cubin")
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", cubin, 0x3A)
    code = []
    for i in range(shnum):
        # Elf64_Shdr: name, type, flags, addr, offset, size, ...
        _, _, flags, _, offset, size = struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize)
        if flags & _SHF_EXECINSTR and size:
            code.append(cubin[offset:offset + size])
    return b"".join(code)


def mma_opcodes(opcodes: Counter) -> dict[str, int]:
    """The tensor-core MMA entries of `sass_opcodes(...)`."""
    return {op: n for op, n in sorted(opcodes.items()) if op.split(".")[0] in MMA_OPCODES}


# ----------------------------------------------------------------------------------------------
# compiling


@dataclass
class Compiled:
    """What one (kernel configuration, arch) compiled to. `error` is set when it did not compile."""

    key: str
    arch: int
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    shared_dynamic_bytes: int = 0
    shared_static_bytes: int = 0
    mma_opcodes: dict[str, int] = field(default_factory=dict)
    sass_instructions: int = 0
    compile_s: float = 0.0
    error: str | None = None


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def compile_spec(spec: KernelSpec, arch: int, workdir: str | os.PathLike) -> Compiled:
    """Compile `spec` for `sm_<arch>` and read registers, spills, shared memory and MMA from the cubin.

    Must run with the interpreter off (`compile_all` takes care of it). Compile errors are
    returned in `Compiled.error`, not raised.
    """
    res, code = _compile_unread(spec, arch, workdir)
    if code is not None:
        read_sass([(res, code)], workdir)
    return res


@dataclass
class _Code:
    """A compiled kernel's instructions, waiting for `read_sass`: `nvdisasm --binary <target>`."""

    target: str  # what ptxas compiled for, e.g. "sm_90a"
    code: bytes


def _compile_unread(spec: KernelSpec, arch: int, workdir: str | os.PathLike) -> tuple[Compiled, _Code | None]:
    """`compile_spec` up to the SASS: the result and the code to disassemble (None after an error)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    key = spec_key(spec)
    res = Compiled(key=key, arch=arch)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope():
            knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v output to stdout
            knobs.compilation.always_compile = True
            with contextlib.redirect_stdout(log):
                src = triton.compiler.ASTSource(
                    fn=jit_function(spec.fn), signature=dict(spec.signature), constexprs=dict(spec.constexprs)
                )
                ck = triton.compile(
                    src,
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
                )
    except Exception as e:  # noqa: BLE001  any compiler failure is a finding, reported with its message
        res.error = _error_summary(e)
        res.compile_s = time.perf_counter() - t0
        return res, None
    res.compile_s = time.perf_counter() - t0
    name = ck.metadata.name

    ptxas = parse_ptxas_log(log.getvalue()).get(name)
    if not ptxas or "registers" not in ptxas or "spill_stores" not in ptxas:
        res.error = f"could not read the ptxas -v log for {name} (Triton's TRITON_DUMP_PTXAS_LOG output changed?)"
        return res, None
    target = next((m.group(2) for m in _PTXAS_TARGET.finditer(log.getvalue()) if m.group(1) == name), None)
    if target is None:
        res.error = f"the ptxas -v log names no target for {name}"
        return res, None
    res.registers = ptxas["registers"]
    res.spill_stores, res.spill_loads = ptxas["spill_stores"], ptxas["spill_loads"]
    res.stack_bytes = ptxas.get("stack_bytes", 0)
    res.shared_dynamic_bytes = int(ck.metadata.shared or 0)

    cubin = Path(workdir) / f"{name}.sm{arch}.{os.getpid()}.cubin"
    cubin.write_bytes(ck.asm["cubin"])
    try:
        usage_text = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], check=True, capture_output=True, text=True
        ).stdout
    finally:
        cubin.unlink(missing_ok=True)
    usage = parse_resource_usage(usage_text).get(name)
    if usage is None or "REG" not in usage:
        res.error = f"cuobjdump --dump-resource-usage lists no function {name}"
        return res, None
    if usage["REG"] != res.registers:
        res.error = f"registers disagree: ptxas log {res.registers}, cuobjdump REG {usage['REG']}"
    res.shared_static_bytes = usage.get("SHARED", 0)
    res.local_bytes = usage.get("LOCAL", 0)
    return res, _Code(target, cubin_code(ck.asm["cubin"]))


def read_sass(compiled: Sequence[tuple[Compiled, _Code]], workdir: str | os.PathLike) -> None:
    """Fill `sass_instructions` and `mma_opcodes` of each result from its code: one `nvdisasm
    --binary` call per target for all of them (their code end to end; the `/*offset*/` of each
    instruction says whose it is). A result whose SASS cannot be read gets an `error`."""
    by_target: dict[str, list[tuple[Compiled, bytes]]] = {}
    for res, c in compiled:
        by_target.setdefault(c.target, []).append((res, c.code))
    for target, items in by_target.items():
        whole = []
        for res, code in items:  # sm_70+ instructions are 16 bytes: anything else is no code we can split
            if code and len(code) % 16 == 0:
                whole.append((res, code))
            else:
                res.error = res.error or f"the cubin has {len(code)} bytes of code, not whole 16-byte instructions"
        items = whole
        if not items:
            continue
        starts, offset = [], 0
        for _, code in items:
            starts.append(offset)
            offset += len(code)
        raw = Path(workdir) / f"code.{target}.{os.getpid()}.bin"
        raw.write_bytes(b"".join(code for _, code in items))
        try:
            p = subprocess.run([_tool("nvdisasm"), "--binary", "SM" + target.removeprefix("sm_"), str(raw)],
                               check=False, capture_output=True, text=True)
        finally:
            raw.unlink(missing_ok=True)
        if p.returncode != 0:
            why = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            for res, _ in items:
                res.error = res.error or f"nvdisasm --binary failed for {target}: {why}"[:400]
            continue
        for (res, _), ops in zip(items, sass_opcodes_by_offset(p.stdout, starts)):
            if not ops:
                res.error = res.error or "nvdisasm printed no instructions we could parse"
            res.sass_instructions = sum(ops.values())
            res.mma_opcodes = mma_opcodes(ops)


def _error_summary(e: Exception) -> str:
    """One line from a compiler exception: Triton's front end puts the source location first and
    the reason last; ptxas errors put the reason in an "error"/"fatal" line of its log."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    name = type(e).__name__
    if not lines:
        return name
    if name == "CompilationError":
        return f"{name} {lines[0]} {lines[-1]}"[:400]
    extra = next((ln for ln in lines[1:] if re.search(r"\b(error|fatal)\b", ln, re.I)), None)
    return (f"{name}: {lines[0]}" + (f" | {extra}" if extra else ""))[:400]


def _jobs_of(specs: Sequence[KernelSpec], archs: Sequence[int]) -> list[tuple[str, int, KernelSpec]]:
    """Distinct (key, arch, first spec with that key) in spec order."""
    seen: dict[str, KernelSpec] = {}
    for s in specs:
        seen.setdefault(spec_key(s), s)
    return [(k, a, s) for k, s in seen.items() for a in archs]


@contextlib.contextmanager
def _private_triton_cache():
    """Point Triton's cache at a fresh temporary directory for the duration (deleted after)."""
    from triton import knobs

    with tempfile.TemporaryDirectory(prefix="kernels-inspect-") as d, knobs.cache.scope():
        knobs.cache.dir = os.path.join(d, "cache")
        yield d


def _compile_in_process(
    specs: Sequence[KernelSpec], archs: Sequence[int], shard: tuple[int, int] = (0, 1)
) -> list[Compiled]:
    """Compile shard `i` of `n` of the distinct (configuration, arch) jobs here (interpreter off)."""
    if interpret_mode():
        raise RuntimeError("compiling needs TRITON_INTERPRET unset (compile_all starts clean workers)")
    i, n = shard
    jobs = _jobs_of(specs, archs)[i::n]
    with _private_triton_cache() as d:
        done = [_compile_unread(s, a, d) for _, a, s in jobs]
        read_sass([(res, code) for res, code in done if code is not None], d)  # one nvdisasm per target
    return [res for res, _ in done]


def compile_all(
    sources: Sequence[str] = SPEC_MODULES,
    archs: Sequence[int] = DEFAULT_ARCHS,
    output_size: int = 1024,
    jobs: int | None = None,
) -> tuple[list[KernelSpec], dict[tuple[str, int], Compiled]]:
    """Load the specs of `sources` and compile each distinct configuration for each arch.

    With the interpreter on, or `jobs` > 1, the compiles run in `jobs` worker processes
    (`python -m kernels.inspect --worker`) whose environment lacks `TRITON_INTERPRET`.

    Args:
        sources: spec sources, see `load_specs`.
        archs: compute capabilities, e.g. (80, 90).
        output_size: generator resolution passed to `aot_specs`.
        jobs: worker processes; default min(4, CPUs), 1 compiles in this process when possible.

    Returns:
        (specs, {(spec_key, arch): Compiled}).

    Raises:
        InspectError: see `load_specs`.
        RuntimeError: a worker process crashed or answered for other specs.
    """
    specs = load_specs(sources, output_size)
    n_jobs = len(_jobs_of(specs, archs))
    jobs = jobs or min(4, os.cpu_count() or 1)
    jobs = max(1, min(jobs, n_jobs))
    if jobs == 1 and not interpret_mode():
        results = _compile_in_process(specs, archs)
    else:
        results = _compile_in_workers(sources, archs, output_size, jobs)
    by_key = {(r.key, r.arch): r for r in results}
    missing = [(k, a) for k, a, _ in _jobs_of(specs, archs) if (k, a) not in by_key]
    if missing:
        raise RuntimeError(f"workers returned no result for {len(missing)} configurations, e.g. {missing[0]}")
    return specs, by_key


def _compile_in_workers(sources: Sequence[str], archs: Sequence[int], output_size: int, jobs: int) -> list[Compiled]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    srcs = [_absolute_source(s) for s in sources]
    with tempfile.TemporaryDirectory(prefix="kernels-inspect-w-") as d:
        procs = []
        for i in range(jobs):
            out = os.path.join(d, f"shard{i}.json")
            cmd = [sys.executable, "-m", "kernels.inspect", "--worker", f"{i}/{jobs}", "--worker-out", out,
                   "--arch", ",".join(str(a) for a in archs), "--output-size", str(output_size)]
            for s in srcs:
                cmd += ["--source", s]
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append((out, proc))
        results: list[Compiled] = []
        failures = []
        for out, p in procs:
            stdout, stderr = p.communicate()
            if p.returncode != 0 or not os.path.exists(out):
                tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
                failures.append(f"worker exited with {p.returncode}:\n{tail}")
                continue
            results.extend(Compiled(**r) for r in json.loads(Path(out).read_text()))
    if failures:
        raise RuntimeError("kernels.inspect worker failed: " + "\n".join(failures))
    return results


def _absolute_source(source: str) -> str:
    target, sep, attr = source.partition(":")
    if target.endswith(".py"):
        target = str(Path(target).resolve())
    return target + sep + attr


# ----------------------------------------------------------------------------------------------
# the report


@dataclass
class KernelReport:
    """One row: a spec compiled for one arch, with its roofline on that arch's GPU (`PEAKS`)."""

    kernel: str
    layer: str
    arch: str
    ok: bool
    error: str | None
    registers: int
    spill_stores: int
    spill_loads: int
    spills: int
    local_bytes: int
    stack_bytes: int
    shared_bytes: int
    shared_dynamic_bytes: int
    shared_static_bytes: int
    mma: bool
    mma_opcodes: dict[str, int]
    num_warps: int
    num_stages: int
    flops: float
    min_bytes: float
    calls: int
    used: bool
    roofline_gpu: str
    roofline_us: float
    bound: str
    compile_s: float


def make_reports(
    specs: Sequence[KernelSpec], compiled: dict[tuple[str, int], Compiled], archs: Sequence[int]
) -> list[KernelReport]:
    """One `KernelReport` per (spec, arch), arch-major (all sm_80 rows, then all sm_90 rows)."""
    rows = []
    for arch in archs:
        peak = PEAKS.get(arch)
        for s in specs:
            c = compiled[(spec_key(s), arch)]
            t, bound = peak.seconds(s.flops, s.min_bytes) if peak else (float("nan"), "")
            rows.append(
                KernelReport(
                    kernel=s.kernel,
                    layer=s.layer,
                    arch=f"sm_{arch}",
                    ok=c.error is None,
                    error=c.error,
                    registers=c.registers,
                    spill_stores=c.spill_stores,
                    spill_loads=c.spill_loads,
                    spills=c.spill_stores + c.spill_loads,
                    local_bytes=c.local_bytes,
                    stack_bytes=c.stack_bytes,
                    shared_bytes=c.shared_dynamic_bytes + c.shared_static_bytes,
                    shared_dynamic_bytes=c.shared_dynamic_bytes,
                    shared_static_bytes=c.shared_static_bytes,
                    mma=bool(c.mma_opcodes),
                    mma_opcodes=c.mma_opcodes,
                    num_warps=s.num_warps,
                    num_stages=s.num_stages,
                    flops=float(s.flops),
                    min_bytes=float(s.min_bytes),
                    calls=s.calls,
                    used=s.used,
                    roofline_gpu=peak.gpu if peak else "",
                    roofline_us=t * 1e6,
                    bound=bound,
                    compile_s=round(c.compile_s, 3),
                )
            )
    return rows


def problems(reports: Iterable[KernelReport]) -> list[str]:
    """One line per failed compile or spilling kernel."""
    out = []
    for r in reports:
        if not r.ok:
            out.append(f"FAILED  {r.kernel} {r.arch}: {r.error}")
        elif r.spills:
            out.append(
                f"SPILLS  {r.kernel} {r.arch}: {r.spill_stores} B spill stores, {r.spill_loads} B spill loads "
                f"(stack frame {r.stack_bytes} B, {r.registers} registers, {r.num_warps} warps)"
            )
    return out


def roofline_totals(reports: Iterable[KernelReport]) -> dict[str, dict[str, Any]]:
    """Per arch: Σ calls × roofline over the specs the generator runs (`used`), in µs, and what was left out."""
    tot: dict[str, dict[str, Any]] = {}
    for r in reports:
        d = tot.setdefault(
            r.arch, {"gpu": r.roofline_gpu, "us": 0.0, "calls": 0, "not_used_us": 0.0, "not_used_specs": 0}
        )
        if r.used:
            d["us"] += r.calls * r.roofline_us
            d["calls"] += r.calls
        else:
            d["not_used_us"] += r.calls * r.roofline_us
            d["not_used_specs"] += 1
    return tot


def _mma_cell(r: KernelReport) -> str:
    if not r.ok:
        return "?"
    if not r.mma:
        return "-"
    return "+".join(sorted({op.split(".")[0] for op in r.mma_opcodes}))


def format_table(reports: Sequence[KernelReport]) -> str:
    """Aligned text table, one row per (spec, arch)."""
    header = ("kernel", "arch", "warps/stages", "regs", "spills B", "smem KiB", "MMA", "GFLOP", "MiB", "calls",
              "roofline µs", "bound")
    rows = [header]
    for r in reports:
        rows.append((
            r.kernel + ("" if r.used else " (not used)"),
            r.arch,
            f"{r.num_warps}/{r.num_stages}",
            str(r.registers) if r.ok else "FAILED",
            str(r.spills) if r.ok else "",
            f"{r.shared_bytes / 1024:.1f}" if r.ok else "",
            _mma_cell(r),
            f"{r.flops / 1e9:.3f}",
            f"{r.min_bytes / 2**20:.2f}",
            str(r.calls),
            f"{r.roofline_us:.2f}",
            r.bound,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {0, 1, 6, 11}
    lines = []
    for j, row in enumerate(rows):
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_totals(reports: Sequence[KernelReport], output_size: int) -> str:
    parts = []
    for arch, d in roofline_totals(reports).items():
        s = f"{arch} ({d['gpu']}): {d['us']:.1f} µs over {d['calls']} calls"
        if d["not_used_specs"]:
            s += f" (+{d['not_used_us']:.1f} µs in {d['not_used_specs']} specs marked not used, left out)"
        parts.append(s)
    head = f"Roofline sum for the {output_size} generator, Σ calls × max(FLOPs/peak, bytes/bandwidth): "
    return head + "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# command line


def _archs(text: str) -> list[int]:
    try:
        archs = [int(a.strip().removeprefix("sm_").removeprefix("sm")) for a in text.split(",") if a.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected compute capabilities like 80,90, got {text!r}") from None
    if not archs:
        raise argparse.ArgumentTypeError("no arch given")
    return archs


def build_parser() -> ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(
        prog="python -m kernels.inspect",
        description="Compile every Triton kernel configuration of the 1024 generator for sm_80/sm_90 "
        "without a GPU; report registers, spills, shared memory, tensor-core MMA and the roofline.",
        epilog="Exit codes: 0 all compiled without spills, 1 a failure or spill, 2 usage error (one line), "
        "130 interrupted.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    p.add_argument("--arch", type=_archs, default=list(DEFAULT_ARCHS), help="compute capabilities (default 80,90)")
    p.add_argument("--output-size", type=int, default=1024, help="generator resolution for aot_specs (default 1024)")
    p.add_argument("--jobs", type=int, default=None, help="compile worker processes (default min(4, CPUs))")
    p.add_argument("--source", action="append", default=None,
                   help="spec source instead of the op table's kernel modules: pkg.module[:func] or file.py:func "
                   "(repeatable)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "i/n": compile shard i of n
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def _worker(args: argparse.Namespace) -> int:
    i, n = (int(v) for v in args.worker.split("/"))
    specs = load_specs(args.source or SPEC_MODULES, args.output_size)
    results = _compile_in_process(specs, args.arch, (i, n))
    Path(args.worker_out).write_text(json.dumps([asdict(r) for r in results]))
    return 0


def _body(args: argparse.Namespace) -> int:
    if args.worker:
        return _worker(args)
    try:
        specs, compiled = compile_all(args.source or SPEC_MODULES, args.arch, args.output_size, args.jobs)
    except RuntimeError as e:  # a worker process crashed (e.g. a compiler segfault): say so, exit 1
        say(f"error: {e}")
        return 1
    reports = make_reports(specs, compiled, args.arch)
    found = problems(reports)
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=1))
        print(format_totals(reports, args.output_size), file=sys.stderr)
    else:
        print(format_table(reports))
        print()
        print(format_totals(reports, args.output_size))
        n_cfg = len({spec_key(s) for s in specs})
        print(f"{len(specs)} specs ({n_cfg} distinct configurations) x {len(args.arch)} archs; "
              f"compile time {sum(c.compile_s for c in compiled.values()):.1f} s (summed over workers)")
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kernels.inspect`: 0 all compiled without spills, 1 a failure or spill, 2 usage error, 130 interrupted."""
    return run_cli(build_parser(), _body, argv, interrupted="nothing was written; rerun the same command")


if __name__ == "__main__":
    sys.exit(main())
