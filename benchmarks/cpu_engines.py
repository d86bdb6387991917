"""CPU engines side by side: the official formulation (`reference`) against each backend x precision.

Run (from the repository root): `python -m benchmarks.cpu_engines [--sizes 256,1024] [--batches 1,4,8] [--repeats 2] [--precisions fp32,bf16] [--json out.json]`

Variants are `backend:precision` for every CPU row of the backend registry (`export.backends`) in
the asked precisions (default: every precision the row offers on a CPU); bf16 variants run only
where the CPU has bf16 units (AMX-BF16 or AVX512-BF16, read from its flags): without them torch and
OpenVINO emulate bf16 through fp32, which is far slower than fp32 and says nothing about bf16
hardware. A variant the registry refuses at load (e.g. a precision this CPU lacks) is skipped with
the reason. The CPU model and flags are printed with every table.

End to end (`--end-to-end [--images 8] [--batches 4] [--backends openvino]`): `engine.run`'s loop
(`engine.batch.run_jobs` with `--save-latents`: read, invert, write PNG + latents, manifest) over a
folder of `--images` real faces (`$PSP_SHARED/data/faces/aligned`, repeated) against
`Engine.invert` alone on the same images (read beforehand, outside the clock), the same engine
loaded once, in turn, median of `--repeats`: img/s and the ratio run / invert (issue 20's goal
>= 0.9). The run is timed three ways: pipelined (the default `RunOptions.queue_depth`), with
`queue_depth=0` (the stages one after another), and as before issue 20 (`queue_depth=0` and PNG at
Pillow's default level 6, `reference.images.PNG_COMPRESS_LEVEL` patched for that run only).

OpenVINO streams (`--ov-streams [--sizes 256,1024] [--batches 4] [--precisions fp32]`): each openvino
variant loaded once and run three ways, interleaved per repeat: `latency` (every call on one request
of all threads, dynamic batch: as before issue 20's part 2), `streams` (calls of >= 2 images one
image per request on one stream per core, `export.backends.graph.openvino_streams`) and `static`
(the latency path with the generator compiled for a static batch of its chunk); s/image per stage
and ratios against `latency`, then peak RSS of a child per mode at `--rss-batch`.

PNG levels (`--png-levels`): Pillow's PNG encoder (`reference.images.save_image`'s) at
compress_level 0..9 and with optimize on, on the faces resized to 1024x1024: median ms per image
and mean file size, against the default level 6 and the level the project writes
(`reference.images.PNG_COMPRESS_LEVEL`).

All variants are loaded in one process and timed in turn on the same inputs (warm-up call apart,
median of `--repeats` calls), per stage (encode; synthesize with resize, as the official CLI's
`--resize_outputs`), then ratios against `reference` are printed. Peak RSS is measured per variant
in a fresh child process (one load + one batch; `ru_maxrss`), since RSS cannot be separated inside
one process. Achieved GFLOP/s use FLOPs counted on the reference with
`torch.utils.flop_counter.FlopCounterMode` (convolutions and matrix products, multiply-add = 2).
Weights: the weight-rule checkpoints (`ffhq_encode_256`, `ffhq_encode` at 1024, seed 0).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import tempfile
import subprocess
import sys
import time
from pathlib import Path

import torch

from reference.description import ENCODER_SIZE


CONFIG = {256: "ffhq_encode_256", 1024: "ffhq_encode"}


def checkpoint_for(size: int) -> Path:
    """The rule checkpoint of `size`, cached as a file (ONNX export caches key on the file)."""
    from engine.demo import demo_checkpoint_path
    from reference.plumbing.files import cache_dir
    from reference import make_checkpoint, save_checkpoint

    if size == 1024:
        return demo_checkpoint_path()
    path = cache_dir() / f"bench_{CONFIG[size]}_seed0.pt"
    if not path.is_file():
        save_checkpoint(make_checkpoint(CONFIG[size], 0), path)
    return path


def variants(precisions: list[str] | None, backends: list[str] | None = None) -> tuple[list[str], list[str]]:
    """`backend:precision` variants of the registry's CPU rows whose package is installed (the
    reference first), in `precisions` (None: each row's CPU precisions), and notes on what was
    left out and why."""
    from export.backends import BACKENDS
    from reference.plumbing.platform import bf16_units

    out, notes = [], []
    for b in BACKENDS.values():
        if backends is not None and b.name not in backends:
            continue
        if "cpu" not in b.precisions or "cpu" in b.emulated_on:
            continue  # GPU backends, and those a CPU runs only emulated (triton: in the interpreter)
        if not b.installed():
            notes.append(f"{b.name}: not installed ({b.package})")
            continue
        for prec in precisions if precisions is not None else b.precisions["cpu"]:
            if prec not in b.precisions["cpu"]:
                continue
            if prec == "bf16" and not bf16_units():
                notes.append(f"{b.name}:bf16 not run: this CPU has no bf16 units (emulated bf16 is slower than fp32)")
                continue
            out.append(f"{b.name}:{prec}")
    return out, notes


def load(variant: str, size: int):
    """`engine.load` of `backend:precision` on the rule checkpoint of `size`; `openvino:P:latency`
    routes every call of that engine to OpenVINO's latency path (as before its streams, `--ov-streams`)."""
    import engine

    backend, precision, *mode = variant.split(":")
    if mode:  # an --ov-streams mode: "latency", "streams" or "static"
        import export.backends.graph as xg

        xg.OPENVINO_STATIC_GENERATOR = mode == ["static"]
    eng = engine.load(checkpoint_for(size), backend=backend, precision=precision)
    if mode:
        n = 1 if mode != ["streams"] else ov_streams()
        set_openvino_streams(eng, {"encoder": n, "generator": n})
    return eng


def ov_streams() -> int:
    """The streams `--ov-streams` measures: `export.backends.graph.openvino_streams` of this machine's cores
    (at least 2)."""
    from export.backends.graph import openvino_streams, physical_cores

    return max(2, openvino_streams(physical_cores()))


def set_openvino_streams(eng, streams: dict[str, int]) -> None:
    """Set the streams of an openvino engine's runners (`export.backends.graph.OpenVINORunner.streams`),
    by part ("encoder", "generator"): 1 runs every call of that part on the latency path."""
    for part, n in streams.items():
        getattr(eng.model, part).streams = n


def inputs(batch: int) -> torch.Tensor:
    """RGB encoder inputs `[batch, 3, 256, 256]` float32 in [-1, 1], seeded by the batch size."""
    s = ENCODER_SIZE
    return torch.rand(batch, 3, s, s, generator=torch.Generator().manual_seed(batch)) * 2 - 1


def count_flops(eng, batch: int = 1) -> dict[str, float]:
    """FLOPs per image of encode and synthesize on the reference model."""
    from torch.utils.flop_counter import FlopCounterMode

    x = inputs(batch)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            w = eng.encode(x)
        enc = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            eng.synthesize(w, resize=True)
        syn = fc.get_total_flops()
    return {"encode": enc / batch, "synthesize": syn / batch}


def time_stage(fn, repeats: int) -> float:
    fn()  # warm-up, not counted
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def rss_child(variant: str, size: int, batch: int) -> None:
    """Child process: load one variant, run one batch end to end, print peak RSS in MiB."""
    eng = load(variant, size)
    eng.invert(inputs(batch), resize=True)
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not `ru_maxrss`: Linux keeps that across `exec`,
    so a child would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - not Linux


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256,1024")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--precisions", default=None,
                   help="precisions to run, e.g. fp32,bf16 (default: every CPU precision of each registry row; bf16 "
                        "only where the CPU has bf16 units)")
    p.add_argument("--backends", default=None, help="backends to run (default: every installed CPU backend)")
    p.add_argument("--rss-batch", type=int, default=8, help="batch of the peak-RSS runs (0: skip)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--rss-only", action="store_true", help="only the peak-RSS runs")
    p.add_argument("--end-to-end", action="store_true",
                   help="only the end-to-end rows: engine.run's loop over a folder vs Engine.invert alone")
    p.add_argument("--images", type=int, default=8, help="end to end: images in the folder (default 8)")
    p.add_argument("--faces", type=Path, default=None,
                   help="end to end and PNG levels: folder of face images (default $PSP_SHARED/data/faces/aligned)")
    p.add_argument("--png-levels", action="store_true", help="only the PNG compression-level table")
    p.add_argument("--ov-streams", action="store_true",
                   help="only OpenVINO's latency path (one request, all threads) against its streams (one image "
                        "per request, streams at once) on the same loaded engine, and peak RSS of each")
    p.add_argument("--rss-child", nargs=3, metavar=("VARIANT", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]), int(args.rss_child[2]))
        return 0
    torch.set_grad_enabled(False)
    from reference.plumbing.platform import cpu_summary

    names, notes = variants(args.precisions.split(",") if args.precisions else None,
                            args.backends.split(",") if args.backends else None)
    results = [{"cpu": cpu_summary(), "torch": torch.__version__, "threads": torch.get_num_threads(), "notes": notes}]
    print(f"CPU: {cpu_summary()}")
    if args.png_levels:
        results += png_levels(faces_dir(args.faces), args.repeats)
    elif args.ov_streams:
        results += streams_rows(args, [n for n in names if n.startswith("openvino:")])
    elif args.end_to_end:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; variants: {', '.join(names)}")
        for n in notes:
            print(f"  note: {n}")
        results += end_to_end_rows(names, [int(s) for s in args.sizes.split(",")],
                                   [int(b) for b in args.batches.split(",")], args.images, args.repeats,
                                   faces_dir(args.faces))
    else:
        results += engine_rows(args, names, notes)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def engine_rows(args: argparse.Namespace, names: list[str], notes: list[str]) -> list[dict]:
    """The model stages per variant, size and batch, and peak RSS per variant (the tables above)."""
    from reference.plumbing.errors import PSPError

    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; variants: {', '.join(names)}")
    for n in notes:
        print(f"  note: {n}")
    for size in [int(s) for s in args.sizes.split(",")]:
        engines, refused = {}, set()
        for v in names if not args.rss_only else ():
            t0 = time.perf_counter()
            try:
                engines[v] = load(v, size)
            except PSPError as e:  # e.g. a precision this CPU lacks
                print(f"[{size}px] {v}: skipped: {' '.join(str(e).split())}")
                refused.add(v)
                continue
            print(f"[{size}px] loaded {v} in {time.perf_counter() - t0:.1f} s")
        flops = count_flops(engines["reference:fp32"]) if "reference:fp32" in engines else None
        for batch in [int(b) for b in args.batches.split(",")] if not args.rss_only else ():
            x = inputs(batch)
            w_ref = next(iter(engines.values())).encode(x)
            row = {"size": size, "batch": batch, "variants": {}}
            for v, eng in engines.items():
                with torch.inference_mode():
                    t_enc = time_stage(lambda: eng.encode(x), args.repeats)
                    t_syn = time_stage(lambda: eng.synthesize(w_ref, resize=True), args.repeats)
                r = {"encode_s": t_enc, "synthesize_s": t_syn, "s_per_image": (t_enc + t_syn) / batch}
                if flops:
                    r["encode_gflops"] = flops["encode"] * batch / t_enc / 1e9
                    r["synthesize_gflops"] = flops["synthesize"] * batch / t_syn / 1e9
                row["variants"][v] = r
            base = row["variants"].get("reference:fp32")
            for v, r in row["variants"].items():
                ratio = base["s_per_image"] / r["s_per_image"] if base else float("nan")
                r["speedup_vs_reference"] = ratio
                gf = (f", {r['encode_gflops']:.0f}/{r['synthesize_gflops']:.0f} GFLOP/s enc/syn"
                      if "encode_gflops" in r else "")
                print(f"[{size}px b{batch}] {v:17s} encode {r['encode_s']:.3f} s, synthesize {r['synthesize_s']:.3f} s, "
                      f"{r['s_per_image']:.3f} s/image, {ratio:.2f}x reference{gf}")
            results.append(row)
        if flops:
            print(f"[{size}px] FLOPs per image: encode {flops['encode'] / 1e9:.1f} G, synthesize {flops['synthesize'] / 1e9:.1f} G")
            results.append({"size": size, "flops_per_image": flops})
        del engines
        if args.rss_batch:
            for v in [v for v in names if v not in refused]:
                results += rss_rows(v, size, args.rss_batch)
    return results


