"""Style mixing and editing through `python -m engine.run`, `python -m engine.synthesize`, and Engine.mapping per backend.

Everything runs on a small checkpoint (a learn_in_w pSp at 32 px, 8 styles: the cheapest encoder
and generator), mixing styles 6-7 (the default, the fine styles 8..n_styles-1, is empty at 32 px;
it is checked in `tests/test_latents.py` with the golden-vector checks of the same path at 256 px).
The CLIs run in process (`main(argv)`); every encode costs about a second, so runs are few and
have one good input.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine
from engine import demo, run, synthesize
from engine import latents as lt
from reference.images import tensor_to_uint8
from engine.manifest import MANIFEST_NAME, read_records

SEED = 3
K = 2
MASK = [6, 7]
N_STYLES = 8  # of the small_w checkpoint (tests/conftest.py)


@pytest.fixture(scope="module")
def ref_eng(small_w):
    return engine.load(small_w, backend="reference")


@pytest.fixture(scope="module")
def faces(shared, tmp_path_factory):
    """A face and a broken file."""
    d = tmp_path_factory.mktemp("in")
    shutil.copy(shared / "data" / "faces" / "aligned" / "hyperstyle_pitt_256.jpg", d / "pitt.jpg")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


def call(main, argv: list[str]) -> tuple[int, str]:
    """`main(argv)` with stderr captured: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


