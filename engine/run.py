"""`python -m engine.run`: invert a folder of images with a pSp checkpoint.

Source: the command line of official pSp `scripts/inference.py` (`--checkpoint_path`,
`--data_path`, `--exp_dir`, `--test_batch_size`, `--resize_outputs`, `--couple_outputs`),
reshaped; the work is done by `engine.batch`.

Exit codes: 0 all inputs ok or skipped; 1 at least one input failed (see the manifest);
2 usage or checkpoint error (one line on stderr, no traceback); 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from reference.errors import PSPError

from . import api, demo
from .batch import RunOptions, find_inputs, plan_jobs, run_jobs
from .images import MAX_PIXELS
from .manifest import MANIFEST_NAME, Manifest


def int_at_least(minimum: int):
    """An argparse `type=`: an integer >= `minimum`, else a one-line "expected ..." error."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m engine.run",
        description="Encode images into StyleGAN2 W+ with a pSp checkpoint and re-synthesize them. "
                    "Outputs mirror the inputs' folders under --output as lossless PNG; a manifest "
                    f"({MANIFEST_NAME}) records each input, and a rerun skips inputs already done.",
        epilog="Exit codes: 0 all ok or skipped, 1 some inputs failed (reasons in the manifest), "
               "2 usage or checkpoint error.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="image files, folders (searched recursively) or glob patterns (quote them)")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="official pSp checkpoint, e.g. psp_ffhq_encode.pt (default: a built-in DEMO "
                        "checkpoint with random weights, whose outputs are not faces)")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                   help="images per forward pass (default 1; the last partial batch is run)")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda", help="device (default cpu)")
    p.add_argument("--backend", default="auto", choices=["auto", *api.BACKENDS],
                   help="implementation (default auto: the fastest measured for the device, openvino on "
                        "CPU (onnxruntime if openvino is not installed), engine on CUDA). reference = the official "
                        "formulation, fp32; engine = static-weight formulation in torch, fp32; onnxruntime = that "
                        "formulation exported to ONNX (cached on first use), fp32, CPU; openvino = the same ONNX "
                        "graphs on OpenVINO, fp32, CPU; triton = synthesis on the Triton kernels (CUDA, fp16; on a CPU only "
                        "under TRITON_INTERPRET=1, for tests); tensorrt = TensorRT plans from python -m "
                        "export.tensorrt (--checkpoint names the plans; CUDA)")
    p.add_argument("--resize-outputs", action="store_true",
                   help="average-pool outputs to 256x256 (official --resize_outputs)")
    p.add_argument("--couple-outputs", action="store_true",
                   help="also write <name>_coupled.jpg: the input (resized to the output height) and the "
                        "output side by side; the .png output is unchanged")
    p.add_argument("--save-latents", action="store_true",
                   help="also write <name>.npy: the W+ latent, float32 [n_styles, 512]")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling for OLD checkpoints that safe loading refuses; this runs "
                        "code from the file, so use it only for checkpoints you trust")
    p.add_argument("--max-pixels", type=_positive_int, default=MAX_PIXELS, metavar="N",
                   help=f"reject images with more pixels than this, before decoding (default {MAX_PIXELS:,})")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments without the program name (default `sys.argv[1:]`).

    Returns:
        The exit code: 0 ok, 1 some inputs failed, 2 usage or checkpoint error.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: 2 on a usage error, 0 after --help
        return int(e.code or 0)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    opts = RunOptions(out_dir=Path(args.output), batch_size=args.batch_size, resize_outputs=args.resize_outputs,
                      couple_outputs=args.couple_outputs, save_latents=args.save_latents,
                      max_pixels=args.max_pixels)
    try:
        jobs = plan_jobs(find_inputs(args.input, exclude=opts.out_dir))
        if args.checkpoint is None:
            say(demo.DEMO_NOTICE)
        t0 = time.perf_counter()
        eng = api.load(args.checkpoint, backend=args.backend, device=args.device,
                       trust_pickle=args.trust_pickle, announce=say)
        say(f"loaded {eng.checkpoint} in {time.perf_counter() - t0:.1f} s: output {eng.output_size}px, "
            f"{eng.n_styles} styles, input_nc {eng.input_nc}, label_nc {eng.label_nc}; "
            f"{len(jobs)} input(s) -> {opts.out_dir}")
        with Manifest(opts.out_dir, opts.config(eng)) as manifest:
            if manifest.n_unreadable:
                say(f"warning: ignored {manifest.n_unreadable} unreadable line(s) in {manifest.path}")
            with tqdm(total=len(jobs), unit="img", file=sys.stderr, dynamic_ncols=True) as bar:
                summary = run_jobs(eng, jobs, opts, manifest, progress=bar)
    except PSPError as e:
        say("error: " + " ".join(str(e).split()))
        return 2
    except OSError as e:  # the output folder or manifest cannot be created or written
        say("error: " + " ".join(str(e).split()))
        return 2
    except KeyboardInterrupt:
        say("interrupted: finished inputs are recorded in the manifest; rerun the same command to resume")
        return 130
    say(summary.format())
    say(f"outputs in {opts.out_dir} (manifest: {opts.out_dir / MANIFEST_NAME})")
    if eng.is_demo:
        say(f"reminder: these outputs come from the random-weight DEMO checkpoint; pass {demo.REAL_CHECKPOINT_HINT}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
