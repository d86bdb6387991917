"""The deterministic weight rule (v1): a complete official-format checkpoint from a config and a seed.

Source: `shared/golden/spec/WEIGHT_RULE.md`. Every float key `k` draws
`torch.randn(shape, generator=torch.Generator().manual_seed(seed + crc32(k)))` once and maps it
by its `init_class`, which is decided by the module that owns the key (as the spec's
`module_type` column), never by guessing from numbers.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from . import encoders as enc
from . import stylegan2 as sg
from .configs import get_config

LATENT_AVG_KEY = "latent_avg"


def draw(key: str, shape, seed: int) -> torch.Tensor:
    """`randn(shape)` from a CPU generator seeded with `seed + crc32(key)` (one draw, float32)."""
    g = torch.Generator().manual_seed(seed + zlib.crc32(key.encode("utf-8")))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def init_classes(model: nn.Module, prefix: str = "") -> "OrderedDict[str, str]":
    """Map every state_dict key of `model` (in state_dict order) to its weight-rule `init_class`.

    Args:
        model: a pSp-layout module (`encoder`/`decoder` children) or a bare `Generator`
            (then `prefix` is "" and keys carry no `decoder.`).
        prefix: prepended to the keys.

    Raises:
        KeyError: a parameter of a module type the rule does not cover.
    """
    owner: dict[str, tuple[str, nn.Module, str]] = {}
    for mname, module in model.named_modules():
        for pname, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            key = f"{mname}.{pname}" if mname else pname
            owner[key] = (mname, module, pname)

    classes: OrderedDict[str, str] = OrderedDict()
    for key in model.state_dict().keys():
        mname, module, pname = owner[key]
        in_decoder = isinstance(model, sg.Generator) or mname.startswith("decoder")
        classes[prefix + key] = _classify(mname, module, pname, in_decoder)
    return classes


def _classify(mname: str, module: nn.Module, pname: str, in_decoder: bool) -> str:
    if isinstance(module, nn.BatchNorm2d):
        return {
            "weight": "bn_weight",
            "bias": "bn_bias",
            "running_mean": "bn_running_mean",
            "running_var": "bn_running_var",
            "num_batches_tracked": "bn_num_batches_tracked",
        }[pname]
    if isinstance(module, nn.PReLU):
        return "prelu_weight"
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return "torch_weight" if pname == "weight" else "torch_bias"
    if isinstance(module, sg.EqualLinear):
        if not in_decoder:
            return "equal_linear_" + pname
        if mname.endswith("modulation"):
            return "modulation_" + pname
        return "mapping_" + pname
    if isinstance(module, sg.ConstantInput):
        return "const_input"
    if isinstance(module, sg.ModulatedConv2d):
        return "modconv_weight"
    if isinstance(module, sg.NoiseInjection):
        return "noise_strength"
    if isinstance(module, sg.FusedLeakyReLU):
        return "fused_lrelu_bias"
    if isinstance(module, sg.ToRGB):
        return "torgb_bias"
    if isinstance(module, (sg.Blur, sg.Upsample)):
        return "fir_kernel"
    if in_decoder and mname.endswith("noises"):
        return "noise_buffer"
    raise KeyError(f"no weight-rule class for {mname}.{pname} ({type(module).__name__})")


def rule_value(key: str, init_class: str, shape, seed: int) -> torch.Tensor:
    """The weight rule's value for one key (WEIGHT_RULE.md table)."""
    if init_class == "bn_num_batches_tracked":
        return torch.tensor(0, dtype=torch.int64)
    if init_class == "fir_kernel":
        return sg.setup_filter(sg.BLUR_KERNEL, gain=4)
    r = draw(key, shape, seed)
    if init_class in ("bn_weight",):
        return 1 + 0.1 * r
    if init_class in ("bn_bias", "bn_running_mean", "torch_bias", "equal_linear_bias", "noise_strength",
                      "fused_lrelu_bias", "torgb_bias"):
        return 0.1 * r
    if init_class == "bn_running_var":
        return 1 + 0.1 * r.abs()
    if init_class == "prelu_weight":
        return 0.25 + 0.05 * r
    if init_class == "torch_weight":
        return r * (1.0 / math.sqrt(math.prod(shape[1:])))
    if init_class == "mapping_weight":
        return 100 * r
    if init_class == "modulation_bias":
        return 1 + 0.1 * r
    if init_class in ("equal_linear_weight", "mapping_bias", "const_input", "modconv_weight",
                      "modulation_weight", "noise_buffer"):
        return r
    raise KeyError(f"unknown init_class {init_class!r} for {key}")


