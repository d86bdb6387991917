"""engine.metrics: PSNR / SSIM / MS-SSIM against independent computations, dlib identity on shared
photos, pairing, the CLI end to end (missing pair, corrupt file, exit codes, JSON) and the runtime
statistics of an engine.run manifest.

LPIPS values are not checked here (no real backbone weights can be had; see test_perceptual.py):
only that the CLI leaves LPIPS out with a message naming the file when the backbone is missing, and
includes it when a (random) backbone is present.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from engine import metrics
from engine.manifest import Manifest, InputStat
from engine.metrics import (DLIB_SAME_PERSON, MS_SSIM_MIN_SIZE, FaceIdentity, ms_ssim, pair_folders, psnr,
                            runtime_stats, ssim)
from reference.plumbing.errors import UsageError
from reference.perceptual import lpips_backbone_path

FACE = "faces/aligned/psp_input_img.jpg"  # young man, frontal
OTHER_PEOPLE = ["faces/aligned/restyle_face_img.jpg", "faces/aligned/hyperstyle_jackson.jpg"]
NO_FACE = "other/skimage_coffee.png"


def to01(u8: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [1, 3, H, W] float64 in [0, 1]."""
    return torch.from_numpy(np.array(u8)).permute(2, 0, 1)[None].double() / 255


