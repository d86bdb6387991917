"""Which layers should stay fp32 in bf16/fp16: the error of each choice, measured side by side.

Run (from the repository root): `python -m benchmarks.precision_choices [--size 1024] [--precision bf16] [--batch 2] [--json out.json]`

Every choice is the engine formulation with its precision emulated (`export.backends.engine_model.emulate_rounding`:
weights and layer activations rounded, fp32 arithmetic in between), on the same random inputs,
against the fp32 reference: relative error of w_plus and img, and the share of uint8 pixels more
than 2 levels off. Emulation measures error on any CPU; speed needs bf16 units, so on a CPU
without them (this is printed) the speed column is left to `benchmarks/cpu_engines.py` on one that has.
The style affines, demodulation, mapping and PixelNorm are fp32 in every choice (FORWARD_NOTES).
"""

from __future__ import annotations

import argparse
import sys

import torch

from reference.plumbing.cli import ArgumentParser, int_at_least, run_cli
from reference.plumbing.files import write_json

CHOICES = {
    "all layers": lambda name, mod, size: False,
    "512+ px layers fp32": lambda name, mod, size: _resolution(name, size) >= 512,
    "ToRGB fp32": lambda name, mod, size: name.startswith("synthesis.to_rgb"),
    "512+ px and ToRGB fp32": lambda name, mod, size: _resolution(name, size) >= 512 or name.startswith("synthesis.to_rgb"),
}


def _resolution(name: str, size: int) -> int:
    """Output resolution of a synthesis layer from its name (`synthesis.convs.<i>`, `synthesis.to_rgbs.<k>`)."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "synthesis" or not parts[2].isdigit():
        return 4 if name.startswith("synthesis.") and len(parts) >= 2 else 0
    i = int(parts[2])
    level = i // 2 if parts[1] == "convs" else i
    return min(8 * 2**level, size)


def build_parser() -> ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(prog="python -m benchmarks.precision_choices", description=__doc__.split("\n\n")[0],
                       epilog="Exit codes: 0 measured, 2 usage or checkpoint error (one line), 130 interrupted.")
    p.add_argument("--size", type=int, default=1024, choices=[256, 1024])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--batch", type=int_at_least(1), default=2)
    p.add_argument("--json")
    return p


def _body(args: argparse.Namespace) -> int:
    from benchmarks.cpu_engines import checkpoint_for, inputs
    from export.compare import compare, parity_tolerance
    from export.backends.engine_model import EnginePSP, emulate_rounding
    from reference import load_psp
    from reference.plumbing.platform import cpu_summary

    torch.set_grad_enabled(False)
    print(f"CPU: {cpu_summary()}")
    psp = load_psp(checkpoint_for(args.size))
    x = inputs(args.batch)
    ref_w = psp.encode(x)
    ref_img = psp.synthesize(ref_w)
    rows = []
    for choice, keep in CHOICES.items():
        model = emulate_rounding(EnginePSP(psp), args.precision, lambda n, m, k=keep: k(n, m, args.size))
        w = model.encode(x)
        img = model.synthesize(w)
        cw = compare(w, ref_w, parity_tolerance("w_plus", args.precision), output="w_plus")
        ci = compare(img, ref_img, parity_tolerance("img", args.precision), output="img")
        rows.append({"choice": choice, "w_plus_rel": cw.rel, "img_rel": ci.rel, "img_u8_over_2": ci.u8_share,
                     "within_contract": cw.passed and ci.passed})
        print(f"[{args.size}px {args.precision}] {choice:24s} w_plus rel {cw.rel:.2e}  img rel {ci.rel:.2e}  "
              f"u8 > 2 levels {ci.u8_share:.2%}{'' if cw.passed and ci.passed else '  OUTSIDE the parity contract'}",
              flush=True)
        del model
    if args.json:
        write_json(args.json, {"cpu": cpu_summary(), "rows": rows})
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit code 0 measured, 2 usage or checkpoint error, 130 interrupted."""
    return run_cli(build_parser(), _body, argv, interrupted="nothing was saved; rerun the same command")


if __name__ == "__main__":
    sys.exit(main())
