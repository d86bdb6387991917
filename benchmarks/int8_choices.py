"""Every int8 quantization choice side by side: its speed against fp32 (and bf16) and its error against the contract.

Run (from the repository root): `python -m benchmarks.int8_choices [--size 256|1024] [--recipes a,b]
[--repeats 3] [--batch 4] [--json out.json]`

For each recipe of `export.quantize.RECIPES` (what is quantized, what stays float), the graphs of
the rule checkpoint of `--size` (`benchmarks.cpu_engines.checkpoint_for`) are quantized with the
self-made calibration set (cached: a second run only measures), then run on the parity contract's
inputs (`export.parity.parity_inputs`: the 4 golden faces and the 12 real faces of `../shared`,
never used for calibration). Each recipe's w_plus and images are compared with the fp32 reference
backend (`export.compare.compare`, the bounds of `parity_tolerance(output, "int8")`), and its
encode and synthesize times (median of `--repeats` calls on `--batch` images after a warm-up) are
measured in this process beside openvino fp32 and, where the CPU has bf16 units, bf16; ratios are
against openvino fp32. The CPU model and flags are printed with the table. Calibration and
quantization time are reported per recipe as the log of the first run (`cached` afterwards).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.cpu_engines import time_stage


def shared_faces() -> Path:
    """`$PSP_SHARED` (default `<repo>/../shared`)."""
    import os

    return Path(os.environ.get("PSP_SHARED") or Path(__file__).resolve().parents[2] / "shared")


def measure(model, x: torch.Tensor, w_ref: torch.Tensor, repeats: int) -> dict[str, float]:
    """s per image of encode (on `x`) and synthesize (on `w_ref[:len(x)]`, full resolution)."""
    n = len(x)
    return {"encode": time_stage(lambda: model.encode(x), repeats) / n,
            "synthesize": time_stage(lambda: model.synthesize(w_ref[:n]), repeats) / n}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cpu_engines import checkpoint_for
    from export.backends import BASELINE, load_model, resolve
    from export.backends.graph import GraphPSP, ReferenceLoader, cached_graphs
    from export.compare import compare, parity_tolerance
    from export.parity import parity_inputs
    from export.quantize import RECIPES, Calibration, cached_int8_graphs
    from reference.plumbing.files import cache_dir
    from reference.plumbing.platform import bf16_units, cpu_summary

    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_choices", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, choices=[256, 1024])
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from: {', '.join(RECIPES)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="images per timed call")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    print(f"CPU: {cpu_summary()}")
    ckpt = checkpoint_for(args.size)
    cache = cache_dir()
    dev = torch.device("cpu")
    x = parity_inputs(shared_faces())
    ref = load_model(resolve(BASELINE, dev, "fp32"), ckpt, dev)
    with torch.inference_mode():
        w_ref = ref.encode(x)
        img_ref = ref.synthesize(w_ref)
    del ref
    graphs = cached_graphs(ckpt, ReferenceLoader(ckpt), cache / "onnx", print)
    rows = []
    floats = ["fp32"] + (["bf16"] if bf16_units() else [])
    timed = {}
    for prec in floats:
        model = GraphPSP(graphs["encoder"], graphs["generator"], "openvino", prec, cache)
        timed[prec] = measure(model, x[: args.batch], w_ref, args.repeats)
        with torch.inference_mode():
            w = model.encode(x)
            img = model.synthesize(w)
        rows.append({"variant": f"openvino:{prec}", "recipe": "", **timed[prec],
                     "w_plus_rel": compare(w, w_ref).rel, "img_rel": compare(img, img_ref).rel})
        del model
    for name in args.recipes.split(","):
        recipe = RECIPES[name]
        log = []
        t0 = time.perf_counter()
        parts = cached_int8_graphs(graphs, ckpt, Calibration(), recipe, announce=log.append)
        made = f"{time.perf_counter() - t0:.0f} s" if log else "cached"
        model = GraphPSP(parts["encoder"], parts["generator"], "openvino", "int8", cache)
        with torch.inference_mode():
            w = model.encode(x)
            img = model.synthesize(w)
        row = {"variant": "openvino:int8", "recipe": name, **measure(model, x[: args.batch], w_ref, args.repeats),
               "w_plus_rel": compare(w, w_ref, parity_tolerance("w_plus", "int8")).rel,
               "img_rel": compare(img, img_ref, parity_tolerance("img", "int8")).rel, "quantized": made}
        row["contract"] = bool(compare(w, w_ref, parity_tolerance("w_plus", "int8")).passed
                               and compare(img, img_ref, parity_tolerance("img", "int8")).passed)
        rows.append(row)
        del model
    base = timed["fp32"]
    print(f"\n{args.size} px output, rule checkpoint, {len(x)} contract inputs (4 golden + 12 real faces), "
          f"times: median of {args.repeats} calls of {args.batch} images; ratios against openvino fp32")
    print("| variant | recipe | encode s/img | synthesize s/img | encode x | synthesize x | total x | w_plus rel | img rel | contract |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tot = (base["encode"] + base["synthesize"]) / (r["encode"] + r["synthesize"])
        contract = "" if "contract" not in r else ("holds" if r["contract"] else "broken")
        print(f"| {r['variant']} | {r['recipe']} | {r['encode']:.4f} | {r['synthesize']:.4f} | "
              f"{base['encode'] / r['encode']:.2f} | {base['synthesize'] / r['synthesize']:.2f} | {tot:.2f} | "
              f"{r['w_plus_rel']:.2e} | {r['img_rel']:.2e} | {contract} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_summary(), "size": args.size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
