"""`python -m export.tensorrt`: build a plan from an `export.onnx` file, and/or report its parity
against the fp32 ONNX or its latency.

Example:
    python -m export.tensorrt --onnx M.onnx --plan M.plan --fp16 --profile 1,4,8 --report parity
"""

from __future__ import annotations

import argparse

from reference.description import sidecar_path
from reference.plumbing.cli import ArgumentParser, int_at_least, run_cli, say
from reference.plumbing.errors import PSPError, UsageError

from .builder import DEFAULT_WORKSPACE_MIB, build_engine, onnx_fp16_count
from .common import TensorRTError, import_tensorrt, parse_profile_arg
from .report import latency_report, parity_report


def _batch_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def build_parser() -> ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(
        prog="python -m export.tensorrt",
        description="Build a TensorRT plan from an export.onnx file (writes <plan> and <plan>.json), and/or "
                    "report its parity against the fp32 ONNX or its latency (JSON beside the plan).",
        epilog="Exit codes: 0 ok, 1 a parity report outside its tolerances, 2 usage error, TensorRT or CUDA "
               "missing, or a TensorRT error (one line), 130 interrupted.")
    p.add_argument("--onnx", metavar="M.onnx", help="ONNX from python -m export.onnx; given: build the plan")
    p.add_argument("--plan", metavar="M.plan", required=True, help="the plan to write (with --onnx) or to report on")
    p.add_argument("--fp16", action="store_true",
                   help="FP16 plan (style affines, demodulation and mapping kept fp32); default fp32 (TF32 off)")
    p.add_argument("--profile", type=parse_profile_arg, action="append", metavar="MIN,OPT,MAX",
                   help="batch sizes of one optimisation profile (repeat for more; default 1,1,1)")
    p.add_argument("--timing-cache", metavar="FILE", help="timing cache read before and written after the build")
    p.add_argument("--version-compatible", action="store_true",
                   help="a plan later TensorRT versions of the same major can run (may be slower)")
    p.add_argument("--exclude-lean-runtime", action="store_true",
                   help="with --version-compatible: leave the lean runtime out of the plan")
    p.add_argument("--workspace-mib", type=int_at_least(1), default=DEFAULT_WORKSPACE_MIB, metavar="MiB",
                   help=f"builder workspace limit (default {DEFAULT_WORKSPACE_MIB})")
    p.add_argument("--report", action="append", choices=("parity", "latency"),
                   help="after the build (or on an existing plan): parity against the fp32 ONNX, or latency")
    p.add_argument("--reference-onnx", metavar="R.onnx",
                   help="fp32 ONNX for --report parity (default: --onnx when it is fp32)")
    p.add_argument("--batch-sizes", type=_batch_list, metavar="1,4,8",
                   help="batch sizes for the reports (default: parity 1; latency each profile's opt and max)")
    p.add_argument("--iters", type=int_at_least(1), default=50, help="timed runs per batch size for --report latency")
    p.add_argument("--warmup", type=int_at_least(0), default=10, help="untimed runs after the first call for --report latency")
    p.add_argument("--device", default="cuda", help="CUDA device for reports (default cuda)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return p


def _body(args: argparse.Namespace) -> int:
    if not args.onnx and not args.report:
        raise UsageError("nothing to do: give --onnx to build, and/or --report parity|latency")
    import_tensorrt()
    if args.onnx:
        build_engine(args.onnx, args.plan, fp16=args.fp16, profiles=args.profile or [(1, 1, 1)],
                     timing_cache=args.timing_cache, version_compatible=args.version_compatible,
                     exclude_lean_runtime=args.exclude_lean_runtime, workspace_mib=args.workspace_mib,
                     verbose=args.verbose)
        say(f"wrote {args.plan} and {sidecar_path(args.plan)}")
    code = 0
    for kind in args.report or []:
        if kind == "parity":
            ref = args.reference_onnx or args.onnx
            if ref is None or onnx_fp16_count(ref):
                raise TensorRTError("--report parity needs the fp32 ONNX: give --reference-onnx (the part exported "
                                    "without --fp16)")
            rep = parity_report(args.plan, ref, batch_sizes=args.batch_sizes or (1,), device=args.device)
            for run in rep["runs"]:
                summary = ", ".join(
                    f"{k} rel {v.get('rel', float('nan')):.2e} (nan {v.get('nan')}, inf {v.get('inf')})"
                    for k, v in run["outputs"].items())
                status = "ok" if run["passed"] else "FAILED"
                say(f"parity batch {run['batch']}: {status}: {summary}")
            code = max(code, 0 if rep["passed"] else 1)
        else:
            rep = latency_report(args.plan, batch_sizes=args.batch_sizes, warmup=args.warmup, iters=args.iters,
                                 device=args.device)
            for r in rep["results"]:
                say(f"latency batch {r['batch']}: p50 {r['p50_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms, "
                    f"{r['img_per_s']:.1f} img/s (first call {r['first_call_ms']:.1f} ms)")
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments without the program name (default `sys.argv[1:]`).

    Returns:
        The exit code (0 ok, 1 parity failed, 2 usage / unavailable / TensorRT error, 130 interrupted).
    """
    return run_cli(build_parser(), _body, argv, errors=(PSPError, OSError, ValueError),
                   interrupted="no plan was written (plans and sidecars appear whole or not at all); rerun the command")
