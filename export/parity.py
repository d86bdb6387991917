"""One parity check for every backend: outputs against the fp32 reference and the official golden vectors.

Source: the comparison rule of this project (relative error `‖out − ref‖ / ‖ref‖`, NaN never
passes) and `shared/golden/README.md` (fp32 paths match the official outputs at `atol=1e-4`), with
the bounds of the one table, `export.compare.TOL` (the precision parity contract of issue 9).

`python -m export.parity --checkpoint CKPT --backends reference,engine,onnxruntime,openvino
--precision fp32,bf16,int8 [--golden FILE.npz] [--faces DIR] [--calibration DIR] [--json out.json]` runs each backend x
precision of the registry (`export.backends`) on the same inputs, compares `w_plus` and `img` with
the fp32 reference backend (and with the golden arrays when `--golden` is given: then the
checkpoint must be the golden one, `make_checkpoint("ffhq_encode_256", 0)`), prints a table and
saves the report as JSON. Exit code 1 when any comparison fails.

int8 (openvino) is how a user checks the quantization on their own weights and faces before using
it: `python -m export.parity --backends openvino --precision int8 --checkpoint USER.pt --faces DIR`
(calibrated on the set the model makes itself, or on `--calibration DIR`, which must not hold any
of the faces it is checked on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from reference.plumbing.cli import ArgumentParser, int_at_least, run_cli
from reference.plumbing.errors import UsageError
from reference.plumbing.files import write_json

from .compare import Comparison, compare, parity_tolerance


def golden_inputs(golden: dict) -> torch.Tensor:
    """The golden encoder input: `(u8/255 − 0.5)/0.5`, NCHW float32."""
    u8 = torch.from_numpy(np.asarray(golden["inputs_rgb256_uint8"])).permute(0, 3, 1, 2).float()
    return (u8 / 255 - 0.5) / 0.5


def face_inputs(folder: str | Path) -> torch.Tensor:
    """Every image under `folder` (e.g. `shared/data/faces/aligned`, 12 real aligned faces) through
    the official RGB transform: `[N, 3, 256, 256]` float32 in [-1, 1].

    Raises:
        UsageError: no image in the folder. InputImageError: an unreadable image (named).
    """
    from reference.plumbing.files import scan_folder
    from reference.images import read_image, to_input_tensor

    files = scan_folder(folder)
    if not files:
        raise UsageError(f"--faces {folder}: no image found")
    return to_input_tensor([read_image(f) for f in files], label_nc=0, names=[str(f) for f in files])


def parity_inputs(shared: str | Path) -> torch.Tensor:
    """The parity contract's inputs: the 4 golden faces then the 12 real aligned faces of `shared`
    (`golden/public_ffhq_encode_256_seed0.npz`, `data/faces/aligned`): `[16, 3, 256, 256]` float32."""
    shared = Path(shared)
    golden = np.load(shared / "golden" / "public_ffhq_encode_256_seed0.npz")
    return torch.cat([golden_inputs(golden), face_inputs(shared / "data" / "faces" / "aligned")])


def run_parity(checkpoint: str | Path, backends: list[str], precisions: list[str] = ("fp32",),
               x: torch.Tensor | None = None, golden: dict | None = None, device: str = "cpu",
               allow_emulated: bool = False, say=print,
               calibration: str | Path | None = None) -> tuple[list[Comparison], list[str]]:
    """Run every backend x precision of the registry on the same inputs and compare with the fp32 reference.

    Each comparison is `export.compare.compare` with the parity contract's bounds for the
    precision (`parity_tolerance`): fp32 rel 1e-5 (and atol 1e-4 against the golden arrays), bf16 /
    fp16 rel 1e-2 on w_plus and 2e-2 on img; images also report the share of uint8 pixels more than
    2 levels off. NaN never passes.

    Args:
        checkpoint: a pSp checkpoint file.
        backends: `export.backends.BACKENDS` names.
        precisions: precisions to run each backend in; a precision a backend does not offer on the
            device is skipped with the reason.
        x: encoder inputs `[B, input_nc, 256, 256]` (default: the golden faces when `golden` is
            given, else 2 random inputs in [-1, 1]).
        golden: arrays of `public_ffhq_encode_256_seed0.npz`: `latents` / `images_resize_false` are
            compared too, on the first 4 inputs (which must then be the golden faces).
        device: "cpu" or "cuda".
        allow_emulated: run bf16 on a CPU without bf16 units (emulated by the runtime: slow).
        say: receives progress lines.
        calibration: int8: the folder of example inputs to calibrate on (None: the self-made set).

    Returns:
        `(comparisons, skipped)`: one `Comparison` per backend x precision x output (x golden),
        labelled `backend:precision`; and one line per combination not run, with the reason.
    """
    from reference.plumbing.files import cache_dir
    from reference.plumbing.platform import bf16_units

    from .backends import BASELINE, Choice, load_model, resolve

    dev = torch.device(device)
    path = Path(checkpoint)

    def load(choice: Choice):
        return load_model(choice, path, dev, False, cache_dir(), say,
                          calibration if choice.precision == "int8" else None)

    ref = load(resolve(BASELINE, dev, "fp32"))
    if x is None:
        d = ref.description
        x = golden_inputs(golden) if golden is not None else \
            torch.rand(2, d.input_nc, d.encoder_size, d.encoder_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        ref_w = ref.encode(x.to(dev))
        ref_img = ref.synthesize(ref_w)
    del ref
    results, skipped = [], []
    for name in backends:
        for precision in precisions:
            try:
                choice = resolve(name, dev, precision)
            except UsageError as e:
                skipped.append(f"{name}:{precision}: {e}")
                continue
            if dev.type == "cpu" and precision == "bf16" and not bf16_units() and not allow_emulated:
                skipped.append(f"{name}:{precision}: this CPU has no bf16 units (emulated bf16 runs 4-130x slower "
                               "than fp32); pass --allow-emulated to run it anyway")
                continue
            say(f"parity: {name} {precision}")
            try:
                model = load(choice)
            except UsageError as e:  # a precision this CPU cannot run (openvino bf16 / int8 capabilities)
                skipped.append(f"{name}:{precision}: {e}")
                continue
            with torch.inference_mode():
                w_plus = model.encode(x.to(dev))
                img = model.synthesize(w_plus)
            label = f"{name}:{precision}"
            outs = {"w_plus": (w_plus, ref_w, "latents"), "img": (img, ref_img, "images_resize_false")}
            for output, (out, r, _) in outs.items():
                results.append(compare(out, r, parity_tolerance(output, precision), output=output, backend=label))
            if golden is not None:
                for output, (out, _, key) in outs.items():
                    n = len(golden[key])
                    results.append(compare(out[:n], golden[key], parity_tolerance(output, precision, "golden"),
                                           output=output, backend=label, against="golden"))
            del model
    return results, skipped


def format_table(results: list[Comparison]) -> str:
    """The report as a text table: one line per comparison, with the bounds of a failed one."""
    lines = [f"{'backend':17s} {'output':7s} {'against':9s} {'max |diff|':>11s} {'rel error':>10s} "
             f"{'u8 >2 lv':>9s}  result"]
    for c in results:
        verdict = "ok" if c.passed else (c.error or ("NaN/Inf" if not c.finite else f"FAIL {c.tolerance}"))
        share = "" if c.u8_share is None else f"{c.u8_share:.2%}"
        lines.append(f"{c.backend:17s} {c.output:7s} {c.against:9s} {c.max_abs:11.3e} {c.rel:10.3e} {share:>9s}  "
                     f"{verdict}")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    """The CLI's argument parser."""
    from .backends import BACKENDS, PRECISIONS

    p = ArgumentParser(prog="python -m export.parity", description=__doc__.split("\n\n")[0],
                       epilog="Exit codes: 0 every comparison passes, 1 any fails, 2 bad arguments or checkpoint "
                              "(one line), 130 interrupted.")
    p.add_argument("--checkpoint", required=True, help="the pSp checkpoint (.pt)")
    p.add_argument("--backends", default="reference,engine,onnxruntime,openvino",
                   help=f"comma-separated, from: {', '.join(BACKENDS)} (default: the CPU backends)")
    p.add_argument("--precision", default="fp32", help=f"comma-separated precisions to run each backend in, from: "
                   f"{', '.join(PRECISIONS)} (default fp32; a precision a backend does not offer is skipped with "
                   "the reason)")
    p.add_argument("--golden", help="public_ffhq_encode_256_seed0.npz: its faces are inputs and the official "
                   "latents and images are compared too (needs its checkpoint, make_checkpoint('ffhq_encode_256', 0))")
    p.add_argument("--faces", metavar="DIR", help="also run every image of DIR (e.g. shared/data/faces/aligned)")
    p.add_argument("--calibration", metavar="DIR", help="int8: calibrate the quantization on the images of DIR "
                   "(default: a set the model makes itself); none of them may be among the faces checked")
    p.add_argument("--batch", type=int_at_least(1), default=2, help="random inputs when neither --golden nor --faces")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda")
    p.add_argument("--allow-emulated", action="store_true",
                   help="run bf16 on a CPU without bf16 units (the runtime emulates it: slow)")
    p.add_argument("--json", help="write the report here")
    return p


