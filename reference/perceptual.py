"""LPIPS v0.1 (Zhang et al., CVPR 2018), the perceptual distance pSp trains and reports with.

The official pSp uses ``LPIPS(net_type='alex', version='0.1')`` from ``criteria/lpips/``: an ImageNet
backbone (torchvision's layout), per-layer channel-normalised features, squared differences, a learned
1x1 linear layer per tap, spatial mean, sum over taps.

Where the weights come from:
    - the learned linear layers: the ``lpips`` PyPI package ships them (``lpips/weights/v0.1/<net>.pth``);
      they are read with ``torch.load(weights_only=True)`` without importing the package.
    - the backbone: the file torchvision caches for ImageNet weights
      (``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth`` ...). It cannot be downloaded here;
      a missing file raises :class:`MissingWeightsError` saying where to put it.

Why the backbones are defined here rather than taken from ``lpips.LPIPS``/torchvision: the only
torchvision wheel for torch 2.13 on the registry is a CUDA build whose ``import torchvision`` fails
against the CPU torch (``_meta_registrations`` registers a fake for ``torchvision::nms`` that does not
exist), and ``import lpips`` imports torchvision. The modules below keep torchvision's ``features.<i>``
parameter names, so torchvision's weight files load into them unchanged, and they reproduce
``lpips/pretrained_networks.py`` slice for slice.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from .plumbing.errors import CheckpointError, PSPError

__all__ = [
    "LPIPS",
    "LPIPS_BACKBONE_FILES",
    "LPIPS_MIN_SIZE",
    "MissingWeightsError",
    "load_lpips",
    "lpips_backbone_path",
]

LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
"""The ImageNet weight file torchvision caches for each LPIPS backbone (its ``model_urls`` names)."""

_BACKBONE_URL = "https://download.pytorch.org/models/{}"
_TORCHVISION_BUILDER = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


class MissingWeightsError(PSPError, FileNotFoundError):
    """A weight file LPIPS needs is not on disk (it cannot be downloaded at run time)."""


# ----------------------------------------------------------------------------------------------------
# Backbones in torchvision's layout (features.<index>.<param>), tapped after the same ReLUs as
# lpips/pretrained_networks.py.


class _Fire(nn.Module):
    """SqueezeNet Fire module, torchvision.models.squeezenet.Fire (same parameter names)."""

    def __init__(self, c_in: int, c_squeeze: int, c_e1: int, c_e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, c_squeeze, kernel_size=1)
        self.expand1x1 = nn.Conv2d(c_squeeze, c_e1, kernel_size=1)
        self.expand3x3 = nn.Conv2d(c_squeeze, c_e3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)


def _alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),  # 0, 1 -> tap relu1
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),  # 3, 4 -> relu2
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),  # 6, 7 -> relu3
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),  # 8, 9 -> relu4
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),  # 10, 11 -> relu5
    )


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers)  # taps after 3, 8, 15, 22, 29 (relu1_2 ... relu5_3)


def _squeezenet1_1_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=3, stride=2), nn.ReLU(),  # 0, 1 -> relu1
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        _Fire(64, 16, 64, 64), _Fire(128, 16, 64, 64),  # 3, 4 -> relu2
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        _Fire(128, 32, 128, 128), _Fire(256, 32, 128, 128),  # 6, 7 -> relu3
        nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
        _Fire(256, 48, 192, 192),  # 9 -> relu4
        _Fire(384, 48, 192, 192),  # 10 -> relu5
        _Fire(384, 64, 256, 256),  # 11 -> relu6
        _Fire(512, 64, 256, 256),  # 12 -> relu7
    )


# net -> (features builder, last feature index of each tap, channels of each tap)
# Smallest image side each backbone maps to a non-empty last tap (found by running it on meta tensors).
LPIPS_MIN_SIZE = {"alex": 31, "vgg": 16, "squeeze": 17}
_NETS = {
    "alex": (_alexnet_features, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
    "vgg": (_vgg16_features, (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
    "squeeze": (_squeezenet1_1_features, (1, 4, 7, 9, 10, 11, 12), (64, 128, 256, 384, 384, 512, 512)),
}


class LPIPS(nn.Module):
    """LPIPS v0.1 distance, lpips/lpips.py ``LPIPS(net, version='0.1', lpips=True, spatial=False)``.

    Built with random weights; use :func:`load_lpips` to get the calibrated network.

    Args:
        net: str, backbone: "alex" (official pSp), "vgg" or "squeeze".
    """

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in _NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(_NETS)}, got {net!r}")
        build, taps, channels = _NETS[net]
        self.net_type = net
        self.taps = taps
        # ScalingLayer of lpips 0.1: inputs in [-1, 1] -> ImageNet-normalised.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.features = build()[: taps[-1] + 1]
        # NetLinLayer: 1x1 conv, no bias (its Dropout is the identity in eval mode and left out).
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in channels)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                # lpips.normalize_tensor: unit L2 norm over channels, eps 1e-10.
                feats.append(x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + 1e-10))
        return feats

    def forward(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        """LPIPS distance, lpips/lpips.py ``LPIPS.forward`` (normalize=False, retPerLayer=False).

        Args:
            img0: [B, 3, H, W] float32, first image, in [-1, 1].
            img1: [B, 3, H, W] float32, second image, in [-1, 1], same shape as img0.

        Returns:
            [B] float32 distances (>= 0, 0 for identical inputs); differentiable w.r.t. both inputs.

        Raises:
            ValueError: the shapes differ or are not [B, 3, H, W], or a side is under
                ``LPIPS_MIN_SIZE[net]`` px.
        """
        if img0.shape != img1.shape or img0.dim() != 4 or img0.shape[1] != 3:
            raise ValueError(
                f"LPIPS needs two [B, 3, H, W] images of one shape, got {tuple(img0.shape)} and {tuple(img1.shape)}"
            )
        if min(img0.shape[-2:]) < LPIPS_MIN_SIZE[self.net_type]:
            raise ValueError(
                f"LPIPS '{self.net_type}' needs images of at least {LPIPS_MIN_SIZE[self.net_type]} px a side, "
                f"got {img0.shape[-1]}x{img0.shape[-2]}"
            )
        n = img0.shape[0]
        both = torch.cat([img0, img1], 0)
        feats = self._taps((both - self.shift) / self.scale)
        dist = torch.zeros(n, dtype=feats[0].dtype, device=both.device)
        for lin, f in zip(self.lins, feats, strict=True):
            dist = dist + lin((f[:n] - f[n:]) ** 2).mean(dim=(1, 2, 3))
        return dist


# ----------------------------------------------------------------------------------------------------
# Weight files


def lpips_backbone_path(net: str = "alex") -> Path:
    """Where torchvision caches the ImageNet weights of an LPIPS backbone (torch.hub, honours $TORCH_HOME).

    Args:
        net: str, "alex", "vgg" or "squeeze".

    Returns:
        ``torch.hub.get_dir()/checkpoints/<LPIPS_BACKBONE_FILES[net]>`` (the file may not exist).

    Raises:
        ValueError: unknown net.
    """
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


def _linear_weights_path(net: str) -> Path:
    # find_spec on a top-level package locates it without running its __init__ (which imports torchvision).
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(
            f"LPIPS linear-layer weights v0.1/{net}.pth not found: the 'lpips' package that ships them is not "
            "installed; run `pip install lpips==0.1.4`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth"
    if not path.is_file():
        raise MissingWeightsError(
            f"LPIPS linear-layer weights not found at {path}; reinstall the 'lpips' package "
            "(`pip install --force-reinstall lpips==0.1.4`)"
        )
    return path


def _missing_backbone(net: str, path: Path, explicit: bool) -> MissingWeightsError:
    name = LPIPS_BACKBONE_FILES[net]
    where = ("give the path of that file" if explicit else
             f"copy it to {path.parent}/ (that folder follows $TORCH_HOME), or give its path "
             "with --lpips-backbone FILE")
    return MissingWeightsError(
        f"LPIPS backbone weights {name} not found at {path}. Get {_BACKBONE_URL.format(name)} on a machine "
        f"with internet (or run `torchvision.models.{_TORCHVISION_BUILDER[net]}(weights='IMAGENET1K_V1')` there, "
        f"which caches it) and {where}"
    )


def load_lpips(
    net: str = "alex",
    device: str | torch.device = "cpu",
    backbone_path: str | os.PathLike | None = None,
) -> LPIPS:
    """The calibrated LPIPS v0.1 network, official pSp ``criteria/lpips/lpips.py`` (net_type='alex').

    Args:
        net: str, backbone: "alex" (what pSp uses), "vgg" or "squeeze".
        device: where the module lives.
        backbone_path: the torchvision ImageNet weight file of that backbone; default
            :func:`lpips_backbone_path` (net).

    Returns:
        :class:`LPIPS` in eval mode with every parameter frozen (requires_grad False); calling it as
        ``module(img0, img1)`` with [B, 3, H, W] float32 images in [-1, 1] gives [B] float32 distances,
        differentiable w.r.t. the images.

    Raises:
        MissingWeightsError: the backbone file (or the lpips package's linear weights) is missing; the
            message names the file, where it was looked for and how to get it.
        CheckpointError: a weight file exists but does not hold that backbone's tensors.
        ValueError: unknown net.
    """
    if net not in _NETS:
        raise ValueError(f"LPIPS net must be one of {sorted(_NETS)}, got {net!r}")
    path = Path(backbone_path) if backbone_path is not None else lpips_backbone_path(net)
    if not path.is_file():
        raise _missing_backbone(net, path, explicit=backbone_path is not None)
    lin_path = _linear_weights_path(net)

    model = LPIPS(net)
    try:
        # mmap (zip-format files only): just the features.* tensors are read from a 233 MB alexnet file.
        backbone = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        linear = torch.load(lin_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"cannot read LPIPS weights ({path} / {lin_path}): {type(e).__name__}: {e}") from e
    if not isinstance(backbone, dict) or not isinstance(linear, dict):
        raise CheckpointError(f"{path} / {lin_path}: expected state dicts of tensors")

    wanted = model.features.state_dict().keys()
    state = {f"features.{k}": backbone.get(f"features.{k}") for k in wanted}
    # lpips' NetLinLayer keeps its conv at model.1 (model.0 is Dropout).
    state.update({f"lins.{i}.weight": linear.get(f"lin{i}.model.1.weight") for i in range(len(model.lins))})
    state.update(shift=model.shift, scale=model.scale)
    missing = sorted(k for k, v in state.items() if v is None)
    if missing:
        raise CheckpointError(
            f"{path} / {lin_path} do not hold the LPIPS '{net}' weights: missing {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}; use torchvision's {LPIPS_BACKBONE_FILES[net]}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: shapes do not match torchvision's {net} backbone: {e}") from e
    model.requires_grad_(False)
    return model.eval().to(device)
