"""reference.perceptual: the LPIPS loader (weight files, errors, the module's contract).

The ImageNet backbone weights cannot be downloaded here, so these tests write a RANDOMLY
INITIALISED backbone state dict, in torchvision's key layout, to a temporary $TORCH_HOME. They test
the loading path, the error messages and the module's contract (eval, frozen, [B] distances, d(x, x)
= 0, symmetry, gradients w.r.t. the images); they do NOT validate LPIPS values, which need the real
backbone. The learned linear layers are the real ones shipped by the lpips package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from reference.plumbing.errors import CheckpointError, PSPError
from reference.perceptual import (LPIPS, LPIPS_BACKBONE_FILES, LPIPS_MIN_SIZE, MissingWeightsError, load_lpips,
                                  lpips_backbone_path)

# torchvision 0.28 `models.alexnet().features` / `vgg16().features` / `squeezenet1_1().features`:
# parameter name -> shape, written out from torchvision's model definitions (torchvision itself
# cannot be imported next to the CPU torch here). The real weight files hold exactly these keys
# (plus the classifier's, which LPIPS does not use).
TORCHVISION_FEATURES = {
    "alex": {
        "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
        "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
        "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
        "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
        "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
    },
    "vgg": {f"features.{i}.{p}": s for i, c_in, c_out in
            [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
             (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
            for p, s in (("weight", (c_out, c_in, 3, 3)), ("bias", (c_out,)))},
    "squeeze": {"features.0.weight": (64, 3, 3, 3), "features.0.bias": (64,)} | {
        f"features.{i}.{name}.{p}": s
        for i, c_in, sq, e in [(3, 64, 16, 64), (4, 128, 16, 64), (6, 128, 32, 128), (7, 256, 32, 128),
                               (9, 256, 48, 192), (10, 384, 48, 192), (11, 384, 64, 256), (12, 512, 64, 256)]
        for name, w in (("squeeze", (sq, c_in, 1, 1)), ("expand1x1", (e, sq, 1, 1)), ("expand3x3", (e, sq, 3, 3)))
        for p, s in (("weight", w), ("bias", (w[0],)))
    },
}


def random_backbone(net: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with torchvision's keys for `net` (He-scaled, so features do not vanish)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in TORCHVISION_FEATURES[net].items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        sd[k] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5 if len(shape) > 1 else torch.zeros(shape)
    sd["classifier.6.bias"] = torch.zeros(1000)  # a key of the real file that LPIPS must ignore
    return sd


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


@pytest.fixture
def alex(torch_home) -> LPIPS:
    """load_lpips('alex') on a random backbone written where torchvision would cache the real one."""
    path = lpips_backbone_path("alex")
    path.parent.mkdir(parents=True)
    torch.save(random_backbone("alex"), path)
    return load_lpips("alex")


def images(seed: int, n: int = 2, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_backbone_path_follows_torch_home(torch_home):
    for net, name in LPIPS_BACKBONE_FILES.items():
        assert lpips_backbone_path(net) == torch_home / "hub" / "checkpoints" / name
    with pytest.raises(ValueError, match="one of"):
        lpips_backbone_path("resnet")


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_missing_backbone_names_file_place_and_fix(torch_home, net):
    with pytest.raises(MissingWeightsError) as info:
        load_lpips(net)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, PSPError)
    assert LPIPS_BACKBONE_FILES[net] in msg
    assert str(lpips_backbone_path(net)) in msg  # where it was looked for
    assert "--lpips-backbone" in msg and "TORCH_HOME" in msg  # how to provide it: the CLI option


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_backbone_has_torchvision_layout(net):
    with torch.device("meta"):  # shapes only, no memory
        model = LPIPS(net)
    ours = {f"features.{k}": tuple(v.shape) for k, v in model.features.state_dict().items()}
    assert ours == TORCHVISION_FEATURES[net]


def test_linear_layers_are_the_lpips_packages(alex):
    folder = Path(list(importlib.util.find_spec("lpips").submodule_search_locations)[0])
    shipped = torch.load(folder / "weights" / "v0.1" / "alex.pth", map_location="cpu", weights_only=True)
    for i, lin in enumerate(alex.lins):
        torch.testing.assert_close(lin.weight, shipped[f"lin{i}.model.1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(alex.features[3].weight, random_backbone("alex")["features.3.weight"], rtol=0, atol=0)


def test_contract_eval_frozen_zero_symmetric_positive(alex):
    assert not alex.training
    assert not any(p.requires_grad for p in alex.parameters())
    x, y = images(1), images(2)
    d_xx, d_xy, d_yx = alex(x, x), alex(x, y), alex(y, x)
    assert d_xy.shape == (2,) and d_xy.dtype == torch.float32
    torch.testing.assert_close(d_xx, torch.zeros(2), rtol=0, atol=1e-7)
    assert (d_xy > 0).all(), d_xy
    torch.testing.assert_close(d_xy, d_yx, rtol=1e-5, atol=1e-7)
    # each row is that pair's own distance, not a batch mean
    torch.testing.assert_close(alex(x[1:], y[1:]), d_xy[1:], rtol=1e-5, atol=1e-7)
    # more noise, further away
    near = alex(x, (x + 0.05 * images(3)).clamp(-1, 1))
    assert (near < d_xy).all(), (near, d_xy)


def test_gradients_flow_to_the_images(alex):
    x = images(1).requires_grad_(True)
    y = images(2)
    alex(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in alex.parameters())


def test_explicit_path_and_bad_files(torch_home, tmp_path):
    elsewhere = tmp_path / "my_alexnet.pth"
    torch.save(random_backbone("alex", seed=5), elsewhere)
    model = load_lpips("alex", backbone_path=elsewhere)
    torch.testing.assert_close(model.features[0].weight, random_backbone("alex", seed=5)["features.0.weight"])

    with pytest.raises(MissingWeightsError, match="not found at .*absent.pth.*give the path of that file"):
        load_lpips("alex", backbone_path=tmp_path / "absent.pth")

    wrong = tmp_path / "wrong.pth"
    torch.save(random_backbone("squeeze"), wrong)  # another backbone's file
    with pytest.raises(CheckpointError, match="features.3.weight"):
        load_lpips("alex", backbone_path=wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_lpips("alex", backbone_path=garbage)


def test_shape_errors(alex):
    with pytest.raises(ValueError, match="one shape"):
        alex(images(1), images(2, size=32))
    s = LPIPS_MIN_SIZE["alex"] - 1
    with pytest.raises(ValueError, match=f"at least {s + 1} px"):
        alex(images(1, size=s), images(2, size=s))
    s += 1
    assert alex(images(1, size=s), images(2, size=s)).shape == (2,)
