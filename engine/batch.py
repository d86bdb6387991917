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

import contextlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from reference.plumbing.cli import plural
from reference.plumbing.digests import checkpoint_identity
from reference.plumbing.errors import CheckpointError, PSPError, UsageError
from reference.images import (MAX_PIXELS, atomic_write_image, atomic_write_npy, couple, display_rgb, input_channels,
                              read_input, tensor_to_uint8, to_input_tensor)

from .align import DEFAULT_UPSAMPLE, MIN_FACE_SIZE, MIN_SCORE
from .api import Engine
from .inputs import Job, file_ids, unsafe_output
from .latents import Edit, apply_edits, default_latent_mask, fit_jpeg, mix_with_w, mixing_z, strip
from .manifest import InputStat, Manifest, input_digest

STAGES = ("read", "encode", "synthesize", "write")
QUEUE_DEPTH = 2  # batches: how far reading may run ahead of the model, and the model ahead of writing
ALIGN_SIZE = 1024  # px: aligned crop side (and quad-warp size) for --align; the encoder resizes it to 256


# ------------------------------------------------------------------------------------------------
# The run loop


@dataclass
class RunOptions:
    """Output options of a batch run (all but batch_size, max_pixels, overwrite and queue_depth are in the
    fingerprint)."""

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
    overwrite: bool = False  # replace outputs made from another input (engine.manifest, "Provenance")
    queue_depth: int = QUEUE_DEPTH  # batches each bounded queue of run_jobs holds; 0: no threads, one stage at a time

    def names(self, job: Job) -> list[str]:
        """The output names `job` would write, relative POSIX, the main image first: its own outputs
        and, with align, those of its first face (`<base>_face0.*`, the names of a photo with
        several faces; later faces are not listed). What `Manifest.done` and `Manifest.conflict`
        look up before the input is read."""
        jobs = [job, job.face(0)] if self.align else [job]
        paths = [j.outputs(self.out_dir, self.save_latents, self.couple_outputs, self.n_outputs, self.save_aligned)
                 for j in jobs]
        ordered = [ps["image"] for ps in paths] + [p for ps in paths for k, p in ps.items() if k != "image"]
        return [Path(os.path.relpath(p, self.out_dir)).as_posix() for p in ordered]

    def mixing_mask(self, eng: Engine) -> list[int]:
        """The style indices mixed: `latent_mask`, or the fine styles 8..n_styles-1."""
        return list(self.latent_mask) if self.latent_mask is not None else default_latent_mask(eng.n_styles)

    def config(self, eng: Engine) -> dict:
        """The manifest config: what determines the output files (see `engine.manifest.fingerprint`).

        Mixing and editing keys appear only when used, so runs without them keep the fingerprint
        they had before these options existed. Edits are identified by the SHA-256 of each
        direction file and their strengths, in order; int8 runs by their calibration set's identity
        and quantization recipe (`export.quantize`)."""
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
        if eng.precision == "int8":  # the quantized graphs depend on the calibration set and the recipe
            from export.quantize import DEFAULT_RECIPE, Calibration

            config["int8"] = {"calibration": Calibration(getattr(eng, "calibration", None)).identity(), "recipe": DEFAULT_RECIPE}
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
        lines = [f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped"
                 + (f"; {plural(self.ok, 'image')} in {self.seconds:.1f} s = {self.images_per_s:.2f} img/s"
                    if self.ok or self.failed else "")]
        if self.ok:
            lines.append("mean ms per image: " + ", ".join(f"{s} {self.stage_ms[s] / self.ok:.1f}" for s in STAGES))
        lines += [f"failed: {reason}" if reason.startswith(src) else f"failed: {src}: {reason}"
                  for src, reason in self.failures]
        return "\n".join(lines)


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...


@dataclass
class _Ready:
    """One item read and converted, waiting for the model: an input, or one aligned face of it."""

    job: Job  # the item's job: the input's, or with several aligned faces `job.face(i)`
    stat: InputStat
    display: np.ndarray | None  # [H, W, 3] uint8 input as shown (display_rgb), kept only for --couple-outputs and grids
    x: torch.Tensor  # [1, C, 256, 256]
    read_ms: float
    aligned: np.ndarray | None = None  # [H, W, 3] uint8 aligned crop, kept only for save_aligned
    n_items: int = 1  # items (faces) of this input


