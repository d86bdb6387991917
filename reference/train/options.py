"""Training options: the official `opts` keys, their defaults, per-task presets and our own additions.

Source: eladrich/pixel2style2pixel@5cfff38 `options/train_options.py` (keys and defaults, as saved in
every official checkpoint: `reference.configs.BASE_OPTS`), the "Training pSp" commands of the official
README (the presets), `configs/data_configs.py` (the dataset types).

Resolution order of a value: an option given on the command line, else (for the architecture keys) the
`--checkpoint`'s opts, else the preset (`--preset`), else the official default. Two defaults differ
from `train_options.py` on purpose:
- `start_from_latent_avg` is on (official: a flag, off unless given; every README command gives it);
- `stylegan_weights` has no default path (official: `pretrained_models/stylegan2-ffhq-config-f.pt`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..configs import BASE_OPTS, n_styles_for
from ..encoders import ENCODER_TYPES
from ..plumbing.errors import PSPError


class TrainConfigError(PSPError):
    """Training options that cannot work together, or an experiment folder in the wrong state."""


@dataclass(frozen=True)
class Task:
    """What one `dataset_type` feeds the encoder (official `configs/transforms_config.py`).

    Attributes:
        source: "rgb" (photo, [-1, 1]), "sketch" (grey, [0, 1]), "seg" (one-hot label_nc),
            "degraded" (RGB after the super-resolution degradation).
        flip: RandomHorizontalFlip(0.5) in the train transforms (applied to source and target together).
        label_nc: the label_nc this task needs (None: any; seg tasks check `label_nc > 1`).
    """

    source: str
    flip: bool
    label_nc: int | None = 0


# Official `data_configs.DATASETS` keys -> transforms (`transforms_config.py`). The official
# FrontalizationTransforms flip source and target with two independent coin tosses, so half the
# pairs are mirrored against each other; here one toss flips both.
TASKS: dict[str, Task] = {
    "ffhq_encode": Task("rgb", flip=True),
    "ffhq_frontalize": Task("rgb", flip=True),
    "celebs_sketch_to_face": Task("sketch", flip=False, label_nc=1),
    "celebs_seg_to_face": Task("seg", flip=False, label_nc=None),
    "celebs_super_resolution": Task("degraded", flip=False),
}


@dataclass(frozen=True)
class Preset:
    """One task's training values and where they come from (`sure=False`: our guess)."""

    name: str
    values: dict = field(default_factory=dict)
    source: str = ""
    sure: bool = True


_README = "official README, 'Training pSp' command"
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("ffhq_encode", {
            "dataset_type": "ffhq_encode", "lpips_lambda": 0.8, "l2_lambda": 1.0, "id_lambda": 0.1,
            "batch_size": 8, "test_batch_size": 8, "workers": 8, "test_workers": 8,
            "val_interval": 2500, "save_interval": 5000}, f"{_README} 'Training the pSp Encoder'"),
        Preset("ffhq_frontalize", {
            "dataset_type": "ffhq_frontalize", "lpips_lambda": 0.08, "l2_lambda": 0.001,
            "lpips_lambda_crop": 0.8, "l2_lambda_crop": 0.01, "id_lambda": 1.0, "w_norm_lambda": 0.005,
            "batch_size": 8, "test_batch_size": 8, "workers": 8, "test_workers": 8,
            "val_interval": 2500, "save_interval": 5000}, f"{_README} 'Frontalization'"),
        Preset("celebs_sketch_to_face", {
            "dataset_type": "celebs_sketch_to_face", "lpips_lambda": 0.8, "l2_lambda": 1.0, "id_lambda": 0.0,
            "w_norm_lambda": 0.005, "label_nc": 1, "input_nc": 1,
            "batch_size": 8, "test_batch_size": 8, "workers": 8, "test_workers": 8,
            "val_interval": 2500, "save_interval": 5000}, f"{_README} 'Sketch to Face'"),
        Preset("celebs_seg_to_face", {
            "dataset_type": "celebs_seg_to_face", "lpips_lambda": 0.8, "l2_lambda": 1.0, "id_lambda": 0.0,
            "w_norm_lambda": 0.005, "label_nc": 19, "input_nc": 19,
            "batch_size": 8, "test_batch_size": 8, "workers": 8, "test_workers": 8,
            "val_interval": 2500, "save_interval": 5000}, f"{_README} 'Segmentation Map to Face'"),
        Preset("celebs_super_resolution", {
            "dataset_type": "celebs_super_resolution", "lpips_lambda": 0.8, "l2_lambda": 1.0, "id_lambda": 0.1,
            "w_norm_lambda": 0.005, "resize_factors": "1,2,4,8,16,32",
            "batch_size": 8, "test_batch_size": 8, "workers": 8, "test_workers": 8,
            "val_interval": 2500, "save_interval": 5000}, f"{_README} 'Super Resolution'"),
        Preset("toonify", {
            "dataset_type": "ffhq_encode", "lpips_lambda": 0.8, "l2_lambda": 1.0, "id_lambda": 0.1,
            "batch_size": 8, "test_batch_size": 8, "workers": 8, "test_workers": 8,
            "val_interval": 2500, "save_interval": 5000},
            "GUESS: the README gives no toonify command; the encoding losses with a toonified StyleGAN2 "
            "passed as --stylegan-weights (e.g. ffhq_cartoon_blended.pt)", sure=False),
    ]
}

