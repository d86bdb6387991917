"""engine.latents and Engine.mapping: style mixing against the official golden vectors, editing, interpolation, pictures.

The golden style-mixing vectors (`shared/golden/public_ffhq_encode_256_seed0.npz`, `stylemix_*`)
go through the engine's path (`Engine.mapping`, `engine.latents.mix`, `Engine.synthesize`), not
only through `reference.style_mix` (that is `tests/test_golden.py`).
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine import latents as lt
from reference.description import ModelDescription
from reference.psp import load_mapping
from engine.api import Engine, UsageError
from export.compare import assert_close

GOLDEN_MASK = "8-13"  # the golden vectors' latent_mask=[8..13] at 256 px (14 styles)


@pytest.fixture(scope="module")
def golden(shared):
    data = np.load(shared / "golden" / "public_ffhq_encode_256_seed0.npz")
    return {k: torch.from_numpy(data[k]) for k in data.files}


@pytest.fixture(scope="module")
def eng256(ffhq256_checkpoint):
    return engine.load(ffhq256_checkpoint, backend="reference")


# ------------------------------------------------------------------------------------------------
# Golden style mixing through Engine.mapping + latents.mix


def test_mixing_z_is_the_golden_convention(golden):
    z = lt.mixing_z(0, 4)
    assert z.dtype == np.float32 and z.shape == (4, 512)
    assert np.array_equal(z, golden["stylemix_z"].numpy())


def test_mapping_reproduces_golden_inject_latents(eng256, golden):
    w = eng256.mapping(golden["stylemix_z"])
    assert w.shape == (4, 512) and w.dtype == torch.float32
    assert_close(w[:, None, :].expand(-1, 14, -1), golden["stylemix_inject_latents"], "golden")


@pytest.mark.parametrize("alpha, key", [(None, "stylemix_alpha_none_latents"), (0.5, "stylemix_alpha_0_5_latents")],
                         ids=["replace", "alpha0.5"])
def test_mix_reproduces_golden_latents(eng256, golden, alpha, key):
    w_plus = golden["latents"]  # the encoder's W+ (codes + latent_avg) of the 4 golden inputs
    mask = lt.parse_latent_mask(GOLDEN_MASK, eng256.n_styles)
    out = lt.mix(eng256, w_plus, lt.mixing_z(0, 4), mask, alpha)  # [B=4, K=4, 14, 512]
    assert out.shape == (4, 4, 14, 512)
    # the golden run mixed z[i] into image i: the diagonal; the other pairs follow the same rule
    assert_close(torch.stack([out[i, i] for i in range(4)]), golden[key], "golden")
    assert torch.equal(out[:, :, :8], w_plus[:, None, :8].expand(-1, 4, -1, -1)), "unmasked styles are the encoder's"
    w = eng256.mapping(golden["stylemix_z"])
    expected_fine = w[None, :, None, :] if alpha is None else alpha * w[None, :, None, :] + (1 - alpha) * w_plus[:, None, 8:]
    torch.testing.assert_close(out[:, :, 8:], expected_fine.expand(4, 4, 6, 512), rtol=0, atol=1e-6)


def test_mixed_images_reproduce_golden(eng256, golden):
    """The engine's mix rendered by Engine.synthesize is the golden image. One of the four (a 256 px
    render costs seconds): all four are rendered from the golden latents by tests/test_golden.py
    (test_style_mixing, the same generator), and test_mix_reproduces_golden_latents checks that the
    engine's mixed latents are the golden ones for all four."""
    mask = lt.parse_latent_mask(GOLDEN_MASK, eng256.n_styles)
    out = lt.mix(eng256, golden["latents"], lt.mixing_z(0, 4), mask, 0.5)
    # one image at a time, as the golden run did (batch size changes fp32 rounding by ~1e-5)
    image = eng256.synthesize(out[0, 0][None])
    assert_close(image, golden["stylemix_alpha_0_5_images"][:1], "golden")


def test_mapping_argument_errors(eng256):
    with pytest.raises(ValueError, match=r"expected z \[B, 512\]"):
        eng256.mapping(torch.zeros(2, 511))
    with pytest.raises(ValueError, match="float32"):
        eng256.mapping(torch.zeros(2, 512, dtype=torch.float64))
    with pytest.raises(UsageError, match=r"alpha must be in \[0, 1\]"):
        lt.mix(eng256, torch.zeros(1, 14, 512), lt.mixing_z(0, 1), [8], alpha=1.5)
    with pytest.raises(ValueError, match=r"\[B, 14, 512\]"):
        lt.mix(eng256, torch.zeros(1, 18, 512), lt.mixing_z(0, 1), [8])


# ------------------------------------------------------------------------------------------------
# Engine.mapping without the model's torch weights (the graph backends: tests/test_onnx.py::test_engine_backends)


