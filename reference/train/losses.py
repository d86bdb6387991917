"""The pSp training objective: L2, LPIPS, identity (ArcFace) and W-norm losses, as official `Coach.calc_loss`.

Source: Richardson et al., "Encoding in Style" (CVPR 2021), Sec. 3.2 (Eq. 2-4:
`L = l2 * L2 + lpips * LPIPS + id * L_ID + w_norm * L_reg`); code as eladrich/pixel2style2pixel@5cfff38
`training/coach.py::calc_loss`, `criteria/id_loss.py`, `criteria/w_norm.py`,
`models/encoders/model_irse.py::Backbone` and `criteria/lpips/lpips.py` (via `reference.perceptual`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import read_checkpoint, validate_state_dict
from ..encoders import _body, _input_layer
from ..perceptual import MissingWeightsError, load_lpips

ARCFACE_FILE = "model_ir_se50.pth"
# Official crop of the face region in a 256 px image: rows 35:223, columns 32:220.
FACE_CROP_256 = (35, 223, 32, 220)


def face_crop(size: int) -> tuple[int, int, int, int]:
    """The official `[:, :, 35:223, 32:220]` crop scaled to a `size` px image: `(top, bottom, left, right)`."""
    return tuple(round(v * size / 256) for v in FACE_CROP_256)  # type: ignore[return-value]


class ArcFace(nn.Module):
    """ArcFace IR-SE-50 at 112 px: the identity network of pSp's ID loss.

    Source: official `models/encoders/model_irse.py::Backbone(input_size=112, num_layers=50,
    mode='ir_se', drop_ratio=0.6)` (from TreB1eN InsightFace_Pytorch); same state_dict keys as
    `model_ir_se50.pth`: `input_layer.*`, `body.0..23.*` (the pSp encoder's IR-SE-50 units) and
    `output_layer.{0,3,4}.*` (BN2d, Dropout, Flatten, Linear(512*7*7, 512), BN1d).
    """

    def __init__(self, drop_ratio: float = 0.6):
        super().__init__()
        self.input_layer = _input_layer(3)
        self.body = _body()
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512), nn.Dropout(drop_ratio), nn.Flatten(), nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, 3, 112, 112]` in [-1, 1] -> unit-norm identity features `[B, 512]` (official `l2_norm`)."""
        feats = self.output_layer(self.body(self.input_layer(x)))
        return feats / torch.norm(feats, 2, 1, True)


def load_arcface(path: str | os.PathLike | None, device: str | torch.device = "cpu", needed_by: str = "") -> ArcFace:
    """Load TreB1eN's IR-SE-50 ArcFace weights (`model_ir_se50.pth`) safely (weights_only).

    Args:
        path: the weight file (a bare state dict), or None.
        device: where the network lives.
        needed_by: the option that asked for it, for the message (e.g. "--id-lambda 0.1").

    Returns:
        `ArcFace` in eval mode, parameters frozen.

    Raises:
        MissingWeightsError: `path` is None or not a file (the message says how to turn the loss off).
        CheckpointError: the file is not IR-SE-50 ArcFace weights (keys and shapes named).
    """
    why = f"the ID loss ({needed_by}) needs" if needed_by else "the ID loss needs"
    if path is None or not Path(path).is_file():
        where = f"{path}: not found; " if path is not None else ""
        raise MissingWeightsError(
            f"{where}{why} the ArcFace IR-SE50 weights {ARCFACE_FILE} (TreB1eN InsightFace_Pytorch, the file "
            "official pSp uses): pass --ir-se50-weights FILE, or turn the ID loss off with --id-lambda 0")
    sd = read_checkpoint(path)
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = dict(sd["state_dict"])
    with torch.device("meta"):
        model = ArcFace()
    validate_state_dict(sd, model.state_dict(), str(path),
                        hint=f"expected TreB1eN's IR-SE-50 ArcFace weights ({ARCFACE_FILE})")
    model.load_state_dict({k: v.float().clone() for k, v in sd.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False).to(device)


class IDLoss(nn.Module):
    """Identity loss `mean_i (1 - <F(y_hat_i), F(y_i)>)` with F = ArcFace on the face crop.

    Source: official `criteria/id_loss.py::IDLoss` (crop [35:223, 32:220], AdaptiveAvgPool2d(112),
    target features detached; `sim_improvement` = mean of `<F(y_hat), F(y)> - <F(y), F(x)>`).

    Args:
        facenet: from `load_arcface`.
        image_size: side of the images the loss sees (the crop scales with it).
    """

    def __init__(self, facenet: ArcFace, image_size: int = 256):
        super().__init__()
        self.facenet = facenet
        self.crop = face_crop(image_size)
        self.face_pool = nn.AdaptiveAvgPool2d((112, 112))

    def extract_feats(self, img: torch.Tensor) -> torch.Tensor:
        """img `[B, 3, S, S]` in [-1, 1] -> `[B, 512]` unit features of the face crop."""
        t, b, l, r = self.crop
        return self.facenet(self.face_pool(img[:, :, t:b, l:r]))

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, float, list]:
        """Returns `(loss, sim_improvement, id_logs)`; `x` is used for logging only, when it is RGB
        (official: always, which fails for sketch / segmentation inputs)."""
        y_hat_feats = self.extract_feats(y_hat)
        with torch.no_grad():
            y_feats = self.extract_feats(y)
            x_feats = self.extract_feats(x) if x.shape[1] == 3 else None
        diff_target = (y_hat_feats * y_feats).sum(1)  # [B]
        loss = (1 - diff_target).mean()
        logs, improvement = [], 0.0
        target_sim, out_feats = diff_target.detach(), y_hat_feats.detach()
        for i in range(y_hat.shape[0]):
            entry = {"diff_target": float(target_sim[i])}
            if x_feats is not None:
                entry["diff_input"] = float(out_feats[i].dot(x_feats[i]))
                entry["diff_views"] = float(y_feats[i].dot(x_feats[i]))
                improvement += entry["diff_target"] - entry["diff_views"]
            logs.append(entry)
        return loss, improvement / y_hat.shape[0], logs


def w_norm_loss(w_plus: torch.Tensor, latent_avg: torch.Tensor | None) -> torch.Tensor:
    """W-norm regulariser `mean_b ||w_plus_b - latent_avg||_F` (the paper's L_reg, Eq. 3).

    Source: official `criteria/w_norm.py::WNormLoss` (`latent_avg` subtracted when
    `start_from_latent_avg`; Frobenius norm over styles and channels; sum / batch).

    Args:
        w_plus: `[B, n_styles, 512]` float32, the codes fed to the generator.
        latent_avg: `[n_styles or 1, 512]` or `[512]`, or None (no subtraction).

    Returns:
        Scalar tensor.
    """
    if latent_avg is not None:
        w_plus = w_plus - latent_avg
    return w_plus.norm(2, dim=(1, 2)).sum() / w_plus.shape[0]


class PSPLoss(nn.Module):
    """The weighted sum of official `Coach.calc_loss`.

    Args:
        opts: training opts (`*_lambda`, `start_from_latent_avg`, `image_size`, `ir_se50_weights`,
            `lpips_backbone`).
        device: where the loss networks live.

    Raises:
        MissingWeightsError: LPIPS or ID loss switched on without its weight files (the message
            names the file and the option that turns the loss off).
        CheckpointError: a weight file of the wrong kind.
    """

    def __init__(self, opts: Mapping[str, Any], device: str | torch.device = "cpu"):
        super().__init__()
        self.lambdas = {k: float(opts[k]) for k in ("id_lambda", "l2_lambda", "lpips_lambda", "lpips_lambda_crop",
                                                     "l2_lambda_crop", "w_norm_lambda")}
        self.start_from_latent_avg = bool(opts["start_from_latent_avg"])
        self.crop = face_crop(int(opts.get("image_size", 256)))
        self.lpips = None
        if self.lambdas["lpips_lambda"] > 0 or self.lambdas["lpips_lambda_crop"] > 0:
            try:
                self.lpips = load_lpips("alex", device=device, backbone_path=opts.get("lpips_backbone"))
            except MissingWeightsError as e:
                on = [f"--{k.replace('_', '-')} {v:g}" for k, v in self.lambdas.items()
                      if k.startswith("lpips") and v > 0]
                raise MissingWeightsError(
                    f"{e}. The LPIPS loss is on ({', '.join(on)}): pass the file with --lpips-backbone FILE, or "
                    f"turn the loss off with {' '.join(o.split()[0] + ' 0' for o in on)}") from None
        self.id_loss = None
        if self.lambdas["id_lambda"] > 0:
            facenet = load_arcface(opts.get("ir_se50_weights"), device, f"--id-lambda {self.lambdas['id_lambda']:g}")
            self.id_loss = IDLoss(facenet, int(opts.get("image_size", 256)))

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_hat: torch.Tensor, w_plus: torch.Tensor,
                latent_avg: torch.Tensor | None) -> tuple[torch.Tensor, dict, list | None]:
        """Official `calc_loss(x, y, y_hat, latent)`.

        Args:
            x: `[B, input_nc, S, S]` encoder input (ID-loss logging only).
            y: `[B, 3, S, S]` target in [-1, 1].
            y_hat: `[B, 3, S, S]` output, `face_pool(G(w_plus))`.
            w_plus: `[B, n_styles, 512]` codes given to the generator.
            latent_avg: the model's latent_avg (`[n_styles, 512]`), used by the W-norm loss.

        Returns:
            `(loss, loss_dict, id_logs)`: scalar loss; floats `loss_id`, `id_improve`, `loss_l2`,
            `loss_lpips`, `loss_lpips_crop`, `loss_l2_crop`, `loss_w_norm` (those switched on) and
            `loss`; per-sample ID logs or None.
        """
        lam = self.lambdas
        loss = y_hat.new_zeros(())
        loss_dict: dict[str, float] = {}
        id_logs = None
        t, b, l, r = self.crop
        if self.id_loss is not None:
            loss_id, improvement, id_logs = self.id_loss(y_hat, y, x)
            loss_dict["loss_id"], loss_dict["id_improve"] = float(loss_id.detach()), float(improvement)
            loss = loss + lam["id_lambda"] * loss_id
        if lam["l2_lambda"] > 0:
            loss_l2 = F.mse_loss(y_hat, y)
            loss_dict["loss_l2"] = float(loss_l2.detach())
            loss = loss + lam["l2_lambda"] * loss_l2
        if lam["lpips_lambda"] > 0:
            loss_lpips = self.lpips(y_hat, y).mean()
            loss_dict["loss_lpips"] = float(loss_lpips.detach())
            loss = loss + lam["lpips_lambda"] * loss_lpips
        if lam["lpips_lambda_crop"] > 0:
            loss_lpips_crop = self.lpips(y_hat[:, :, t:b, l:r], y[:, :, t:b, l:r]).mean()
            loss_dict["loss_lpips_crop"] = float(loss_lpips_crop.detach())
            loss = loss + lam["lpips_lambda_crop"] * loss_lpips_crop
        if lam["l2_lambda_crop"] > 0:
            loss_l2_crop = F.mse_loss(y_hat[:, :, t:b, l:r], y[:, :, t:b, l:r])
            loss_dict["loss_l2_crop"] = float(loss_l2_crop.detach())
            loss = loss + lam["l2_lambda_crop"] * loss_l2_crop
        if lam["w_norm_lambda"] > 0:
            loss_w_norm = w_norm_loss(w_plus, latent_avg if self.start_from_latent_avg else None)
            loss_dict["loss_w_norm"] = float(loss_w_norm.detach())
            loss = loss + lam["w_norm_lambda"] * loss_w_norm
        loss_dict["loss"] = float(loss.detach())
        return loss, loss_dict, id_logs
