"""A Triton Inference Server model repository around a TensorRT plan, from the plan's sidecar alone.

Source: Triton's model configuration (`config.pbtxt`, protobuf text format of `ModelConfig` in
triton-inference-server/common `protobuf/model_config.proto`: `platform: "tensorrt_plan"`,
`max_batch_size`, `input`/`output` with `dims` WITHOUT the batch dim, `dynamic_batching`
{`preferred_batch_size`, `max_queue_delay_microseconds`}, `instance_group` {`profile`}) and its
repository layout `REPO/<name>/config.pbtxt` + `REPO/<name>/<version>/model.plan`.

Layout written:

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.plan          (a hard link to the plan where possible, else a copy)
    REPO/<name>/psp_engine.json       (a copy of the plan's sidecar `<plan>.json`: the model description
                                       with preprocessing and latent_avg, and the plan's build)

The instance group lists every optimisation profile of the plan so that the server picks, per
batch, a profile that covers it (without `profile`, Triton uses profile 0 only). So every batch
size from 1 to `max_batch_size` must be covered by some profile; this is checked.

No TensorRT is needed: only `<plan>.json` (written by `python -m export.tensorrt`) is read.

CLI: `python -m export.triton_repo --plan M.plan --out REPO [--name psp] [--max-batch N]
[--preferred-batch 4,8] [--max-queue-delay-us 100]`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from reference.plumbing.cli import ArgumentParser, int_at_least, run_cli, say
from reference.description import ModelDescription, read_sidecar, sidecar_path
from reference.plumbing.errors import PSPError
from reference.plumbing.files import atomic_copy, atomic_path, atomic_write_bytes

from .tensorrt.common import PLAN_KIND

# Sidecar dtype names -> Triton's DataType enum names (model_config.proto).
TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int8": "TYPE_INT8",
    "int32": "TYPE_INT32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8",
}
MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
DEFAULT_MAX_QUEUE_DELAY_US = 100


class TritonRepoError(PSPError):
    """A model repository cannot be written as asked (missing sidecar, batch sizes the plan cannot run)."""


def read_plan_sidecar(plan: str | os.PathLike) -> tuple[ModelDescription, dict[str, Any]]:
    """Read `<plan>.json` (kind "tensorrt-plan" of the one sidecar schema) and check the parts a Triton
    config needs.

    Returns:
        `(description, info)` as `reference.description.read_sidecar`.

    Raises:
        TritonRepoError: missing plan; missing, unreadable or other sidecar; missing inputs/outputs/profiles.
    """
    plan = Path(plan)
    if not plan.is_file():
        raise TritonRepoError(f"{plan}: no such plan; build one with python -m export.tensorrt")
    try:
        description, info = read_sidecar(plan, PLAN_KIND)
    except PSPError as e:
        raise TritonRepoError(str(e)) from None
    missing = [k for k in ("inputs", "outputs", "profiles") if not info.get(k)]
    if missing:
        raise TritonRepoError(f"{sidecar_path(plan)}: sidecar lacks {', '.join(missing)}; rebuild with "
                              "python -m export.tensorrt")
    return description, info


def _covered(profiles: Sequence[Mapping[str, Any]], batch: int) -> bool:
    return any(int(p["min"]) <= batch <= int(p["max"]) for p in profiles)


def check_batching(profiles: Sequence[Mapping[str, Any]], max_batch: int, preferred: Sequence[int]) -> None:
    """Every batch 1..max_batch must fall in some profile; preferred sizes in 1..max_batch.

    Raises:
        TritonRepoError: a batch size no profile runs (named, with the profiles), or bad preferred sizes.
    """
    top = max(int(p["max"]) for p in profiles)
    ranges = ", ".join(f"{p.get('name', i)} [{p['min']}, {p['max']}]" for i, p in enumerate(profiles))
    if max_batch < 1:
        raise TritonRepoError(f"--max-batch must be >= 1, got {max_batch}")
    if max_batch > top:
        raise TritonRepoError(f"--max-batch {max_batch} is above the plan's largest profile max {top} (profiles: "
                              f"{ranges}); lower it or rebuild with --profile MIN,OPT,{max_batch}")
    holes = [b for b in range(1, max_batch + 1) if not _covered(profiles, b)]
    if holes:
        raise TritonRepoError(f"batch sizes {holes} fall in no profile (profiles: {ranges}); the dynamic batcher can "
                              "form any size up to --max-batch: rebuild with a profile covering them")
    bad = [b for b in preferred if not 1 <= b <= max_batch]
    if bad:
        raise TritonRepoError(f"--preferred-batch {bad} outside 1..{max_batch} (--max-batch)")


def _tensor_block(t: Mapping[str, Any]) -> str:
    dtype = TRITON_DTYPES.get(str(t["dtype"]))
    if dtype is None:
        raise TritonRepoError(f"tensor {t['name']!r}: dtype {t['dtype']!r} has no Triton type")
    shape = [int(d) for d in t["shape"]]
    if not shape or shape[0] != -1:
        raise TritonRepoError(f"tensor {t['name']!r}: shape {shape} has no dynamic batch dim 0; re-export with the "
                              "batch axis dynamic")
    dims = ", ".join(str(d) for d in shape[1:])
    return f'  {{\n    name: "{t["name"]}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n  }}'


def config_pbtxt(meta: Mapping[str, Any], name: str, max_batch: int, preferred: Sequence[int],
                 max_queue_delay_us: int) -> str:
    """The text of `config.pbtxt` for a plan (protobuf text format of Triton's `ModelConfig`).

    Args:
        meta: the plan sidecar's artifact info (inputs, outputs with -1 for the batch, profiles).
        name: the model name (= its directory in the repository).
        max_batch: `max_batch_size`.
        preferred: `dynamic_batching.preferred_batch_size` (may be empty).
        max_queue_delay_us: `dynamic_batching.max_queue_delay_microseconds`.

    Returns:
        The file's text (ends with a newline).
    """
    inputs = ",\n".join(_tensor_block(t) for t in meta["inputs"])
    outputs = ",\n".join(_tensor_block(t) for t in meta["outputs"])
    profiles = ", ".join(f'"{i}"' for i in range(len(meta["profiles"])))
    batching = []
    if preferred:
        batching.append(f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]")
    batching.append(f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}")
    return (
        f'name: "{name}"\n'
        f'platform: "tensorrt_plan"\n'
        f"max_batch_size: {int(max_batch)}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        f"dynamic_batching {{\n" + "\n".join(batching) + "\n}\n"
        f"instance_group [\n  {{\n    kind: KIND_GPU\n    count: 1\n    profile: [ {profiles} ]\n  }}\n]\n"
    )


def _place_plan(plan: Path, dest: Path) -> str:
    """Hard-link (same filesystem) or copy the plan to `dest` through a temporary name; returns how."""
    with atomic_path(dest) as tmp:
        try:
            os.link(plan, tmp)
            how = "hard link"
        except OSError:
            shutil.copyfile(plan, tmp)
            how = "copy"
    return how


def write_triton_repo(plan: str | os.PathLike, out: str | os.PathLike, *, name: str = "psp",
                      max_batch: int | None = None, preferred_batch: Sequence[int] = (),
                      max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US, version: int = 1) -> dict[str, Any]:
    """Write (or update) one model of a Triton model repository from a plan and its sidecar.

    Args:
        plan: a plan from `python -m export.tensorrt` (`<plan>.json` beside it).
        out: the repository folder (created if missing; other models in it are left alone).
        name: model name and folder.
        max_batch: `max_batch_size`; default the largest profile max.
        preferred_batch: preferred batch sizes for the dynamic batcher.
        max_queue_delay_us: how long a request may wait for others to batch with, µs.
        version: the model version folder.

    Returns:
        `{"config": Path, "plan": Path, "sidecar": Path, "placed": "hard link" | "copy",
        "max_batch": int}`.

    Raises:
        TritonRepoError: missing plan or sidecar, a bad name, or batch sizes the plan cannot run.
    """
    plan, out = Path(plan), Path(out)
    if not MODEL_NAME.match(name):
        raise TritonRepoError(f"--name {name!r}: use letters, digits, '_', '-' or '.'")
    if version < 1:
        raise TritonRepoError(f"model version must be >= 1, got {version}")
    _, meta = read_plan_sidecar(plan)
    profiles = meta["profiles"]
    max_batch = int(max_batch) if max_batch is not None else max(int(p["max"]) for p in profiles)
    preferred = [int(b) for b in preferred_batch]
    check_batching(profiles, max_batch, preferred)
    text = config_pbtxt(meta, name, max_batch, preferred, max_queue_delay_us)

    model_dir = out / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    dest = model_dir / str(version) / "model.plan"
    placed = _place_plan(plan, dest)
    config = model_dir / "config.pbtxt"
    atomic_write_bytes(config, text)
    sidecar = model_dir / "psp_engine.json"
    atomic_copy(sidecar_path(plan), sidecar)
    return {"config": config, "plan": dest, "sidecar": sidecar, "placed": placed, "max_batch": max_batch}


# ----------------------------------------------------------------------------------------------
# CLI


_positive = int_at_least(1)
_non_negative = int_at_least(0)


def _sizes(text: str) -> list[int]:
    return [_positive(v) for v in text.split(",") if v.strip()]


def build_parser() -> ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(
        prog="python -m export.triton_repo",
        description="Write a Triton Inference Server model repository (config.pbtxt + <version>/model.plan) for a "
                    "TensorRT plan built by python -m export.tensorrt; reads only the plan's <plan>.json sidecar.",
        epilog="Exit codes: 0 written, 2 usage error or a plan/sidecar that does not fit (one line), 130 interrupted.")
    p.add_argument("--plan", required=True, metavar="M.plan", help="the TensorRT plan (its M.plan.json beside it)")
    p.add_argument("--out", required=True, metavar="REPO", help="model repository folder (created if missing)")
    p.add_argument("--name", default="psp", help="model name and folder (default psp)")
    p.add_argument("--max-batch", type=_positive, metavar="N",
                   help="max_batch_size (default: the plan's largest profile max)")
    p.add_argument("--preferred-batch", type=_sizes, default=[], metavar="4,8",
                   help="dynamic batcher's preferred batch sizes (default none)")
    p.add_argument("--max-queue-delay-us", type=_non_negative, default=DEFAULT_MAX_QUEUE_DELAY_US, metavar="US",
                   help=f"dynamic batcher's max queue delay, microseconds (default {DEFAULT_MAX_QUEUE_DELAY_US})")
    p.add_argument("--version", type=_positive, default=1, help="model version folder (default 1)")
    return p


def _body(args: argparse.Namespace) -> int:
    res = write_triton_repo(args.plan, args.out, name=args.name, max_batch=args.max_batch,
                            preferred_batch=args.preferred_batch, max_queue_delay_us=args.max_queue_delay_us,
                            version=args.version)
    say(f"wrote {res['config']} and {res['plan']} ({res['placed']}, max_batch_size {res['max_batch']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 written, 2 error, 130 interrupted)."""
    return run_cli(build_parser(), _body, argv, interrupted="rerun the same command (each file is replaced whole)")


if __name__ == "__main__":
    sys.exit(main())
