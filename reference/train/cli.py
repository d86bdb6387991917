"""`python -m reference.train`: train a pSp encoder (official `scripts/train.py`, reshaped).

Source: eladrich/pixel2style2pixel@5cfff38 `scripts/train.py` and `options/train_options.py`: the same
options with dashes (`--lpips_lambda` -> `--lpips-lambda`, `--checkpoint_path` -> `--checkpoint`), data
folders on the command line instead of `configs/paths_config.py`, and `--preset` for the README's
per-task values.

Exit codes: 0 done (or nothing left to do); 1 `--check-data` found unusable files; 2 a usage, option,
data or weight-file error (one line on stderr, no traceback); 130 interrupted (rerun with --resume).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Mapping

from ..plumbing.cli import ArgumentParser, int_at_least, run_cli
from .coach import Coach, _say, check_data
from .options import IMAGE_SIZES, PRESETS, TASKS, resolve_opts


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _nonneg_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return value


def build_parser() -> ArgumentParser:
    """The CLI's parser; options not given stay absent from the namespace (so presets can fill them)."""
    pos, nonneg = int_at_least(1), int_at_least(0)
    presets = "; ".join(f"{p.name}{'' if p.sure else ' (a guess)'}" for p in PRESETS.values())
    p = ArgumentParser(
        prog="python -m reference.train", argument_default=argparse.SUPPRESS,
        description="Train a pSp encoder for a StyleGAN2 generator, as official pixel2style2pixel scripts/train.py. "
                    "Checkpoints go to EXP_DIR/checkpoints/iteration_N.pt and best_model.pt in the official layout; "
                    "metrics to EXP_DIR/logs/metrics.jsonl.",
        epilog="Values: an option given here, else the --preset's, else the official default "
               f"(options/train_options.py). Presets: {presets}. Exit codes: 0 done, 1 --check-data found bad files, "
               "2 option/data/weights error, 130 interrupted (rerun with --resume).")
    g = p.add_argument_group("experiment and data")
    g.add_argument("--exp-dir", dest="exp_dir", required=True, metavar="DIR", help="checkpoints and logs go here")
    g.add_argument("--preset", choices=sorted(PRESETS), help="per-task values of the official README commands")
    g.add_argument("--dataset-type", dest="dataset_type", choices=sorted(TASKS),
                   help="task and its transforms (official data_configs; default ffhq_encode)")
    g.add_argument("--source", metavar="DIR", help="training inputs (searched recursively)")
    g.add_argument("--target", metavar="DIR", help="training targets, paired with --source by file name "
                                                    "(default: --source itself, as for encoding)")
    g.add_argument("--test-source", dest="test_source", metavar="DIR", help="validation inputs (no validation without)")
    g.add_argument("--test-target", dest="test_target", metavar="DIR",
                   help="validation targets (default --test-source)")
    g.add_argument("--resize-factors", dest="resize_factors", metavar="LIST",
                   help="super-resolution down-sampling factors, one drawn per sample (default 1,2,4,8,16,32)")
    g.add_argument("--image-size", dest="image_size", type=int, choices=IMAGE_SIZES,
                   help="side of sources/targets in px (default 256, official; smaller only for tests)")
    g.add_argument("--check-data", dest="check_data", action="store_true",
                   help="read every pair once, report unusable files, and exit (1 if any)")
    g = p.add_argument_group("model")
    g.add_argument("--encoder-type", dest="encoder_type",
                   help="GradualStyleEncoder (default), BackboneEncoderUsingLastLayerIntoW, "
                        "BackboneEncoderUsingLastLayerIntoWPlus")
    g.add_argument("--input-nc", dest="input_nc", type=pos, help="encoder input channels (3 RGB, 1 sketch, N seg)")
    g.add_argument("--label-nc", dest="label_nc", type=nonneg, help="0 RGB, 1 sketch, N segmentation classes")
    g.add_argument("--output-size", dest="output_size", type=pos, help="generator resolution (default 1024)")
    g.add_argument("--learn-in-w", dest="learn_in_w", action="store_true", help="one w instead of W+ codes")
    g.add_argument("--start-from-latent-avg", dest="start_from_latent_avg", action=argparse.BooleanOptionalAction,
                   help="add latent_avg to the codes (default on; every official README command sets it)")
    g.add_argument("--train-decoder", dest="train_decoder", action="store_true", help="also train the generator")
    g = p.add_argument_group("initial weights (read with weights_only=True)")
    g.add_argument("--checkpoint", dest="checkpoint_path", metavar="FILE", help="start from a pSp checkpoint")
    g.add_argument("--stylegan-weights", dest="stylegan_weights", metavar="FILE",
                   help="rosinality StyleGAN2 checkpoint {'g_ema', 'latent_avg'} for the decoder")
    g.add_argument("--ir-se50-weights", dest="ir_se50_weights", metavar="FILE",
                   help="TreB1eN model_ir_se50.pth: encoder init and the ID loss network")
    g.add_argument("--lpips-backbone", dest="lpips_backbone", metavar="FILE",
                   help="torchvision alexnet-owt-7be5be79.pth for the LPIPS loss (default: the torch hub cache)")
    g.add_argument("--latent-avg-samples", dest="latent_avg_samples", type=pos,
                   help="z samples for latent_avg when the StyleGAN2 file has none (default 100000)")
    g = p.add_argument_group("objective")
    for name, default in (("l2-lambda", 1.0), ("lpips-lambda", 0.8), ("id-lambda", 0), ("w-norm-lambda", 0),
                          ("lpips-lambda-crop", 0), ("l2-lambda-crop", 0)):
        g.add_argument(f"--{name}", dest=name.replace("-", "_"), type=_nonneg_float, metavar="W",
                       help=f"weight (official default {default:g})")
    g = p.add_argument_group("optimisation and schedule")
    g.add_argument("--optim-name", dest="optim_name", choices=["ranger", "adam"], help="default ranger")
    g.add_argument("--learning-rate", dest="learning_rate", type=_positive_float, help="default 1e-4")
    g.add_argument("--batch-size", dest="batch_size", type=pos, help="default 4")
    g.add_argument("--test-batch-size", dest="test_batch_size", type=pos, help="default 2")
    g.add_argument("--workers", type=nonneg, help="data loader processes (default 4)")
    g.add_argument("--test-workers", dest="test_workers", type=nonneg, help="default 2")
    g.add_argument("--max-steps", dest="max_steps", type=nonneg, help="last step (default 500000)")
    g.add_argument("--image-interval", dest="image_interval", type=pos, help="train image grids (default 100)")
    g.add_argument("--board-interval", dest="board_interval", type=pos, help="metrics lines (default 50)")
    g.add_argument("--val-interval", dest="val_interval", type=pos, help="validation (default 1000)")
    g.add_argument("--save-interval", dest="save_interval", type=pos, help="iteration_N.pt (default max-steps)")
    g.add_argument("--seed", type=nonneg, help="data order, flips, noise, init (default 0)")
    g.add_argument("--device", dest="train_device", help="cpu, cuda, cuda:1 ... (default cuda when available)")
    g.add_argument("--resume", action="store_true", help="continue the run in --exp-dir from its train_state.pt")
    return p


def run(given: Mapping[str, Any], resume: bool = False, say: Callable[[str], None] = _say) -> tuple[Coach, dict]:
    """Train from option values (official key names), as the CLI does.

    Args:
        given: explicit option values (`preset`, `exp_dir`, `source`, ...); with `resume`, `exp_dir`
            and the schedule options to change.
        resume: continue the run in `given["exp_dir"]`.
        say: where progress lines go.

    Returns:
        `(coach, Coach.train() result)`.

    Raises:
        PSPError: option, data or weight-file errors (subclasses named in `Coach`).
    """
    coach = Coach(given if resume else resolve_opts(given), resume=resume, say=say)
    return coach, coach.train()


def _body(args: argparse.Namespace) -> int:
    given = vars(args)
    resume = bool(given.pop("resume", False))
    check = bool(given.pop("check_data", False))
    if check:
        return 1 if check_data(resolve_opts(given)) else 0
    run(given, resume=resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 done, 1 bad data found by --check-data, 2 error, 130 interrupted
    (Ctrl-C or SIGTERM))."""
    return run_cli(build_parser(), _body, argv,
                   interrupted="rerun with --resume to continue from the last iteration checkpoint")
