"""One parity check for every backend: outputs against the fp32 reference and the official golden vectors.

Source: the comparison rule of this project (relative error `‖out − ref‖ / ‖ref‖`, NaN never
passes) and `shared/golden/README.md` (fp32 paths match the official outputs at `atol=1e-4`;
fp16 paths within a relative 1e-2).

`python -m export.parity --checkpoint CKPT --backends reference,engine,onnxruntime,openvino [--golden FILE.npz] [--json out.json]`
runs each backend through `engine.load(...).invert` on the same inputs, compares `w_plus` and
`img` with the reference backend (and with the golden arrays when `--golden` is given: then the
checkpoint must be the golden one, `make_checkpoint("ffhq_encode_256", 0)`), prints a table and
saves the report as JSON. Exit code 1 when any comparison fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

# Per backend precision: what a comparison of its outputs must meet.
TOLERANCES = {
    "fp32": {"rel": 1e-5, "atol": 1e-4},
    "fp16": {"rel": 1e-2},
}
BACKEND_PRECISION = {"reference": "fp32", "engine": "fp32", "onnxruntime": "fp32", "openvino": "fp32",
                     "triton": "fp16", "tensorrt": "fp16"}


@dataclass
class Comparison:
    """One output of one backend against one reference."""

    backend: str
    output: str
    against: str
    max_abs: float
    rel: float
    finite: bool
    tolerance: dict
    passed: bool


def compare(backend: str, output: str, against: str, out, ref, tolerance: dict) -> Comparison:
    """Compare arrays (torch or numpy): max |out − ref|, ‖out − ref‖/‖ref‖ in float64, NaN/Inf check.

    Args:
        tolerance: `{"rel": r}` and/or `{"atol": a}`; every bound given must hold.

    Raises:
        ValueError: the shapes differ.
    """
    o = np.asarray(out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else out, dtype=np.float64)
    r = np.asarray(ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else ref, dtype=np.float64)
    if o.shape != r.shape:
        raise ValueError(f"{backend}/{output}: shape {o.shape} != reference {r.shape}")
    finite = bool(np.isfinite(o).all())
    diff = np.abs(o - r)
    max_abs = float(diff.max()) if finite else float("inf")
    rel = float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-300)) if finite else float("inf")
    ok = finite and rel <= tolerance.get("rel", float("inf")) and max_abs <= tolerance.get("atol", float("inf"))
    return Comparison(backend, output, against, max_abs, rel, finite, dict(tolerance), ok)


def golden_inputs(golden: dict) -> torch.Tensor:
    """The golden encoder input: `(u8/255 − 0.5)/0.5`, NCHW float32."""
    u8 = torch.from_numpy(np.asarray(golden["inputs_rgb256_uint8"])).permute(0, 3, 1, 2).float()
    return (u8 / 255 - 0.5) / 0.5


def run_parity(checkpoint: str | Path, backends: list[str], golden: dict | None = None, batch: int = 2,
               seed: int = 0) -> list[Comparison]:
    """Run every backend on the same inputs and compare with the reference (and the golden arrays).

    Args:
        checkpoint: a pSp checkpoint.
        backends: `engine.BACKENDS` names; "reference" is always run first as the baseline.
        golden: arrays of `public_ffhq_encode_256_seed0.npz` (then the inputs are its faces, and
            `latents` / `images_resize_false` are compared too), or None for random inputs in [-1, 1].
        batch, seed: the random inputs' batch size and seed (without golden).

    Returns:
        One `Comparison` per backend and output (and per golden array).
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
        tol = TOLERANCES[BACKEND_PRECISION.get(name, "fp16")]
        results.append(compare(name, "w_plus", "reference", w_plus, ref_w, tol))
        results.append(compare(name, "img", "reference", img, ref_img, tol))
        if golden is not None:
            results.append(compare(name, "w_plus", "golden", w_plus, golden["latents"], tol))
            results.append(compare(name, "img", "golden", img, golden["images_resize_false"], tol))
        del eng
    return results


def format_table(results: list[Comparison]) -> str:
    lines = [f"{'backend':12s} {'output':7s} {'against':9s} {'max |diff|':>11s} {'rel error':>10s}  result"]
    for c in results:
        verdict = "ok" if c.passed else ("NaN/Inf" if not c.finite else f"FAIL {c.tolerance}")
        lines.append(f"{c.backend:12s} {c.output:7s} {c.against:9s} {c.max_abs:11.3e} {c.rel:10.3e}  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m export.parity`: exit 0 all pass, 1 any fails, 2 bad arguments or checkpoint."""
    from reference.errors import PSPError

    p = argparse.ArgumentParser(prog="python -m export.parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--backends", default="reference,engine,onnxruntime,openvino")
    p.add_argument("--golden", help="public_ffhq_encode_256_seed0.npz (with its checkpoint)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    golden = dict(np.load(args.golden)) if args.golden else None
    try:
        results = run_parity(args.checkpoint, args.backends.split(","), golden, args.batch)
    except PSPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(c) for c in results], indent=1))
    return 0 if all(c.passed for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