# Keys of ours, saved in `opts` next to the official ones (official code ignores unknown keys).
EXTRA_DEFAULTS: dict[str, Any] = {
    "source": None,  # train source folder (official: data_configs train_source_root)
    "target": None,  # train target folder (default: the source folder)
    "test_source": None,
    "test_target": None,
    "preset": None,
    "seed": 0,
    "image_size": 256,  # px side of source, target and face_pool(y_hat); official: 256 fixed
    "ir_se50_weights": None,  # official: configs/paths_config.py model_paths['ir_se50']
    "lpips_backbone": None,  # torchvision alexnet weights (reference.perceptual)
    "latent_avg_samples": 100_000,  # official Coach: decoder.mean_latent(int(1e5))
    "train_device": None,
}

# Official opts we carry but do not implement: MoCo loss (non-face domains), Weights & Biases.
UNSUPPORTED_NONZERO = ("moco_lambda", "use_wandb")

# What may change when a run is resumed (schedule and machinery, not the model, data or objective).
RESUME_OVERRIDABLE = frozenset({
    "max_steps", "image_interval", "board_interval", "val_interval", "save_interval", "workers",
    "test_workers", "test_batch_size", "train_device", "test_source", "test_target",
})

IMAGE_SIZES = (32, 64, 128, 256)

# Options holding paths: stored absolute, so that a run resumes from any working directory.
PATH_KEYS = ("exp_dir", "source", "target", "test_source", "test_target", "checkpoint_path", "stylegan_weights",
             "ir_se50_weights", "lpips_backbone")


def absolute_paths(values: Mapping[str, Any]) -> dict:
    """`values` with every `PATH_KEYS` entry made absolute (`os.path.abspath`; None kept)."""
    return {k: (os.path.abspath(os.fspath(v)) if k in PATH_KEYS and v is not None else v) for k, v in values.items()}

# Opts that fix the network's shape: a --checkpoint provides those not given explicitly.
CHECKPOINT_ARCH_KEYS = ("encoder_type", "input_nc", "label_nc", "output_size", "learn_in_w")


def default_opts() -> dict:
    """Official defaults (`BASE_OPTS`, as saved by the official train script) plus our extra keys."""
    opts = {**BASE_OPTS, **EXTRA_DEFAULTS}
    opts["stylegan_weights"] = None
    opts["start_from_latent_avg"] = True
    return opts


