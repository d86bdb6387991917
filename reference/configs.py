"""Named checkpoint configurations: the `opts` official pSp training saves, per task layout.

Source: eladrich/pixel2style2pixel@5cfff38 `options/train_options.py` defaults as saved by
`training/coach.py::__get_save_dict` (`vars(opts)`), restated in `shared/golden/spec/*.json.gz`
(`opts_as_saved`). The names are the spec's config names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# What `vars(opts)` holds in an official checkpoint trained with the defaults (ffhq_encode, 1024).
BASE_OPTS: dict = {
    "exp_dir": None,
    "dataset_type": "ffhq_encode",
    "encoder_type": "GradualStyleEncoder",
    "input_nc": 3,
    "label_nc": 0,
    "output_size": 1024,
    "batch_size": 4,
    "test_batch_size": 2,
    "workers": 4,
    "test_workers": 2,
    "learning_rate": 0.0001,
    "optim_name": "ranger",
    "train_decoder": False,
    "start_from_latent_avg": True,
    "learn_in_w": False,
    "lpips_lambda": 0.8,
    "id_lambda": 0,
    "l2_lambda": 1.0,
    "w_norm_lambda": 0,
    "lpips_lambda_crop": 0,
    "l2_lambda_crop": 0,
    "moco_lambda": 0,
    "stylegan_weights": "pretrained_models/stylegan2-ffhq-config-f.pt",
    "checkpoint_path": None,
    "max_steps": 500000,
    "image_interval": 100,
    "board_interval": 50,
    "val_interval": 1000,
    "save_interval": None,
    "use_wandb": False,
    "resize_factors": None,
    "device": "cuda:0",
    "n_styles": 18,
}


def n_styles_for(output_size: int) -> int:
    """`int(log2(output_size)) * 2 - 2` (official `pSp.__init__`): 14 at 256, 16 at 512, 18 at 1024."""
    return int(math.log2(output_size)) * 2 - 2


@dataclass(frozen=True)
class Config:
    """A named checkpoint layout: `kind` "psp" (`{state_dict, opts, latent_avg}`) or
    "stylegan2" (rosinality `{g_ema, latent_avg}`)."""

    name: str
    kind: str
    overrides: dict = field(default_factory=dict)
    size: int = 1024  # stylegan2 configs only

    def opts(self) -> dict:
        """The `opts` dict an official checkpoint of this config holds (pSp configs only)."""
        if self.kind != "psp":
            raise ValueError(f"config {self.name!r} is a {self.kind} checkpoint and has no pSp opts")
        opts = dict(BASE_OPTS)
        opts.update(self.overrides)
        opts["n_styles"] = n_styles_for(opts["output_size"])
        return opts


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in [
        Config("ffhq_encode", "psp"),
        Config("ffhq_encode_256", "psp", {"output_size": 256}),
        Config("super_resolution", "psp",
               {"dataset_type": "celebs_super_resolution", "resize_factors": "1,2,4,8,16,32"}),
        Config("sketch_to_face", "psp", {"dataset_type": "celebs_sketch_to_face", "input_nc": 1, "label_nc": 1}),
        Config("seg_to_face", "psp", {"dataset_type": "celebs_seg_to_face", "input_nc": 19, "label_nc": 19}),
        Config("w_encoder_1024", "psp",
               {"encoder_type": "BackboneEncoderUsingLastLayerIntoW", "learn_in_w": True}),
        Config("wplus_encoder_1024", "psp", {"encoder_type": "BackboneEncoderUsingLastLayerIntoWPlus"}),
        Config("stylegan2_rosinality_256", "stylegan2", size=256),
        Config("stylegan2_rosinality_1024", "stylegan2", size=1024),
    ]
}


def get_config(name: str) -> Config:
    """Look up a config by its spec name; ValueError lists the known names."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}") from None
