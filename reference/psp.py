"""The pSp model: encoder + StyleGAN2 decoder + latent_avg, and its loaders.

Source: Richardson et al., "Encoding in Style" (CVPR 2021), Sec. 3: `pSp(x) = G(E(x) + w_avg)`;
forward as eladrich/pixel2style2pixel `models/psp.py::pSp.forward` with `randomize_noise=False`
(restated in `shared/golden/spec/FORWARD_NOTES.md`).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from . import checkpoint as ckio
from .configs import n_styles_for
from .description import ENCODER_SIZE
from .plumbing.errors import CheckpointError
from .stylegan2 import LR_MLP, N_MLP, EqualLinear, Generator, PixelNorm, check_size
from .weights import psp_modules


def complete_opts(opts: Mapping[str, Any]) -> dict:
    """A checkpoint's opts with the official inference defaults filled in and `n_styles` recomputed
    from `output_size` (as official pSp does): what `PSP(opts).opts` holds.

    Raises:
        ValueError: an output_size that is not a power of two in [4, 4096].
    """
    opts = {**ckio.INFERENCE_DEFAULTS, **dict(opts)}
    check_size(int(opts["output_size"]))
    opts["n_styles"] = n_styles_for(int(opts["output_size"]))
    return opts


class PSP(nn.Module):
    """pixel2style2pixel: an IR-SE-50 encoder into W+ and a StyleGAN2 generator.

    Build with `load_psp`; the constructor makes the architecture from `opts` (random init).

    Attributes:
        opts: the checkpoint's opts with inference defaults filled in.
        output_size, n_styles, input_nc, label_nc, dataset_type, learn_in_w.
        encoder: one of `reference.encoders.ENCODER_TYPES`.
        decoder: `reference.stylegan2.Generator(output_size)`.
        latent_avg: `[n_styles, 512]` float32 buffer added to the codes (zeros when the
            checkpoint does not use `start_from_latent_avg`).
    """

    def __init__(self, opts: Mapping[str, Any]):
        super().__init__()
        opts = complete_opts(opts)
        self.opts = opts
        self.output_size = int(opts["output_size"])
        self.n_styles = opts["n_styles"]
        self.input_nc = int(opts["input_nc"])
        self.label_nc = int(opts["label_nc"] or 0)
        self.dataset_type = opts["dataset_type"]
        self.learn_in_w = bool(opts["learn_in_w"])
        self.start_from_latent_avg = bool(opts["start_from_latent_avg"])
        modules = psp_modules(opts)
        self.encoder = modules.encoder
        self.decoder: Generator = modules.decoder
        self.face_pool = nn.AdaptiveAvgPool2d((ENCODER_SIZE, ENCODER_SIZE))  # official --resize_outputs
        self.register_buffer("latent_avg", torch.zeros(self.n_styles, 512), persistent=False)

    @property
    def description(self):
        """The `reference.description.ModelDescription` of this model (fp32; checkpoint recorded when
        the loader set it)."""
        d = self.__dict__.get("_description")
        if d is None:
            from .description import describe

            d = self.__dict__["_description"] = describe(self, backend="reference")
        return d

    @description.setter
    def description(self, value) -> None:
        self.__dict__["_description"] = value

    # ------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images into W+ (latent_avg added).

        Args:
            x: `[B, input_nc, 256, 256]` float32. RGB: in [-1, 1] (`(u8/255 - 0.5)/0.5`);
                sketch: [0, 1]; segmentation: one-hot in {0, 1}.

        Returns:
            w_plus `[B, n_styles, 512]` float32.

        Raises:
            ValueError: x of the wrong shape.
        """
        if x.ndim != 4 or x.shape[1] != self.input_nc or x.shape[2:] != (ENCODER_SIZE, ENCODER_SIZE):
            raise ValueError(
                f"encode expects x [B, {self.input_nc}, {ENCODER_SIZE}, {ENCODER_SIZE}] (this checkpoint's input_nc is "
                f"{self.input_nc}), got {tuple(x.shape)}"
            )
        codes = self.encoder(x)
        if self.learn_in_w:
            if self.start_from_latent_avg:
                codes = codes + self.latent_avg[0]
            return codes[:, None, :].repeat(1, self.n_styles, 1)
        if self.start_from_latent_avg:
            codes = codes + self.latent_avg
        return codes

    def synthesize(self, w_plus: torch.Tensor) -> torch.Tensor:
        """Render W+ latents with the stored noise buffers (`randomize_noise=False`), at full
        resolution: the backend-model interface (`export.backends.BackendModel`). The official
        `resize` lives in `forward` (and in `engine.Engine.synthesize` for every backend).

        Args:
            w_plus: `[B, n_styles, 512]` float32 (a `[B, 512]` w is repeated to all styles).

        Returns:
            img `[B, 3, R, R]` float32, unclamped (trained nets: about [-1, 1]); R = output_size.
        """
        return self.decoder.synthesis(w_plus)

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """StyleGAN2 mapping network: z `[B, 512]` (standard normal) -> w `[B, 512]`."""
        if z.ndim != 2 or z.shape[1] != 512:
            raise ValueError(f"mapping expects z [B, 512], got {tuple(z.shape)}")
        return self.decoder.mapping(z)

    def forward(self, x: torch.Tensor, resize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`(img, w_plus)`: the official inference forward (`pSp.forward(x, resize=...)`); with
        `resize` the image is average-pooled to 256x256 by `face_pool` (official
        `AdaptiveAvgPool2d((256, 256))`: an exact box mean for 512/1024, the identity at 256)."""
        w_plus = self.encode(x)
        img = self.synthesize(w_plus)
        return (self.face_pool(img) if resize else img), w_plus


def style_mix(
    w_plus: torch.Tensor,
    inject_w_plus: torch.Tensor | None,
    latent_mask: Iterable[int],
    alpha: float | None = None,
) -> torch.Tensor:
    """Style mixing as official `pSp.forward(latent_mask, inject_latent, alpha)`, without mutating inputs.

    For each i in `latent_mask`: with `inject_w_plus` and `alpha`:
    `alpha*inject[:, i] + (1-alpha)*w_plus[:, i]`; with `alpha=None`: `inject[:, i]`; without
    `inject_w_plus`: 0.

    Args:
        w_plus: `[B, n_styles, 512]`.
        inject_w_plus: `[B or 1, n_styles, 512]` (e.g. `mapping(z)` repeated to n_styles), or None.
        latent_mask: style indices in `[0, n_styles)`.
        alpha: mixing weight in [0, 1], or None to replace.

    Returns:
        A new `[B, n_styles, 512]` tensor.

    Raises:
        ValueError: bad shapes or an index out of range.
    """
    if w_plus.ndim != 3:
        raise ValueError(f"style_mix needs W+ codes [B, n_styles, 512], got {tuple(w_plus.shape)}")
    n_styles = w_plus.shape[1]
    mask = [int(i) for i in latent_mask]
    bad = [i for i in mask if not 0 <= i < n_styles]
    if bad:
        raise ValueError(f"latent_mask indices {bad} out of range [0, {n_styles})")
    out = w_plus.clone()
    if inject_w_plus is not None:
        if inject_w_plus.ndim != 3 or inject_w_plus.shape[1:] != w_plus.shape[1:]:
            raise ValueError(
                f"inject_w_plus must be [B or 1, {n_styles}, {w_plus.shape[2]}], got {tuple(inject_w_plus.shape)}"
            )
        inject_w_plus = inject_w_plus.expand_as(w_plus)
    for i in mask:
        if inject_w_plus is None:
            out[:, i] = 0
        elif alpha is None:
            out[:, i] = inject_w_plus[:, i]
        else:
            out[:, i] = alpha * inject_w_plus[:, i] + (1 - alpha) * w_plus[:, i]
    return out


def _latent_avg_for(model: PSP, latent_avg: Any, source: str) -> torch.Tensor:
    """Normalise a stored latent_avg ([n_styles,512], [1,512] or [512]) to `[n_styles, 512]`."""
    if not isinstance(latent_avg, torch.Tensor):
        raise CheckpointError(
            f"{source}: opts.start_from_latent_avg is set but the checkpoint has no 'latent_avg' tensor; "
            "the official code would fail here too. Re-save the checkpoint with its latent_avg."
        )
    la = latent_avg.detach().float()
    ckio.check_finite({"latent_avg": la}, source)
    ok_shapes = {(512,), (1, 512)} | (set() if model.learn_in_w else {(model.n_styles, 512)})
    if tuple(la.shape) not in ok_shapes:
        raise CheckpointError(
            f"{source}: latent_avg has shape {tuple(la.shape)}; expected "
            + (" or ".join(str(list(s)) for s in sorted(ok_shapes)))
            + f" for {'a learn_in_w' if model.learn_in_w else 'a W+'} checkpoint with {model.n_styles} styles"
        )
    return la.reshape(-1, 512).expand(model.n_styles, 512).clone()


def _psp_parts(ckpt: Mapping[str, Any], source: str) -> tuple[Mapping[str, torch.Tensor], dict, Any]:
    """`(state_dict, file opts, latent_avg or None)` of a pSp checkpoint dict.

    Raises:
        CheckpointError: a StyleGAN2 or encoder-only checkpoint, or no pSp layout (named with `source`).
    """
    kind = ckio.checkpoint_kind(ckpt)
    if kind in ("stylegan2", "stylegan2_state_dict"):
        raise CheckpointError(
            f"{source}: this is a StyleGAN2 generator checkpoint (rosinality 'g_ema' layout), not a pSp "
            "checkpoint: it has no encoder. Pass a pSp checkpoint (e.g. psp_ffhq_encode.pt), or load the "
            "generator alone with reference.load_stylegan2."
        )
    if kind == "encoder_only":
        raise CheckpointError(
            f"{source}: this looks like IR-SE50 backbone weights (e.g. model_ir_se50.pth), not a pSp "
            "checkpoint: it has no style heads or generator."
        )
    if kind == "psp_state_dict":
        return ckpt, {}, None
    if kind == "psp":
        state_dict = ckpt["state_dict"]
        file_opts = ckpt.get("opts") or {}
        if not isinstance(file_opts, Mapping):
            file_opts = vars(file_opts) if hasattr(file_opts, "__dict__") else {}
        return state_dict, dict(file_opts), ckpt.get("latent_avg")
    raise CheckpointError(
        f"{source}: not a pSp checkpoint: expected a dict with 'state_dict' (encoder.*, decoder.* keys), "
        f"'opts' and 'latent_avg'; found top-level keys {sorted(map(str, ckpt))[:8]}"
    )


def psp_opts(path_or_dict: str | os.PathLike | Mapping[str, Any], trust_pickle: bool = False) -> dict:
    """The opts a `PSP` loaded from this checkpoint has (`complete_opts`: defaults, n_styles), read
    without building the model or copying weights (the file is memory-mapped; about 0.3 s for 1.2 GB).

    Raises:
        CheckpointError: as `load_psp` for an unreadable or non-pSp file, or opts that describe no model.
    """
    ckpt, source = _read(path_or_dict, trust_pickle)
    state_dict, file_opts, _ = _psp_parts(ckpt, source)
    try:
        return complete_opts({**ckio.infer_opts_from_state_dict(state_dict), **file_opts})
    except ValueError as e:
        raise CheckpointError(f"{source}: the checkpoint's opts do not describe a pSp model: {e}") from None


def load_psp(path_or_dict: str | os.PathLike | Mapping[str, Any], trust_pickle: bool = False,
             opts: Mapping[str, Any] | None = None) -> PSP:
    """Load an official pSp checkpoint into a `PSP` in eval mode, fp32, on the CPU.

    Source: official `models/psp.py::pSp.load_weights` and `scripts/inference.py`; the
    architecture comes from the checkpoint's `opts` (missing opts take the official inference
    defaults: output_size 1024, learn_in_w False, ...); n_styles is recomputed from output_size.

    Args:
        path_or_dict: a `.pt` file (`torch.load(weights_only=True)`) or an already loaded dict
            (`{'state_dict', 'opts', 'latent_avg'}`, or a bare pSp state dict with `opts` given).
        trust_pickle: allow full unpickling of old files that need it (see `read_checkpoint`).
        opts: architecture opts overriding / completing the checkpoint's.

    Returns:
        `PSP` in eval mode with `requires_grad=False` parameters.

    Raises:
        CheckpointError: unreadable file; a StyleGAN2 or encoder-only checkpoint; keys missing,
            unexpected or mis-shaped (all named, with the likely cause); a bad latent_avg.
    """
    ckpt, source = _read(path_or_dict, trust_pickle)
    state_dict, file_opts, latent_avg = _psp_parts(ckpt, source)
    merged = {**ckio.infer_opts_from_state_dict(state_dict), **dict(file_opts), **dict(opts or {})}
    try:
        with torch.device("meta"):
            model = PSP(merged)
    except ValueError as e:
        raise CheckpointError(f"{source}: the checkpoint's opts do not describe a pSp model: {e}") from None

    expected = {**{f"encoder.{k}": v for k, v in model.encoder.state_dict().items()},
                **{f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}}
    ckio.validate_state_dict(state_dict, expected, source, hint=ckio.describe_mismatch(merged, state_dict))

    enc_sd = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    dec_sd = {k[len("decoder."):]: v for k, v in state_dict.items() if k.startswith("decoder.")}
    model.encoder.load_state_dict(_float32(enc_sd), strict=True, assign=True)
    model.decoder.load_state_dict(_float32(dec_sd), strict=True, assign=True)
    if model.start_from_latent_avg:
        model.latent_avg = _latent_avg_for(model, latent_avg, source)
    else:
        model.latent_avg = torch.zeros(model.n_styles, 512)
    model.face_pool = nn.AdaptiveAvgPool2d((ENCODER_SIZE, ENCODER_SIZE))
    model.eval().requires_grad_(False)
    return model


def load_stylegan2(path_or_dict: str | os.PathLike | Mapping[str, Any], trust_pickle: bool = False
                   ) -> tuple[Generator, torch.Tensor | None]:
    """Load a rosinality StyleGAN2 checkpoint (`{'g_ema', 'latent_avg'?}`) or a bare generator state dict.

    Source: rosinality stylegan2-pytorch `convert_weight.py` / `train.py` layouts; pSp reads
    `g_ema` and `latent_avg` as restated in `shared/golden/spec/stylegan2_rosinality_*.json.gz`.

    Returns:
        `(generator, latent_avg)`: the `Generator` in eval mode (fp32, size read off the noise
        buffers) and `latent_avg` `[512]` float32, or None when the file has none.

    Raises:
        CheckpointError: not a StyleGAN2 checkpoint (a pSp one is named as such), or keys/shapes
            that do not fit a `Generator(size, 512, 8, channel_multiplier=2)`.
    """
    ckpt, source = _read(path_or_dict, trust_pickle)
    kind = ckio.checkpoint_kind(ckpt)
    if kind in ("psp", "psp_state_dict"):
        raise CheckpointError(f"{source}: this is a pSp checkpoint, not a StyleGAN2 one: load it with load_psp")
    if kind == "stylegan2":
        sd, latent_avg = ckpt["g_ema"], ckpt.get("latent_avg")
    elif kind == "stylegan2_state_dict":
        sd, latent_avg = ckpt, None
    else:
        raise CheckpointError(f"{source}: not a StyleGAN2 checkpoint (no 'g_ema'); top-level keys "
                              f"{sorted(map(str, ckpt))[:8]}")
    n_noise = sum(1 for k in sd if k.startswith("noises.noise_"))
    size = 2 ** ((n_noise - 1) // 2 + 2) if n_noise else 0
    try:
        check_size(size)
    except ValueError:
        raise CheckpointError(f"{source}: cannot tell the generator size: {n_noise} noise buffers") from None
    with torch.device("meta"):
        gen = Generator(size)
    ckio.validate_state_dict(sd, gen.state_dict(), source)
    gen.load_state_dict(_float32(sd), strict=True, assign=True)
    gen.eval().requires_grad_(False)
    if latent_avg is not None:
        latent_avg = latent_avg.detach().float().reshape(-1, 512)[0]
    return gen, latent_avg


def _read(path_or_dict: str | os.PathLike | Mapping[str, Any], trust_pickle: bool) -> tuple[dict, str]:
    """`(checkpoint dict, name for messages)` from a path (read safely) or an already loaded dict."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "<checkpoint dict>"
    return ckio.read_checkpoint(path_or_dict, trust_pickle=trust_pickle), str(path_or_dict)


