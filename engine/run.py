"""`python -m engine.run`: invert a folder of images with a pSp checkpoint.

Source: the command line of official pSp `scripts/inference.py` (`--checkpoint_path`,
`--data_path`, `--exp_dir`, `--test_batch_size`, `--resize_outputs`, `--couple_outputs`),
reshaped; the work is done by `engine.batch`. Style mixing (`--n-outputs`, `--latent-mask`,
`--mix-alpha`, `--seed`) follows official `scripts/style_mixing.py` / `inference.py --latent_mask`,
deterministically; `--edit` adds linear directions (see `engine.latents`).

Exit codes: 0 all inputs ok or skipped; 1 at least one input failed (see the manifest);
2 usage or checkpoint error, or another run holds the output folder (one line on stderr, no
traceback); 130 interrupted, by Ctrl-C or SIGTERM (rerun to resume).

Safety: options, inputs and output names are checked before the checkpoint loads (an output
folder that is an input folder, an output that would overwrite an input or land outside
`--output`: see `engine.inputs`); the output folder is then locked for the run and cleared of
the temp files an interrupted run left (`claim_output_folder`).

URIs (`s3://`, `gs://`, `file://`, ... for `--input` and `--output`) are read and written by the
distributed run (`--ray`, see `engine.cluster.remote`); without `--ray` they are refused with the fix
(`--ray local` runs the same pipeline on this machine).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from reference.plumbing.cli import ArgumentParser, argparse_type, int_at_least, plural, run_cli, say
from reference.plumbing.errors import CheckpointError
from reference.plumbing.files import cache_dir, folder_lock, sweep_temp_files
from reference.description import describe_opts
from reference.images import MAX_PIXELS
from reference.psp import psp_opts
from reference.sr import bicubic_kernel, parse_factors

from export.backends import BACKENDS, PRECISIONS
from export.backends import help_text as backend_help

from . import api, demo
from . import latents as lt
from .cluster import remote
from .align import add_face_arguments, check_setup as check_align_setup, upsample as align_upsample
from .batch import ALIGN_SIZE, RunOptions, Summary, check_output_names, run_jobs
from .inputs import find_inputs, plan_jobs
from .manifest import MANIFEST_NAME, Manifest

CACHE_TEMP_AGE_S = 3600  # s: a cache temp file older than this is a killed process's leftover (exports take minutes)

_positive_int = int_at_least(1)


def _unit_float(text: str) -> float:
    return lt.check_alpha(float(text))


def _resize_factor(text: str) -> int | str:
    """`--resize-factor`: 'input' or a degradation factor (range-checked by `reference.sr.bicubic_kernel`)."""
    if text == "input":
        return text
    factor = int(text)
    bicubic_kernel(factor)  # ValueError out of range
    return factor


def _n_outputs(text: str) -> int:
    """`--n-outputs` (argparse `type=`): an integer in [1, `engine.latents.MAX_N_OUTPUTS`]."""
    value = _positive_int(text)
    if value > lt.MAX_N_OUTPUTS:
        raise argparse.ArgumentTypeError(
            f"expected 1 to {lt.MAX_N_OUTPUTS} mixes per input, got {value} (each input's grid holds its mixes in one "
            "row); for more, run again with another --seed")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise ValueError(text)
    return value


edit_arg = argparse_type(lt.parse_edit, "DIR.npy:STRENGTH")  # shared with engine.synthesize
EDIT_HELP = ("add STRENGTH x the direction in DIR.npy to the latents before synthesis (repeatable; the sum "
             "is added). DIR.npy: float [512] or [1, 512] (a W direction, every style) or [n_styles, 512] "
             "(a W+ direction, per style); STRENGTH a number, default 1 (e.g. smile.npy:1.5, age.npy:-2)")


def add_edit_argument(p: argparse.ArgumentParser) -> None:
    """`--edit DIR.npy[:STRENGTH]` (repeatable), as engine.run and engine.synthesize take it."""
    p.add_argument("--edit", type=edit_arg, action="append", default=[], metavar="DIR.npy:STRENGTH",
                   help=EDIT_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = ArgumentParser(
        prog="python -m engine.run",
        description="Encode images into StyleGAN2 W+ with a pSp checkpoint and re-synthesize them. "
                    "Outputs mirror the inputs' folders under --output as lossless PNG; a manifest "
                    f"({MANIFEST_NAME}) records each input, and a rerun skips inputs already done.",
        epilog="Exit codes: 0 all ok or skipped, 1 some inputs failed (reasons in the manifest), "
               "2 usage or checkpoint error.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="image files, folders (searched recursively) or glob patterns (quote them); with --ray "
                        "also URIs of a folder/prefix or a file (s3://, gs://, hdfs://, file://, any fsspec scheme)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="output folder (created if missing); with --ray also a URI (s3://bucket/out, ...)")
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="official pSp checkpoint, e.g. psp_ffhq_encode.pt (default: a built-in DEMO "
                        "checkpoint with random weights, whose outputs are not faces)")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                   help="images per forward pass (default 1; the last partial batch is run)")
    add_engine_arguments(p)
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that the manifest says were made from ANOTHER input (e.g. a/x.png run "
                        "into --output, then b/x.png into the same folder); without it such an input fails with a "
                        "message naming both files and its outputs are kept. A moved folder of the same files is "
                        "the same input and needs no --overwrite")
    p.add_argument("--max-pixels", type=_positive_int, default=MAX_PIXELS, metavar="N",
                   help=f"reject images with more pixels than this, before decoding (default {MAX_PIXELS:,})")
    mixing = p.add_argument_group(
        "style mixing (multi-modal synthesis, official scripts/style_mixing.py; deterministic: stored noise, seeded z)")
    mixing.add_argument("--n-outputs", type=_n_outputs, default=None, metavar="K",
                        help="also write K style-mixed outputs per input, <name>_mix0.png ... (and <name>_mix<k>.npy "
                             "with --save-latents), plus <name>_grid.jpg: the input, the inversion, then the K mixes. "
                             f"Output k of every input mixes in the same z_k. K is 1 to {lt.MAX_N_OUTPUTS}; mixes are "
                             "written as they are rendered (--batch-size at a time)")
    mixing.add_argument("--latent-mask", default=None, metavar="SPEC",
                        help="styles taken from the random latent, e.g. 8-17 or 8,9,12-13 (default: the fine styles "
                             "8..n_styles-1, i.e. 8-13 at 256 px, 8-17 at 1024 as the official docs use)")
    mixing.add_argument("--mix-alpha", type=argparse_type(_unit_float, "a number in [0, 1]"), default=None,
                        metavar="A", help="blend alpha*random + (1-alpha)*input on the masked styles "
                                          "(default: replace them, as official)")
    mixing.add_argument("--seed", type=argparse_type(_seed, "an integer in [0, 2**32)"), default=None, metavar="S",
                        help="seed of the random latents: z = RandomState(S).randn(K, 512) (default 0)")
    editing = p.add_argument_group(
        "latent editing", "edits apply to the inverted latents before synthesis and before mixing: <name>.png is "
                          "the edited image and --save-latents stores the edited latents")
    add_edit_argument(editing)
    align = p.add_argument_group(
        "face alignment", "FFHQ alignment from dlib's 68 landmarks before encoding (pip install -e '.[align]'; the "
                          "landmark model is for non-commercial use only, see README)")
    align.add_argument("--align", action="store_true",
                       help=f"align each photo first ({ALIGN_SIZE} px crops, resized to 256 for the encoder); a photo "
                            "with several faces gives <name>_face0, <name>_face1, ... (most confident first); a photo "
                            "without a face is recorded as failed with the reason (exit code 1, as engine.align)")
    add_face_arguments(align)
    align.add_argument("--save-aligned", action="store_true", help="with --align: also keep each crop as <name>_aligned.png")
    sr = p.add_argument_group("super resolution")
    sr.add_argument("--resize-factor", default=None, metavar="F|input",
                    type=argparse_type(_resize_factor, "a positive integer factor or 'input'"),
                    help="super-resolution checkpoints: degrade each input as the official transform does (bicubic "
                         "downsampling by F, then back to 256) before encoding; 'input' for inputs that are already "
                         "low-resolution (only resized to 256). Default: the checkpoint's training factor when it has "
                         "exactly one; a multi-factor checkpoint needs the option (official code draws one at random)")
    cluster = p.add_argument_group(
        "cluster (Ray Data; pip install -e '.[serve]')",
        "same options, outputs, manifest and exit codes; inputs and outputs must be what every node can reach: "
        "paths of a shared filesystem, or URIs")
    cluster.add_argument("--ray", metavar="ADDRESS", default=None,
                         help="run on a Ray cluster: 'local' starts one on this machine's CPUs; else a Ray "
                              "address ('auto', 'ray://host:10001'). --input and --output may then be URIs of "
                              "pyarrow.fs (file://, s3://, gs://, hdfs://, abfs://) or of an installed fsspec "
                              "package (pip install s3fs, gcsfs, ...): inputs are listed here and read by the "
                              "cluster, outputs are uploaded atomically, and the manifest is copied to "
                              "<output URI>/manifest.jsonl (a rerun resumes from it)")
    cluster.add_argument("--num-actors", type=_positive_int, default=None, metavar="N",
                         help="model actors, each loading the engine once (default: one per --gpus-per-actor "
                              "share of the cluster's GPUs, else the cluster's CPUs minus one)")
    cluster.add_argument("--cpus-per-actor", type=_positive_int, default=1, metavar="N",
                         help="CPUs each model actor reserves and runs torch on (default 1)")
    cluster.add_argument("--gpus-per-actor", type=argparse_type(_non_negative_float, "a number >= 0"),
                         default=0.0, metavar="G", help="GPUs each model actor reserves (default 0)")
    return p


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return value


def resolve_resize_factor(arg: str | int | None, eng: api.Engine, say=lambda msg: None) -> int | None:
    """The degradation factor of `--resize-factor` for this checkpoint (None: no degradation).

    Source: official `configs/transforms_config.py::SuperResTransforms` (`resize_factors`, default
    "1,2,4,8,16,32"; a factor is drawn at random per image there).

    Raises:
        UsageError: the option on a checkpoint that is not super-resolution; a bad value; a
            multi-factor super-resolution checkpoint without the option.
    """
    dataset_type = str(eng.opts.get("dataset_type", ""))
    is_sr = "super_resolution" in dataset_type
    factors = parse_factors(eng.opts.get("resize_factors")) if is_sr else []
    if arg is None:
        if not is_sr:
            return None
        if len(factors) == 1:
            return factors[0]
        trained = ",".join(map(str, factors)) or "1,2,4,8,16,32 (the official default)"
        raise api.UsageError(
            f"{eng.checkpoint} is a super-resolution checkpoint trained on factors {trained}: pass --resize-factor F "
            "to degrade the inputs by F as in training, or --resize-factor input if they are already low-resolution")
    if not is_sr:
        raise api.UsageError(f"--resize-factor is for super-resolution checkpoints (dataset_type "
                             f"celebs_super_resolution); {eng.checkpoint} has dataset_type {dataset_type or 'unknown'!r}")
    if arg == "input":
        return None
    try:
        factor = int(arg)
        bicubic_kernel(factor)  # validates the range
    except ValueError:
        raise api.UsageError(f"--resize-factor: expected a positive integer or 'input', got {arg!r}") from None
    if factors and factor not in factors:
        say(f"warning: --resize-factor {factor} is not among the checkpoint's training factors {factors}")
    return factor


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """--device, --backend and --precision, with help texts from the backend registry (shared by the CLIs)."""
    p.add_argument("--device", default="cpu", metavar="cpu|cuda", help="device (default cpu)")
    p.add_argument("--backend", default="auto", choices=["auto", *api.BACKENDS], help=backend_help())
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                   help="activation precision (default auto: fp16 on CUDA; on a CPU bf16 where it has bf16 units "
                        "(AMX-BF16 or AVX512-BF16, read from its flags), else fp32). Inputs, latents and images "
                        "are fp32 in every precision; the style affines, demodulation and mapping stay fp32. "
                        "fp32 is exact (official outputs at 1e-4); bf16/fp16 are within 1e-2 (latents) and "
                        "2e-2 (images) relative error of fp32. int8 (backend openvino; never chosen by auto): "
                        "NNCF post-training quantization, made once per checkpoint and calibration set and cached, "
                        "held only to a looser bound: 3e-2 (latents) and 5e-2 (images); check it on your weights "
                        "and faces first: python -m export.parity --precision int8 --checkpoint CKPT --faces DIR")
    p.add_argument("--calibration", type=Path, default=None, metavar="DIR", help=(
        "--precision int8: calibrate the quantization on the images of DIR (a few dozen of the kind the checkpoint "
        "encodes; sketch and segmentation checkpoints need it), not on the images you check accuracy on; default: "
        "a set the model makes itself (W+ through its mapping network, the images its generator renders)"))


def plan_for(args: argparse.Namespace) -> api.LoadPlan:
    """`api.plan_load` with the CLI's options: the device, backend and precision resolved, once per run.

    Raises:
        UsageError: an unavailable --device, or a --backend / --precision that cannot run here.
    """
    return api.plan_load(args.checkpoint, backend=args.backend, device=args.device, precision=args.precision,
                         trust_pickle=args.trust_pickle, calibration=getattr(args, "calibration", None))


def load_engine(args: argparse.Namespace, what: str, plan: api.LoadPlan | None = None) -> api.Engine:
    """`api.load_planned` of `plan` (default `plan_for(args)`): the backend and precision it resolved,
    not resolved again; says what was loaded, which backend and precision run and why."""
    t0 = time.perf_counter()
    eng = api.load_planned(plan or plan_for(args), announce=say)
    say(f"loaded {eng.checkpoint} in {time.perf_counter() - t0:.1f} s: output {eng.output_size}px, "
        f"{eng.n_styles} styles, input_nc {eng.input_nc}, label_nc {eng.label_nc}; {what}")
    say(f"running backend {eng.backend}, precision {eng.precision} on {eng.device} ({eng.reason})")
    return eng


def run_facts(eng: api.Engine) -> dict:
    """What every manifest row records about the run besides its fingerprinted config."""
    return {"backend": eng.backend, "precision": eng.precision, "device": str(eng.device), "why": eng.reason}


def mixing_options(args: argparse.Namespace) -> dict:
    """RunOptions fields of the mixing flags (syntax checked; the mask is range-checked once the
    checkpoint's n_styles is known).

    Raises:
        UsageError: a mixing flag without --n-outputs, or a malformed --latent-mask.
    """
    if args.n_outputs is None:
        given = [f for f, v in (("--latent-mask", args.latent_mask), ("--mix-alpha", args.mix_alpha),
                                ("--seed", args.seed)) if v is not None]
        if given:
            raise api.UsageError(f"{', '.join(given)}: only used for style mixing; add --n-outputs K")
        return {}
    if args.latent_mask is not None:
        lt.parse_latent_mask(args.latent_mask, None)
    return {"n_outputs": args.n_outputs, "mix_alpha": args.mix_alpha, "seed": args.seed or 0}


def check_edit_files(edits: list[lt.Edit]) -> None:
    """Read each --edit file once before the (slow) checkpoint load, so a missing or bad file fails fast.

    Raises:
        LatentFileError: naming the file.
    """
    for e in edits:
        lt.read_direction(e.path)


def preload_facts(args: argparse.Namespace, plan: api.LoadPlan | None = None) -> api.Facts | None:
    """`api.Facts` of the model `plan` (default `plan_for(args)`) would load, without loading it: its
    description from the checkpoint's opts (read memory-mapped: about 0.3 s for 1.2 GB;
    `reference.description.describe_opts`), with the plan's backend and precision. None where that
    needs the load: the demo checkpoint not built yet, a row that takes no checkpoint (TensorRT
    plans), a file safe loading cannot read (`api.load_planned` then reports it), or `--trust-pickle`
    (unpickling runs code from the file: once is enough).

    Raises:
        UsageError: as `plan_for`, when no plan is given.
    """
    plan = plan or plan_for(args)
    choice = plan.choice
    if BACKENDS[choice.backend].takes != "checkpoint" or plan.trust_pickle or not plan.checkpoint.is_file():
        return None
    try:
        opts = psp_opts(plan.checkpoint)
    except CheckpointError:
        return None
    return api.Facts(describe_opts(opts, plan.checkpoint, choice.precision, choice.backend), plan)


def model_options(args: argparse.Namespace, opts: RunOptions, model, say=lambda msg: None) -> RunOptions:
    """`opts` completed with what depends on the model: edits (checked against n_styles), the
    latent mask, the super-resolution factor, the alignment options. The one place these are
    resolved, both for the pre-load check (`model` the `api.Facts` of `preload_facts`) and the run (an
    `Engine`, whose facts are read the same way), so both give the same fingerprint.

    Raises:
        UsageError, LatentFileError: a bad --edit file, --latent-mask or --resize-factor for this model.
    """
    opts = replace(opts, edits=lt.load_edits(args.edit, model.n_styles),
                   align=args.align, largest_face=args.largest_face, save_aligned=args.save_aligned,
                   all_faces=args.all_faces, upsample=align_upsample(args),
                   degrade_factor=resolve_resize_factor(args.resize_factor, model, say))
    if args.latent_mask is not None:
        opts = replace(opts, latent_mask=tuple(lt.parse_latent_mask(args.latent_mask, model.n_styles)))
    return opts


def all_done(jobs: list, opts: RunOptions, facts: api.Facts, output: remote.RemoteOutput | None = None) -> bool:
    """Whether the manifest in `opts.out_dir` marks every job done with the fingerprint these options
    and this model give (`Manifest.done`: same config, input unchanged or moved, outputs present and
    made from it; with an output URI, `opts.out_dir` is its staging folder and the outputs are looked
    for at the URI)."""
    if not jobs or not (opts.out_dir / MANIFEST_NAME).is_file():
        return False
    manifest = Manifest(opts.out_dir, opts.config(facts), exists=output.exists if output is not None else None)
    if manifest.bad_lines:
        return False  # the run warns once and drops them (compaction)
    return all(manifest.done(remote.input_stat(job.source), opts.names(job),
                             lambda _stat, source=job.source: remote.input_digest(source)) is not None for job in jobs)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments without the program name (default `sys.argv[1:]`).

    Returns:
        The exit code: 0 ok, 1 some inputs failed, 2 usage or checkpoint error, 130 interrupted.
    """
    return run_cli(build_parser(), _run, argv,
                   interrupted="finished inputs are recorded in the manifest; rerun the same command to resume")