def check_output_names(jobs: Sequence[Job], opts: RunOptions) -> None:
    """Refuse a run that would write outside `opts.out_dir`, over an input file, or twice to the
    same file (case-insensitively), e.g. with style mixing `a.jpg`'s `a_mix0.png` and the inversion
    of an input `a_mix0.jpg`. Cheap (a stat per output): call it before the model loads.

    Raises:
        UsageError: naming the input(s), the file and the fix.
    """
    inputs = file_ids([job.source for job in jobs])
    seen: dict[str, int] = {}
    for i, job in enumerate(jobs):
        for path in job.outputs(opts.out_dir, opts.save_latents, opts.couple_outputs, opts.n_outputs,
                                opts.save_aligned).values():
            harm = unsafe_output(path, opts.out_dir, inputs)
            if harm is not None:
                raise UsageError(f"{job.source}: its output {harm}; choose an --output folder that holds no input")
            j = seen.setdefault(str(path).casefold(), i)
            if j != i:
                raise UsageError(f"{job.source} and {jobs[j].source} would both write {path}; rename one of them "
                                 "or run them into different --output folders")


def read_items(job: Job, stat: InputStat, label_nc: int, opts: "RunOptions", t0: float,
               data: bytes | None = None) -> list[_Ready]:
    """Read one input into its items, ready for the model: one, or one per aligned face.

    The CPU stage of a run (no model needed: the distributed run calls it in Ray tasks).

    Args:
        job, stat: the input and its stat.
        label_nc: the checkpoint's label_nc (0 photo, 1 sketch, >1 segmentation classes).
        opts: the run's options (max_pixels, align, largest_face, save_aligned, degrade_factor;
            couple_outputs / n_outputs decide whether the displayed input is kept).
        t0: `time.perf_counter()` when reading began (read_ms counts from it).
        data: the input's bytes when the caller fetched them (an input behind a URI,
            `engine.cluster.remote.RemoteFile`), decoded as the file would be; None: read `job.source`.

    Returns:
        The items, each with x `[1, C, 256, 256]` float32.

    Raises:
        PSPError: an unreadable or unsuitable file (named), or with align a photo without a face.
    """
    keep_image = opts.couple_outputs or opts.n_outputs > 0
    image = read_input(job.source, label_nc, max_pixels=opts.max_pixels, data=data)
    if not opts.align:
        x = to_input_tensor([image], label_nc, names=[str(job.source)], degrade_factor=opts.degrade_factor)
        return [_Ready(job, stat, display_rgb(image, label_nc) if keep_image else None, x, _ms(t0))]
    from .align import align_image

    faces = align_image(image, name=str(job.source), largest_face=opts.largest_face,
                        output_size=ALIGN_SIZE, transform_size=ALIGN_SIZE, upsample=opts.upsample,
                        all_faces=opts.all_faces)
    items = []
    for i, (_, crop) in enumerate(faces):
        x = to_input_tensor([crop], label_nc, names=[str(job.source)], degrade_factor=opts.degrade_factor)
        items.append(_Ready(job if len(faces) == 1 else job.face(i), stat,
                            display_rgb(crop, label_nc) if keep_image else None, x, 0.0,
                            aligned=np.asarray(crop.convert("RGB")) if opts.save_aligned else None,
                            n_items=len(faces)))
    for r in items:
        r.read_ms = _ms(t0) / len(items)
    return items


def read_error(job: Job, e: Exception) -> str:
    """The "failed" reason for an exception `read_items` raised on `job`."""
    if isinstance(e, PSPError):
        return str(e)
    return f"{job.source}: unexpected {type(e).__name__} while reading: {e}"


@dataclass
class Mixing:
    """Style mixing resolved for one engine: the mixed styles and the mapped random latents."""

    mask: list[int]
    w_inject: torch.Tensor  # [K, 512] float32 on the engine's device


