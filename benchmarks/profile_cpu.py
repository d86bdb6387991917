"""The roofline profile of the CPU backends: per stage and layer group, time, FLOPs and bytes against
this machine's measured peaks.

Run (from the repository root): `python -m benchmarks.profile_cpu [--size 256|1024] [--batch 1]
[--backends reference,engine,onnxruntime,openvino] [--precisions fp32,bf16] [--repeats 2] [--json FILE]`;
`--tune` instead compares OpenVINO settings side by side (hints, streams, threads, chunk sizes,
static shapes, denormals) and prints their ratios.

What it prints (and writes with `--json`):
- the CPU model and flags (`reference.plumbing.platform.cpu_summary`) and the measured roofs: fp32
  and bf16 matrix products (torch; bf16 only where the CPU has bf16 units), int8 matrix products
  (OpenVINO; `torch._int_mm` has only a plain CPU loop), memory bandwidth by a copy kernel;
- per variant (`backend:precision`, every CPU row of `export.backends.BACKENDS` in the asked
  precisions; those that cannot run here are named with the reason) a Markdown table of the layer
  groups (`benchmarks._roofline.group_order`: encoder body, map2style heads, the FPN merge, each
  generator resolution's convolutions, style affines, modulation, FIR filters, bias + noise + leaky
  ReLU, to_rgb, OpenVINO's layout reorders, the 256 resize): ms per image, FLOPs, bytes moved,
  achieved GFLOP/s and GB/s, arithmetic intensity, the bounding roof and the share of each roof.

How: torch rows (`reference`, `engine`) run under `benchmarks._roofline.OpProfiler` (every aten op
timed, FLOPs by `torch.utils.flop_counter`'s formulas, module paths by forward hooks). Graph rows
compile the cached ONNX graphs (`export.backends.graph.cached_graphs`, as the backend does) with the
backend's settings plus per-node counters (OpenVINO `PERF_COUNT`: `real_time`, `exec_type` per
executed node, the fused ONNX nodes from the runtime model; ONNX Runtime `enable_profiling`), in the
backend's chunk sizes, and map node names (`/model/synthesis/convs.3/Conv_81`: module paths, see
`export.onnx.name_nodes_by_module`) to the same groups. FLOPs and bytes of graph rows are those of
the engine formulation the graphs were exported from (fp32 counts; bytes at the precision's width
except the fp32 style math). Wall times of each stage are measured without the profiler, in the
same process; the table's "% stage" is a group's share of that wall time.

Weights: the weight-rule checkpoints of `benchmarks.cpu_engines.checkpoint_for` (`ffhq_encode_256`
at 256; the demo checkpoint, `ffhq_encode` at 1024), or `--checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.cpu_engines import time_stage
from benchmarks._roofline import (WIDTH, GraphIndex, OpProfiler, Peaks, group_order, group_rows, markdown_table,
                                  measure_peaks, median_records, rows_json)
from reference.plumbing.cli import ArgumentParser, int_at_least, run_cli

TORCH_ROWS = ("reference", "engine")
GRAPH_ROWS = ("onnxruntime", "openvino")
FP32_GROUPS = ("gen: styles (affine, demod coefs)",)  # fp32 in every precision (registry docstring)


def encoder_input(description, batch: int) -> torch.Tensor:
    """`[batch, input_nc, 256, 256]` float32 in [-1, 1], seeded (the same for every variant)."""
    s = description.encoder_size
    return torch.rand(batch, description.input_nc, s, s, generator=torch.Generator().manual_seed(batch)) * 2 - 1


# ------------------------------------------------------------------------------------------------
# torch rows


def profile_torch(model, x: torch.Tensor, repeats: int) -> dict:
    """Per-op records and stage wall times of a torch backend model (`encode`, `synthesize`, and the
    `Engine`'s 256 resize, `reference.psp.face_pool`).

    Args:
        model: a backend model (`export.backends.BackendModel`, an `nn.Module`).
        x: `[B, input_nc, 256, 256]` float32 encoder input.
        repeats: profiled and timed rounds (a warm-up apart); op times are medians over the rounds.

    Returns:
        `{"records": [OpRecord], "wall_s": {"encode": s, "synthesize": s}, "w_plus": the encoder's
        W+}`, per batch (synthesize includes the resize).
    """
    from reference.psp import face_pool

    with torch.inference_mode():
        w = model.encode(x)
        wall = {"encode": time_stage(lambda: model.encode(x), repeats),
                "synthesize": time_stage(lambda: face_pool(model.synthesize(w)), repeats)}
        runs = []
        for i in range(repeats + 1):
            with OpProfiler(model) as prof:
                with prof.stage("encode"):
                    model.encode(x)
                with prof.stage("synthesize"):
                    img = model.synthesize(w)
                with prof.stage("resize"):
                    face_pool(img)
            if i:  # the first round warms the profiler's paths up
                runs.append(prof.records)
    return {"records": median_records(runs), "wall_s": wall, "w_plus": w}


def torch_items(records, batch: int) -> list[tuple[str, float, float, float, str]]:
    """`(group, seconds, flops, bytes, op)` per image of each record (the resize, `face_pool`, is the
    identity at 256: then one empty item says so)."""
    items = [(r.group, r.seconds / batch, r.flops / batch, r.bytes / batch, r.op) for r in records]
    if not any(r.stage == "resize" for r in records):
        items.append(("resize 256", 0.0, 0.0, 0.0, "identity at 256"))
    return items


# ------------------------------------------------------------------------------------------------
# graph rows


def _runtime_model_facts(compiled) -> dict[str, dict]:
    """Per executed node of an OpenVINO compiled model: output bytes (`[B, ...]` at its precision)
    and the ONNX nodes fused into it (`originalLayersNames`)."""
    facts = {}
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        get = lambda k: info[k].astype(str) if k in info.keys() else ""  # noqa: E731
        prec = get("outputPrecisions").split(",")[0]
        width = {"f32": 4, "bf16": 2, "f16": 2, "i8": 1, "u8": 1, "i32": 4, "i64": 8}.get(prec, 4)
        out_bytes = 0
        for i in range(node.get_output_size()):
            shape = node.get_output_partial_shape(i)
            if shape.is_static:
                out_bytes += int(np.prod([d.get_length() for d in shape])) * width
        facts[node.get_friendly_name()] = {"out_bytes": out_bytes, "fused": get("originalLayersNames")}
    return facts


def profile_openvino(path: Path, input_name: str, a: np.ndarray, chunk: int, precision: str, repeats: int,
                     index: GraphIndex, config: dict | None = None) -> dict:
    """Per-node times of one cached graph on OpenVINO's CPU plugin, compiled as `openvino_runner`
    does (latency hint, `physical_cores()` threads, the precision hint) plus `PERF_COUNT`, run in
    chunks of `chunk` images.

    Returns:
        `{"items": [(group, s/batch, 0, reorder bytes/batch, kernel)], "wall_s": s per batch,
        "fused": {node: fused ONNX nodes}}`; FLOPs and the bytes of ONNX nodes are the caller's
        (the engine formulation's).
    """
    import openvino as ov

    from export.backends.graph import physical_cores

    props = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": physical_cores(),
             "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", **(config or {})}
    compiled = ov.Core().compile_model(str(path), "CPU", {**props, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    chunks = [np.ascontiguousarray(a[i : i + chunk]) for i in range(0, a.shape[0], chunk)]

    def run() -> dict[str, tuple[float, str, str]]:
        acc: dict[str, list] = {}
        for c in chunks:
            request.infer({input_name: c})
            for p in request.get_profiling_info():
                if p.status.name != "EXECUTED":
                    continue
                e = acc.setdefault(p.node_name, [0.0, p.exec_type, p.node_type])
                e[0] += p.real_time.total_seconds()
        return acc

    run()
    wall = time_stage(lambda: [request.infer({input_name: c}) for c in chunks], repeats)
    runs = [run() for _ in range(repeats)]
    facts = _runtime_model_facts(compiled)  # output shapes of the last chunk's run
    batch = a.shape[0]
    items = []
    for name, (_, kernel, node_type) in runs[0].items():
        seconds = statistics.median(r[name][0] for r in runs if name in r)
        group = index.group_of(name, node_type)
        for orig in facts.get(name, {}).get("fused", "").split(",")[1:]:  # ONNX nodes fused into this one
            if index.groups.get(orig, group) != group:
                items.append((index.groups[orig], 0.0, 0.0, 0.0, f"fused into {group.split(': ')[-1]}"))
        moved = 0.0
        if group.endswith("layout reorders"):  # read + write of its tensor; a constant's reorder is marked
            moved = 2 * facts.get(name, {}).get("out_bytes", 0) / len(chunks[-1])  # per image of the last chunk
            kernel = "reorder of a constant" if name.startswith("Constant_") else "reorder"
        items.append((group, seconds / batch, 0.0, moved, kernel))
    del request, compiled
    return {"items": items, "wall_s": wall, "fused": {n: f["fused"] for n, f in facts.items() if "," in f["fused"]}}


def profile_onnxruntime(path: Path, input_name: str, output_name: str, a: np.ndarray, chunk: int, repeats: int,
                        index: GraphIndex) -> dict:
    """Per-node times of one cached graph on ONNX Runtime (settings of `ort_runner`, plus
    `enable_profiling`), in chunks of `chunk` images. Returns as `profile_openvino`."""
    import onnxruntime as ort

    from export.backends.graph import physical_cores

    def session(profile: bool):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = physical_cores()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="psp-ort-profile-")) / "ort")
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    chunks = [np.ascontiguousarray(a[i : i + chunk]) for i in range(0, a.shape[0], chunk)]
    plain = session(False)
    wall = time_stage(lambda: [plain.run([output_name], {input_name: c}) for c in chunks], repeats)
    del plain
    s = session(True)
    for _ in range(repeats + 1):
        for c in chunks:
            s.run([output_name], {input_name: c})
    trace = Path(s.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    per_round = len(chunks)
    rounds: list[dict[str, list]] = [{} for _ in range(repeats)]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        k = next((i for i, (t0, t1) in enumerate(runs) if t0 <= e["ts"] <= t1), None)
        if k is None or k < per_round:  # the warm-up round
            continue
        acc = rounds[min(k // per_round - 1, repeats - 1)]
        name = e["name"].removesuffix("_kernel_time")
        args = e.get("args", {})
        entry = acc.setdefault(name, [0.0, args.get("op_name", ""), int(args.get("output_size", 0) or 0)])
        entry[0] += e["dur"] / 1e6
    batch = a.shape[0]
    items = []
    for name, (_, op, out_bytes) in rounds[0].items():
        seconds = statistics.median(r[name][0] for r in rounds if name in r)
        group = index.group_of(name)
        moved = 2 * out_bytes / len(chunks[-1]) if group.endswith("layout reorders") else 0.0  # read + write
        items.append((group, seconds / batch, 0.0, moved, op))
    return {"items": items, "wall_s": wall, "fused": {}}


def with_engine_counts(items: list[tuple], engine_rows: dict, precision: str) -> list[tuple]:
    """Add to graph-row items the FLOPs and bytes per image of each group as the engine formulation
    counts them (`engine_rows`: group -> (flops, fp32 bytes)), bytes at `precision`'s width (the fp32
    style math stays fp32), once per group."""
    out = list(items)
    scale = WIDTH.get(precision, 4) / 4
    for group, (flops, moved) in engine_rows.items():
        out.append((group, 0.0, flops, moved * (1.0 if group in FP32_GROUPS else scale), ""))
    return out


# ------------------------------------------------------------------------------------------------
# the run


def variants_to_run(backends: list[str] | None, precisions: list[str]) -> tuple[list[str], list[str]]:
    """`backend:precision` of the registry's CPU rows this machine can profile, and why others are
    left out (`benchmarks.cpu_engines.variants`, plus the precisions this profiler cannot compile)."""
    from benchmarks.cpu_engines import variants

    names, notes = variants(precisions, backends)
    kept = []
    for v in names:
        backend, precision = v.split(":")
        if backend in GRAPH_ROWS and precision not in ("fp32", "bf16"):
            notes.append(f"{v}: not profiled (the profiler compiles the cached fp32 graphs; {precision} graphs are "
                         "made elsewhere)")
        elif backend == "onnxruntime" and precision != "fp32":
            notes.append(f"{v}: not profiled (ONNX Runtime runs fp32 here)")
        elif backend not in TORCH_ROWS + GRAPH_ROWS:
            notes.append(f"{v}: not profiled (no per-layer profile for this backend)")
        else:
            kept.append(v)
    return kept, notes


def print_peaks(p: Peaks) -> None:
    bf16 = f"{p.bf16_gflops:.0f} GFLOP/s" if p.bf16_gflops else "-"
    int8 = f"{p.int8_gops:.0f} GOP/s" if p.int8_gops else "-"
    print(f"peaks: fp32 {p.fp32_gflops:.0f} GFLOP/s ({p.notes['fp32']}); bf16 {bf16} ({p.notes['bf16']}); "
          f"int8 {int8} ({p.notes['int8']}); memory {p.bandwidth_gbs:.1f} GB/s ({p.notes['bandwidth']}); "
          f"fp32 ridge point {p.fp32_gflops / p.bandwidth_gbs:.1f} FLOP/B")


def profile(args: argparse.Namespace) -> dict:
    """Run the profile (see the module docstring); prints the tables and returns the results."""
    import engine
    from export.backends.graph import RUNTIMES, ReferenceLoader, cached_graphs
    from reference.plumbing.files import cache_dir
    from reference.plumbing.platform import cpu_summary
    from reference.psp import face_pool

    torch.set_grad_enabled(False)
    names, notes = variants_to_run(args.backends.split(",") if args.backends else None, args.precisions.split(","))
    print(f"CPU: {cpu_summary()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; variants: {', '.join(names) or '-'}")
    for n in notes:
        print(f"  note: {n}")
    peaks = measure_peaks(args.peak_size)
    print_peaks(peaks)
    from benchmarks.cpu_engines import checkpoint_for

    ckpt = Path(args.checkpoint) if args.checkpoint else checkpoint_for(args.size)
    results: dict = {"cpu": cpu_summary(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "checkpoint": str(ckpt), "batch": args.batch, "repeats": args.repeats, "notes": notes,
                     "peaks": {"fp32_gflops": peaks.fp32_gflops, "bf16_gflops": peaks.bf16_gflops,
                               "int8_gops": peaks.int8_gops, "bandwidth_gbs": peaks.bandwidth_gbs,
                               "notes": peaks.notes},
                     "variants": {}}
    engine_counts: dict[str, tuple[float, float]] | None = None
    profiles: dict[str, dict] = {}
    order: list[str] = []
    description = None
    # torch rows first: the engine's fp32 counts give the graph rows their FLOPs and bytes
    ordered = sorted(names, key=lambda v: (v.split(":")[0] not in TORCH_ROWS, v != "engine:fp32"))
    if any(v.split(":")[0] in GRAPH_ROWS for v in names) and "engine:fp32" not in names:
        ordered.insert(0, "engine:fp32 (counts only)")
    x = w_engine = None
    for v in ordered:
        backend, precision = v.split(" ")[0].split(":")
        t0 = time.perf_counter()
        if backend in TORCH_ROWS:
            eng = engine.load(ckpt, backend=backend, precision=precision)
            description = eng.model.description
            order = group_order(description.output_size)
            x = encoder_input(description, args.batch) if x is None else x
            print(f"[{v}] loaded in {time.perf_counter() - t0:.1f} s; profiling batch {args.batch} ...", flush=True)
            prof = profile_torch(eng.model, x, args.repeats)
            del eng
            items = torch_items(prof["records"], args.batch)
            if backend == "engine" and precision == "fp32":
                w_engine = prof["w_plus"]
                engine_counts = {}
                for g, _, f, b, _ in items:
                    c = engine_counts.get(g, (0.0, 0.0))
                    engine_counts[g] = (c[0] + f, c[1] + b)
            if "counts only" in v:
                continue
            profiles[v] = {"items": items, "wall_s": prof["wall_s"]}
        else:
            paths = cached_graphs(ckpt, ReferenceLoader(ckpt), cache_dir() / "onnx", announce=print)
            _, enc_chunk, gen_chunk = RUNTIMES[backend]
            xa, wa = x.numpy(), w_engine.numpy()  # the generator runs on the engine's W+ of the same x
            enc_index, gen_index = GraphIndex.load(paths["encoder"], "encode"), GraphIndex.load(paths["generator"], "synthesize")
            print(f"[{v}] profiling batch {args.batch} (chunks: encoder {enc_chunk}, generator {gen_chunk}) ...", flush=True)
            if backend == "openvino":
                enc = profile_openvino(paths["encoder"], "x", xa, enc_chunk, precision, args.repeats, enc_index)
                gen = profile_openvino(paths["generator"], "w_plus", wa, gen_chunk, precision, args.repeats, gen_index)
            else:
                enc = profile_onnxruntime(paths["encoder"], "x", "w_plus", xa, enc_chunk, args.repeats, enc_index)
                gen = profile_onnxruntime(paths["generator"], "w_plus", "img", wa, gen_chunk, args.repeats, gen_index)
            img = torch.zeros(args.batch, 3, description.output_size, description.output_size)
            with torch.inference_mode(), OpProfiler(torch.nn.Module()) as rp, rp.stage("resize"):
                face_pool(img)
            resize_wall = time_stage(lambda: face_pool(img), args.repeats)
            items = enc["items"] + gen["items"] + torch_items(rp.records, args.batch)
            counts = {g: c for g, c in (engine_counts or {}).items() if g != "resize 256"}
            items = with_engine_counts(items, counts, precision)
            profiles[v] = {"items": items, "wall_s": {"encode": enc["wall_s"], "synthesize": gen["wall_s"] + resize_wall},
                           "fused": {**enc["fused"], **gen["fused"]}}
    end = measure_peaks(args.peak_size)
    print(f"peaks measured again at the end: fp32 {end.fp32_gflops:.0f} GFLOP/s, memory {end.bandwidth_gbs:.1f} GB/s; "
          "the tables use the better of the two")
    peaks = peaks.best(end)
    results["peaks"] = {"fp32_gflops": peaks.fp32_gflops, "bf16_gflops": peaks.bf16_gflops, "int8_gops": peaks.int8_gops,
                        "bandwidth_gbs": peaks.bandwidth_gbs, "notes": peaks.notes}
    print_peaks(peaks)
    for v, p in profiles.items():
        precision = v.split(":")[1]
        rows = group_rows(p["items"], order)
        stage_ms = {k: s * 1e3 / args.batch for k, s in p["wall_s"].items()}
        profiled = {st: sum(r.ms for r in rows if (r.group.startswith("enc")) == (st == "encode")) for st in stage_ms}
        peak = peaks.compute(precision)
        print(f"\n### {v}, {description.output_size} px, batch {args.batch}: encode {stage_ms['encode']:.1f} ms/img "
              f"(profiled ops {profiled['encode']:.1f}), synthesize + resize {stage_ms['synthesize']:.1f} ms/img "
              f"(profiled ops {profiled['synthesize']:.1f}); roofs {peak or 0:.0f} GFLOP/s, {peaks.bandwidth_gbs:.1f} GB/s\n")
        print(markdown_table(rows, peak, peaks.bandwidth_gbs, stage_ms))
        results["variants"][v] = {"stage_ms_per_image": stage_ms, "profiled_ms_per_image": profiled,
                                  "groups": rows_json(rows, peak, peaks.bandwidth_gbs),
                                  "fused": p.get("fused", {})}
    results["output_size"] = description.output_size if description else None
    results["groups"] = order
    return results


# ------------------------------------------------------------------------------------------------
# --tune: OpenVINO settings side by side


TUNE_CONFIGS: dict[str, tuple[str, dict, int | None, bool]] = {
    # key: (what, compile properties over the backend's, chunk (None: the backend's), static batch shape)
    "backend": ("the backend's settings (LATENCY hint, physical_cores() threads)", {}, None, False),
    "static": ("static batch shape (model.reshape to the chunk)", {}, None, True),
    "throughput": ("THROUGHPUT hint, chunks of 1 on an async queue", {"PERFORMANCE_HINT": "THROUGHPUT"}, 1, False),
    "streams2": ("2 streams, chunks of 1 on an async queue", {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2}, 1,
                 False),
    "threads1": ("1 thread", {"INFERENCE_NUM_THREADS": 1}, None, False),
    "chunk1": ("chunk 1", {}, 1, False),
    "chunk2": ("chunk 2", {}, 2, False),
    "chunk4": ("chunk 4", {}, 4, False),
    "denormals": ("CPU_DENORMALS_OPTIMIZATION on", {"CPU_DENORMALS_OPTIMIZATION": True}, None, False),
    "static-chunk1": ("static batch shape, chunk 1", {}, 1, True),
}


def tune(args: argparse.Namespace) -> dict:
    """Each `TUNE_CONFIGS` entry compiled on the cached graphs and timed on the same batch, the
    entries of a part interleaved round by round (so load from elsewhere falls on all of them);
    ratios against the backend's own settings. Prints a table per part."""
    import openvino as ov

    from benchmarks.cpu_engines import checkpoint_for
    from export.backends.graph import RUNTIMES, ReferenceLoader, cached_graphs, physical_cores
    from reference.plumbing.files import cache_dir
    from reference.plumbing.platform import cpu_summary

    ckpt = Path(args.checkpoint) if args.checkpoint else checkpoint_for(args.size)
    paths = cached_graphs(ckpt, ReferenceLoader(ckpt), cache_dir() / "onnx", announce=print)
    precision = args.precisions.split(",")[0]
    print(f"CPU: {cpu_summary()}")
    print(f"OpenVINO {ov.__version__}; {ckpt.name}, batch {args.batch}, {precision}, medians of {args.repeats} rounds")
    _, enc_chunk, gen_chunk = RUNTIMES["openvino"]
    rng = np.random.default_rng(0)
    core = ov.Core()
    x = (rng.random((args.batch, 3, 256, 256), dtype=np.float32) * 2 - 1)
    w_plus = core.compile_model(str(paths["encoder"]), "CPU").create_infer_request().infer({"x": x[:1]})["w_plus"]
    w = np.repeat(w_plus, args.batch, axis=0) + 0.05 * rng.standard_normal((args.batch, *w_plus.shape[1:]), dtype=np.float32)
    results = {"cpu": cpu_summary(), "batch": args.batch, "precision": precision, "parts": {}}
    wanted = args.tune_configs.split(",") if args.tune_configs else list(TUNE_CONFIGS)
    for part, a, name, chunk0 in (("encoder", x, "x", enc_chunk), ("generator", w, "w_plus", gen_chunk)):
        runners = {}
        for cname in wanted:
            _, props, chunk, static = TUNE_CONFIGS[cname]
            chunk = chunk or chunk0
            model = core.read_model(str(paths[part]))
            if static:
                model.reshape({name: [chunk, *a.shape[1:]]})
            compiled = core.compile_model(model, "CPU", {
                "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": physical_cores(),
                "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", **props})
            chunks = [np.ascontiguousarray(a[i : i + chunk]) for i in range(0, len(a), chunk)]
            if props.get("PERFORMANCE_HINT") == "THROUGHPUT":
                queue = ov.AsyncInferQueue(compiled, max(1, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

                def run(queue=queue, chunks=chunks):
                    for c in chunks:
                        queue.start_async({name: c})
                    queue.wait_all()
            else:
                request = compiled.create_infer_request()

                def run(request=request, chunks=chunks):
                    for c in chunks:
                        request.infer({name: c})
            run()
            runners[cname] = run
        times: dict[str, list[float]] = {c: [] for c in runners}
        for _ in range(args.repeats):
            for cname, run in runners.items():
                t0 = time.perf_counter()
                run()
                times[cname].append(time.perf_counter() - t0)
        base = statistics.median(times[wanted[0]])
        print(f"\n{part}: ms per image, and speed against `{wanted[0]}`\n")
        print("| setting | ms/img | speed-up |\n|---|---|---|")
        results["parts"][part] = {}
        for cname, ts in times.items():
            med = statistics.median(ts)
            results["parts"][part][cname] = {"ms_per_image": med * 1e3 / args.batch, "speedup": base / med}
            print(f"| {cname}: {TUNE_CONFIGS[cname][0]} | {med * 1e3 / args.batch:.1f} | {base / med:.2f}x |")
        del runners
    return results


def build_parser() -> ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(prog="python -m benchmarks.profile_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, choices=(256, 1024), default=256,
                   help="output size: the rule checkpoint of benchmarks.cpu_engines (1024: the demo checkpoint)")
    p.add_argument("--checkpoint", help="a pSp checkpoint instead of the rule checkpoint of --size")
    p.add_argument("--batch", type=int_at_least(1), default=1, help="images per call (default 1)")
    p.add_argument("--backends", help="backends to profile (default: every installed CPU backend)")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="precisions (default fp32,bf16; bf16 only where the CPU has bf16 units)")
    p.add_argument("--repeats", type=int_at_least(1), default=2, help="timed rounds, medians (a warm-up apart)")
    p.add_argument("--peak-size", type=int_at_least(64), default=2048, help="matrix size of the matmul peaks")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--tune", action="store_true", help="compare OpenVINO settings side by side instead")
    p.add_argument("--tune-configs", help=f"with --tune, comma-separated keys of: {', '.join(TUNE_CONFIGS)} (the first is the base; default all)")
    return p


def _body(args: argparse.Namespace) -> int:
    results = tune(args) if args.tune else profile(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.profile_cpu`: the roofline profile (or `--tune`). Exit 0 ok, 2 bad arguments."""
    return run_cli(build_parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