def psp_modules(opts: dict) -> nn.Module:
    """An `nn.Module` with `encoder` and `decoder` children in the official pSp layout.

    Built on whatever device is current (use `torch.device("meta")` to get shapes only).

    Raises:
        ValueError: an unknown `encoder_type` or a bad `output_size`.
    """
    from .configs import n_styles_for

    output_size = int(opts.get("output_size", 1024))
    sg.check_size(output_size)
    encoder_type = opts.get("encoder_type", "GradualStyleEncoder")
    if encoder_type not in enc.ENCODER_TYPES:
        raise ValueError(f"unknown encoder_type {encoder_type!r}; known: {', '.join(enc.ENCODER_TYPES)}")
    m = nn.Module()
    m.encoder = enc.ENCODER_TYPES[encoder_type](int(opts.get("input_nc", 3)), n_styles_for(output_size))
    m.decoder = sg.Generator(output_size)
    return m


Progress = Callable[[int, int], object]  # progress(done_bytes, total_bytes), after each tensor


def make_state_dict(model: nn.Module, seed: int, prefix: str = "",
                    progress: Progress | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Fill every state_dict key of `model` (a meta-device module is fine) by the weight rule.

    Args:
        model: the module whose keys and shapes to fill.
        seed: the rule's seed.
        prefix: prepended to every key.
        progress: called as `progress(done_bytes, total_bytes)` after each tensor (float32 bytes
            of the tensors made so far, of all of them), e.g. to drive a progress bar.
    """
    meta = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in meta.items()}
    total = sum(v.numel() * v.element_size() for v in meta.values())
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    done = 0
    for k, cls in init_classes(model).items():
        value = rule_value(prefix + k, cls, shapes[k], seed)
        out[prefix + k] = value
        done += value.numel() * value.element_size()
        if progress is not None:
            progress(done, total)
    return out


def make_checkpoint(config: str, seed: int, progress: Progress | None = None) -> dict:
    """A complete checkpoint of a named config, by the weight rule, in the official file layout.

    Source: `shared/golden/spec/WEIGHT_RULE.md` (v1); layout `{'state_dict', 'opts',
    'latent_avg'}` (official `Coach.__get_save_dict`) for pSp configs and `{'g_ema',
    'latent_avg'}` (rosinality `convert_weight.py`) for `stylegan2_rosinality_*`.

    Args:
        config: a spec config name (`reference.configs.CONFIGS`): ffhq_encode, ffhq_encode_256,
            super_resolution, sketch_to_face, seg_to_face, w_encoder_1024, wplus_encoder_1024,
            stylegan2_rosinality_256, stylegan2_rosinality_1024.
        seed: integer seed (the golden vectors use 0).
        progress: called as `progress(done_bytes, total_bytes)` after each tensor made (see
            `make_state_dict`); the checkpoint's tensors take about `total_bytes` in memory and on disk.

    Returns:
        The checkpoint dict; float32 tensors (int64 `num_batches_tracked`). `latent_avg` is
        `0.5*randn(512)` drawn under key "latent_avg", stored `[n_styles, 512]` (W+),
        `[1, 512]` (learn_in_w) or `[512]` (StyleGAN2). About 1.2 GB for a 1024 pSp config.

    Raises:
        ValueError: unknown config.
    """
    cfg = get_config(config)
    v = 0.5 * draw(LATENT_AVG_KEY, (512,), seed)
    if cfg.kind == "stylegan2":
        with torch.device("meta"):
            gen = sg.Generator(cfg.size)
        return {"g_ema": make_state_dict(gen, seed, progress=progress), "latent_avg": v}
    opts = cfg.opts()
    with torch.device("meta"):
        model = psp_modules(opts)
    latent_avg = v[None] if opts["learn_in_w"] else v.repeat(opts["n_styles"], 1)
    return {"state_dict": make_state_dict(model, seed, progress=progress), "opts": opts, "latent_avg": latent_avg}