def prepare_run(eng: Engine, jobs: Sequence[Job], opts: RunOptions) -> Mixing | None:
    """Check a run before any input is read, and resolve style mixing.

    Args:
        eng: a loaded `Engine`.
        jobs: from `plan_jobs` (empty to skip the output-name check, as a worker that does not
            hold the job list does).
        opts: the run's options.

    Returns:
        The `Mixing` of `opts.n_outputs` K > 0, else None.

    Raises:
        CheckpointError: the checkpoint's label_nc and input_nc disagree (no input can fit it), or
            its mapping network cannot be read (mixing).
        UsageError: two inputs would write the same file; --align on a non-photo checkpoint;
            --largest-face / --all-faces / --save-aligned without --align; a bad latent mask or alpha; a
            backend without a mapping network (mixing).
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
    if not opts.n_outputs:
        return None
    # before any input: a bad mask or a backend without a mapping fails the run, not each input
    mask = opts.mixing_mask(eng)
    w_inject = eng.mapping(torch.from_numpy(mixing_z(opts.seed, opts.n_outputs)))  # [K, 512]
    mix_with_w(torch.zeros(1, eng.n_styles, 512, device=w_inject.device), w_inject[:1], mask, opts.mix_alpha)
    return Mixing(mask, w_inject)


class NonFiniteError(Exception):
    """Rendered style mixes hold NaN/Inf (raised by `Inverted.render`; `write_item` fails the item)."""


@dataclass
class Inverted:
    """The model's results for a batch of items, on the CPU, ready to write.

    The style mixes are not rendered here: `write_item` renders each item's K mixes in chunks of
    `RunOptions.batch_size` with `render` and writes each chunk before the next is made, so a run
    holds one item's mixes at most (as uint8, for its grid), never the batch's."""

    out_u8: np.ndarray  # [B, R, R, 3] uint8 inversions
    latents: np.ndarray  # [B, n_styles, 512] float32 (edited)
    mix_latents: np.ndarray | None  # [B, K, n_styles, 512] float32 mixed latents, or None
    encode_ms: float  # per item
    synth_ms: float  # per item, the inversion only
    bad: dict[int, str] = field(default_factory=dict)  # items with NaN/Inf (zeroed here; never written)
    render: Callable[[np.ndarray], np.ndarray] | None = None  # [k, n_styles, 512] float32 -> [k, R, R, 3] uint8
    mix_ms: dict[int, float] = field(default_factory=dict)  # item -> ms spent rendering its mixes (write_item)


def invert_items(eng: Engine, x: torch.Tensor, opts: RunOptions, mixing: Mixing | None) -> Inverted:
    """The model stage of a run: encode, edit, synthesize one batch, and mix its latents (the mixes
    are rendered by `write_item`, see `Inverted`).

    Args:
        eng: a loaded `Engine`.
        x: `[B, C, 256, 256]` float32, the items' inputs concatenated.
        opts: edits, resize_outputs, n_outputs, mix_alpha.
        mixing: from `prepare_run` (None without mixing).

    Returns:
        The batch's `Inverted`; items whose latents, mixed latents or images hold NaN/Inf are in `bad`.

    Raises:
        RuntimeError: the model failed (e.g. out of memory).
    """
    n = x.shape[0]
    t0 = time.perf_counter()
    w_plus = apply_edits(eng.encode(x), opts.edits)  # [B, n_styles, 512]
    _sync(eng)
    encode_ms = _ms(t0) / n
    t0 = time.perf_counter()
    img = eng.synthesize(w_plus, resize=opts.resize_outputs)  # [B, 3, R, R]
    if mixing is not None:
        w_mixed = mix_with_w(w_plus, mixing.w_inject, mixing.mask, opts.mix_alpha).flatten(0, 1)  # [B*K, n_styles, 512]
    _sync(eng)
    synth_ms = _ms(t0) / n
    bad = non_finite(n, latents=w_plus, image=img, **({"mixed latents": w_mixed} if mixing is not None else {}))
    if bad:  # zero them so the conversions below stay quiet; those items are not written
        w_plus, img = w_plus.nan_to_num(0.0, 0.0, 0.0), img.nan_to_num(0.0, 0.0, 0.0)
        if mixing is not None:
            w_mixed = w_mixed.nan_to_num(0.0, 0.0, 0.0)
    out_u8 = tensor_to_uint8(img)  # [B, R, R, 3]
    latents = w_plus.to("cpu", torch.float32).numpy()  # [B, n_styles, 512]
    if mixing is None:
        return Inverted(out_u8, latents, None, encode_ms, synth_ms, bad)
    mix_latents = w_mixed.to("cpu", torch.float32).numpy().reshape(n, opts.n_outputs, *latents.shape[1:])

    def render(w: np.ndarray) -> np.ndarray:
        """Mixed latents `[k, n_styles, 512]` -> images `[k, R, R, 3]` uint8 (ValueError if not finite)."""
        mix_img = eng.synthesize(torch.from_numpy(np.ascontiguousarray(w)).to(w_plus.device), resize=opts.resize_outputs)
        if not bool(torch.isfinite(mix_img).all()):
            raise NonFiniteError("the model produced NaN/Inf mixed images (the checkpoint's weights or an --edit "
                                 "overflow float32)")
        return tensor_to_uint8(mix_img)

    return Inverted(out_u8, latents, mix_latents, encode_ms, synth_ms, bad, render)


def write_item(r: _Ready, i: int, inv: Inverted, opts: RunOptions,
               inputs: dict[tuple[int, int], str]) -> tuple[dict[str, Path] | None, str | None]:
    """Write item `r` (row `i` of `inv`): every output file atomically, the .png last.

    The K style mixes are rendered here (`Inverted.render`) in chunks of `opts.batch_size`, each
    chunk written before the next is rendered; their time is added to `inv.mix_ms[i]`. If anything
    fails, the files this call wrote are removed again, so a failed item leaves nothing.

    Args:
        r, i, inv: the item and its row of the batch's results.
        opts: the run's options.
        inputs: `engine.inputs.file_ids` of the run's inputs (an output never overwrites one).

    Returns:
        `(paths, None)`: the files written, by kind (see `Job.outputs`); or `(None, reason)` when
        nothing was written: the model produced NaN/Inf for it, an output path is outside
        `opts.out_dir` or onto an input, the mixes' rendering failed, or a file cannot be written.
    """
    paths = r.job.outputs(opts.out_dir, opts.save_latents, opts.couple_outputs, opts.n_outputs, opts.save_aligned)
    harm = inv.bad.get(i) or next(filter(None, (unsafe_output(p, opts.out_dir, inputs) for p in paths.values())), None)
    if harm is not None:
        return None, f"{r.job.source}: {harm}; nothing written"
    written: list[Path] = []

    def write(kind: str, save, array: np.ndarray) -> None:
        save(paths[kind], array)
        written.append(paths[kind])

    try:
        if "aligned" in paths:
            write("aligned", atomic_write_image, r.aligned)
        if "latent" in paths:
            write("latent", atomic_write_npy, inv.latents[i])
        if "coupled" in paths:
            write("coupled", atomic_write_image, couple(r.display, inv.out_u8[i]))
        mixes: list[np.ndarray] = []  # [R, R, 3] uint8 each, for the grid
        for k0 in range(0, opts.n_outputs, opts.batch_size):
            t0 = time.perf_counter()
            chunk = inv.render(inv.mix_latents[i, k0 : k0 + opts.batch_size])  # [k, R, R, 3]
            inv.mix_ms[i] = inv.mix_ms.get(i, 0.0) + _ms(t0)
            for k, img in enumerate(chunk, start=k0):
                write(f"mix{k}", atomic_write_image, img)
                if f"mix{k}_latent" in paths:
                    write(f"mix{k}_latent", atomic_write_npy, inv.mix_latents[i, k])
                mixes.append(img)
        if "grid" in paths:
            row = strip([r.display, inv.out_u8[i], *mixes], height=inv.out_u8.shape[1])
            write("grid", atomic_write_image, fit_jpeg(row))
        write("image", atomic_write_image, inv.out_u8[i])
    except NonFiniteError as e:
        reason = f"{r.job.source}: {e}; nothing written"
    except (OSError, ValueError) as e:
        reason = f"{paths['image']}: cannot write ({type(e).__name__}: {e})"
    except RuntimeError as e:  # the mixes' rendering, e.g. out of memory
        reason = f"{r.job.source}: model failed on its style mixes: {type(e).__name__}: {e}; nothing written"
    else:
        return paths, None
    _remove(written)
    return None, reason


def _remove(paths: Sequence[Path]) -> None:
    """Remove the files a failed item wrote (each was written whole, atomically)."""
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


class Recorder:
    """Where a run's outcomes go: one manifest record per input, the summary, the progress bar.

    The only writer of the manifest, in the single-process and the distributed run alike. An
    input with several items (aligned faces) is recorded once: "ok" when all its items are
    written, "failed" at its first failed item (later items of it are ignored).

    Args:
        manifest: an open `Manifest`.
        progress: anything with `update(n)` (a tqdm bar), advanced once per input, or None.
        opts: the run's options (output names and `overwrite`, for `todo`); None: inputs are
            matched by path only and never checked for conflicts.
    """

    def __init__(self, manifest: Manifest, progress: Progress | None = None, opts: RunOptions | None = None):
        self.manifest = manifest
        self.progress = progress
        self.opts = opts
        self.summary = Summary()
        self._written: dict[str, tuple[int, list[Path]]] = {}  # input -> (items written, outputs)
        self._closed: set[str] = set()  # inputs recorded this run
        self._stats: dict[str, InputStat] = {}  # input -> its stat as `todo` handed it out (with the digest)

    def todo(self, jobs: Sequence[Job], stat_of: Callable[[object], InputStat] = InputStat.of,
             digest_of: Callable[[object], str | None] = input_digest) -> list[tuple[Job, InputStat]]:
        """The jobs to run, with their stat (`stat_of(job.source)`: a local file's `InputStat.of`, or
        `engine.cluster.remote.input_stat` for inputs behind URIs).

        Jobs the manifest has as done (`Manifest.done`, a moved input included) are counted
        "skipped" without a new record (a no-op rerun leaves the manifest as it was). Without
        `opts.overwrite`, a job whose outputs were made from another input (`Manifest.conflict`)
        is recorded "failed" with the reason and not run. Digests are computed with
        `digest_of(job.source)` where a decision needs one, and for every local input to run (the
        manifest records it; an input behind a URI is hashed by the read stage instead).
        """
        todo = []
        for job in jobs:
            stat = stat_of(job.source)
            digest = lambda _stat, source=job.source: digest_of(source)  # noqa: E731
            names = self.opts.names(job) if self.opts is not None else ()
            if self.manifest.done(stat, names, digest) is not None:
                self.summary.skipped += 1
                self._advance()
                continue
            reason = None
            if self.opts is not None and not self.opts.overwrite:
                reason = self.manifest.conflict(stat, names, digest)
            if reason is not None:
                self.failed(job.source, stat, reason, {})
                continue
            if stat.sha256 is None:
                stat.sha256 = input_digest(job.source)
            self._stats[stat.path] = stat
            todo.append((job, stat))
        return todo

    def _stat(self, stat: InputStat) -> InputStat:
        """The stat `todo` gave out for this input (its digest), completed by `stat`'s digest if it
        has one (computed by the read stage of the distributed run)."""
        known = self._stats.get(stat.path)
        if known is None:
            return stat
        if known.sha256 is None:
            known.sha256 = stat.sha256
        return known

    def failed(self, source: Path, stat: InputStat, reason: str, timings: dict) -> None:
        """Record input `source` "failed" with `reason` (once: later calls for it are ignored)."""
        if stat.path in self._closed:
            return
        self._closed.add(stat.path)
        self.manifest.append(self._stat(stat), "failed", error=reason, timings_ms=timings)
        self.summary.failed += 1
        self.summary.failures.append((str(source), reason))
        self._advance()

    def written(self, stat: InputStat, n_items: int, outputs: Sequence[Path], timings: dict) -> None:
        """One item of an input written: `outputs` absolute; `timings` the input's per-stage ms
        (used from its last item). Records the input "ok" once all `n_items` are written."""
        if stat.path in self._closed:
            return
        count, outs = self._written.get(stat.path, (0, []))
        count, outs = count + 1, outs + list(outputs)
        if count < n_items:
            self._written[stat.path] = (count, outs)
            return
        self._written.pop(stat.path, None)
        self._closed.add(stat.path)
        self.manifest.append(self._stat(stat), "ok", outputs=outs, timings_ms=timings)
        self.summary.ok += 1
        for s in STAGES:
            self.summary.stage_ms[s] += timings[s]
        self._advance()

    def read_error(self, job: Job, stat: InputStat, e: Exception, read_ms: float) -> None:
        """Record an input that `read_items` refused "failed" (see `read_error`)."""
        self.failed(job.source, stat, read_error(job, e), {"read": read_ms})

    def closed(self, stat: InputStat) -> bool:
        """Whether `stat`'s input is already recorded in this run (e.g. an earlier face failed)."""
        return stat.path in self._closed

    def _advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)


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
    (in chunks of `opts.batch_size`, each chunk written before the next is rendered: `write_item`),
    and shown in a grid (see the module docstring). An input whose outputs were made from another
    input is recorded "failed" unless `opts.overwrite` (`Recorder.todo`).
    The stages (`read_items`, `invert_items`, `write_item`, `Recorder`) are the ones the
    distributed run (`engine.cluster.distributed`) runs on a Ray cluster.

    Pipeline (`opts.queue_depth` D > 0, the default 2): three stages run at once so that the model
    never waits for files. A reader thread reads and converts batch n+1.. while the calling thread
    runs the model on batch n, and a writer thread writes (encodes PNGs, saves latents) and records
    batch n-1..; PIL's decoders and encoders and zlib release the GIL. Two queues of D batches each
    join them, so reading runs at most D + 1 batches ahead of the model and the model at most
    D + 1 ahead of writing (memory stays bounded). The model is used by one thread at a time (the
    style mixes, rendered while writing, wait for it). D = 0 runs the stages one after another in
    the calling thread (the behaviour before the pipeline; the benchmarks' baseline).

    Manifest: the writer stage is the only one that records (`Recorder`, once the run started;
    `Recorder.todo` before it). Rows are appended in input order: first the inputs `Recorder.todo`
    fails (outputs of another input), then every input run, in the order of `jobs`, whatever
    stage it failed in; so is `Summary.failures`. A rerun skips what is recorded done.

    Interruption (KeyboardInterrupt, e.g. Ctrl-C or SIGTERM through `reference.plumbing.cli.run_cli`,
    raised in the calling thread): the reader stops, the writer finishes the input it is writing
    (its files and its record) and stops before the next, both threads are joined, then the
    interruption propagates. Batches read or inverted but not written are dropped unrecorded; every
    file is written atomically, so the folder holds whole files only, and the manifest holds
    exactly the inputs whose files are all written. A rerun does the rest. (A second interruption
    while the threads finish propagates at once; the threads are daemons and the process exits.)

    Args:
        eng: a loaded `Engine`.
        jobs: from `plan_jobs`.
        opts: output options; `opts.out_dir` must be `manifest.out_dir`.
        manifest: an open `Manifest` (`with Manifest(...)`).
        progress: anything with `update(n)` (a tqdm bar), advanced once per job.

    Returns:
        The run's `Summary`.

    Raises:
        CheckpointError, UsageError: see `prepare_run`.
        OSError: the manifest cannot be written.
        KeyboardInterrupt: see Interruption.
    """
    mixing = prepare_run(eng, jobs, opts)
    inputs = file_ids([job.source for job in jobs])  # checked again before each write (faces' names are new)
    t_start = time.perf_counter()
    rec = Recorder(manifest, progress, opts)
    todo = rec.todo(jobs)
    chunks = [todo[s:s + opts.batch_size] for s in range(0, len(todo), opts.batch_size)]
    label_nc = eng.label_nc
    model_lock = threading.Lock()  # one thread at a time in the model: the batches, and the mixes write_item renders

    def model(b: _Batch) -> _Batch:
        with model_lock:
            invert_batch(eng, b, opts, mixing)
        if b.inv is not None and b.inv.render is not None:
            render = b.inv.render

            def locked_render(w: np.ndarray) -> np.ndarray:
                with model_lock:
                    return render(w)

            b.inv.render = locked_render
        return b

    def read(chunk: list[tuple[Job, InputStat]]) -> _Batch:
        return read_batch(chunk, label_nc, opts)

    def write(b: _Batch, stop: threading.Event | None) -> None:
        write_batch(b, opts, inputs, rec, stop)

    if opts.queue_depth <= 0:
        for chunk in chunks:
            write(model(read(chunk)), None)
    else:
        run_pipeline(chunks, read, model, write, opts.queue_depth)
    rec.summary.seconds = time.perf_counter() - t_start
    return rec.summary


@dataclass
class _Batch:
    """One batch of inputs on its way through `run_jobs`' stages, its inputs in order."""

    reads: list[tuple[Job, InputStat, list[_Ready] | Exception, float]]  # per input: items or read error, read ms
    inv: Inverted | None = None  # the model's results for `ready`, row by row
    error: str | None = None  # why the model failed on the whole batch

    @property
    def ready(self) -> list[_Ready]:
        """The items read, in input order (the rows of `x` and of `inv`)."""
        return [r for _, _, items, _ in self.reads if not isinstance(items, Exception) for r in items]


def read_batch(chunk: Sequence[tuple[Job, InputStat]], label_nc: int, opts: RunOptions) -> _Batch:
    """The read stage of `run_jobs`: `read_items` for each input of `chunk`; a failure is kept with
    its input (recorded by the write stage, in input order), the others go on."""
    reads: list[tuple[Job, InputStat, list[_Ready] | Exception, float]] = []
    for job, stat in chunk:
        t0 = time.perf_counter()
        try:
            reads.append((job, stat, read_items(job, stat, label_nc, opts, t0), 0.0))
        except Exception as e:  # noqa: BLE001 - one unreadable file must not stop the run; recorded
            reads.append((job, stat, e, _ms(t0)))
    return _Batch(reads)


def invert_batch(eng: Engine, b: _Batch, opts: RunOptions, mixing: Mixing | None) -> _Batch:
    """The model stage of `run_jobs`: `invert_items` on the batch's items (x `[B, C, 256, 256]`);
    a model failure (e.g. out of memory) fails every item of this batch and the run goes on."""
    ready = b.ready
    if ready:
        try:
            b.inv = invert_items(eng, torch.cat([r.x for r in ready]), opts, mixing)
        except RuntimeError as e:
            b.error = f"model failed on this batch: {type(e).__name__}: {e}"
    return b


def write_batch(b: _Batch, opts: RunOptions, inputs: dict[tuple[int, int], str], rec: Recorder,
                stop: threading.Event | None = None) -> None:
    """The write stage of `run_jobs`: each input of the batch in order, its files written
    (`write_item`) and its outcome recorded; read and model failures are recorded here too, so
    rows follow input order. Returns early, between inputs, once `stop` is set."""
    row = 0  # the next item's row in b.inv
    for job, stat, items, read_ms in b.reads:
        if stop is not None and stop.is_set():
            return
        if isinstance(items, Exception):
            rec.read_error(job, stat, items, read_ms)
            continue
        for r in items:
            i, row = row, row + 1
            if b.error is not None:
                rec.failed(r.job.source, r.stat, b.error, {"read": r.read_ms})
                continue
            if rec.closed(r.stat):
                continue  # an earlier face of this input failed: the input is recorded failed
            inv = b.inv
            t0 = time.perf_counter()
            paths, reason = write_item(r, i, inv, opts, inputs)
            if paths is None:
                rec.failed(r.job.source, r.stat, reason,
                           {"read": r.read_ms, "encode": inv.encode_ms, "synthesize": inv.synth_ms})
                continue
            n = r.n_items
            mix_ms = inv.mix_ms.get(i, 0.0)  # rendered while writing: counted as synthesis
            rec.written(r.stat, n, [Path(os.path.abspath(p)) for p in paths.values()],
                        {"read": r.read_ms * n, "encode": inv.encode_ms * n, "synthesize": (inv.synth_ms + mix_ms) * n,
                         "write": (_ms(t0) - mix_ms) * n})


_END = object()  # the end of a pipeline queue


def run_pipeline(chunks: Sequence, read: Callable, model: Callable, write: Callable, depth: int) -> None:
    """Run `write(model(read(chunk)), stop)` for every chunk in order, the three stages at once: `read`
    in a reader thread, `model` in the calling thread, `write` in a writer thread, joined by two
    queues of `depth` items each (see `run_jobs`, "Pipeline" and "Interruption").

    Args:
        chunks: the work, in order.
        read: chunk -> batch (must not raise for one bad input: keep failures in the batch).
        model: batch -> batch.
        write: `(batch, stop)`: writes and records; returns early, between inputs, once the
            `threading.Event` `stop` is set.
        depth: items each queue holds, >= 1.

    Raises:
        KeyboardInterrupt, or what a stage raised (the first): after the threads are joined.
    """
    stop = threading.Event()
    read_q: queue.Queue = queue.Queue(maxsize=depth)
    write_q: queue.Queue = queue.Queue(maxsize=depth)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for chunk in chunks:
                if stop.is_set() or not _put(read_q, read(chunk), stop):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            errors.append(e)
            stop.set()
        finally:
            _put(read_q, _END, stop)

    def writer() -> None:
        try:
            while (b := _get(write_q, stop)) is not _END:
                write(b, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=reader, name="psp-read", daemon=True),
               threading.Thread(target=writer, name="psp-write", daemon=True)]
    for t in threads:
        t.start()
    try:
        while (b := _get(read_q, stop)) is not _END:
            if not _put(write_q, model(b), stop):
                break
        _put(write_q, _END, stop)
        for t in threads:
            t.join()
    except BaseException:
        stop.set()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """`q.put(item)`, waiting while `q` is full; False (not put) once `stop` is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _get(q: queue.Queue, stop: threading.Event) -> object:
    """`q.get()`, waiting while `q` is empty; `_END` once `stop` is set."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            pass
    return _END


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

