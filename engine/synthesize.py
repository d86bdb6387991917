"""`python -m engine.synthesize`: render saved W+ latents (optionally edited) and interpolations between two.

Source: the decoder half of official pSp `models/psp.py::pSp.forward` (`decoder([codes],
input_is_latent=True, randomize_noise=False)`, `face_pool` with `--resize_outputs`, `tensor2im`);
the latents are what `python -m engine.run --save-latents` writes. Rendering uses the generator's
stored noise, so the same latents on the same backend, one latent per forward pass (batch size 1
here and in engine.run), give the same bytes as engine.run.

Inputs (`--latents`): `.npy` files, or folders searched recursively for `*.npy` (hidden files and
the output folder skipped). Each file holds `[n_styles, 512]` (one W+), `[B, n_styles, 512]` (a
batch) or `[512]` / `[1, 512]` (one w, repeated to every style); see `engine.latents.load_latents`.

Outputs, under `--output`, mirroring each file's path relative to the deepest folder holding all of
them (as engine.run names its outputs): `<rel>/<stem>.png` for a single latent, `<rel>/<stem>_<i>.png`
for entry i of a batch (i zero-padded to the width of B-1). `--interpolate A.npy B.npy --steps N`
writes `<A>_to_<B>_<i>.png` for the N frames (linear in W+, both ends included) and
`<A>_to_<B>_strip.jpg` (the frames in a row, at most 256 px high). Every file is written atomically.

Resuming: `manifest.jsonl` in the output folder, the format of `engine.manifest`; a latent file
whose latest record is "ok" with the same fingerprint (checkpoint, backend, --resize-outputs, the
edits' file hashes and strengths), unchanged size and mtime, and all outputs present is skipped.
An interpolation is recorded under the input key `"<A> -> <B> (N steps)"` (absolute paths) with
the two files' summed size and latest mtime. A bad file is recorded "failed" and the rest go on
(a `.npy` header is checked before the array is allocated: `engine.latents.read_npy`). An output
made from another latent file (other path and content) is not replaced without `--overwrite`
(`engine.manifest`, "Provenance").

Exit codes: 0 all ok or skipped; 1 at least one input failed (see the manifest); 2 usage or
checkpoint error (one line on stderr, no traceback); 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from reference.plumbing.cli import ArgumentParser, int_at_least, plural, run_cli, say
from reference.plumbing.digests import checkpoint_identity
from reference.plumbing.errors import PSPError

from . import api, demo
from . import latents as lt
from reference.plumbing.files import scan_folder
from reference.images import atomic_write_image, tensor_to_uint8

from .batch import Progress, non_finite
from .inputs import Job, file_ids, plan_jobs, unsafe_output
from .manifest import MANIFEST_NAME, InputStat, Manifest, input_digest
from .run import add_edit_argument, add_engine_arguments, claim_output_folder, finish, load_engine, run_facts

STRIP_HEIGHT = 256  # px, the most an interpolation strip's frames are shown at


# ------------------------------------------------------------------------------------------------
# Inputs and options


def find_latent_files(specs: Sequence[str], exclude: str | os.PathLike | None = None) -> list[Path]:
    """Expand `--latents` arguments into `.npy` files.

    Args:
        specs: files (taken whatever their extension) or folders (searched recursively for
            `*.npy`, case-insensitive; hidden files and folders skipped).
        exclude: a folder never searched (the output folder).

    Returns:
        Files in argument order (sorted within a folder), each once.

    Raises:
        UsageError: an argument that is neither a file nor a folder, or no `.npy` found at all.
    """
    found: dict[str, Path] = {}
    for spec in specs:
        p = Path(spec)
        if p.is_file():
            matches = [p]
        elif p.is_dir():
            matches = scan_folder(p, exclude, extensions=frozenset({".npy"}))
        else:
            raise api.UsageError(f"--latents {spec}: no such file or folder")
        for m in matches:
            found.setdefault(os.path.abspath(m), m)
    if not found:
        raise api.UsageError(f"no .npy latent file found in --latents {' '.join(map(str, specs))}")
    return list(found.values())


def image_names(job: Job, out_dir: Path, batch: int | None) -> list[Path]:
    """PNG paths for a latent file: `<base>.png` for a single latent (batch None), else
    `<base>_<i>.png` for i < batch, i zero-padded to the width of batch-1."""
    stem = out_dir / Path(job.base)
    if batch is None:
        return [stem.with_name(stem.name + ".png")]
    width = len(str(batch - 1))
    return [stem.with_name(f"{stem.name}_{i:0{width}d}.png") for i in range(batch)]


def interpolation_names(a: Path, b: Path, steps: int, out_dir: Path) -> tuple[list[Path], Path]:
    """`(frames, strip)`: `<A>_to_<B>_<i>.png` for i < steps and `<A>_to_<B>_strip.jpg` in `out_dir`."""
    base = f"{a.stem}_to_{b.stem}"
    width = len(str(steps - 1))
    return [out_dir / f"{base}_{i:0{width}d}.png" for i in range(steps)], out_dir / f"{base}_strip.jpg"


@dataclass
class SynthOptions:
    """Options of a synthesize run (all but batch_size and overwrite are in the fingerprint)."""

    out_dir: Path
    batch_size: int = 1
    resize_outputs: bool = False
    edits: tuple[lt.Edit, ...] = ()  # loaded (engine.latents.load_edit)
    overwrite: bool = False  # replace outputs made from another input (engine.manifest, "Provenance")

    def config(self, eng: api.Engine) -> dict:
        """The manifest config: what determines the output files (see `engine.manifest.fingerprint`)."""
        config = {
            "tool": "engine.synthesize",
            "checkpoint": checkpoint_identity(eng.checkpoint),
            "backend": eng.backend,
            "precision": eng.precision,
            "resize_outputs": self.resize_outputs,
        }
        if self.edits:
            config["edits"] = [{"sha256": e.sha256, "strength": e.strength} for e in self.edits]
        return config


@dataclass
class SynthSummary:
    """Counts and timings of a synthesize run.

    Attributes:
        ok, failed, skipped: input counts (latent files and interpolations).
        images: PNGs written. seconds: wall time of the loop, s.
        failures: `(input, reason)` of each failed input.
    """

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    images: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def format(self) -> str:
        """Multi-line human summary."""
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        lines = [f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped"
                 + (f"; {plural(self.images, 'image')} in {self.seconds:.1f} s = {rate:.2f} img/s"
                    if self.ok or self.failed else "")]
        lines += [f"failed: {reason}" if reason.startswith(src) else f"failed: {src}: {reason}"
                  for src, reason in self.failures]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The run loops


def _render(eng: api.Engine, w_plus: np.ndarray, opts: SynthOptions) -> tuple[np.ndarray, dict[int, str]]:
    """Edited latents `[N, n_styles, 512]` -> `(uint8 [N, R, R, 3], {n: reason})`, in chunks of
    `opts.batch_size`; the dict names the latents whose edited latents or image hold NaN/Inf (their
    images are black and must not be written)."""
    w = lt.apply_edits(torch.from_numpy(np.ascontiguousarray(w_plus, np.float32)), opts.edits)
    img = torch.cat([eng.synthesize(w[i : i + opts.batch_size], resize=opts.resize_outputs)
                     for i in range(0, w.shape[0], opts.batch_size)])  # [N, 3, R, R]
    bad = non_finite(w.shape[0], latents=w, image=img)
    return tensor_to_uint8(img.nan_to_num(0.0, 0.0, 0.0) if bad else img), bad


def run_latents(eng: api.Engine, jobs: Sequence[Job], opts: SynthOptions, manifest: Manifest,
                progress: Progress | None = None, summary: SynthSummary | None = None) -> SynthSummary:
    """Render every job's latent file, writing its PNGs and one manifest record per file.

    Files are read one at a time (a bad one is recorded "failed" and the others go on), grouped
    until a group holds `opts.batch_size` latents, rendered together in chunks of
    `opts.batch_size`, and written atomically.

    Args:
        eng: a loaded `Engine`.
        jobs: from `plan_jobs(find_latent_files(...))`.
        opts: output options; `opts.out_dir` must be `manifest.out_dir`.
        manifest: an open `Manifest`.
        progress: anything with `update(n)`, advanced once per file.
        summary: counts to add to (default a new one).

    Returns:
        The run's `SynthSummary`.
    """
    summary = summary if summary is not None else SynthSummary()
    t_start = time.perf_counter()
    claimed: dict[str, str] = {}  # output path (casefolded) -> the file that writes it, in this run
    inputs = file_ids([job.source for job in jobs])

    def tick() -> None:
        if progress is not None:
            progress.update(1)

    def fail(job: Job, stat: InputStat, reason: str, timings: dict) -> None:
        if stat.sha256 is None:
            stat.sha256 = input_digest(job.source)
        manifest.append(stat, "failed", error=reason, timings_ms=timings)
        summary.failed += 1
        summary.failures.append((str(job.source), reason))
        tick()

    group: list[tuple[Job, InputStat, np.ndarray, bool, float]] = []

    def flush() -> None:
        if not group:
            return
        t0 = time.perf_counter()
        try:
            u8, bad = _render(eng, np.concatenate([g[2] for g in group]), opts)
        except RuntimeError as e:  # e.g. out of memory: this group fails, the run goes on
            for job, stat, _, _, read_ms in group:
                fail(job, stat, f"model failed on this batch: {type(e).__name__}: {e}", {"read": read_ms})
            group.clear()
            return
        synth_ms = _ms(t0) / len(group)
        start = 0
        for job, stat, w, batched, read_ms in group:
            t0 = time.perf_counter()
            images = u8[start : start + w.shape[0]]
            harm = next((bad[n] for n in range(start, start + w.shape[0]) if n in bad), None)
            start += w.shape[0]
            paths = image_names(job, opts.out_dir, w.shape[0] if batched else None)
            timings = {"read": read_ms, "synthesize": synth_ms}
            harm = harm or next(filter(None, (unsafe_output(p, opts.out_dir, inputs) for p in paths)), None)
            if harm is not None:
                fail(job, stat, f"{job.source}: {harm}; nothing written", timings)
                continue
            clash = next((claimed[str(p).casefold()] for p in paths
                          if claimed.get(str(p).casefold(), str(job.source)) != str(job.source)), None)
            if clash is not None:
                fail(job, stat, f"{job.source}: its output names collide with those of {clash}; rename one", timings)
                continue
            made = None if opts.overwrite else manifest.conflict(stat, _names(paths, opts), _digest_of(job.source))
            if made is not None:
                fail(job, stat, made, timings)
                continue
            try:
                for path, img in zip(paths, images):
                    atomic_write_image(path, img)
            except (OSError, ValueError) as e:
                fail(job, stat, f"{paths[0]}: cannot write ({type(e).__name__}: {e})", timings)
                continue
            for p in paths:
                claimed[str(p).casefold()] = str(job.source)
            if stat.sha256 is None:
                stat.sha256 = input_digest(job.source)
            manifest.append(stat, "ok", outputs=[Path(os.path.abspath(p)) for p in paths],
                            timings_ms={**timings, "write": _ms(t0)})
            summary.ok += 1
            summary.images += len(paths)
            tick()
        group.clear()

    for job in jobs:
        stat = InputStat.of(job.source)
        done = manifest.done(stat, _names(image_names(job, opts.out_dir, None), opts), _digest_of(job.source))
        if done is not None:  # no record: a no-op rerun leaves the manifest as it was
            summary.skipped += 1
            for o in done["outputs"]:
                claimed[str(opts.out_dir / o).casefold()] = str(job.source)
            tick()
            continue
        t0 = time.perf_counter()
        try:
            w, batched = lt.load_latents(job.source, eng.n_styles)
        except PSPError as e:
            fail(job, stat, str(e), {"read": _ms(t0)})
            continue
        group.append((job, stat, w, batched, _ms(t0)))
        if sum(g[2].shape[0] for g in group) >= opts.batch_size:
            flush()
    flush()
    summary.seconds += time.perf_counter() - t_start
    return summary


def run_interpolation(eng: api.Engine, a: Path, b: Path, steps: int, opts: SynthOptions, manifest: Manifest,
                      summary: SynthSummary | None = None) -> SynthSummary:
    """Render `steps` frames from latent file `a` to `b` (linear in W+, edits applied) and their strip.

    Args:
        eng: a loaded `Engine`.
        a, b: `.npy` files of one latent each (`[n_styles, 512]`, `[1, n_styles, 512]` or `[512]`).
        steps: frames, >= 2, both ends included.
        opts: output options; manifest: an open `Manifest`; summary: counts to add to.

    Returns:
        The `SynthSummary` (one input: ok, failed or skipped).
    """
    summary = summary if summary is not None else SynthSummary()
    t_start = time.perf_counter()
    sa, sb = InputStat.of(a), InputStat.of(b)
    stat = InputStat(f"{sa.path} -> {sb.path} ({steps} steps)", sa.size + sb.size if min(sa.size, sb.size) >= 0 else -1,
                     max(sa.mtime_ns, sb.mtime_ns) if min(sa.mtime_ns, sb.mtime_ns) >= 0 else -1)
    frames_paths, strip_path = interpolation_names(a, b, steps, opts.out_dir)
    names = _names([*frames_paths, strip_path], opts)

    def digest(_stat: InputStat) -> str | None:  # of the pair: the digests of A and B, in order
        da, db = input_digest(a), input_digest(b)
        return hashlib.sha256(f"{da}:{db}:{steps}".encode()).hexdigest() if da and db else None

    if manifest.done(stat, names, digest) is not None:
        summary.skipped += 1
        summary.seconds += time.perf_counter() - t_start
        return summary
    if stat.sha256 is None:
        stat.sha256 = digest(stat)
    t0 = time.perf_counter()
    try:
        made = None if opts.overwrite else manifest.conflict(stat, names, digest)
        if made is not None:
            raise lt.LatentFileError(made)
        ends = []
        for p in (a, b):
            w, _ = lt.load_latents(p, eng.n_styles)
            if w.shape[0] != 1:
                raise lt.LatentFileError(f"{p}: --interpolate needs one latent per file; this one holds a batch of "
                                         f"{w.shape[0]}")
            ends.append(w[0])
        read_ms = _ms(t0)
        t0 = time.perf_counter()
        frames, bad = _render(eng, lt.interpolate(ends[0], ends[1], steps), opts)  # [steps, R, R, 3]
        synth_ms = _ms(t0)
        if bad:
            raise lt.LatentFileError(f"{a} -> {b}: frame {min(bad)}: {bad[min(bad)]}; nothing written")
        harm = next(filter(None, (unsafe_output(p, opts.out_dir, file_ids([a, b])) for p in
                                  (*frames_paths, strip_path))), None)
        if harm is not None:
            raise lt.LatentFileError(f"{harm}; nothing written")
        t0 = time.perf_counter()
        for path, img in zip(frames_paths, frames):
            atomic_write_image(path, img)
        height = min(frames.shape[1], STRIP_HEIGHT, lt.JPEG_MAX_SIDE // steps)
        atomic_write_image(strip_path, lt.fit_jpeg(lt.strip(list(frames), height=max(height, 1))))
    except PSPError as e:
        reason = str(e)
    except RuntimeError as e:
        reason = f"model failed: {type(e).__name__}: {e}"
    except (OSError, ValueError) as e:
        reason = f"{strip_path}: cannot write ({type(e).__name__}: {e})"
    else:
        manifest.append(stat, "ok", outputs=[Path(os.path.abspath(p)) for p in (*frames_paths, strip_path)],
                        timings_ms={"read": read_ms, "synthesize": synth_ms, "write": _ms(t0)})
        summary.ok += 1
        summary.images += steps
        summary.seconds += time.perf_counter() - t_start
        return summary
    manifest.append(stat, "failed", error=reason)
    summary.failed += 1
    summary.failures.append((stat.path, reason))
    summary.seconds += time.perf_counter() - t_start
    return summary


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _names(paths: Sequence[Path], opts: SynthOptions) -> list[str]:
    """Output paths as the manifest names them: relative to the output folder, POSIX."""
    return [Path(os.path.relpath(p, opts.out_dir)).as_posix() for p in paths]


def _digest_of(source: Path):
    """`Manifest.done`/`conflict`'s `digest_of` for a latent file: its content digest, computed once asked."""
    return lambda _stat: input_digest(source)