def resolve_opts(given: Mapping[str, Any]) -> dict:
    """Merge explicit values over a preset over the defaults, then check them.

    Source: official `options/train_options.py` (keys, defaults) and README commands (presets).

    Args:
        given: option values set explicitly (official key names; `preset` selects a `PRESETS` entry;
            with `checkpoint_path`, the architecture keys not given come from that checkpoint).

    Returns:
        The complete opts dict (official keys + `EXTRA_DEFAULTS` keys); `n_styles` recomputed from
        output_size, `target` defaulting to `source`, `resize_factors` to "1,2,4,8,16,32" for
        super-resolution (as official `SuperResTransforms`).

    Raises:
        TrainConfigError: unknown preset or option, or values that cannot work together (see `check_opts`).
        CheckpointError: `checkpoint_path` is not a readable checkpoint.
    """
    opts = default_opts()
    given = absolute_paths(given)
    preset = given.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise TrainConfigError(f"unknown --preset {preset!r}; known: {', '.join(PRESETS)}")
        opts.update(PRESETS[preset].values)
    unknown = sorted(set(given) - set(opts))
    if unknown:
        raise TrainConfigError(f"unknown training option(s): {', '.join(unknown)}")
    if given.get("checkpoint_path"):
        opts.update({k: v for k, v in checkpoint_arch(given["checkpoint_path"]).items() if k not in given})
    opts.update(given)
    if opts["target"] is None:
        opts["target"] = opts["source"]
    if opts["test_target"] is None:
        opts["test_target"] = opts["test_source"]
    if opts["dataset_type"] == "celebs_super_resolution" and not opts["resize_factors"]:
        opts["resize_factors"] = "1,2,4,8,16,32"
    check_opts(opts)
    opts["n_styles"] = n_styles_for(int(opts["output_size"]))
    return opts


def checkpoint_arch(path: str | os.PathLike) -> dict:
    """The architecture opts (`CHECKPOINT_ARCH_KEYS`) a pSp checkpoint was trained with.

    Official training takes them from the command line and fails on a mismatch; here a `--checkpoint`
    supplies the ones not given. The file is memory-mapped: only its `opts` are read.

    Raises:
        CheckpointError: the file is missing or not a readable checkpoint.
    """
    from ..checkpoint import read_checkpoint

    file_opts = read_checkpoint(path).get("opts") or {}
    if not isinstance(file_opts, Mapping):
        file_opts = vars(file_opts) if hasattr(file_opts, "__dict__") else {}
    return {k: file_opts[k] for k in CHECKPOINT_ARCH_KEYS if k in file_opts}