@contextlib.contextmanager
def claim_output_folder(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir` for one run of a batch CLI (engine.run, engine.synthesize).

    Takes the folder's lock (`reference.plumbing.files.folder_lock`: a second run into the same folder stops
    with exit 2 naming the holder; a dead holder's lock is taken over), then removes the temp files
    an interrupted run left: every `*.psp-tmp` under `out_dir` (the lock guarantees no other writer)
    and those in the cache older than `CACHE_TEMP_AGE_S` (another process may be exporting there).
    A folder this run created and left empty (e.g. the checkpoint failed to load) is removed.

    Raises:
        FolderBusyError: another run holds the folder.
        OSError: the folder cannot be created.
    """
    existed = out_dir.is_dir()
    try:
        with folder_lock(out_dir):
            stale = sweep_temp_files(out_dir) + sweep_temp_files(cache_dir(), older_than_s=CACHE_TEMP_AGE_S)
            if stale:
                say(f"removed {plural(len(stale), 'temp file')} left by an interrupted run")
            yield
    finally:
        if not existed:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only succeeds when empty


def _run(args: argparse.Namespace) -> int:
    opts = RunOptions(out_dir=Path(args.output), batch_size=args.batch_size, resize_outputs=args.resize_outputs,
                      couple_outputs=args.couple_outputs, save_latents=args.save_latents,
                      max_pixels=args.max_pixels, align=args.align, largest_face=args.largest_face,
                      save_aligned=args.save_aligned, overwrite=args.overwrite)
    opts = replace(opts, **mixing_options(args))
    if not args.align:
        given = [o for o, v in (("--largest-face", args.largest_face), ("--all-faces", args.all_faces),
                                ("--upsample", args.upsample is not None), ("--save-aligned", args.save_aligned)) if v]
        if given:
            raise api.UsageError(f"{', '.join(given)}: only used with --align")
    else:
        check_align_setup()  # a missing dlib is reported before the model loads
    if args.ray is None and (args.num_actors is not None or args.gpus_per_actor or args.cpus_per_actor != 1):
        raise api.UsageError("--num-actors, --cpus-per-actor and --gpus-per-actor need --ray ADDRESS")
    given = [*(("--input", i) for i in args.input), ("--output", args.output)]
    uris = [(what, v) for what, v in given if remote.is_uri(v)]
    if uris and args.ray is None:
        what, uri = uris[0]
        raise api.UsageError(f"{what} {uri}: URIs are read and written by the distributed run; add --ray local to "
                             "run it on this machine (or --ray ADDRESS for a cluster)")
    output = remote.RemoteOutput(args.output) if remote.is_uri(args.output) else None
    if output is not None:
        output.check()  # the filesystem opens (scheme known, reachable) before anything else
        opts = replace(opts, out_dir=output.staging)  # the manifest and the lock stay local
    check_edit_files(args.edit)
    if uris:
        jobs = remote.plan_jobs(remote.find_inputs(args.input, output or opts.out_dir))
    else:
        jobs = plan_jobs(find_inputs(args.input, exclude=opts.out_dir))
    check_output_names(jobs, opts)  # before the (slow) checkpoint load
    with claim_output_folder(opts.out_dir):
        if output is not None:
            output.start(say, CACHE_TEMP_AGE_S)
        try:
            if args.ray is None:
                return _invert(args, opts, jobs, None)
            from .cluster import distributed  # Ray is imported only for --ray

            started, seconds = distributed.connect(args.ray, say)
            try:
                return _invert(args, opts, jobs, (started, seconds), output)
            finally:
                if started:
                    import ray

                    ray.shutdown()
        finally:
            if output is not None:
                _push_manifest(output)


def _push_manifest(output: remote.RemoteOutput) -> None:
    """The final copy of the manifest to the output URI; a failure is said, not raised (the staging
    copy stays, and the next run from this machine uses it)."""
    try:
        output.push_manifest()
    except (OSError, api.UsageError) as e:
        say(f"warning: could not copy the manifest to {output.uri}/{MANIFEST_NAME} ({type(e).__name__}: {e}); "
            f"it is in {output.staging / MANIFEST_NAME}, and a rerun from this machine uses it")


def _invert(args: argparse.Namespace, opts: RunOptions, jobs: list, ray_start: tuple[bool, float] | None,
            output: remote.RemoteOutput | None = None) -> int:
    """`_run` once the options are checked and the output folder is held: load, then run the jobs
    (`ray_start`: None for the single process, else `(started, seconds)` of `distributed.connect`;
    `output`: the `--output` URI, whose staging folder is `opts.out_dir`, or None)."""
    if args.checkpoint is None:
        say(demo.DEMO_NOTICE)
    where = output.uri if output is not None else opts.out_dir
    plan = plan_for(args)  # the backend and precision, resolved once for the check and the load
    facts = preload_facts(args, plan)
    if facts is not None and all_done(jobs, model_options(args, opts, facts), facts, output):
        say(f"nothing to do: all {plural(len(jobs), 'input')} are done with these options (see "
            f"{_manifest_path(where)}); the model was not loaded")
        return finish(Summary(skipped=len(jobs)), where, facts)
    eng = load_engine(args, f"{plural(len(jobs), 'input')} -> {where}", plan)
    opts = model_options(args, opts, eng, say)
    if opts.degrade_factor is not None:
        say(f"super resolution: inputs degraded by factor {opts.degrade_factor} (official bicubic downsampling)")
    if opts.n_outputs:
        say(f"style mixing: {opts.n_outputs} output(s) per input, styles {_ranges(opts.mixing_mask(eng))}, "
            f"alpha {'replace' if opts.mix_alpha is None else opts.mix_alpha}, seed {opts.seed}")
    with Manifest(opts.out_dir, opts.config(eng), run_facts(eng),
                  exists=output.exists if output is not None else None) as manifest:
        if manifest.bad_lines:
            say(manifest.unreadable_warning())
        with tqdm(total=len(jobs), unit="img", file=sys.stderr, dynamic_ncols=True) as bar:
            if ray_start is None:
                summary = run_jobs(eng, jobs, opts, manifest, progress=bar)
            else:
                from .cluster import distributed

                cluster = distributed.ClusterOptions(args.ray, args.num_actors, args.gpus_per_actor,
                                                     args.cpus_per_actor)
                load_args = {"checkpoint": str(eng.checkpoint), "backend": eng.backend, "device": args.device,
                             "precision": eng.precision, "trust_pickle": args.trust_pickle}
                summary, n_actors = distributed.run_distributed(eng, jobs, opts, manifest, load_args, cluster,
                                                                progress=bar, output=output)
    if ray_start is not None:
        say(f"ray ({args.ray}): {n_actors} actor(s)" + (f" x {args.gpus_per_actor:g} GPU" if args.gpus_per_actor else "")
            + (f"; cluster started in {ray_start[1]:.1f} s" if ray_start[0] else ""))
    return finish(summary, where, eng)


def _manifest_path(out_dir: Path | str) -> Path | str:
    """The manifest of an output folder (`Path`) or output URI (`str`)."""
    return out_dir / MANIFEST_NAME if isinstance(out_dir, Path) else remote.join_uri(out_dir, MANIFEST_NAME)


def finish(summary, out_dir: Path | str, eng: api.Engine) -> int:
    """The end of a batch CLI (engine.run, engine.synthesize): the summary, where the outputs are (a
    folder, or an output URI), the demo reminder; the exit code, 1 when some input failed, else 0."""
    say(summary.format())
    if summary.ok or summary.failed:  # else nothing ran (everything skipped): no backend line to claim
        say(f"ran backend {eng.backend}, precision {eng.precision} on {eng.device} ({eng.reason})")
    say(f"outputs in {out_dir} (manifest: {_manifest_path(out_dir)})")
    if eng.is_demo:
        say(f"reminder: these outputs come from the random-weight DEMO checkpoint; pass {demo.REAL_CHECKPOINT_HINT}")
    return 1 if summary.failed else 0


def _ranges(indices: list[int]) -> str:
    """[8, 9, 10, 12] -> "8-10,12"."""
    parts, start = [], None
    for j, i in enumerate(indices):
        if start is None:
            start = i
        if j + 1 == len(indices) or indices[j + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


if __name__ == "__main__":
    sys.exit(main())