def load256(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").resize((256, 256), Image.BILINEAR))


def jpeg_copy(u8: np.ndarray, quality: int = 80, side: int | None = None) -> np.ndarray:
    """Recompress as JPEG (optionally through a resize to `side` and back): a slightly degraded copy."""
    im = Image.fromarray(u8)
    if side:
        im = im.resize((side, side), Image.BICUBIC).resize(im.size, Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@pytest.fixture(scope="module")
def face256(shared) -> np.ndarray:
    return load256(shared / "data" / FACE)


@pytest.fixture(scope="module")
def face176(face256) -> np.ndarray:
    """A 176 px centre crop: above MS-SSIM's 161 px minimum, cheaper than 256."""
    return np.ascontiguousarray(face256[40:216, 40:216])


@pytest.fixture(scope="module")
def dlib_faces() -> FaceIdentity:
    return FaceIdentity()


@pytest.fixture(autouse=True)
def no_lpips_backbone(tmp_path, monkeypatch):
    """A $TORCH_HOME with no LPIPS backbone, whatever the machine caches (tests that want one write it)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


# ------------------------------------------------------------------------------------------------
# Pixel metrics


def test_psnr_identical_is_inf_and_means_skip_it(face256):
    x = to01(face256)
    assert psnr(x, x).item() == math.inf
    s = metrics._summary([math.inf, 30.0, 40.0, math.nan])
    assert s["mean"] == 35.0 and s["std"] == 5.0 and s["count"] == 2 and s["n_inf"] == 1 and s["n_nan"] == 1
    assert metrics._summary([math.inf, math.inf])["mean"] == math.inf
    assert metrics.to_json({"a": math.inf, "b": math.nan, "c": [1.5]}) == {"a": "inf", "b": None, "c": [1.5]}


def test_psnr_of_a_known_perturbation(face256):
    rng = np.random.default_rng(0)
    noisy = np.clip(face256.astype(np.int16) + rng.integers(-6, 7, face256.shape), 0, 255).astype(np.uint8)
    mse = np.mean((face256.astype(np.float64) / 255 - noisy.astype(np.float64) / 255) ** 2)
    expected = 10 * math.log10(1 / mse)
    got = psnr(to01(noisy), to01(face256)).item()
    assert abs(got - expected) < 1e-9, (got, expected)
    assert 30 < got < 45  # uniform +-6 noise on 8 bits: ~36 dB


def test_ssim_and_ms_ssim_are_one_for_identical_and_fall_with_noise(face176):
    x = to01(face176)
    assert ssim(x, x).item() == pytest.approx(1, abs=1e-9)
    assert ms_ssim(x, x).item() == pytest.approx(1, abs=1e-9)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    values = [(ssim(x, (x + s * noise).clamp(0, 1)).item(), ms_ssim(x, (x + s * noise).clamp(0, 1)).item())
              for s in (0.01, 0.05, 0.2)]
    for (s_hi, m_hi), (s_lo, m_lo) in zip(values, values[1:], strict=False):
        assert s_lo < s_hi < 1 and m_lo < m_hi < 1, values
    # symmetric, and per image in a batch
    y = (x + 0.05 * noise).clamp(0, 1)
    assert ssim(x, y).item() == pytest.approx(ssim(y, x).item(), abs=1e-12)
    batch = ms_ssim(torch.cat([x, y]), torch.cat([y, y]))
    assert batch[1].item() == pytest.approx(1, abs=1e-9) and batch[0].item() == pytest.approx(values[1][1], abs=1e-12)


def test_ms_ssim_minimum_size_is_a_clear_error():
    small = torch.rand(1, 3, MS_SSIM_MIN_SIZE - 1, MS_SSIM_MIN_SIZE + 40, dtype=torch.float64)
    with pytest.raises(ValueError, match=f">= {MS_SSIM_MIN_SIZE} px"):
        ms_ssim(small, small)
    ok = torch.rand(1, 3, MS_SSIM_MIN_SIZE, MS_SSIM_MIN_SIZE, dtype=torch.float64)
    assert ms_ssim(ok, ok).item() == pytest.approx(1, abs=1e-9)
    with pytest.raises(ValueError, match="SSIM needs"):
        ssim(small[..., :10, :10], small[..., :10, :10])


# ------------------------------------------------------------------------------------------------
# Identity


def test_identity_same_face_close_other_people_far(shared, face256, dlib_faces):
    # A recompressed, down-and-up-sized copy of the same photo: same person.
    cos_same, dist_same, note = dlib_faces.compare(jpeg_copy(face256, quality=70, side=180), face256)
    assert note is None
    assert dist_same < DLIB_SAME_PERSON / 3, dist_same
    assert cos_same > 0.99, cos_same
    for other in OTHER_PEOPLE:
        cos, dist, _ = dlib_faces.compare(load256(shared / "data" / other), face256)
        assert dist > DLIB_SAME_PERSON, (other, dist)
        assert cos < cos_same - 0.05, (other, cos, cos_same)


def test_identity_without_a_face_is_nan_with_reason(shared, face256, dlib_faces):
    coffee = load256(shared / "data" / NO_FACE)
    cos, dist, reason = dlib_faces.compare(coffee, face256)
    assert math.isnan(cos) and math.isnan(dist)
    assert reason == "no face found in pred (dlib HOG detector)"
    assert "pred and target" in dlib_faces.compare(coffee, coffee)[2]


# ------------------------------------------------------------------------------------------------
# Pairing and the CLI


def save(path: Path, u8: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(u8).save(path, **kw)
    return path


def test_pairing_rules(tmp_path):
    px = np.zeros((8, 8, 3), np.uint8)
    for rel in ["a.png", "sub/b.png", "x.jpg.png", "only_pred.png", "dup.png", "dup.jpg"]:
        save(tmp_path / "pred" / rel, px)
    for rel in ["a.jpg", "sub/b.jpeg", "x.jpg", "x.png", "only_target.png", "dup.png"]:
        save(tmp_path / "target" / rel, px)
    p = pair_folders(tmp_path / "pred", tmp_path / "target")
    assert [(n, a.name, b.relative_to(tmp_path / "target").as_posix()) for n, a, b in p.pairs] == [
        ("a", "a.png", "a.jpg"), ("sub/b", "b.png", "sub/b.jpeg"), ("x.jpg", "x.jpg.png", "x.jpg")]
    assert p.unmatched_pred == ["only_pred.png"]
    assert p.unmatched_target == ["dup.png", "only_target.png", "x.png"]
    assert [rel for rel, _ in p.ambiguous] == ["pred/dup.jpg", "pred/dup.png"]


def test_engine_run_extras_are_skipped_unless_asked(tmp_path, capsys):
    """What `engine.run --n-outputs 2 --couple-outputs --align --save-aligned --save-latents` writes beside
    each inversion is recognised (counted, not unmatched); an input itself named `y_mix0` stays a prediction."""
    px = np.zeros((16, 16, 3), np.uint8)
    pred, target = tmp_path / "pred", tmp_path / "target"
    extras = ["a_mix0.png", "a_mix1.png", "a_grid.jpg", "a_coupled.jpg", "a_aligned.png",
              "sub/b_face0_mix0.png", "sub/b_face0_aligned.png"]
    for rel in ["a.png", "sub/b_face0.png", "y_mix0.png", *extras]:
        save(pred / rel, px)
    np.save(pred / "a.npy", np.zeros((18, 512), np.float32))
    for rel in ["a.jpg", "sub/b_face0.jpg", "y_mix0.jpg"]:
        save(target / rel, px)
    p = pair_folders(pred, target)
    assert [n for n, _, _ in p.pairs] == ["a", "sub/b_face0", "y_mix0"]
    assert p.unmatched_pred == [] and p.unmatched_target == []
    assert p.extras == sorted(extras)
    p = pair_folders(pred, target, include_extras=True)
    assert p.extras == [] and p.unmatched_pred == []
    by_name = {n: b.relative_to(target).as_posix() for n, _, b in p.pairs}
    assert by_name["a_mix1"] == "a.jpg" and by_name["sub/b_face0_mix0"] == "sub/b_face0.jpg" and len(by_name) == 10

    assert metrics.main(["--pred", str(pred), "--target", str(target), "--size", "16", "--no-id", "--no-lpips"]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 pairs" in out and "skipped 7 engine.run extra output(s)" in out and "--include-extras" in out
    assert "unmatched pred" not in out
    assert metrics.main(["--pred", str(pred), "--target", str(target), "--size", "16", "--no-id", "--no-lpips",
                         "--include-extras"]) == 0
    assert "10 of 10 pairs" in capsys.readouterr().out


def test_messages_name_cli_options(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "t").mkdir()
    with pytest.raises(UsageError, match="^--size must be >= 0"):
        metrics.evaluate(tmp_path / "p", tmp_path / "t", size=-1)
    from reference.perceptual import _missing_backbone

    msg = str(_missing_backbone("alex", tmp_path / "alexnet.pth", explicit=False))
    assert "--lpips-backbone" in msg and "backbone_path=" not in msg


@pytest.fixture
def folders(tmp_path, shared, face256):
    """pred/target folders: two good pairs (one in a sub-folder), a corrupt pred, a missing pair each side."""
    pred, target = tmp_path / "pred", tmp_path / "target"
    other = load256(shared / "data" / OTHER_PEOPLE[0])
    save(target / "me.jpg", face256, quality=95)
    save(pred / "me.png", jpeg_copy(face256, quality=70))
    save(target / "sub" / "her.png", other)
    save(pred / "sub" / "her.png", other)  # identical: PSNR inf
    save(target / "broken.jpg", face256)
    (pred / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # corrupt
    save(pred / "extra.png", face256)
    save(target / "lonely.jpg", face256)
    return pred, target


def test_cli_end_to_end(folders, tmp_path, capsys):
    pred, target = folders
    out = tmp_path / "report" / "metrics.json"
    code = metrics.main(["--pred", str(pred), "--target", str(target), "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 1  # one pair failed (the corrupt file)
    report = json.loads(out.read_text())
    assert report["counts"] == {"pairs": 3, "ok": 2, "failed": 1, "unmatched_pred": 1, "unmatched_target": 1,
                                "extras_skipped": 0}
    assert report["unmatched"] == {"pred": ["extra.png"], "target": ["lonely.jpg"]}
    (failure,) = report["failures"]
    assert failure["name"] == "broken" and str(pred / "broken.png") in failure["reason"]
    assert "not an image file PIL can read" in failure["reason"]

    rows = {r["name"]: r for r in report["pairs"]}
    assert rows["sub/her"]["psnr_db"] == "inf" and rows["sub/her"]["ssim"] == pytest.approx(1, abs=1e-9)
    # PSNR of the JPEG pair recomputed independently from the files, resized as the CLI does
    a, b = load256(pred / "me.png"), load256(target / "me.jpg")
    mse = np.mean((a / 255.0 - b / 255.0) ** 2)
    assert rows["me"]["psnr_db"] == pytest.approx(10 * math.log10(1 / mse), abs=1e-9)
    assert rows["me"]["id_distance"] < DLIB_SAME_PERSON and rows["sub/her"]["id_distance"] == pytest.approx(0, abs=1e-6)
    s = report["summary"]
    assert s["psnr_db"]["n_inf"] == 1 and s["psnr_db"]["count"] == 1 and s["psnr_db"]["mean"] == rows["me"]["psnr_db"]
    assert s["id_distance"]["below_0.6"] == 2
    assert "lpips" not in s and report["settings"]["lpips_net"] is None
    assert report["runtime"] is None

    assert "alexnet-owt-7be5be79.pth" in captured.err and "LPIPS left out" in captured.err
    assert "PSNR (dB)" in captured.out and "1 identical pair(s) (inf)" in captured.out
    assert "unmatched pred: extra.png" in captured.out and "failed: broken" in captured.out


def test_cli_native_size_no_face_and_lpips(tmp_path, capsys):
    pred, target = tmp_path / "pred", tmp_path / "target"
    save(pred / "small.png", np.full((100, 120, 3), 128, np.uint8))
    save(target / "small.png", np.full((100, 120, 3), 120, np.uint8))
    save(pred / "mismatch.png", np.zeros((64, 64, 3), np.uint8))
    save(target / "mismatch.png", np.zeros((65, 64, 3), np.uint8))
    # a random LPIPS backbone where load_lpips looks: LPIPS is then computed (values not meaningful)
    from test_perceptual import random_backbone

    path = lpips_backbone_path("alex")
    path.parent.mkdir(parents=True)
    torch.save(random_backbone("alex"), path)
    out = tmp_path / "m.json"
    code = metrics.main(["--pred", str(pred), "--target", str(target), "--size", "0", "--json", str(out)])
    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    assert code == 1
    (failure,) = report["failures"]
    assert failure["reason"].startswith("mismatch: sizes differ: pred 64x64, target 64x65 (")
    (small,) = report["pairs"]
    assert small["size"] == [120, 100]
    assert small["psnr_db"] == pytest.approx(10 * math.log10(1 / (8 / 255) ** 2), abs=1e-9)
    assert small["ms_ssim"] is None and f">= {MS_SSIM_MIN_SIZE} px" in small["notes"]["ms_ssim"]
    assert small["id_cosine"] is None and "no face found in pred and target" in small["notes"]["identity"]
    assert isinstance(small["lpips"], float) and small["lpips"] > 0
    assert report["summary"]["lpips"]["count"] == 1 and report["settings"]["lpips_net"] == "alex"
    assert report["summary"]["ms_ssim"]["n_nan"] == 1 and report["summary"]["ssim"]["count"] == 1
    assert "LPIPS (alex)" in captured.out and "LPIPS left out" not in captured.err

    missing = tmp_path / "nowhere" / "alexnet.pth"
    assert metrics.main(["--pred", str(pred), "--target", str(target), "--size", "0", "--no-id",
                         "--lpips-backbone", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"LPIPS left out: LPIPS backbone weights alexnet-owt-7be5be79.pth not found at {missing}" in err


def test_cli_usage_errors_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "engine.metrics", "--pred", str(tmp_path / "nope"), "--target",
                        str(tmp_path / "empty")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: --pred {tmp_path / 'nope'}: no such folder"
    assert metrics.main(["--pred", str(tmp_path), "--target", str(tmp_path / "empty")]) == 2  # no pair
    assert metrics.main(["--pred", str(tmp_path), "--target", str(tmp_path), "--size", "-1"]) == 2


# ------------------------------------------------------------------------------------------------
# Runtime from a manifest


def test_runtime_statistics_from_an_engine_run_manifest(tmp_path, face256):
    out = tmp_path / "run"
    inputs = []
    for i in range(5):
        inputs.append(save(tmp_path / "in" / f"{i}.png", face256[:64, :64]))
    timings = [{"read": 2.0 + i, "encode": 100.0 + 10 * i, "synthesize": 50.0 + i * i, "write": 3.0} for i in range(4)]
    with Manifest(out, {"backend": "old"}) as m:  # an older run with other options: ignored
        m.append(InputStat.of(inputs[0]), "ok", outputs=[out / "0.png"], timings_ms={"read": 999.0})
    with Manifest(out, {"backend": "engine"}) as m:
        m.append(InputStat.of(inputs[0]), "ok", outputs=[out / "0.png"], timings_ms={"read": 500.0})  # redone below
        for i, t in enumerate(timings):
            m.append(InputStat.of(inputs[i]), "ok", outputs=[out / f"{i}.png", out / f"{i}_coupled.jpg"], timings_ms=t)
        m.append(InputStat.of(inputs[4]), "failed", error="bad", timings_ms={"read": 1.0})
        m.append(InputStat.of(inputs[1]), "skipped", outputs=["1.png"])

    rt = runtime_stats(out)
    assert rt["images"] == 4 and rt["backend"] == "engine" and rt["records_ignored"] == 2
    for stage in ("read", "encode", "synthesize", "write"):
        v = np.array([t[stage] for t in timings])
        got = rt["stages_ms"][stage]
        assert got["mean"] == pytest.approx(v.mean()) and got["p50"] == pytest.approx(np.median(v))
        assert got["p90"] == pytest.approx(np.percentile(v, 90))
    totals = [sum(t.values()) for t in timings]
    assert rt["stages_ms"]["total"]["mean"] == pytest.approx(np.mean(totals))
    assert rt["images_per_s"] == pytest.approx(4 / (sum(totals) / 1e3))
    assert runtime_stats(tmp_path / "in") is None

    # evaluate() reports it, and does not take the coupled side-by-sides for predictions
    for i in range(4):
        save(out / f"{i}.png", face256[:64, :64])
        save(out / f"{i}_coupled.jpg", face256[:64, :128])
    report = metrics.evaluate(out, tmp_path / "in", size=64, identity=False, lpips=False, say=lambda m: None)
    assert report["runtime"] == rt
    assert report["counts"]["pairs"] == 4 and report["unmatched"] == {"pred": [], "target": ["4.png"]}