def check_opts(opts: Mapping[str, Any]) -> None:
    """Reject options that cannot work together, with the fix in the message.

    Raises:
        TrainConfigError: no experiment folder or source folder; unknown dataset_type, encoder_type or
            optim_name; input_nc that does not fit label_nc; a task that needs another label_nc; no
            loss switched on; a negative lambda; bad output_size, image_size or resize_factors;
            learn_in_w with an encoder that outputs W+; an official option we do not implement.
    """
    if not opts.get("exp_dir"):
        raise TrainConfigError("--exp-dir is required: the folder for checkpoints and logs")
    if not opts.get("source"):
        raise TrainConfigError("--source is required: the folder of training inputs (and targets, unless --target)")
    dataset_type = opts["dataset_type"]
    if dataset_type not in TASKS:
        raise TrainConfigError(f"unknown --dataset-type {dataset_type!r}; known: {', '.join(TASKS)}")
    task = TASKS[dataset_type]
    label_nc, input_nc = int(opts["label_nc"] or 0), int(opts["input_nc"])
    if task.label_nc is not None and label_nc != task.label_nc:
        raise TrainConfigError(
            f"--dataset-type {dataset_type} needs --label-nc {task.label_nc}, got {label_nc}"
            + (" (and --input-nc 1)" if task.label_nc == 1 else ""))
    if task.source == "seg" and label_nc < 2:
        raise TrainConfigError(
            f"--dataset-type {dataset_type} needs the number of classes: --label-nc N --input-nc N "
            "(CelebAMask-HQ: 19)")
    expected_nc = 3 if label_nc == 0 else label_nc
    if input_nc != expected_nc:
        raise TrainConfigError(
            f"--input-nc {input_nc} does not fit --label-nc {label_nc}: the encoder input has {expected_nc} "
            f"channel(s) ({'RGB' if label_nc == 0 else 'sketch' if label_nc == 1 else 'one-hot classes'})")
    if opts["encoder_type"] not in ENCODER_TYPES:
        raise TrainConfigError(f"unknown --encoder-type {opts['encoder_type']!r}; known: {', '.join(ENCODER_TYPES)}")
    if opts["learn_in_w"] and opts["encoder_type"] != "BackboneEncoderUsingLastLayerIntoW":
        raise TrainConfigError(
            "--learn-in-w needs --encoder-type BackboneEncoderUsingLastLayerIntoW (the only encoder that "
            f"outputs one w); got {opts['encoder_type']}")
    if opts["encoder_type"] == "BackboneEncoderUsingLastLayerIntoW" and not opts["learn_in_w"]:
        raise TrainConfigError("--encoder-type BackboneEncoderUsingLastLayerIntoW outputs one w: add --learn-in-w")
    if str(opts["optim_name"]).lower() not in ("ranger", "adam"):
        raise TrainConfigError(f"unknown --optim-name {opts['optim_name']!r}; known: ranger, adam")
    size = int(opts["output_size"])
    min_size = 32 if opts["encoder_type"] == "GradualStyleEncoder" else 16
    if size < min_size or size > 1024 or size & (size - 1):
        raise TrainConfigError(
            f"--output-size must be a power of two in [{min_size}, 1024] for {opts['encoder_type']}, got {size}")
    if int(opts["image_size"]) not in IMAGE_SIZES:
        raise TrainConfigError(f"--image-size must be one of {IMAGE_SIZES}, got {opts['image_size']}")
    lambdas = {k: float(opts[k]) for k in ("lpips_lambda", "id_lambda", "l2_lambda", "w_norm_lambda",
                                           "lpips_lambda_crop", "l2_lambda_crop")}
    bad = [k for k, v in lambdas.items() if v < 0 or not math.isfinite(v)]
    if bad:
        raise TrainConfigError(f"loss weights must be finite and >= 0: {', '.join(f'{k}={lambdas[k]}' for k in bad)}")
    if not any(v > 0 for v in lambdas.values()):
        raise TrainConfigError("every loss weight is 0: set at least one of --l2-lambda, --lpips-lambda, ...")
    if lambdas["lpips_lambda_crop"] > 0 and int(opts["image_size"]) < 64:
        raise TrainConfigError("--lpips-lambda-crop needs --image-size 64 or more: LPIPS (alex) needs 31 px, and the "
                               "face crop of a 32 px image is 24 px")
    for key in UNSUPPORTED_NONZERO:
        if opts.get(key):
            raise TrainConfigError(f"{key}={opts[key]!r} is not supported by this trainer (MoCo loss, wandb)")
    if opts["resize_factors"]:
        if task.source != "degraded":
            raise TrainConfigError("--resize-factors applies to --dataset-type celebs_super_resolution only")
        try:
            factors = [int(f) for f in str(opts["resize_factors"]).split(",") if f.strip()]
        except ValueError:
            factors = []
        if not factors or any(f < 1 or f > 128 for f in factors):
            raise TrainConfigError(
                f"--resize-factors must be a comma list of integers in [1, 128], got {opts['resize_factors']!r}")
    for key in ("batch_size", "test_batch_size", "max_steps", "image_interval", "board_interval", "val_interval"):
        if int(opts[key]) < (0 if key == "max_steps" else 1):
            raise TrainConfigError(f"--{key.replace('_', '-')} must be positive, got {opts[key]}")
    if opts["save_interval"] is not None and int(opts["save_interval"]) < 1:
        raise TrainConfigError(f"--save-interval must be positive, got {opts['save_interval']}")


def saved_opts(opts: Mapping[str, Any]) -> dict:
    """The `opts` written into checkpoints: every official key (`BASE_OPTS` order) then ours.

    `device` is "cuda:0" as the official Coach saves it: official inference moves `latent_avg` to
    `opts.device` and the network to CUDA, so another value breaks it there. The device we trained
    on is kept in `train_device`.
    """
    out = {k: opts.get(k, v) for k, v in BASE_OPTS.items()}
    out["device"] = "cuda:0"
    out.update({k: opts.get(k, v) for k, v in EXTRA_DEFAULTS.items()})
    return out
