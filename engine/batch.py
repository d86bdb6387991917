"""Batch inversion of image files: input discovery, output naming, the resumable run loop.

Source: the job of official pSp `scripts/inference.py` (read, encode, synthesize, `tensor2im`,
save), made robust: one bad file is recorded and skipped, every file is written atomically, and a
manifest lets a rerun skip finished work (see `engine.manifest`).

Output naming: each input's path relative to the deepest folder holding all inputs is mirrored
under the output folder, with the extension replaced: `<rel>/<stem>.png` (lossless), the latent
`<rel>/<stem>.npy` (float32 `[n_styles, 512]`) and, with couple, `<rel>/<stem>_coupled.jpg`.
Inputs whose `<rel>/<stem>` would collide (`x.jpg` and `x.png` in one folder, compared
case-insensitively) keep their whole name instead: `<rel>/x.jpg.png`, `<rel>/x.png.png`.
The root depends on the set of inputs, so rerun with the same `--input` arguments to resume.

Style mixing (`RunOptions.n_outputs` K > 0; official `scripts/style_mixing.py`): also
`<rel>/<stem>_mix<k>.png` for k = 0..K-1 (with latents, `<rel>/<stem>_mix<k>.npy`) and
`<rel>/<stem>_grid.jpg` (the input, the inversion, then the K mixes in one row). Output k of every
input mixes in z_k = row k of `engine.latents.mixing_z(seed, K)`. Edits (`RunOptions.edits`) are
applied to the encoder's latents first: `<stem>.png` is the edited inversion, `<stem>.npy` holds
the latents it was rendered from (edited), and the mixes start from the edited latents.

Face alignment (`RunOptions.align`; `engine.align`): each photo is aligned first (FFHQ recipe,
1024 px crops as the HyperStyle/ReStyle authors' own, `ALIGN_SIZE`), then the crop goes through the
official transform. One face keeps the input's output names; several faces are all inverted, most
confident first, as `<rel>/<stem>_face<i>.*` (only the largest with `largest_face`; every detection,
weak ones included, with `all_faces`); with `save_aligned` each crop is kept as `<...>_aligned.png`.
A photo without a face is recorded "failed" with the reason, as `engine.align` reports it (a rerun
tries it again). Super-resolution checkpoints
(`RunOptions.degrade_factor`): the input is degraded as the official SR transform does
(`reference.sr`) before encoding.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from reference.cli import plural
from reference.errors import CheckpointError, PSPError, UsageError
from reference.images import (MAX_PIXELS, atomic_write_image, atomic_write_npy, couple, display_rgb, input_channels,
                              read_input, tensor_to_uint8, to_input_tensor)

from .align import DEFAULT_UPSAMPLE, MIN_FACE_SIZE, MIN_SCORE
from .api import Engine
from .inputs import Job, check_output_names, file_ids, unsafe_output
from .latents import Edit, apply_edits, default_latent_mask, fit_jpeg, mix_with_w, mixing_z, strip
from .manifest import InputStat, Manifest, checkpoint_identity

STAGES = ("read", "encode", "synthesize", "write")
ALIGN_SIZE = 1024  # px: aligned crop side (and quad-warp size) for --align; the encoder resizes it to 256


# ------------------------------------------------------------------------------------------------
# The run loop


@dataclass
class RunOptions:
    """Output options of a batch run (all but batch_size and max_pixels are in the fingerprint)."""

    out_dir: Path
    batch_size: int = 1
    resize_outputs: bool = False
    couple_outputs: bool = False
    save_latents: bool = False
    max_pixels: int = MAX_PIXELS
    n_outputs: int = 0  # style-mixed outputs per input (0: no mixing)
    latent_mask: tuple[int, ...] | None = None  # styles to mix; None: engine.latents.default_latent_mask
    mix_alpha: float | None = None  # None: replace the masked styles (official); else blend weight in [0, 1]
    seed: int = 0  # of engine.latents.mixing_z
    edits: tuple[Edit, ...] = ()  # loaded (engine.latents.load_edit), applied in order
    align: bool = False  # FFHQ-align photos first (engine.align)
    largest_face: bool = False  # with align: only the largest face, else every face
    save_aligned: bool = False  # with align: keep each crop as <name>_aligned.png
    all_faces: bool = False  # with align: every detection, not only those engine.align.is_face accepts
    upsample: int = DEFAULT_UPSAMPLE  # with align: dlib detector upsampling
    degrade_factor: int | None = None  # super-resolution: official bicubic degradation by this factor

    def mixing_mask(self, eng: Engine) -> list[int]:
        """The style indices mixed: `latent_mask`, or the fine styles 8..n_styles-1."""
        return list(self.latent_mask) if self.latent_mask is not None else default_latent_mask(eng.n_styles)

    def config(self, eng: Engine) -> dict:
        """The manifest config: what determines the output files (see `engine.manifest.fingerprint`).

        Mixing and editing keys appear only when used, so runs without them keep the fingerprint
        they had before these options existed. Edits are identified by the SHA-256 of each
        direction file and their strengths, in order."""
        config = {
            "checkpoint": checkpoint_identity(eng.checkpoint),
            "backend": eng.backend,
            "precision": eng.precision,
            "resize_outputs": self.resize_outputs,
            "couple_outputs": self.couple_outputs,
            "save_latents": self.save_latents,
        }
        if self.n_outputs:
            config["mixing"] = {"n_outputs": self.n_outputs, "latent_mask": self.mixing_mask(eng),
                                "alpha": self.mix_alpha, "seed": self.seed}
        if self.edits:
            config["edits"] = [{"sha256": e.sha256, "strength": e.strength} for e in self.edits]
        if self.align:
            config["align"] = {"size": ALIGN_SIZE, "largest_face": self.largest_face, "save_aligned": self.save_aligned,
                               "upsample": self.upsample,
                               "faces": "all" if self.all_faces else {"min_score": MIN_SCORE, "min_size": MIN_FACE_SIZE}}
        if self.degrade_factor is not None:
            config["degrade_factor"] = self.degrade_factor
        return config


@dataclass
class Summary:
    """Counts and timings of a run.

    Attributes:
        ok, failed, skipped: image counts.
        seconds: wall time of the loop (reading to writing; not the checkpoint load), s.
        stage_ms: summed per-stage ms over the ok images.
        failures: `(input, reason)` of each failed image.
    """

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    stage_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        """Images written per second of loop time (img/s)."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        """Multi-line human summary."""
        lines = [f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped; "
                 f"{plural(self.ok, 'image')} in {self.seconds:.1f} s = {self.images_per_s:.2f} img/s"]
        if self.ok:
            lines.append("mean ms per image: " + ", ".join(f"{s} {self.stage_ms[s] / self.ok:.1f}" for s in STAGES))
        lines += [f"failed: {reason}" if reason.startswith(src) else f"failed: {src}: {reason}"
                  for src, reason in self.failures]
        return "\n".join(lines)


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...


@dataclass
class _Ready:
    job: Job  # the item's job: the input's, or with several aligned faces `job.face(i)`
    stat: InputStat
    image: object  # PIL.Image, kept only for --couple-outputs and mixing grids (else None: a batch of photos can be large)
    x: torch.Tensor  # [1, C, 256, 256]
    read_ms: float
    aligned: object = None  # PIL.Image of the aligned crop, kept only for save_aligned
    n_items: int = 1  # items (faces) of this input, all in the same batch


def _read_items(job: Job, stat: InputStat, eng: Engine, opts: "RunOptions", keep_image: bool, t0: float) -> list[_Ready]:
    """Read one input into its items: one, or one per aligned face. Raises what reading raises."""
    image = read_input(job.source, eng.label_nc, max_pixels=opts.max_pixels)
    if not opts.align:
        x = to_input_tensor([image], eng.label_nc, names=[str(job.source)], degrade_factor=opts.degrade_factor)
        return [_Ready(job, stat, image if keep_image else None, x, _ms(t0))]
    from .align import align_image

    faces = align_image(image, name=str(job.source), largest_face=opts.largest_face,
                        output_size=ALIGN_SIZE, transform_size=ALIGN_SIZE, upsample=opts.upsample,
                        all_faces=opts.all_faces)
    items = []
    for i, (_, crop) in enumerate(faces):
        x = to_input_tensor([crop], eng.label_nc, names=[str(job.source)], degrade_factor=opts.degrade_factor)
        items.append(_Ready(job if len(faces) == 1 else job.face(i), stat, crop if keep_image else None, x, 0.0,
                            aligned=crop if opts.save_aligned else None, n_items=len(faces)))
    for r in items:
        r.read_ms = _ms(t0) / len(items)
    return items


def run_jobs(eng: Engine, jobs: Sequence[Job], opts: RunOptions, manifest: Manifest,
             progress: Progress | None = None) -> Summary:
    """Invert every job's image, writing outputs and one manifest record per job.

    Per batch: every item is read and converted on its own (a bad file is recorded "failed" and
    the others go on), the good ones go through the model together, then each is written
    atomically. An item whose latents or images hold NaN/Inf is recorded "failed" and nothing of
    it is written; an output path outside `opts.out_dir` or onto an input fails its item too. Jobs
    the manifest marks done are counted "skipped" without a new record (the manifest stays
    proportional to the inputs). The last partial batch runs.
    With `opts.edits` the encoder's latents are edited before synthesis; with `opts.n_outputs`
    K > 0 each input is also mixed with the K mapped z vectors and those K images are rendered
    (in chunks of `opts.batch_size`), written, and shown in a grid (see the module docstring).

    Args:
        eng: a loaded `Engine`.
        jobs: from `plan_jobs`.
        opts: output options; `opts.out_dir` must be `manifest.out_dir`.
        manifest: an open `Manifest` (`with Manifest(...)`).
        progress: anything with `update(n)` (a tqdm bar), advanced once per job.

    Returns:
        The run's `Summary`.

    Raises:
        CheckpointError: the checkpoint's label_nc and input_nc disagree (no input can fit it), or
            its mapping network cannot be read (mixing).
        UsageError: two inputs would write the same file; a bad latent mask or alpha; a
            backend without a mapping network (mixing).
        OSError: the manifest cannot be written.
    """
    if input_channels(eng.label_nc) != eng.input_nc:
        raise CheckpointError(
            f"{eng.checkpoint}: its opts say label_nc={eng.label_nc}, which means {input_channels(eng.label_nc)}-channel "
            f"inputs, but its encoder takes input_nc={eng.input_nc}; the checkpoint's opts are inconsistent"
        )
    if opts.align and eng.label_nc != 0:
        raise UsageError(f"--align aligns face photos; this checkpoint takes label_nc={eng.label_nc} inputs "
                         "(sketch or segmentation), which are not photos")
    if (opts.largest_face or opts.save_aligned or opts.all_faces) and not opts.align:
        raise UsageError("--largest-face, --all-faces and --save-aligned need --align")
    check_output_names(jobs, opts)
    inputs = file_ids([job.source for job in jobs])  # checked again before each write (faces' names are new)
    if opts.n_outputs:  # before any input: a bad mask or a backend without a mapping fails the run, not each input
        mask = opts.mixing_mask(eng)
        w_inject = eng.mapping(torch.from_numpy(mixing_z(opts.seed, opts.n_outputs)))  # [K, 512]
        mix_with_w(torch.zeros(1, eng.n_styles, 512, device=w_inject.device), w_inject[:1], mask, opts.mix_alpha)
    keep_image = opts.couple_outputs or opts.n_outputs > 0
    summary = Summary()
    t_start = time.perf_counter()

    def fail(job: Job, stat: InputStat, reason: str, timings: dict) -> None:
        manifest.append(stat, "failed", error=reason, timings_ms=timings)
        summary.failed += 1
        summary.failures.append((str(job.source), reason))
        if progress is not None:
            progress.update(1)

    todo = []
    for job in jobs:
        stat = InputStat.of(job.source)
        if manifest.done(stat) is not None:  # no record: a no-op rerun leaves the manifest as it was
            summary.skipped += 1
            if progress is not None:
                progress.update(1)
        else:
            todo.append((job, stat))

    for start in range(0, len(todo), opts.batch_size):
        ready: list[_Ready] = []
        for job, stat in todo[start:start + opts.batch_size]:
            t0 = time.perf_counter()
            try:
                ready += _read_items(job, stat, eng, opts, keep_image, t0)
            except PSPError as e:  # NoFaceError included: no output for this input (see engine.align.main)
                fail(job, stat, str(e), {"read": _ms(t0)})
            except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the run; recorded
                fail(job, stat, f"{job.source}: unexpected {type(e).__name__} while reading: {e}", {"read": _ms(t0)})
        if not ready:
            continue

        x = torch.cat([r.x for r in ready])  # [B, C, 256, 256]
        try:
            t0 = time.perf_counter()
            w_plus = apply_edits(eng.encode(x), opts.edits)  # [B, n_styles, 512]
            _sync(eng)
            encode_ms = _ms(t0) / len(ready)
            t0 = time.perf_counter()
            img = eng.synthesize(w_plus, resize=opts.resize_outputs)  # [B, 3, R, R]
            if opts.n_outputs:
                w_mixed = mix_with_w(w_plus, w_inject, mask, opts.mix_alpha).flatten(0, 1)  # [B*K, n_styles, 512]
                mix_img = torch.cat([eng.synthesize(w_mixed[j : j + opts.batch_size], resize=opts.resize_outputs)
                                     for j in range(0, w_mixed.shape[0], opts.batch_size)])  # [B*K, 3, R, R]
            _sync(eng)
            synth_ms = _ms(t0) / len(ready)
        except RuntimeError as e:  # e.g. out of memory: every image of this batch fails, the run goes on
            for r in ready:
                if r.job.source not in {q.job.source for q in ready[:ready.index(r)]}:  # once per input
                    fail(r.job, r.stat, f"model failed on this batch: {type(e).__name__}: {e}", {"read": r.read_ms})
            continue
        bad = non_finite(len(ready), latents=w_plus, image=img,
                          **({"mixed latents": w_mixed, "mixed images": mix_img} if opts.n_outputs else {}))
        if bad:  # zero them so the conversions below stay quiet; those items are not written
            w_plus, img = w_plus.nan_to_num(0.0, 0.0, 0.0), img.nan_to_num(0.0, 0.0, 0.0)
            if opts.n_outputs:
                w_mixed, mix_img = w_mixed.nan_to_num(0.0, 0.0, 0.0), mix_img.nan_to_num(0.0, 0.0, 0.0)
        out_u8 = tensor_to_uint8(img)  # [B, R, R, 3]
        latents = w_plus.to("cpu", torch.float32).numpy()  # [B, n_styles, 512]
        if opts.n_outputs:
            k = opts.n_outputs
            mix_u8 = tensor_to_uint8(mix_img).reshape(len(ready), k, *out_u8.shape[1:])  # [B, K, R, R, 3]
            mix_latents = w_mixed.to("cpu", torch.float32).numpy().reshape(len(ready), k, *latents.shape[1:])

        written: dict[Path, list[Path]] = {}  # input -> outputs of its items written so far
        for i, r in enumerate(ready):
            t0 = time.perf_counter()
            paths = r.job.outputs(opts.out_dir, opts.save_latents, opts.couple_outputs, opts.n_outputs,
                                  opts.save_aligned)
            if r.job.source in written and written[r.job.source] is None:
                continue  # an earlier face of this input failed to write: the input is recorded failed
            harm = bad.get(i) or next(filter(None, (unsafe_output(p, opts.out_dir, inputs) for p in paths.values())),
                                      None)
            if harm is not None:
                written[r.job.source] = None
                fail(r.job, r.stat, f"{r.job.source}: {harm}; nothing written",
                     {"read": r.read_ms, "encode": encode_ms, "synthesize": synth_ms})
                continue
            try:
                if "aligned" in paths:
                    atomic_write_image(paths["aligned"], np.asarray(r.aligned.convert("RGB")))
                if "latent" in paths:
                    atomic_write_npy(paths["latent"], latents[i])
                if "coupled" in paths:
                    atomic_write_image(paths["coupled"], couple(display_rgb(r.image, eng.label_nc), out_u8[i]))
                for k in range(opts.n_outputs):
                    atomic_write_image(paths[f"mix{k}"], mix_u8[i, k])
                    if f"mix{k}_latent" in paths:
                        atomic_write_npy(paths[f"mix{k}_latent"], mix_latents[i, k])
                if "grid" in paths:
                    row = strip([display_rgb(r.image, eng.label_nc), out_u8[i], *mix_u8[i]], height=out_u8.shape[1])
                    atomic_write_image(paths["grid"], fit_jpeg(row))
                atomic_write_image(paths["image"], out_u8[i])
            except (OSError, ValueError) as e:
                written[r.job.source] = None
                fail(r.job, r.stat, f"{paths['image']}: cannot write ({type(e).__name__}: {e})",
                     {"read": r.read_ms, "encode": encode_ms, "synthesize": synth_ms})
                continue
            outs = written.setdefault(r.job.source, [])
            outs += [Path(os.path.abspath(p)) for p in paths.values()]
            if len(outs) < r.n_items * len(paths):
                continue  # more faces of this input to write; one record per input once all are
            n = r.n_items
            timings = {"read": r.read_ms * n, "encode": encode_ms * n, "synthesize": synth_ms * n, "write": _ms(t0) * n}
            manifest.append(r.stat, "ok", outputs=outs, timings_ms=timings)
            summary.ok += 1
            for s in STAGES:
                summary.stage_ms[s] += timings[s]
            if progress is not None:
                progress.update(1)

    summary.seconds = time.perf_counter() - t_start
    return summary


def non_finite(n: int, **tensors: torch.Tensor) -> dict[int, str]:
    """`{item: reason}` for the items whose tensors hold NaN or Inf.

    Args:
        n: items in the batch.
        tensors: name -> tensor whose first dimension is `n` items, or `n * K` (K rows per item,
            as the mixes are), any other shape.

    Returns:
        For each bad item, one reason naming what was not finite and the likely causes.
    """
    bad: dict[int, str] = {}
    for name, t in tensors.items():
        finite = torch.isfinite(t.detach()).reshape(n, -1).all(1).cpu()  # [n]
        for i in (~finite).nonzero().flatten().tolist():
            bad.setdefault(i, f"the model produced NaN/Inf {name} (the checkpoint's weights or an --edit overflow "
                              "float32)")
    return bad


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _sync(eng: Engine) -> None:
    if eng.device.type == "cuda":
        torch.cuda.synchronize(eng.device)

