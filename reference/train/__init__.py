"""Training of pSp encoders, as the official eladrich/pixel2style2pixel training code.

Source: Richardson et al., "Encoding in Style" (CVPR 2021), Sec. 3.2 and 4; official
`scripts/train.py`, `training/coach.py`, `training/ranger.py`, `options/train_options.py`,
`configs/transforms_config.py`, `criteria/` (restated, not copied).

    python -m reference.train --preset ffhq_encode --source ffhq256/ --exp-dir runs/encode \
        --stylegan-weights stylegan2-ffhq-config-f.pt --ir-se50-weights model_ir_se50.pth

Python: `run({"exp_dir": ..., "source": ..., ...})` or `Coach(resolve_opts(...)).train()`.
Modules: `options` (opts, presets), `data` (paired folders, transforms), `losses` (L2, LPIPS, ID,
W-norm), `optim` (Ranger/Adam), `coach` (loop, checkpoints, resume), `cli`.
"""

from .cli import build_parser, main, run
from .coach import TRAIN_STATE, Coach, check_data, estimate_latent_avg, init_model, psp_forward
from .data import EpochBatches, Pair, PairedDataset, TrainDataError, pair_folders, scan_images
from .losses import ArcFace, IDLoss, PSPLoss, face_crop, load_arcface, w_norm_loss
from .optim import RANGER_SETTINGS, make_optimizer
from .options import PRESETS, TASKS, TrainConfigError, default_opts, resolve_opts, saved_opts

__all__ = [
    "PRESETS",
    "RANGER_SETTINGS",
    "TASKS",
    "TRAIN_STATE",
    "ArcFace",
    "Coach",
    "EpochBatches",
    "IDLoss",
    "PSPLoss",
    "Pair",
    "PairedDataset",
    "TrainConfigError",
    "TrainDataError",
    "build_parser",
    "check_data",
    "default_opts",
    "estimate_latent_avg",
    "face_crop",
    "init_model",
    "load_arcface",
    "main",
    "make_optimizer",
    "pair_folders",
    "psp_forward",
    "resolve_opts",
    "run",
    "saved_opts",
    "scan_images",
    "w_norm_loss",
]