def rss_rows(variant: str, size: int, batch: int) -> list[dict]:
    """Peak RSS of `variant` (`backend:precision[:mode]`) in a fresh child (`--rss-child`), printed, as
    a one-row list; [] with the reason printed where the child failed (a variant refused at load)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.cpu_engines", "--rss-child", variant, str(size), str(batch)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        print(f"[{size}px] {variant}: peak RSS skipped: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        return []
    rss = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    print(f"[{size}px b{batch}] {variant:21s} peak RSS {rss:.0f} MiB")
    return [{"size": size, "batch": batch, "variant": variant, "peak_rss_mib": rss}]


def streams_rows(args: argparse.Namespace, names: list[str]) -> list[dict]:
    """`--ov-streams`: per size, openvino variant and batch, encode and synthesize (with resize) of the
    same loaded engine three ways: `latency` (as before issue 20's part 2: one request of all threads,
    dynamic batch), `streams` (`ov_streams()` streams, one image per request), `static` (the latency
    path with the generator compiled for a static batch of its chunk; its encoder is `latency`'s, a
    noise control), interleaved per repeat (a warm-up each apart, which also compiles the streams
    model), medians; then peak RSS of a fresh child per mode at `--rss-batch` (one load + one batch;
    only the compiled models of that mode)."""
    from export.backends.graph import openvino_runner
    from reference.plumbing.files import cache_dir

    rows = []
    n = ov_streams()
    for size in [int(s) for s in args.sizes.split(",")]:
        for v in names:
            t0 = time.perf_counter()
            eng = load(v + ":latency", size)
            dynamic = eng.model.generator
            static = openvino_runner(dynamic.path, "w_plus", "img", v.split(":")[1], cache_dir(), streams=1,
                                     static_batch=eng.model.max_generator_batch)
            print(f"[{size}px] loaded {v} in {time.perf_counter() - t0:.1f} s; {n} streams")
            modes = {"latency": (1, dynamic), "streams": (n, dynamic), "static": (1, static)}

            def use(mode: str) -> None:
                streams, generator = modes[mode]
                eng.model.generator = generator
                set_openvino_streams(eng, {"encoder": streams, "generator": streams})

            for batch in [int(b) for b in args.batches.split(",")]:
                x = inputs(batch)
                w = eng.encode(x)
                stages = {"encode": lambda: eng.encode(x), "synthesize": lambda: eng.synthesize(w, resize=True)}
                ts = {(m, st): [] for m in modes for st in stages}
                with torch.inference_mode():
                    for m in modes:  # warm-up (and the streams model's compile), not counted
                        use(m)
                        for fn in stages.values():
                            fn()
                    for _ in range(max(args.repeats, 1)):
                        for m in modes:
                            use(m)
                            for st, fn in stages.items():
                                t1 = time.perf_counter()
                                fn()
                                ts[(m, st)].append(time.perf_counter() - t1)
                use("latency")
                med = {k: statistics.median(t) / batch for k, t in ts.items()}
                rows.append({"size": size, "batch": batch, "variant": v, "streams": n,
                             "s_per_image": {f"{m}/{st}": s for (m, st), s in med.items()},
                             "seconds": {f"{m}/{st}": t for (m, st), t in ts.items()}})
                for st in [*stages, "both"]:
                    sec = {m: med[(m, st)] if st != "both" else sum(med[(m, s)] for s in stages) for m in modes}
                    print(f"[{size}px b{batch}] {v:13s} {st:10s} latency {sec['latency']:.3f} s/img; "
                          + ", ".join(f"{m} {sec[m]:.3f} s/img = {sec['latency'] / sec[m]:.2f}x" for m in modes
                                      if m != "latency"))
            eng = dynamic = static = None  # freed before the RSS children start
            modes.clear()
            if args.rss_batch:
                for m in ("latency", "streams", "static"):
                    rows += rss_rows(f"{v}:{m}", size, args.rss_batch)
    return rows


def faces_dir(given: Path | None) -> Path:
    """The folder of real faces: `given`, else `$PSP_SHARED/data/faces/aligned` (default `../shared`)."""
    if given is not None:
        return given
    shared = Path(os.environ.get("PSP_SHARED") or Path(__file__).resolve().parents[2] / "shared")
    return shared / "data" / "faces" / "aligned"


def face_arrays(faces: Path, size: int) -> list:
    """The faces of `faces` as `[size, size, 3]` uint8 arrays (Lanczos-resized where needed)."""
    import numpy as np
    from PIL import Image

    files = sorted(p for p in faces.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no faces in {faces}: pass --faces DIR or set PSP_SHARED")
    return [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.LANCZOS)) for f in files]


def png_levels(faces: Path, repeats: int) -> list[dict]:
    """Pillow's PNG encoder at each compress_level (and optimize) on the 1024 px faces, side by side:
    median ms per image, mean MiB, both against level 6 (Pillow's default)."""
    from PIL import Image

    from reference.images import PNG_COMPRESS_LEVEL

    arrays = face_arrays(faces, 1024)
    settings = [("default (6)", {}), *((f"level {n}", {"compress_level": n}) for n in range(10)),
                ("optimize", {"optimize": True})]
    times: dict[str, list[float]] = {name: [] for name, _ in settings}
    sizes: dict[str, list[int]] = {name: [] for name, _ in settings}
    for _ in range(max(repeats, 1)):  # settings interleaved per image, so drift hits all alike
        for a in arrays:
            im = Image.fromarray(a)
            for name, options in settings:
                buf = io.BytesIO()
                t0 = time.perf_counter()
                im.save(buf, format="PNG", **options)
                times[name].append(time.perf_counter() - t0)
                sizes[name].append(buf.tell())
    base_ms = statistics.median(times["default (6)"]) * 1e3
    base_mib = statistics.mean(sizes["default (6)"]) / 2**20
    print(f"PNG encode, Pillow, {len(arrays)} real faces at 1024x1024 x {max(repeats, 1)} "
          f"(project level: {PNG_COMPRESS_LEVEL}):")
    print(f"  {'setting':12s} {'ms/image':>9s} {'MiB/image':>10s} {'speed vs 6':>11s} {'size vs 6':>10s}")
    rows = []
    for name, _ in settings:
        ms, mib = statistics.median(times[name]) * 1e3, statistics.mean(sizes[name]) / 2**20
        print(f"  {name:12s} {ms:9.0f} {mib:10.2f} {base_ms / ms:10.2f}x {mib / base_mib - 1:+9.0%}")
        rows.append({"png": name, "ms_per_image": ms, "mib_per_image": mib})
    return rows


def end_to_end_rows(names: list[str], sizes: list[int], batches: list[int], n_images: int, repeats: int,
                    faces: Path) -> list[dict]:
    """For each size, variant and batch: engine.run's loop over a folder (pipelined, and with the
    stages one after another) against `Engine.invert` alone on the same images; img/s and ratios."""
    from reference.plumbing.errors import PSPError

    rows = []
    files = sorted(p for p in faces.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    with tempfile.TemporaryDirectory(prefix="psp_e2e_") as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i in range(n_images):  # distinct files: engine.run would write one output per name
            shutil.copyfile(files[i % len(files)], folder / f"face{i:03d}{files[i % len(files)].suffix.lower()}")
        for size in sizes:
            for v in names:
                t0 = time.perf_counter()
                try:
                    eng = load(v, size)
                except PSPError as e:
                    print(f"[{size}px] {v}: skipped: {' '.join(str(e).split())}")
                    rows.append({"size": size, "variant": v, "skipped": str(e)})
                    continue
                print(f"[{size}px] loaded {v} in {time.perf_counter() - t0:.1f} s")
                for batch in batches:
                    r = end_to_end(eng, folder, batch, repeats, Path(tmp))
                    rows.append({"size": size, "batch": batch, "variant": v, "images": n_images, **r})
                    tag = f"[{size}px b{batch}] {v:17s}"
                    print(f"{tag} Engine.invert alone          {r['invert_img_s']:.3f} img/s")
                    print(f"{tag} engine.run, pipelined        {r['run_img_s']:.3f} img/s = {r['run_vs_invert']:.2f}x invert")
                    print(f"{tag} engine.run, one stage a time {r['sequential_img_s']:.3f} img/s = "
                          f"{r['sequential_vs_invert']:.2f}x invert")
                    print(f"{tag} engine.run before (sequential, PNG level 6) {r['before_img_s']:.3f} img/s = "
                          f"{r['before_vs_invert']:.2f}x invert; now {r['run_img_s'] / r['before_img_s']:.2f}x before")
                    print(f"{tag} one-stage-a-time run's mean ms per image: "
                          + ", ".join(f"{k} {ms:.0f}" for k, ms in r["sequential_stage_ms"].items()))
                del eng
    return rows


def end_to_end(eng, folder: Path, batch: int, repeats: int, work: Path) -> dict:
    """One end-to-end row: the three timings on `folder`'s images with `eng` (see the module docstring).

    Returns:
        img/s of `Engine.invert` alone, of the pipelined run and of the sequential run (medians of
        `repeats`, interleaved), their ratios, and the sequential run's per-stage mean ms per image.
    """
    from engine.batch import RunOptions, run_jobs
    from engine.inputs import find_inputs, plan_jobs
    from engine.manifest import Manifest

    jobs = plan_jobs(find_inputs([str(folder)]))
    n = len(jobs)
    x = eng.read_inputs([j.source for j in jobs])  # [n, 3, 256, 256], outside the clock

    def invert() -> None:
        for s in range(0, n, batch):
            eng.invert(x[s:s + batch])

    stage_ms: dict[str, float] = {}

    def run(depth: int) -> None:
        out = work / f"out_q{depth}"
        shutil.rmtree(out, ignore_errors=True)
        opts = RunOptions(out_dir=out, batch_size=batch, save_latents=True, queue_depth=depth)
        with Manifest(out, opts.config(eng)) as m:
            summary = run_jobs(eng, jobs, opts, m)
        if summary.ok != n:
            raise RuntimeError(f"engine.run wrote {summary.ok} of {n} images: {summary.failures}")
        if depth == 0:
            stage_ms.update({k: v / n for k, v in summary.stage_ms.items()})

    from engine.batch import QUEUE_DEPTH
    import reference.images

    def before() -> None:
        """As engine.run was before issue 20: one stage at a time, PNG at Pillow's default level 6."""
        level = reference.images.PNG_COMPRESS_LEVEL
        reference.images.PNG_COMPRESS_LEVEL = 6
        try:
            run(0)
        finally:
            reference.images.PNG_COMPRESS_LEVEL = level

    modes = {"invert": invert, "run": lambda: run(QUEUE_DEPTH), "sequential": lambda: run(0), "before": before}
    with torch.inference_mode():
        eng.invert(x[:batch])  # warm-up, not counted
    ts: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(max(repeats, 1)):
        for k, fn in modes.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn()
            ts[k].append(time.perf_counter() - t0)
    ips = {k: n / statistics.median(t) for k, t in ts.items()}
    return {"invert_img_s": ips["invert"], "run_img_s": ips["run"], "sequential_img_s": ips["sequential"],
            "before_img_s": ips["before"], "run_vs_invert": ips["run"] / ips["invert"],
            "sequential_vs_invert": ips["sequential"] / ips["invert"], "before_vs_invert": ips["before"] / ips["invert"],
            "sequential_stage_ms": stage_ms, "seconds": ts}


if __name__ == "__main__":
    sys.exit(main())
