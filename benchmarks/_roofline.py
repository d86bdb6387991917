"""The pieces of the roofline profile (`benchmarks/profile_cpu.py`): this machine's measured peaks,
the layer groups of pSp, per-op accounting of a torch model (time, FLOPs, bytes) and of an ONNX
graph's runtime profile, and the roofline arithmetic.

Source: Williams, Waterman, Patterson, "Roofline: an insightful visual performance model for
multicore architectures" (CACM 2009): attainable GFLOP/s = min(compute peak, arithmetic intensity x
memory bandwidth); a kernel left of the ridge point (peak / bandwidth) is memory-bound. FLOPs are
`torch.utils.flop_counter`'s formulas (the ones `FlopCounterMode` uses: convolutions and matrix
products, a multiply-add = 2 FLOPs; element-wise ops count 0).
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

WIDTH = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}  # bytes per element of a precision


# ------------------------------------------------------------------------------------------------
# Peaks


@dataclass
class Peaks:
    """This machine's measured roofs.

    Attributes:
        fp32_gflops: fp32 matrix product, GFLOP/s (torch.mm, n x n x n, best of the rounds).
        bf16_gflops: bf16 matrix product, GFLOP/s, or None (no bf16 units: not run).
        int8_gops: int8 matrix product, GOP/s (a multiply-add = 2), or None.
        bandwidth_gbs: memory copy, GB/s counting the bytes read and written.
        notes: per roof, how it was measured (and why one was skipped).
    """

    fp32_gflops: float
    bf16_gflops: float | None
    int8_gops: float | None
    bandwidth_gbs: float
    notes: dict[str, str] = field(default_factory=dict)

    def best(self, other: "Peaks") -> "Peaks":
        """Each roof the higher of two measurements (the start and the end of a run: load from other
        processes lowers a peak, never raises it)."""
        hi = lambda a, b: max(v for v in (a, b) if v is not None) if (a, b) != (None, None) else None  # noqa: E731
        return Peaks(hi(self.fp32_gflops, other.fp32_gflops), hi(self.bf16_gflops, other.bf16_gflops),
                     hi(self.int8_gops, other.int8_gops), hi(self.bandwidth_gbs, other.bandwidth_gbs),
                     {k: v + "; the better of two measurements (start, end)" for k, v in self.notes.items()})

    def compute(self, precision: str) -> float | None:
        """The compute roof of `precision` in GFLOP/s (None: not measured on this CPU)."""
        return {"fp32": self.fp32_gflops, "bf16": self.bf16_gflops, "fp16": None,
                "int8": self.int8_gops}.get(precision)


def _best_seconds(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(n: int, dtype: torch.dtype, rounds: int = 3) -> float:
    """GFLOP/s of `torch.mm` of two `[n, n]` matrices of `dtype` (2 n³ FLOPs, best of `rounds`)."""
    g = torch.Generator().manual_seed(n)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), rounds) / 1e9


def openvino_int8_gops(n: int, rounds: int = 3, threads: int | None = None) -> tuple[float, str]:
    """GOP/s of an int8 `[n, n] x [n, n]` matrix product on OpenVINO's CPU plugin, and the kernel it
    ran: a MatMul whose activation passes a FakeQuantize (256 levels) and whose weight is an int8
    constant dequantized by a Convert and a Multiply, the pattern OpenVINO's low-precision
    transformations compile to an int8 FullyConnected (`exec_type` names it, e.g. `jit_gemm_I8`,
    `brgemm_avx512_amx_I8`). Source: OpenVINO Runtime Python API (`openvino.opset13`), CPU plugin
    `PERF_COUNT`."""
    import openvino as ov
    import openvino.opset13 as ops

    from export.backends.graph import physical_cores

    rng = np.random.default_rng(n)
    x = ops.parameter([n, n], np.float32, name="x")
    lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
    xq = ops.fake_quantize(x, lo, hi, lo, hi, 256)
    w = ops.constant(rng.integers(-127, 128, (n, n), dtype=np.int8))
    wf = ops.multiply(ops.convert(w, "f32"), ops.constant(np.full((n, 1), 0.01, np.float32)))
    model = ov.Model([ops.matmul(xq, wf, False, True)], [x], "int8_matmul")
    compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True,
                                                      "INFERENCE_NUM_THREADS": int(threads or physical_cores())})
    request = compiled.create_infer_request()
    a = rng.standard_normal((n, n), dtype=np.float32)
    seconds = _best_seconds(lambda: request.infer({0: a}), rounds)
    kernels = sorted({p.exec_type for p in request.get_profiling_info() if p.node_type == "FullyConnected"})
    return 2 * n**3 / seconds / 1e9, ",".join(kernels) or "?"


def copy_gbs(mib: int = 256, rounds: int = 5) -> tuple[float, str]:
    """Memory bandwidth in GB/s by a copy kernel of `mib` MiB (bytes read + bytes written, best of
    `rounds`): the better of torch's `copy_` (all threads) and numpy's `copyto` (one thread)."""
    n = mib * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    t_torch = _best_seconds(lambda: dst.copy_(src), rounds)
    a, b = np.ones(n, np.float32), np.empty(n, np.float32)
    t_np = _best_seconds(lambda: np.copyto(b, a), rounds)
    moved = 2 * n * 4
    gbs = {"torch copy_": moved / t_torch / 1e9, "numpy copyto": moved / t_np / 1e9}
    best = max(gbs, key=gbs.get)
    return gbs[best], f"{best} of {mib} MiB, read+write, best of {rounds} " + \
        f"({', '.join(f'{k} {v:.1f}' for k, v in gbs.items())} GB/s)"


def measure_peaks(n: int = 2048, rounds: int = 3, copy_mib: int = 256) -> Peaks:
    """The roofs of this machine, measured now (see `Peaks`).

    Args:
        n: the matrix size of the matmul peaks (2048: 17 GFLOP per product).
        rounds: timed rounds per peak (best taken; a warm-up apart).
        copy_mib: the buffer of the copy kernel, MiB (well above the last-level cache).
    """
    from reference.plumbing.platform import bf16_units

    notes = {"fp32": f"torch.mm {n}^3 fp32, {torch.get_num_threads()} threads, best of {rounds}"}
    fp32 = matmul_gflops(n, torch.float32, rounds)
    units = bf16_units()
    if units:
        bf16 = matmul_gflops(n, torch.bfloat16, rounds)
        notes["bf16"] = f"torch.mm {n}^3 bf16 ({', '.join(units)}), best of {rounds}"
    else:
        bf16 = None
        notes["bf16"] = "no bf16 units: skipped"
    try:
        int8, kernel = openvino_int8_gops(n, rounds)
        notes["int8"] = f"OpenVINO MatMul with FakeQuantize on an int8 weight, {n}^3, kernel {kernel}, best of {rounds}"
        # torch._int_mm has a CPU kernel, but a plain loop (measured < 1 GOP/s): not a roof
    except Exception as e:  # noqa: BLE001 - openvino missing or refusing: the roof is left out, said why
        int8, notes["int8"] = None, f"not measured ({type(e).__name__}: {e})"
    bw, notes["bandwidth"] = copy_gbs(copy_mib)
    return Peaks(fp32, bf16, int8, bw, notes)


# ------------------------------------------------------------------------------------------------
# Layer groups


ENCODER_GROUPS = ("enc: body (IR-SE-50)", "enc: map2style heads", "enc: FPN (latlayers, upsample+add)",
                  "enc: layout reorders", "enc: other")
GENERATOR_TAIL = ("gen: styles (affine, demod coefs)", "gen: modulate/demodulate x", "gen: FIR (blur, skip up)",
                  "gen: bias+noise+lrelu", "gen: to_rgb", "gen: layout reorders", "gen: other", "resize 256")


def group_order(output_size: int) -> list[str]:
    """Every layer group of a model of `output_size`, in the order of the tables."""
    convs = [f"gen: conv {4 * 2**i}" for i in range(int(np.log2(output_size)) - 1)]
    return list(ENCODER_GROUPS) + convs + list(GENERATOR_TAIL)


_LAYER = re.compile(r"(?:^|\.)(conv1|to_rgb1|convs\.(\d+)|to_rgbs\.(\d+))(?:\.|$)")


def classify(stage: str, path: str, kind: str, depthwise: bool = False, scale_of: str = "") -> str:
    """The layer group of one op.

    Args:
        stage: "encode", "synthesize" or "resize".
        path: the dotted module path of the op (`encoder.backbone.units.3.conv1`,
            `synthesis.convs.4`, `decoder.convs.4.conv.blur`; "" for the model's own forward).
        kind: the op's kind: "conv", "matmul", "mul", "add", "act", "resize", "pool", "concat",
            "reorder", "other".
        depthwise: a convolution with one input channel per group (a FIR filter).
        scale_of: for a "mul" in a generator layer, what the other operand is: "style" (a per-sample,
            per-channel vector: modulation or demodulation) or "" (a constant: the lrelu gain).

    Returns:
        One of `group_order(R)`.
    """
    if stage == "resize":
        return "resize 256"
    if stage == "encode":
        if kind == "reorder":
            return "enc: layout reorders"
        if re.search(r"(^|\.)(backbone|input_layer|body)(\.|$)", path):
            return "enc: body (IR-SE-50)"
        if re.search(r"(^|\.)(styles|coarse|middle|fine|output_layer_2|output_pool|linear)(\.|$)", path):
            return "enc: map2style heads"
        if "latlayer" in path:
            return "enc: FPN (latlayers, upsample+add)"
        if path.endswith("encoder"):  # the encoder's own forward: FPN merge, or the W/W+ heads' pool+linear
            if kind in ("matmul", "pool"):
                return "enc: map2style heads"
            if kind != "concat":  # the bilinear upsample (and its index arithmetic) and the add
                return "enc: FPN (latlayers, upsample+add)"
        return "enc: other"
    if kind == "reorder":
        return "gen: layout reorders"
    m = _LAYER.search(path)
    if m is None:
        return "gen: other"
    if re.search(r"(^|\.)(blur|upsample|skip_up)(\.|$)", path) or (kind == "conv" and depthwise):
        return "gen: FIR (blur, skip up)"
    if re.search(r"(^|\.)(affine|demod|modulation)(\.|$)", path):
        return "gen: styles (affine, demod coefs)"
    if m.group(1).startswith("to_rgb"):
        return "gen: to_rgb"
    if re.search(r"(^|\.)(noise|activate)(\.|$)", path):
        return "gen: bias+noise+lrelu"
    if kind == "conv":
        i = m.group(2)
        return f"gen: conv {4 if i is None else 2 ** (3 + int(i) // 2)}"
    if kind == "mul" and scale_of == "style":
        return "gen: modulate/demodulate x"
    if kind in ("add", "act", "mul"):
        return "gen: bias+noise+lrelu"
    if path.endswith(".conv"):  # reference ModulatedConv2d: weight modulation and demodulation
        return "gen: modulate/demodulate x"
    return "gen: other"


# ------------------------------------------------------------------------------------------------
# torch: per-op accounting


@dataclass
class OpRecord:
    """One aten op of a forward: where it ran, its kind, seconds, FLOPs and bytes moved."""

    stage: str
    path: str
    op: str
    group: str
    seconds: float
    flops: int
    bytes: int


_TORCH_KINDS = {
    "convolution": "conv", "_convolution": "conv", "mm": "matmul", "addmm": "matmul", "bmm": "matmul",
    "baddbmm": "matmul", "mul": "mul", "add": "add", "sub": "add", "leaky_relu": "act", "relu": "act",
    "relu_": "act", "_prelu_kernel": "act", "prelu": "act", "sigmoid": "act", "upsample_bilinear2d": "resize",
    "avg_pool2d": "pool", "mean": "pool", "_adaptive_avg_pool2d": "pool", "addcmul": "mul", "cat": "concat",
}
_IMPLICIT = torch._C.DispatchKey.CompositeImplicitAutograd
_META_OPS = {"size", "sym_size", "stride", "sym_stride", "storage_offset", "sym_storage_offset", "numel",
             "sym_numel", "dim", "is_contiguous", "sym_is_contiguous", "is_strides_like_format",
             "is_non_overlapping_and_dense", "layout"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of `t` (a broadcast dimension, stride 0, counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


class OpProfiler(TorchDispatchMode):
    """Times every aten op of a forward and counts its FLOPs and bytes, with the module path it ran
    in, and classifies it into a layer group (`classify`).

    Time: `time.perf_counter` around the op (CPU ops are synchronous); the Python dispatch around it
    is not counted, so the sum of the ops is a little below the wall time of the same forward run
    without the profiler. FLOPs: `torch.utils.flop_counter.flop_registry`. Unlike `FlopCounterMode`,
    ops outside the registry run as they are, not decomposed (a decomposition runs slower than the
    kernel it replaces); none of pSp's holds a matrix product, so the totals are equal
    (tests/test_profile_cpu.py checks). Bytes: each input and the
    output read or written once (distinct elements, at their dtype's width; a view moves nothing):
    the least traffic an op can have, what the roofline model counts.

    Args:
        model: its `named_modules` give the paths (a module-level forward hook keeps a stack).

    Use: `with OpProfiler(model) as prof, prof.stage("encode"): model.encode(x)`; then `prof.records`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.current_stage = ""
        self.records: list[OpRecord] = []
        self._hooks: list = []
        self._depth = 0

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Ops inside the block belong to `stage` ("encode", "synthesize", "resize")."""
        before, self.current_stage = self.current_stage, name
        try:
            yield
        finally:
            self.current_stage = before

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def pre(module, args):
            if id(module) in self.names:
                self.stack.append(self.names[id(module)])

        def post(module, args, out):
            if id(module) in self.names and self.stack:
                self.stack.pop()

        if self._depth == 0:  # the mode is entered again around decompositions: hooks once
            self._hooks = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for h in self._hooks:
                h.remove()
            self._hooks = []
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if name in _META_OPS:
            return func(*args, **kwargs)
        packet = func._overloadpacket
        if packet not in flop_registry and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _IMPLICIT):
            with self:  # what the dispatcher does without a mode: the op's C++ composite, seen op by op
                return func._op_dk(_IMPLICIT, *args, **kwargs)
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - t0
        flops = int(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0
        moved = 0 if func.is_view else sum(tensor_bytes(t) for t in _tensors((args, kwargs, out)))
        path = self.stack[-1] if self.stack else ""
        kind = _TORCH_KINDS.get(name) or _TORCH_KINDS.get(name.removesuffix("_"), "other")  # add_ as add
        depthwise, scale_of = False, ""
        if kind == "conv":
            weight, groups = args[1], args[8] if len(args) > 8 else 1
            depthwise = groups > 1 and weight.shape[1] == 1
        elif kind == "mul" and len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args):
            small = min(args, key=lambda t: t.numel())
            # [N, C, 1, 1] (modulation, demodulation) against a constant scalar (the lrelu gain)
            scale_of = "style" if small.ndim >= 2 and small.numel() > 1 and small.shape[-1] == 1 else ""
        group = classify(self.current_stage, path, kind, depthwise, scale_of)
        self.records.append(OpRecord(self.current_stage, path, name, group, seconds, flops, moved))
        return out


def median_records(runs: list[list[OpRecord]]) -> list[OpRecord]:
    """The records of repeated identical forwards, each op's seconds the median over the runs."""
    out = []
    for recs in zip(*runs):
        r = recs[0]
        out.append(OpRecord(r.stage, r.path, r.op, r.group, statistics.median(x.seconds for x in recs), r.flops,
                            r.bytes))
    return out


# ------------------------------------------------------------------------------------------------
# ONNX graphs: node name -> group


_ONNX_KINDS = {"Conv": "conv", "ConvTranspose": "conv", "Gemm": "matmul", "MatMul": "matmul", "Einsum": "matmul",
               "Mul": "mul", "Add": "add", "Sub": "add", "LeakyRelu": "act", "Relu": "act", "PRelu": "act",
               "Sigmoid": "act", "Resize": "resize", "ReduceMean": "pool", "AveragePool": "pool",
               "GlobalAveragePool": "pool", "Concat": "concat"}
_ONNX_NAME = re.compile(r"^(/(?:[^/]+/)*[A-Za-z]+_\d+)")
_REORDER = re.compile(r"_(a[b-z]+\d*[a-z]*)_(a[b-z]+\d*[a-z]*)_")


@dataclass
class GraphIndex:
    """What the profile needs of one exported ONNX graph (`export.onnx`: node names carry module paths,
    `/model/synthesis/convs.3/Conv_81`): per node its group, FLOP-free facts only.

    Attributes:
        stage: "encode" or "synthesize".
        groups: ONNX node name -> layer group (`classify`).
    """

    stage: str
    groups: dict[str, str]

    @classmethod
    def load(cls, onnx_path, stage: str) -> "GraphIndex":
        """Read the graph's nodes (not its external weights) and classify each."""
        import onnx

        graph = onnx.load(str(onnx_path), load_external_data=False).graph
        consts = {i.name for i in graph.initializer}
        producer = {}
        for n in graph.node:
            for o in n.output:
                producer[o] = n
            if n.op_type == "Constant":
                consts.update(n.output)

        def origin(name: str, depth: int = 0) -> str:
            """The module path that made a value, through shape and cast ops; "const" for constants."""
            if name in consts or name not in producer or depth > 6:
                return "const"
            n = producer[name]
            if n.op_type in ("Unsqueeze", "Reshape", "Cast", "Expand", "Squeeze"):
                return origin(n.input[0], depth + 1)
            return _path(n.name)

        groups = {}
        for n in graph.node:
            kind = _ONNX_KINDS.get(n.op_type, "other")
            attrs = {a.name: a for a in n.attribute}
            depthwise = kind == "conv" and "group" in attrs and attrs["group"].i > 1 and stage == "synthesize"
            scale_of = ""
            if kind == "mul":
                where = [origin(i) for i in n.input]
                scale_of = "style" if any(re.search(r"(affine|demod)$", w) for w in where) else ""
            groups[n.name] = classify(stage, _path(n.name), kind, depthwise, scale_of)
            for o in n.output:  # ONNX Runtime names the nodes it rewrites (NCHWc) after their outputs
                groups.setdefault(o, groups[n.name])
        return cls(stage, groups)

    def group_of(self, runtime_name: str, node_type: str = "") -> str:
        """The group of a node a runtime reports: an ONNX node name, possibly with the runtime's
        suffixes (`.../Gemm_83/WithoutBiases`), a node ONNX Runtime rewrote into its NCHWc layout
        (named after the ONNX node's output value, `conv2d_9_nchwc`), or a layout conversion the
        runtime inserted (OpenVINO `<from>_abcd_acdb_<to>`, node type Reorder; ONNX Runtime
        `ReorderInput`/`ReorderOutput`)."""
        if node_type == "Reorder" or _REORDER.search(runtime_name) or runtime_name.startswith("Reorder"):
            return classify(self.stage, "", "reorder")
        if runtime_name in self.groups:
            return self.groups[runtime_name]
        bare = re.sub(r"(_nchwc|_token_\d+)+$", "", runtime_name)
        if bare in self.groups:
            return self.groups[bare]
        m = _ONNX_NAME.match(runtime_name)
        if m and m.group(1) in self.groups:
            return self.groups[m.group(1)]
        return classify(self.stage, _path(runtime_name), "other")


def _path(node_name: str) -> str:
    """`/model/synthesis/convs.3/Conv_81` -> `synthesis.convs.3` (the `EnginePSP` module path)."""
    parts = [p for p in node_name.split("/") if p][:-1]
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts)


# ------------------------------------------------------------------------------------------------
# The roofline table


@dataclass
class GroupRow:
    """One layer group of one variant, per image.

    Attributes:
        group: the group's name (`group_order`).
        ms: milliseconds per image.
        gflop: GFLOP per image (multiply-add = 2).
        mb: MB moved per image (each tensor read or written once, at the precision's width).
        kernels: what ran it (OpenVINO `exec_type`s, or aten ops), most time first.
    """

    group: str
    ms: float
    gflop: float
    mb: float
    kernels: str = ""

    def roof(self, peak_gflops: float | None, bandwidth_gbs: float) -> dict[str, float | str | None]:
        """Achieved GFLOP/s and GB/s, arithmetic intensity (FLOP/B), the bounding roof ("compute"
        right of the ridge point, "memory" left of it) and the achieved share of each roof and of the
        attainable (the lower roof at this intensity), in %."""
        s = self.ms / 1e3
        gfs = self.gflop / s if s > 0 else 0.0
        gbs = self.mb / 1e3 / s if s > 0 else 0.0
        ai = self.gflop * 1e9 / (self.mb * 1e6) if self.mb > 0 else float("inf")
        out: dict[str, float | str | None] = {"gflops": gfs, "gbs": gbs, "ai": ai, "pct_bw": 100 * gbs / bandwidth_gbs}
        if peak_gflops:
            ridge = peak_gflops / bandwidth_gbs
            attainable = min(peak_gflops, ai * bandwidth_gbs)
            out.update(bound="compute" if ai >= ridge else "memory", pct_peak=100 * gfs / peak_gflops,
                       pct_roof=100 * gfs / attainable if attainable > 0 else 0.0)
        else:
            out.update(bound=None, pct_peak=None, pct_roof=None)
        return out


def group_rows(items: list[tuple[str, float, float, float, str]], order: list[str]) -> list[GroupRow]:
    """Sum `(group, seconds, flops, bytes, kernel)` items into `GroupRow`s in `order` (groups with no
    op left out), each per image is the caller's division."""
    acc: dict[str, list] = {}
    for group, seconds, flops, moved, kernel in items:
        a = acc.setdefault(group, [0.0, 0.0, 0.0, {}])
        a[0] += seconds
        a[1] += flops
        a[2] += moved
        a[3][kernel] = a[3].get(kernel, 0.0) + seconds
    rows = []
    for g in order + sorted(set(acc) - set(order)):
        if g in acc:
            s, f, b, k = acc[g]
            top = sorted(k.items(), key=lambda kv: -kv[1])[:3]
            rows.append(GroupRow(g, s * 1e3, f / 1e9, b / 1e6, ", ".join(n for n, _ in top if n)))
    return rows


def markdown_table(rows: list[GroupRow], peak_gflops: float | None, bandwidth_gbs: float,
                   stage_ms: dict[str, float]) -> str:
    """The per-group table of one variant (Markdown): time, share of its stage's wall time, FLOPs,
    bytes, achieved rates, intensity, bound and the share of the roofs."""
    head = ("| group | ms/img | % stage | GFLOP/img | MB/img | GFLOP/s | GB/s | FLOP/B | bound | % compute peak "
            "| % bw peak | % of roof | kernels |")
    lines = [head, "|" + "---|" * 13]
    pct = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    for r in rows:
        x = r.roof(peak_gflops, bandwidth_gbs)
        stage = "encode" if r.group.startswith("enc") else "synthesize"
        share = 100 * r.ms / stage_ms[stage] if stage_ms.get(stage) else float("nan")
        ai = "inf" if x["ai"] == float("inf") else f"{x['ai']:.1f}"
        lines.append(f"| {r.group} | {r.ms:.1f} | {share:.0f} | {r.gflop:.2f} | {r.mb:.0f} | {x['gflops']:.1f} | "
                     f"{x['gbs']:.1f} | {ai} | {x['bound'] or '-'} | {pct(x['pct_peak'])} | {x['pct_bw']:.0f} | "
                     f"{pct(x['pct_roof'])} | {r.kernels} |")
    return "\n".join(lines)


def rows_json(rows: list[GroupRow], peak_gflops: float | None, bandwidth_gbs: float) -> list[dict]:
    """The rows with their roofline figures, for `--json`."""
    return [{**asdict(r), **r.roof(peak_gflops, bandwidth_gbs)} for r in rows]