def _float32(sd: Mapping[str, torch.Tensor]) -> dict:
    """Floating tensors as contiguous fp32 (fp16 checkpoints are upcast); others unchanged."""
    return {k: (v.float().contiguous() if v.is_floating_point() else v) for k, v in sd.items()}


def load_mapping(path: str | os.PathLike, trust_pickle: bool = False) -> nn.Module:
    """Only the StyleGAN2 mapping network of a checkpoint, for backends that hold no torch weights.

    Source: rosinality `Generator.style` (PixelNorm + 8 EqualLinear, lr_mul 0.01, fused lrelu),
    the keys `decoder.style.1..8.{weight,bias}` of an official pSp checkpoint (or `style.*` of a
    rosinality `g_ema`); built with `reference.stylegan2` modules, so it computes what
    `reference.PSP.mapping` computes. The file is read with `weights_only=True` and memory-mapped;
    only the 8 MiB of mapping weights are copied.

    Args:
        path: the checkpoint file.
        trust_pickle: as `reference.read_checkpoint`.

    Returns:
        An `nn.Module` z `[N, 512]` -> w `[N, 512]`, fp32, CPU, eval, no grad.

    Raises:
        CheckpointError: unreadable file; no mapping keys, or mis-shaped ones (named).
    """
    ckpt = ckio.read_checkpoint(path, trust_pickle=trust_pickle)
    kind = ckio.checkpoint_kind(ckpt)
    if kind == "psp":
        sd, prefix = ckpt["state_dict"], "decoder.style."
    elif kind == "psp_state_dict":
        sd, prefix = ckpt, "decoder.style."
    elif kind == "stylegan2":
        sd, prefix = ckpt["g_ema"], "style."
    elif kind == "stylegan2_state_dict":
        sd, prefix = ckpt, "style."
    else:
        raise CheckpointError(f"{path}: not a pSp or StyleGAN2 checkpoint: no mapping network (decoder.style.*) found")
    style = {k[len(prefix):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith(prefix)}
    with torch.device("meta"):
        net = nn.Sequential(PixelNorm(), *[EqualLinear(512, 512, lr_mul=LR_MLP, activation="fused_lrelu")
                                           for _ in range(N_MLP)])
    ckio.validate_state_dict(style, net.state_dict(), f"{path} (mapping network, {prefix}*)")
    net.load_state_dict({k: v.detach().to(torch.float32, copy=True) for k, v in style.items()}, strict=True,
                        assign=True)
    return net.eval().requires_grad_(False)


def face_pool(img: torch.Tensor) -> torch.Tensor:
    """Official `AdaptiveAvgPool2d((256, 256))` for square power-of-two images: a box mean above 256,
    the identity at 256, nearest repetition below (what adaptive pooling does there)."""
    r, s = img.shape[-1], ENCODER_SIZE
    if r > s:
        return torch.nn.functional.avg_pool2d(img, r // s)
    if r < s:
        return img.repeat_interleave(s // r, dim=2).repeat_interleave(s // r, dim=3)
    return img
