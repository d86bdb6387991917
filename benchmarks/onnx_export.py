"""ONNX export of a pSp part: the TorchScript exporter against the torch.export-based one, side by side.

Run (from the repository root): `python -m benchmarks.onnx_export [--checkpoint C] [--part encoder] [--rounds 1]`

What `export.onnx` used until 2026-12-01 (`torch.onnx.export(..., dynamo=False)`: one protobuf holding
every weight, serialized, then copied into Python bytes) against what it uses now (`dynamo=True`,
weights streamed to `<name>.onnx.data`). Peak memory is per process, so each variant runs in a child
process of its own (alternating, `--rounds` times each): the child loads the checkpoint, builds the
engine formulation (`EnginePSP`), exports one part, and reports its peak RSS (`ru_maxrss`), the RSS
just before the export, the export's wall time and the files' size. The table gives each variant's
figures and the ratio to the TorchScript exporter, with the CPU model and flags.

Default checkpoint: the embedded demo (1024 px `ffhq_encode`, 1.2 GB; built on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks._children import medians, print_header, run_child

VARIANTS = ("torchscript", "dynamo")


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(variant: str, checkpoint: str, part: str, out: Path) -> dict:
    """One export in this process; its figures."""
    import torch

    from export.backends.engine_model import EnginePSP
    from export.onnx import IO_NAMES, _Part, example_input, export_onnx
    from reference import load_psp

    model = EnginePSP(load_psp(checkpoint))
    before = _rss_gib()
    path = out / f"{variant}.{part}.onnx"
    t0 = time.perf_counter()
    if variant == "dynamo":
        export_onnx(model, path, part=part)
    else:  # the former export.onnx: TorchScript exporter, weights inside the protobuf
        inputs, outputs = IO_NAMES[part]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Part(model, part, False).eval(), (example_input(model, part),), str(path),
                              input_names=inputs, output_names=outputs,
                              dynamic_axes={n: {0: "batch"} for n in inputs + outputs}, opset_version=17,
                              do_constant_folding=True, dynamo=False)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in out.glob(f"{variant}.{part}.onnx*") if f.suffix != ".json")
    return {"variant": variant, "seconds": seconds, "rss_before_gib": before,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "mib": size / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="pSp checkpoint (default: the embedded demo, built on first use)")
    p.add_argument("--part", choices=("encoder", "generator", "psp"), default="encoder")
    p.add_argument("--rounds", type=int, default=1, help="exports per variant (alternating)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.checkpoint, args.part, Path(args.out))))
        return 0

    ckpt = args.checkpoint
    if ckpt is None:
        from engine.demo import demo_checkpoint_path

        ckpt = str(demo_checkpoint_path(print))
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnx_export_") as tmp:
        for _ in range(args.rounds):
            for variant in VARIANTS:
                row = run_child(["-m", "benchmarks.onnx_export", "--child", variant, "--checkpoint", ckpt, "--part", args.part, "--out", tmp])
                if row is None:
                    return 1
                rows.append(row)
                for f in Path(tmp).iterdir():
                    f.unlink()
    print_header(f"checkpoint: {ckpt}; part: {args.part}; rounds: {args.rounds}",
                 ["exporter", "export s", "RSS before export GiB", "peak RSS GiB", "peak − RSS before export GiB",
                  "files MiB", "peak vs torchscript"])
    base = {}
    for v in VARIANTS:
        med = medians(rows, v, ("seconds", "rss_before_gib", "peak_gib", "mib"))
        base = base or med
        print(f"| {v} | {med['seconds']:.1f} | {med['rss_before_gib']:.2f} | {med['peak_gib']:.2f} | "
              f"{med['peak_gib'] - med['rss_before_gib']:.2f} | {med['mib']:.0f} | {med['peak_gib'] / base['peak_gib']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