def files_under(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def mixed_run(small_w, faces, tmp_path_factory):
    """engine.run with 2 mixes per input, styles 6-7, seed 3, latents saved; a good input and a broken one."""
    out = tmp_path_factory.mktemp("mixed") / "out"
    argv = ["--input", faces, "--output", out, "--checkpoint", small_w, "--backend", "reference",
            "--n-outputs", K, "--latent-mask", "6-7", "--seed", SEED, "--save-latents"]
    rc, err = call(run.main, argv)
    return argv, out, rc, err


# ------------------------------------------------------------------------------------------------
# engine.run --n-outputs


def test_mixing_outputs(mixed_run, ref_eng):
    _, out, rc, err = mixed_run
    assert rc == 1, err  # the broken input fails; the others are done
    assert "1 ok, 1 failed, 0 skipped" in err and "broken.jpg" in err
    assert "style mixing: 2 output(s) per input, styles 6-7, alpha replace, seed 3" in err
    expected = ["pitt.png", "pitt.npy", "pitt_grid.jpg"] + [f"pitt_mix{k}{e}" for k in range(K) for e in (".png", ".npy")]
    assert files_under(out) == sorted([MANIFEST_NAME, *expected])
    grid = Image.open(out / "pitt_grid.jpg")
    assert grid.format == "JPEG" and grid.size == (32 * (2 + K), 32), "input, inversion, K mixes at 32 px"

    records = {Path(r["input"]).stem: r for r in read_records(out)}
    assert records["broken"]["status"] == "failed"
    assert records["pitt"]["config"]["mixing"] == {"n_outputs": K, "latent_mask": MASK, "alpha": None, "seed": SEED}
    assert sorted(records["pitt"]["outputs"]) == sorted(expected)

    # the files are what the API computes from the saved inversion: mix with z_k = mixing_z(3, 2)[k], synthesize
    # (that the saved latent is the encoder's is tests/test_cli.py's; an encode costs ~1 s)
    w_plus = torch.from_numpy(np.load(out / "pitt.npy"))[None]
    assert np.array_equal(pixels(out / "pitt.png"), tensor_to_uint8(ref_eng.synthesize(w_plus))[0])
    mixed = lt.mix(ref_eng, w_plus, lt.mixing_z(SEED, K), MASK)  # [1, K, 8, 512]
    w = ref_eng.mapping(torch.from_numpy(lt.mixing_z(SEED, K)))
    for k in range(K):
        saved = np.load(out / f"pitt_mix{k}.npy")
        assert np.array_equal(saved, mixed[0, k].numpy())
        assert np.array_equal(saved[:6], w_plus[0, :6].numpy()), "unmasked styles are the input's"
        assert np.array_equal(saved[6:], w[k].expand(2, 512).numpy()), "masked styles are mapping(z_k) (alpha None)"
        img = tensor_to_uint8(ref_eng.synthesize(mixed[0, k : k + 1]))[0]
        assert np.array_equal(pixels(out / f"pitt_mix{k}.png"), img)
    assert not np.array_equal(pixels(out / "pitt_mix0.png"), pixels(out / "pitt_mix1.png"))


def test_rerun_skips_and_seed_decides(mixed_run, tmp_path):
    argv, out, _, _ = mixed_run
    out2 = tmp_path / "out"
    shutil.copytree(out, out2)
    argv = [a if a != out else out2 for a in argv]
    first = {p: (out2 / p).read_bytes() for p in files_under(out2) if p.endswith((".png", ".npy"))}
    mtimes = {p: (out2 / p).stat().st_mtime_ns for p in first}

    rc, err = call(run.main, argv)
    assert rc == 1 and "0 ok, 1 failed, 1 skipped" in err, err
    assert {p: (out2 / p).stat().st_mtime_ns for p in first} == mtimes, "skipped outputs are not rewritten"

    assert argv[-3:-1] == ["--seed", SEED]
    rc, err = call(run.main, [*argv[:-2], "4", "--save-latents"])  # --seed 4
    assert rc == 1 and "1 ok, 1 failed, 0 skipped" in err, "another seed is another fingerprint: redone"
    assert (out2 / "pitt.png").read_bytes() == first["pitt.png"], "the inversion does not depend on the seed"
    for k in range(K):
        assert (out2 / f"pitt_mix{k}.png").read_bytes() != first[f"pitt_mix{k}.png"]

    rc, err = call(run.main, argv)  # seed 3 again: redone (the latest record is seed 4), same bytes
    assert rc == 1 and "1 ok, 1 failed, 0 skipped" in err
    assert {p: (out2 / p).read_bytes() for p in first} == first, "same seed, same bytes"


@pytest.mark.parametrize("extra, message", [
    (["--seed", "1"], "--seed: only used for style mixing; add --n-outputs K"),
    (["--latent-mask", "8", "--mix-alpha", "0.5"], "--latent-mask, --mix-alpha: only used for style mixing"),
    (["--n-outputs", "1", "--latent-mask", "9-8"], "reversed range '9-8'"),
    (["--n-outputs", "1", "--mix-alpha", "1.5"], "mixing alpha must be in [0, 1]"),
    (["--n-outputs", "1", "--mix-alpha", "half"], "expected a number in [0, 1], got 'half'"),
    (["--n-outputs", "0"], "--n-outputs: expected a positive integer, got 0"),
    (["--n-outputs", "1", "--seed", "-1"], "expected an integer in [0, 2**32)"),
    (["--edit", "{tmp}/missing.npy:2"], "missing.npy: direction file not found"),
    (["--edit", "{tmp}/d.npy:inf"], "strength must be a finite number"),
])
def test_usage_errors_before_loading(extra, message, faces, tmp_path):
    """Checked before the checkpoint is loaded (the checkpoint path does not exist)."""
    argv = ["--input", faces / "pitt.jpg", "--output", tmp_path / "out", "--checkpoint", tmp_path / "unused.pt",
            *[e.format(tmp=tmp_path) for e in extra]]
    rc, err = call(run.main, argv)
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_usage_errors_after_loading(small_w, faces, tmp_path):
    base = ["--input", faces / "pitt.jpg", "--output", tmp_path / "out", "--checkpoint", small_w, "--backend", "reference"]
    rc, err = call(run.main, [*base, "--n-outputs", "1", "--latent-mask", "6-8"])
    assert rc == 2 and "style index 8 out of range: this checkpoint has 8 styles (0-7)" in err
    rc, err = call(run.main, [*base, "--n-outputs", "1"])
    assert rc == 2 and "default --latent-mask (the fine styles 8..n_styles-1) is empty" in err
    np.save(tmp_path / "d18.npy", np.zeros((18, 512), np.float32))
    rc, err = call(run.main, [*base, "--edit", f"{tmp_path / 'd18.npy'}:1"])
    assert rc == 2 and "d18.npy: direction of shape [18, 512] does not fit this checkpoint (8 styles)" in err
    # an input named like another input's mix output
    shutil.copy(faces / "pitt.jpg", tmp_path / "a.jpg")
    shutil.copy(faces / "pitt.jpg", tmp_path / "a_mix0.jpg")
    rc, err = call(run.main, ["--input", tmp_path / "a.jpg", tmp_path / "a_mix0.jpg", "--output", tmp_path / "o2",
                              "--checkpoint", small_w, "--backend", "reference", "--n-outputs", "1",
                              "--latent-mask", "7"])
    assert rc == 2 and "would both write" in err and "a_mix0.png" in err


# ------------------------------------------------------------------------------------------------
# Editing: engine.run --edit and engine.synthesize --edit agree


def test_edit_in_run_and_in_synthesize(mixed_run, small_w, faces, tmp_path):
    _, out, _, _ = mixed_run
    d = np.zeros((N_STYLES, 512), np.float32)
    d[[2, 3]] = np.random.default_rng(4).standard_normal((2, 512))
    np.save(tmp_path / "d.npy", d)
    edit = f"{tmp_path / 'd.npy'}:2"
    rc, err = call(run.main, ["--input", faces / "pitt.jpg", "--output", tmp_path / "edited", "--checkpoint", small_w,
                              "--backend", "reference", "--save-latents", "--edit", edit])
    assert rc == 0, err
    unedited = np.load(out / "pitt.npy")
    saved = np.load(tmp_path / "edited" / "pitt.npy")
    assert np.array_equal(saved, (torch.from_numpy(unedited) + torch.from_numpy(2 * d)).numpy()), "--save-latents stores the edited latents"
    config = read_records(tmp_path / "edited")[-1]["config"]
    assert config["edits"] == [{"sha256": lt.read_npy(tmp_path / "d.npy")[1], "strength": 2.0}]
    assert (tmp_path / "edited" / "pitt.png").read_bytes() != (out / "pitt.png").read_bytes()

    rc, err = call(synthesize.main, ["--latents", out / "pitt.npy", "--output", tmp_path / "synth",
                                     "--checkpoint", small_w, "--backend", "reference", "--edit", edit])
    assert rc == 0, err
    assert (tmp_path / "synth" / "pitt.png").read_bytes() == (tmp_path / "edited" / "pitt.png").read_bytes()


# ------------------------------------------------------------------------------------------------
# engine.synthesize


def test_synthesize_reproduces_run_bytes(mixed_run, small_w, tmp_path):
    _, out, _, _ = mixed_run
    argv = ["--latents", out, "--output", tmp_path / "synth", "--checkpoint", small_w, "--backend", "reference"]
    rc, err = call(synthesize.main, argv)
    assert rc == 0, err
    pngs = [p for p in files_under(out) if p.endswith(".png")]
    assert len(pngs) == 1 + K and f"{len(pngs)} ok, 0 failed, 0 skipped" in err
    assert files_under(tmp_path / "synth") == sorted([MANIFEST_NAME, *pngs])
    for p in pngs:
        assert (tmp_path / "synth" / p).read_bytes() == (out / p).read_bytes(), p
    rc, err = call(synthesize.main, argv)
    assert rc == 0 and f"0 ok, 0 failed, {len(pngs)} skipped" in err


def test_synthesize_shapes_and_bad_files(ref_eng, small_w, tmp_path):
    src = tmp_path / "lat"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(5)
    w3 = ref_eng.mapping(torch.from_numpy(lt.mixing_z(1, 3)))  # plausible latents: mapped z, every style
    batch = w3[:, None, :].expand(-1, N_STYLES, -1).numpy().copy()  # [3, 8, 512]
    np.save(src / "batch.npy", batch)
    np.save(src / "sub" / "w.npy", batch[1, 0])  # a w [512]
    np.save(src / "wrong.npy", rng.standard_normal((9, 512)).astype(np.float32))
    (src / "text.npy").write_text("hello")
    (src / "notes.txt").write_text("not picked up from a folder")
    rc, err = call(synthesize.main, ["--latents", src, "--output", tmp_path / "out", "--checkpoint", small_w,
                                     "--backend", "reference", "--batch-size", "2"])
    assert rc == 1, err
    assert "2 ok, 2 failed, 0 skipped; 4 images" in err
    assert "wrong.npy: latent of shape [9, 512] does not fit this checkpoint (8 styles)" in err
    assert "text.npy: not a .npy array file" in err
    out = tmp_path / "out"
    assert files_under(out) == sorted([MANIFEST_NAME, "batch_0.png", "batch_1.png", "batch_2.png", "sub/w.png"])
    for i in range(3):
        one = tensor_to_uint8(ref_eng.synthesize(torch.from_numpy(batch[i : i + 1])))[0]
        got = pixels(out / f"batch_{i}.png").astype(int)
        assert np.abs(got - one).max() <= 1, "batched rendering equals single rendering up to fp32 rounding"
    w_img = tensor_to_uint8(ref_eng.synthesize(torch.from_numpy(batch[1:2])))[0]
    assert np.array_equal(pixels(out / "sub" / "w.png"), w_img), "a w [512] is repeated to every style"


def test_interpolate(mixed_run, small_w, tmp_path):
    _, out, _, _ = mixed_run
    argv = ["--interpolate", out / "pitt.npy", out / "pitt_mix0.npy", "--steps", "3", "--output", tmp_path / "i",
            "--checkpoint", small_w, "--backend", "reference"]
    rc, err = call(synthesize.main, argv)
    assert rc == 0, err
    names = [f"pitt_to_pitt_mix0_{i}.png" for i in range(3)] + ["pitt_to_pitt_mix0_strip.jpg"]
    assert files_under(tmp_path / "i") == sorted([MANIFEST_NAME, *names])
    assert (tmp_path / "i" / names[0]).read_bytes() == (out / "pitt.png").read_bytes(), "first frame is A"
    assert (tmp_path / "i" / names[2]).read_bytes() == (out / "pitt_mix0.png").read_bytes(), "last frame is B"
    assert Image.open(tmp_path / "i" / names[3]).size == (3 * 32, 32)
    rc, err = call(synthesize.main, argv)
    assert rc == 0 and "0 ok, 0 failed, 1 skipped" in err


def test_synthesize_usage_and_demo(small_w, mixed_run, tmp_path, monkeypatch, capsys):
    _, out, _, _ = mixed_run
    rc, err = call(synthesize.main, ["--output", tmp_path / "o", "--checkpoint", small_w])
    assert rc == 2 and "nothing to render" in err
    rc, err = call(synthesize.main, ["--latents", tmp_path / "nope", "--output", tmp_path / "o"])
    assert rc == 2 and "no such file or folder" in err
    # without --checkpoint: the demo checkpoint (stood in for by the small one: the real one is 1.2 GB)
    monkeypatch.setattr(demo, "demo_checkpoint_path", lambda announce=None: small_w)
    rc, err = call(synthesize.main, ["--latents", out / "pitt.npy", "--output", tmp_path / "o", "--backend", "reference"])
    assert rc == 0, err
    assert "DEMO checkpoint" in err and "RANDOM weights" in err and "reminder" in err
    assert synthesize.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--latents", "--interpolate", "--steps", "--edit", "--resize-outputs", "--backend"):
        assert flag in text


def test_run_help_documents_mixing(capsys):
    assert run.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--n-outputs", "--latent-mask", "--mix-alpha", "--seed", "--edit"):
        assert flag in text
    assert "default: the fine styles 8..n_styles-1" in text and "edited latents" in text


# ------------------------------------------------------------------------------------------------
# Engine.mapping on a backend without torch weights (onnxruntime, openvino; and the engine formulation)
# is checked in tests/test_onnx.py::test_engine_backends, on the graphs that file exports anyway (an
# export here cost ~50 s for this one check).
