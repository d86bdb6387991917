"""One parity check for every backend: outputs against the fp32 reference and the official golden vectors.

Source: the comparison rule of this project (relative error `‖out − ref‖ / ‖ref‖`, NaN never
passes) and `shared/golden/README.md` (fp32 paths match the official outputs at `atol=1e-4`), with
the bounds of the one table, `export.compare.TOL` (the precision parity contract of issue 9).

`python -m export.parity --checkpoint CKPT --backends reference,engine,onnxruntime,openvino [--golden FILE.npz] [--json out.json]`
runs each backend through `engine.load(...).invert` on the same inputs, compares `w_plus` and
`img` with the reference backend (and with the golden arrays when `--golden` is given: then the
checkpoint must be the golden one, `make_checkpoint("ffhq_encode_256", 0)`), prints a table and
saves the report as JSON. Exit code 1 when any comparison fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from reference.cli import ArgumentParser, int_at_least, run_cli
from reference.files import write_json

from .compare import Comparison, compare, parity_tolerance

# The precision each backend computes in today (the lead's backend registry will carry it).
BACKEND_PRECISION = {"reference": "fp32", "engine": "fp32", "onnxruntime": "fp32", "openvino": "fp32",
                     "triton": "fp16", "tensorrt": "fp16"}


def golden_inputs(golden: dict) -> torch.Tensor:
    """The golden encoder input: `(u8/255 − 0.5)/0.5`, NCHW float32."""
    u8 = torch.from_numpy(np.asarray(golden["inputs_rgb256_uint8"])).permute(0, 3, 1, 2).float()
    return (u8 / 255 - 0.5) / 0.5


def run_parity(checkpoint: str | Path, backends: list[str], golden: dict | None = None, batch: int = 2,
               seed: int = 0) -> list[Comparison]:
    """Run every backend on the same inputs and compare with the reference (and the golden arrays).

    Each comparison is `export.compare.compare` with the parity contract's bounds for the backend's
    precision (`parity_tolerance(output, BACKEND_PRECISION[name], against)`).

    Args:
        checkpoint: a pSp checkpoint.
        backends: `engine.BACKENDS` names; "reference" is always run first as the baseline.
        golden: arrays of `public_ffhq_encode_256_seed0.npz` (then the inputs are its faces, and
            `latents` / `images_resize_false` are compared too), or None for random inputs in [-1, 1].
        batch, seed: the random inputs' batch size and seed (without golden).

    Returns:
        One `Comparison` per backend and output (and per golden array); images carry `u8_share`.
    """
    import engine

    ref_engine = engine.load(checkpoint, backend="reference")
    if golden is not None:
        x = golden_inputs(golden)
    else:
        x = torch.rand(batch, ref_engine.input_nc, 256, 256, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    ref_img, ref_w = ref_engine.invert(x)
    del ref_engine
    results = []
    for name in backends:
        eng = engine.load(checkpoint, backend=name)
        img, w_plus = eng.invert(x)
        precision = BACKEND_PRECISION.get(name, "fp16")
        outs = {"w_plus": (w_plus, ref_w, "latents"), "img": (img, ref_img, "images_resize_false")}
        for output, (out, ref, golden_key) in outs.items():
            results.append(compare(out, ref, parity_tolerance(output, precision), output=output, backend=name))
        if golden is not None:
            for output, (out, _, golden_key) in outs.items():
                results.append(compare(out, golden[golden_key], parity_tolerance(output, precision, "golden"),
                                       output=output, backend=name, against="golden"))
        del eng
    return results


def format_table(results: list[Comparison]) -> str:
    """The report as a text table: one line per comparison, with the bounds of a failed one."""
    lines = [f"{'backend':12s} {'output':7s} {'against':9s} {'max |diff|':>11s} {'rel error':>10s} "
             f"{'u8 >2 lv':>9s}  result"]
    for c in results:
        verdict = "ok" if c.passed else (c.error or ("NaN/Inf" if not c.finite else f"FAIL {c.tolerance}"))
        share = "" if c.u8_share is None else f"{c.u8_share:.2%}"
        lines.append(f"{c.backend:12s} {c.output:7s} {c.against:9s} {c.max_abs:11.3e} {c.rel:10.3e} {share:>9s}  "
                     f"{verdict}")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(prog="python -m export.parity", description=__doc__.split("\n\n")[0],
                       epilog="Exit codes: 0 every comparison passes, 1 any fails, 2 bad arguments or checkpoint "
                              "(one line), 130 interrupted.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--backends", default="reference,engine,onnxruntime,openvino")
    p.add_argument("--golden", help="public_ffhq_encode_256_seed0.npz (with its checkpoint)")
    p.add_argument("--batch", type=int_at_least(1), default=2)
    p.add_argument("--json", help="write the report here")
    return p


def _body(args: argparse.Namespace) -> int:
    golden = dict(np.load(args.golden)) if args.golden else None
    results = run_parity(args.checkpoint, args.backends.split(","), golden, args.batch)
    print(format_table(results))
    if args.json:
        write_json(args.json, [c.as_dict() for c in results])
    return 0 if all(c.passed for c in results) else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m export.parity`: exit 0 all pass, 1 any fails, 2 bad arguments or checkpoint, 130 interrupted."""
    return run_cli(build_parser(), _body, argv, interrupted="nothing was written; rerun the same command")


if __name__ == "__main__":
    sys.exit(main())