def test_mapping_from_checkpoint(ffhq256_checkpoint, eng256, golden, tmp_path):
    net = load_mapping(ffhq256_checkpoint)
    with torch.inference_mode():
        assert torch.equal(net(golden["stylemix_z"]), eng256.mapping(golden["stylemix_z"]))
    ckpt = torch.load(ffhq256_checkpoint, map_location="cpu", weights_only=True, mmap=True)
    style = {k: v.clone() for k, v in ckpt["state_dict"].items() if k.startswith("decoder.style.")}
    del style["decoder.style.3.bias"]
    broken = tmp_path / "broken.pt"
    torch.save({"state_dict": style, "opts": ckpt["opts"]}, broken)
    with pytest.raises(engine.CheckpointError, match=r"broken\.pt.*1 missing key\(s\): 3\.bias"):
        load_mapping(broken)


def test_mapping_without_a_checkpoint_is_a_usage_error():
    plans = types.SimpleNamespace(description=ModelDescription(input_nc=3, label_nc=0, output_size=256, n_styles=14,
                                                               precision="fp16", backend="tensorrt"))
    eng = Engine.around(plans, Path("plans/psp"))
    with pytest.raises(UsageError, match="holds no mapping network.*--backend engine"):
        eng.mapping(torch.zeros(1, 512))


# ------------------------------------------------------------------------------------------------
# Seeds, masks


def test_mixing_z_is_deterministic_and_prefix_stable():
    assert np.array_equal(lt.mixing_z(7, 3), lt.mixing_z(7, 3))
    assert np.array_equal(lt.mixing_z(7, 2), lt.mixing_z(7, 5)[:2]), "output k does not depend on K"
    assert not np.array_equal(lt.mixing_z(7, 3), lt.mixing_z(8, 3))
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(UsageError, match="seed"):
            lt.mixing_z(bad, 1)
    with pytest.raises(UsageError, match="n_outputs"):
        lt.mixing_z(0, 0)


@pytest.mark.parametrize("spec, expected", [("8-13", [8, 9, 10, 11, 12, 13]), ("8,9,12-13", [8, 9, 12, 13]),
                                            (" 3, 1-2 ,3", [1, 2, 3]), ("0", [0])])
def test_parse_latent_mask(spec, expected):
    assert lt.parse_latent_mask(spec, 14) == expected


@pytest.mark.parametrize("spec, message", [
    ("", "empty"), ("8,,9", "'' is not an index"), ("8-", "'8-' is not an index or a range"),
    ("a-b", "'a-b' is not an index"), ("-1", "'-1' is not an index"), ("1.5", "'1.5' is not an index"),
    ("9-8", "reversed range '9-8'; write it low-high (8-9)"),
    ("8-14", "style index 14 out of range: this checkpoint has 14 styles (0-13)"),
])
def test_latent_mask_errors(spec, message):
    with pytest.raises(UsageError, match="--latent-mask") as e:
        lt.parse_latent_mask(spec, 14)
    assert message in str(e.value)


def test_default_latent_mask():
    assert lt.default_latent_mask(14) == list(range(8, 14))
    assert lt.default_latent_mask(18) == list(range(8, 18))
    with pytest.raises(UsageError, match="empty for a checkpoint with 8 styles; pass --latent-mask"):
        lt.default_latent_mask(8)
    assert lt.parse_latent_mask("8-99", None) == list(range(8, 100)), "syntax only without n_styles"


# ------------------------------------------------------------------------------------------------
# Directions and editing


def _save(path: Path, array) -> Path:
    np.save(path, array, allow_pickle=False)
    return path


@pytest.mark.parametrize("shape", [(512,), (1, 512), (14, 512), (1, 14, 512)])
def test_direction_shapes_accepted(tmp_path, shape):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape).astype(np.float32)
    d = lt.load_direction(_save(tmp_path / "d.npy", a), 14)
    assert d.shape == (14, 512) and d.dtype == np.float32
    assert np.array_equal(d, np.broadcast_to(a.reshape(-1, 512), (14, 512)))


@pytest.mark.parametrize("shape", [(511,), (2, 512), (13, 512), (18, 512), (2, 14, 512), (14, 512, 1)])
def test_direction_shape_errors_name_the_file(tmp_path, shape):
    path = _save(tmp_path / "wrong_dir.npy", np.zeros(shape, np.float32))
    with pytest.raises(lt.LatentFileError) as e:
        lt.load_direction(path, 14)
    msg = str(e.value)
    assert msg.startswith(str(path)) and str(list(shape)) in msg and "[14, 512]" in msg and "[512]" in msg


def test_bad_direction_files(tmp_path):
    cases = {
        "missing.npy": (None, "direction file not found"),
        "pickled.npy": (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
                        "pickled Python objects"),
        "archive.npy": (_savez, ".npz archive"),
        "text.npy": (lambda p: p.write_text("not an array"), "not a .npy array file"),
        "truncated.npy": (lambda p: p.write_bytes(_npy_bytes(np.zeros(512, np.float32))[:100]), "not a .npy array file"),
        "nan.npy": (lambda p: np.save(p, np.full(512, np.nan, np.float32)), "NaN or Inf"),
        "complex.npy": (lambda p: np.save(p, np.zeros(512, np.complex64)), "dtype complex64"),
    }
    for name, (make, message) in cases.items():
        path = tmp_path / name
        if make is not None:
            make(path)
        with pytest.raises(lt.LatentFileError, match=message) as e:
            lt.load_direction(path, 14)
        assert str(path) in str(e.value)
    # a pickle is refused without being unpickled
    evil = tmp_path / "evil.npy"
    evil.write_bytes(pickle.dumps(np.zeros(512)))
    with pytest.raises(lt.LatentFileError, match="evil.npy: a Python pickle, which is never loaded"):
        lt.load_direction(evil, 14)


