"""CPU engines side by side: the official formulation (`reference`) against each backend x precision.

Run (from the repository root): `python -m benchmarks.cpu_engines [--sizes 256,1024] [--batches 1,4,8] [--repeats 2] [--precisions fp32,bf16] [--json out.json]`

Variants are `backend:precision` for every CPU row of the backend registry (`export.backends`) in
the asked precisions; bf16 variants run only where the CPU has bf16 units (AMX-BF16 or
AVX512-BF16, read from its flags): without them torch and OpenVINO emulate bf16 through fp32, which
is far slower than fp32 and says nothing about bf16 hardware. The CPU model and flags are printed
with every table.

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
import json
import resource
import statistics
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


def variants(precisions: list[str], backends: list[str] | None = None) -> tuple[list[str], list[str]]:
    """`backend:precision` variants of the registry's CPU rows whose package is installed (the
    reference first), and notes on what was left out and why."""
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
        for prec in precisions:
            if prec not in b.precisions["cpu"]:
                continue
            if prec == "bf16" and not bf16_units():
                notes.append(f"{b.name}:bf16 not run: this CPU has no bf16 units (emulated bf16 is slower than fp32)")
                continue
            out.append(f"{b.name}:{prec}")
    return out, notes


def load(variant: str, size: int):
    import engine

    backend, precision = variant.split(":")
    return engine.load(checkpoint_for(size), backend=backend, precision=precision)


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
    p.add_argument("--precisions", default="fp32,bf16", help="precisions to run (bf16 only where the CPU has bf16 units)")
    p.add_argument("--backends", default=None, help="backends to run (default: every installed CPU backend)")
    p.add_argument("--rss-batch", type=int, default=8, help="batch of the peak-RSS runs (0: skip)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--rss-only", action="store_true", help="only the peak-RSS runs")
    p.add_argument("--rss-child", nargs=3, metavar=("VARIANT", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]), int(args.rss_child[2]))
        return 0
    torch.set_grad_enabled(False)
    from reference.plumbing.platform import cpu_summary

    names, notes = variants(args.precisions.split(","), args.backends.split(",") if args.backends else None)
    results = [{"cpu": cpu_summary(), "torch": torch.__version__, "threads": torch.get_num_threads(), "notes": notes}]
    print(f"CPU: {cpu_summary()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; variants: {', '.join(names)}")
    for n in notes:
        print(f"  note: {n}")
    for size in [int(s) for s in args.sizes.split(",")]:
        engines = {}
        for v in names if not args.rss_only else ():
            t0 = time.perf_counter()
            engines[v] = load(v, size)
            print(f"[{size}px] loaded {v} in {time.perf_counter() - t0:.1f} s")
        flops = count_flops(engines["reference:fp32"]) if "reference:fp32" in engines else None
        for batch in [int(b) for b in args.batches.split(",")] if not args.rss_only else ():
            x = inputs(batch)
            w_ref = engines[names[0]].encode(x)
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
            for v in names:
                out = subprocess.run([sys.executable, "-m", "benchmarks.cpu_engines", "--rss-child", v, str(size),
                                      str(args.rss_batch)],
                                     capture_output=True, text=True, check=True)
                rss = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]
                print(f"[{size}px b{args.rss_batch}] {v:17s} peak RSS {rss:.0f} MiB")
                results.append({"size": size, "batch": args.rss_batch, "variant": v, "peak_rss_mib": rss})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
