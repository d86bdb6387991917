"""Optimizers of official pSp training: Ranger (default) or Adam.

Source: eladrich/pixel2style2pixel@5cfff38 `training/coach.py::configure_optimizers` and
`training/ranger.py` (Ranger 20.4.11: RAdam + Lookahead + gradient centralization).

Ranger comes from the `pytorch-optimizer` package (`pytorch_optimizer.Ranger`), configured to the
official arithmetic. Its defaults differ from the official file in two places, both set here:
- `eps`: official 6.1e-5 (the file's comment says 1e-5, the code uses 6.1e-5); package 1e-5.
- `degenerated_to_sgd`: official takes a bias-corrected momentum (SGD) step while the RAdam variance
  estimate is not yet rectified (N_sma <= 5, steps 1-5 with beta2 0.999); the package skips those
  updates unless asked.
The rest matches: betas (0.95, 0.999), Lookahead k=6 alpha=0.5 (slow weights at every 6th step),
N_sma threshold 5, gradient centralization on conv and linear weights (`gc_conv_only=False`), no
weight decay. The package's threshold test is `>=` where official has `>`; N_sma is never exactly 5
(4.996 at step 5, 5.994 at step 6). Its moment updates use `lerp` rather than `mul/add`, so results
agree to float rounding, not bit for bit.
"""

from __future__ import annotations

from typing import Iterable

import torch

RANGER_SETTINGS = {
    "betas": (0.95, 0.999),
    "alpha": 0.5,
    "k": 6,
    "n_sma_threshold": 5,
    "degenerated_to_sgd": True,
    "eps": 6.1e-5,
    "weight_decay": 0.0,
    "use_gc": True,
    "gc_conv_only": False,
}


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer official `Coach.configure_optimizers` builds.

    Args:
        name: "ranger" (official default) or "adam" (`torch.optim.Adam(params, lr)`, torch defaults).
        params: the encoder's parameters (+ the decoder's with `--train-decoder`).
        lr: learning rate (official default 1e-4).

    Returns:
        The optimizer; its `state_dict()` holds only tensors and plain values (loads with weights_only).

    Raises:
        ValueError: unknown name.
    """
    params = list(params)
    if name.lower() == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name.lower() == "ranger":
        from pytorch_optimizer import Ranger

        return Ranger(params, lr=lr, **RANGER_SETTINGS)
    raise ValueError(f"unknown optimizer {name!r}; known: ranger, adam")