def _savez(path: Path) -> None:
    with open(path, "wb") as f:
        np.savez(f, d=np.zeros(512))


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_parse_edit():
    assert (lt.parse_edit("smile.npy:1.5").path, lt.parse_edit("smile.npy:1.5").strength) == (Path("smile.npy"), 1.5)
    assert lt.parse_edit("age.npy:-2").strength == -2.0
    assert lt.parse_edit("pose.npy").strength == 1.0, "strength defaults to 1"
    assert lt.parse_edit("C:\\dirs\\pose.npy").path == Path("C:\\dirs\\pose.npy")
    assert lt.parse_edit("C:\\dirs\\pose.npy:0.5").path == Path("C:\\dirs\\pose.npy")
    for bad, message in ((":2", "no file"), ("a.npy:inf", "finite"), ("a.npy:nan", "finite")):
        with pytest.raises(UsageError, match=message):
            lt.parse_edit(bad)


def test_editing(tmp_path):
    rng = np.random.default_rng(1)
    w_plus = torch.from_numpy(rng.standard_normal((2, 14, 512)).astype(np.float32))
    w_dir = rng.standard_normal(512).astype(np.float32)
    plus_dir = np.zeros((14, 512), np.float32)
    plus_dir[[3, 4]] = rng.standard_normal((2, 512))
    d_w = lt.load_edit(lt.parse_edit(f"{_save(tmp_path / 'w.npy', w_dir)}:0"), 14)
    d_plus = lt.load_edit(lt.parse_edit(f"{_save(tmp_path / 'plus.npy', plus_dir)}:2.5"), 14)
    assert len(d_w.sha256) == 64 and d_w.sha256 != d_plus.sha256

    assert lt.apply_edits(w_plus, [d_w]) is w_plus, "strength 0 is the identity"
    assert lt.apply_edits(w_plus, []) is w_plus

    edited = lt.apply_edits(w_plus, [d_plus])
    changed = (edited != w_plus).any(dim=2).any(dim=0)  # [14] styles touched
    assert changed.nonzero().flatten().tolist() == [3, 4], "a W+ direction moves only its nonzero styles"
    torch.testing.assert_close(edited[:, 3:5], w_plus[:, 3:5] + 2.5 * torch.from_numpy(plus_dir[3:5]))

    both = lt.apply_edits(w_plus, [d_plus, dataclasses.replace(d_w, strength=-1.0)])
    torch.testing.assert_close(both, w_plus + torch.from_numpy(2.5 * plus_dir - w_dir[None]), rtol=0, atol=1e-5)
    assert (both != w_plus).any(dim=2).all(), "a W direction moves every style"
    # the numpy path gives the same float32 result as the torch path
    assert np.array_equal(lt.apply_edits(w_plus.numpy(), [d_plus]), edited.numpy())
    with pytest.raises(ValueError, match="not loaded"):
        lt.apply_edits(w_plus, [lt.parse_edit("x.npy:1")])


# ------------------------------------------------------------------------------------------------
# Interpolation and pictures


def test_interpolate():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 14, 512)).astype(np.float32)
    frames = lt.interpolate(a, b[None], 5)
    assert frames.shape == (5, 14, 512) and frames.dtype == np.float32
    assert np.array_equal(frames[0], a) and np.array_equal(frames[-1], b), "both ends exact"
    np.testing.assert_allclose(frames[2], (a + b) / 2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.diff(frames, axis=0), np.broadcast_to((b - a) / 4, (4, 14, 512)), atol=1e-5)
    with pytest.raises(ValueError, match="steps >= 2"):
        lt.interpolate(a, b, 1)
    with pytest.raises(ValueError, match="one shape"):
        lt.interpolate(a, b[:10], 3)


def test_strip_and_grid():
    red = np.zeros((64, 32, 3), np.uint8)
    red[..., 0] = 255
    out = np.full((128, 128, 3), 7, np.uint8)
    s = lt.strip([red, out, out])
    assert s.shape == (128, 64 + 128 + 128, 3) and s.dtype == np.uint8
    assert (s[:, :64, 0] > 250).all() and (s[:, :64, 1:] < 5).all(), "input resized with its aspect kept"
    assert (s[:, 64:] == 7).all()
    assert lt.strip([out], height=32).shape == (32, 32, 3)
    g = lt.grid([[red, out], [out]], height=64)
    assert g.shape == (128, 32 + 64, 3)
    assert (g[64:, 64:] == 255).all(), "short rows are padded with white"
    with pytest.raises(ValueError, match="uint8"):
        lt.strip([np.zeros((4, 4, 3), np.float32)])
    assert lt.fit_jpeg(np.zeros((2, 70000, 3), np.uint8)).shape[1] == lt.JPEG_MAX_SIDE