# ------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(
        prog="python -m engine.synthesize",
        description="Render saved W+ latents (.npy from python -m engine.run --save-latents) with a pSp checkpoint's "
                    "generator, optionally edited, and interpolations between two latents. One lossless PNG per "
                    f"latent; a manifest ({MANIFEST_NAME}) lets a rerun skip what is done.",
        epilog="Exit codes: 0 all ok or skipped, 1 some inputs failed (reasons in the manifest), "
               "2 usage or checkpoint error.",
    )
    p.add_argument("--latents", nargs="+", default=[], metavar="FILE_OR_DIR",
                   help=".npy files or folders (searched recursively for *.npy); each file holds [n_styles, 512], "
                        "[B, n_styles, 512] or a w [512] (repeated to every style)")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--interpolate", nargs=2, metavar=("A.npy", "B.npy"),
                   help="also render --steps frames from latent A to latent B (linear in W+), written as "
                        "<A>_to_<B>_<i>.png plus <A>_to_<B>_strip.jpg")
    p.add_argument("--steps", type=int_at_least(2), default=8, metavar="N",
                   help="frames of --interpolate, both ends included (default 8)")
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="official pSp checkpoint, e.g. psp_ffhq_encode.pt (default: the built-in DEMO checkpoint "
                        "with random weights, whose outputs are not faces)")
    p.add_argument("--batch-size", type=int_at_least(1), default=1, metavar="N",
                   help="latents per forward pass (default 1; batching changes results only at float32 rounding, "
                        "so batch 1 here and in engine.run gives identical bytes)")
    add_engine_arguments(p)
    p.add_argument("--resize-outputs", action="store_true",
                   help="average-pool outputs to 256x256 (official --resize_outputs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that the manifest says were made from ANOTHER latent file (another path "
                        "and content, e.g. a/x.npy and then b/x.npy into one --output); without it such a file fails "
                        "with a message naming both")
    add_edit_argument(p)
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling for OLD checkpoints that safe loading refuses; this runs code from "
                        "the file, so use it only for checkpoints you trust")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments without the program name (default `sys.argv[1:]`).

    Returns:
        The exit code: 0 ok, 1 some inputs failed, 2 usage or checkpoint error, 130 interrupted.
    """
    return run_cli(build_parser(), _run, argv,
                   interrupted="finished inputs are recorded in the manifest; rerun the same command to resume")


def _run(args: argparse.Namespace) -> int:
    opts = SynthOptions(out_dir=Path(args.output), batch_size=args.batch_size, resize_outputs=args.resize_outputs,
                        overwrite=args.overwrite)
    summary = SynthSummary()
    if not args.latents and not args.interpolate:
        raise api.UsageError("nothing to render: give --latents FILE_OR_DIR ... and/or --interpolate A.npy B.npy")
    jobs = plan_jobs(find_latent_files(args.latents, exclude=opts.out_dir)) if args.latents else []
    ends = [Path(p) for p in args.interpolate or ()]
    for p in ends:
        if not p.is_file():
            raise api.UsageError(f"--interpolate {p}: no such file")
    for e in args.edit:
        lt.read_direction(e.path)  # fail fast, before the checkpoint load
    with claim_output_folder(opts.out_dir):
        return _render_all(args, opts, jobs, ends, summary)


def _render_all(args: argparse.Namespace, opts: SynthOptions, jobs: list[Job], ends: list[Path],
                summary: SynthSummary) -> int:
    """`_run` once the options are checked and the output folder is held: load, then render."""
    if args.checkpoint is None:
        say(demo.DEMO_NOTICE)
    eng = load_engine(args, f"{plural(len(jobs), 'latent file')}{' + 1 interpolation' if ends else ''} -> {opts.out_dir}")
    opts.edits = lt.load_edits(args.edit, eng.n_styles)
    with Manifest(opts.out_dir, opts.config(eng), run_facts(eng)) as manifest:
        if manifest.bad_lines:
            say(manifest.unreadable_warning())
        with tqdm(total=len(jobs) + bool(ends), unit="file", file=sys.stderr, dynamic_ncols=True) as bar:
            run_latents(eng, jobs, opts, manifest, progress=bar, summary=summary)
            if ends:
                run_interpolation(eng, ends[0], ends[1], args.steps, opts, manifest, summary=summary)
                bar.update(1)
    return finish(summary, opts.out_dir, eng)


if __name__ == "__main__":
    sys.exit(main())