def check_disjoint(calibration: str | Path | None, faces: str | Path | None) -> None:
    """Refuse a calibration folder that holds any image (by content) of the faces the contract is checked on.

    Raises:
        UsageError: a shared image (named).
    """
    if not calibration or not faces:
        return
    from reference.plumbing.digests import file_sha256
    from reference.plumbing.files import scan_folder

    checked = {file_sha256(f): f for f in scan_folder(faces)}
    for f in scan_folder(calibration):
        if file_sha256(f) in checked:
            raise UsageError(f"--calibration {calibration} holds {f.name}, which is also among the --faces checked "
                             f"({checked[file_sha256(f)]}); calibrate on other images than the ones you check on")


def _body(args: argparse.Namespace) -> int:
    check_disjoint(args.calibration, args.faces)
    golden = dict(np.load(args.golden)) if args.golden else None
    parts = ([golden_inputs(golden)] if golden is not None else []) + ([face_inputs(args.faces)] if args.faces else [])
    x = torch.cat(parts) if parts else None
    if x is None and args.batch != 2:
        x = torch.rand(args.batch, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    results, skipped = run_parity(args.checkpoint, args.backends.split(","), args.precision.split(","), x, golden,
                                  args.device, args.allow_emulated, say=lambda m: print(m, file=sys.stderr),
                                  calibration=args.calibration)
    print(format_table(results))
    for line in skipped:
        print(f"skipped {line}")
    if args.json:
        write_json(args.json, {"comparisons": [c.as_dict() for c in results], "skipped": skipped})
    return 0 if results and all(c.passed for c in results) else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m export.parity`: exit 0 all pass, 1 any fails, 2 bad arguments or checkpoint, 130 interrupted."""
    return run_cli(build_parser(), _body, argv, interrupted="nothing was written; rerun the same command")


if __name__ == "__main__":
    sys.exit(main())
