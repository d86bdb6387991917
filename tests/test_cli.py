"""`python -m engine.run` end to end, the `engine.load` API, the manifest and the output naming.

The CLI runs on the ffhq_encode_256 weights of the golden vectors (`ffhq256_checkpoint`), so its
outputs are checked against the official implementation's, not only for existence. Two tests
run a real subprocess (exit code and stderr as a user sees them); the rest call
`engine.run.main(argv)` in process to save the interpreter start-up and the checkpoint load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine
from conftest import REPO
from engine import api, run
from export.backends import Choice
from reference.description import ModelDescription
from engine.inputs import find_inputs, plan_jobs
from reference.images import tensor_to_uint8
from engine.manifest import MANIFEST_NAME, InputStat, Manifest, read_records

N_FACES = 7  # of the 12 shared aligned faces: 5 + 2 at batch 5
SUBPROCESS_TIMEOUT_S = 600


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, from the repo root, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "engine.run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)


def files_under(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def assert_no_temp_files(d: Path) -> None:
    leftovers = [p for p in files_under(d) if Path(p).name.startswith(".") or p.endswith(".tmp")]
    assert not leftovers, f"temp files left behind: {leftovers}"


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line message, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def golden(shared):
    return np.load(shared / "golden" / "public_ffhq_encode_256_seed0.npz")


# ------------------------------------------------------------------------------------------------
# End to end on real aligned faces


@pytest.fixture(scope="module")
def e2e(shared, ffhq256_checkpoint, tmp_path_factory):
    """One subprocess run over N_FACES of the shared aligned faces (the first six by name, and
    psp_input_img.jpg, golden input 0), batch 5 (so the last batch has 2), with latents. Returns
    (input folder, output folder, the process, the manifest's records)."""
    src = tmp_path_factory.mktemp("e2e_in")
    faces = sorted((shared / "data" / "faces" / "aligned").glob("*.jpg"))
    for p in faces[:N_FACES - 1] + [p for p in faces[N_FACES - 1:] if p.name == "psp_input_img.jpg"]:
        shutil.copy(p, src / p.name)
    out = tmp_path_factory.mktemp("e2e") / "out"
    # fp32 asked for: the outputs are checked against the official ones at atol 1e-4 (auto is bf16
    # on a CPU with bf16 units)
    proc = run_cli("--input", str(src), "--output", str(out), "--checkpoint", str(ffhq256_checkpoint),
                   "--save-latents", "--batch-size", "5", "--precision", "fp32")
    return src, out, proc, read_records(out)


@pytest.mark.slow
def test_end_to_end(e2e, shared, golden):
    src, out, proc, records = e2e
    assert proc.returncode == 0, proc.stderr
    assert f"{N_FACES} ok, 0 failed, 0 skipped" in proc.stderr
    stems = sorted(p.stem for p in src.glob("*.jpg"))
    assert len(stems) == N_FACES
    assert files_under(out) == sorted([MANIFEST_NAME] + [f"{s}.png" for s in stems] + [f"{s}.npy" for s in stems])
    for s in stems:
        im = Image.open(out / f"{s}.png")
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (256, 256)
        w = np.load(out / f"{s}.npy")
        assert w.shape == (14, 512) and w.dtype == np.float32

    assert len(records) == N_FACES and all(r["status"] == "ok" and r["error"] is None for r in records)
    assert sorted(Path(r["input"]).stem for r in records) == stems
    for r in records:
        assert sorted(r["outputs"]) == sorted([f"{Path(r['input']).stem}.npy", f"{Path(r['input']).stem}.png"])
        assert set(r["timings_ms"]) == {"read", "encode", "synthesize", "write"}
        assert all(v >= 0 for v in r["timings_ms"].values())
    assert len({r["fingerprint"] for r in records}) == 1

    # psp_input_img.jpg is golden input 0: the CLI computes what the official code computes
    w = np.load(out / "psp_input_img.npy")
    np.testing.assert_allclose(w, golden["latents"][0], rtol=0, atol=1e-4)
    expected = tensor_to_uint8(torch.from_numpy(golden["images_resize_false"][:1]))[0]
    got = np.asarray(Image.open(out / "psp_input_img.png")).astype(int)
    diff = np.abs(got - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, "only float32 rounding at truncation edges may differ"


@pytest.mark.slow
def test_rerun_skips_everything(e2e, shared, ffhq256_checkpoint, capsys):
    src, out, proc, _ = e2e
    assert proc.returncode == 0, proc.stderr
    before = {p: (out / p).stat().st_mtime_ns for p in files_under(out) if p != MANIFEST_NAME}
    n_records = len(read_records(out))
    rc = run.main(["--input", str(src), "--output", str(out), "--checkpoint", str(ffhq256_checkpoint),
                   "--save-latents", "--batch-size", "5", "--precision", "fp32"])
    assert rc == 0
    err = capsys.readouterr().err
    assert f"0 ok, 0 failed, {N_FACES} skipped" in err and "the model was not loaded" in err
    records = read_records(out)
    assert len(records) == n_records == N_FACES and {r["status"] for r in records} == {"ok"}, \
        "a no-op rerun adds no record"
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before, "a skipped input must not be rewritten"


def _no_load(*args, **kwargs):
    raise AssertionError("api.load was called")


def test_rerun_with_nothing_to_do_does_not_load(tmp_path, shared, small_w, capsys, monkeypatch):
    """Every option that shapes the outputs goes into the pre-load fingerprint (`run.preload_facts`, read
    before the load): the same command skips without loading, one changed option loads and redoes.
    (The session's 32 px checkpoint, 8 styles: the fingerprint does not depend on the model's size.)"""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(shared / "data" / "faces" / "aligned" / "hyperstyle_pitt_256.jpg", src / "pitt.jpg")
    direction = tmp_path / "d.npy"
    np.save(direction, np.full(512, 0.01, np.float32))
    argv = ["--input", str(src), "--output", str(tmp_path / "out"), "--checkpoint", str(small_w),
            "--save-latents", "--n-outputs", "1", "--latent-mask", "5-7", "--edit", f"{direction}:0.5", "--backend", "reference"]
    assert run.main(argv) == 0
    [record] = read_records(tmp_path / "out")
    args = run.build_parser().parse_args(argv)
    facts = run.preload_facts(args)
    planned = run.model_options(args, run.replace(run.RunOptions(out_dir=tmp_path / "out", save_latents=True),
                                                  **run.mixing_options(args)), facts)
    assert planned.config(facts) == record["config"], "the pre-load config must be the one the run records"
    monkeypatch.setattr(api, "load_planned", _no_load)  # every load goes through it
    capsys.readouterr()
    assert run.main(argv) == 0
    err = capsys.readouterr().err
    assert "the model was not loaded" in err and "0 ok, 0 failed, 1 skipped\n" in err
    assert "img/s" not in err and "ran backend" not in err, "nothing ran: no rate, no backend claimed"
    for changed in (["--seed", "1"], ["--latent-mask", "4-7"], ["--backend", "engine"], ["--resize-outputs"]):
        with pytest.raises(AssertionError, match="api.load was called"):
            run.main(argv + changed)
    (src / "pitt.jpg").touch()  # a changed input is redone
    with pytest.raises(AssertionError, match="api.load was called"):
        run.main(argv)


def test_preload_resolves_the_resize_factor_as_the_load_does(tmp_path):
    """A super-resolution checkpoint's default factor comes from its opts, known before the load, so a
    run with `--resize-factor input` and one without have different fingerprints."""
    description = ModelDescription(input_nc=3, label_nc=0, output_size=1024, n_styles=18, backend="engine",
                                   opts={"dataset_type": "celebs_super_resolution", "resize_factors": "4"})
    plan = api.LoadPlan(tmp_path, torch.device("cpu"), Choice("engine", "fp32", "asked for"))
    facts = api.Facts(description, plan)
    parse = run.build_parser().parse_args
    opts = run.RunOptions(out_dir=tmp_path)
    base = ["--input", "x", "--output", "y"]
    assert run.model_options(parse(base), opts, facts).degrade_factor == 4
    assert run.model_options(parse(base + ["--resize-factor", "input"]), opts, facts).degrade_factor is None
    with pytest.raises(engine.UsageError, match="--resize-factor is for super-resolution"):
        run.model_options(parse(base + ["--resize-factor", "2"]), opts,
                          api.Facts(description.replace(opts={"dataset_type": "ffhq_encode"}), plan))


def test_rerun_with_relative_paths_skips(tmp_path, shared, small_w, capsys, monkeypatch):
    """Manifest outputs are relative to the output folder, whatever the working directory (the
    session's 32 px checkpoint on the engine backend: no graph export)."""
    (tmp_path / "in").mkdir()
    shutil.copy(shared / "data" / "faces" / "aligned" / "hyperstyle_pitt_256.jpg", tmp_path / "in" / "pitt.jpg")
    monkeypatch.chdir(tmp_path)
    argv = ["--input", "in", "--output", "out", "--checkpoint", str(small_w), "--backend", "engine", "--save-latents"]
    assert run.main(argv) == 0
    assert [r["outputs"] for r in read_records(tmp_path / "out")] == [["pitt.png", "pitt.npy"]]
    capsys.readouterr()
    assert run.main(argv) == 0
    assert "0 ok, 0 failed, 1 skipped" in capsys.readouterr().err
    assert read_records(tmp_path / "out")[-1]["outputs"] == ["pitt.png", "pitt.npy"]


# ------------------------------------------------------------------------------------------------
# Bad files among good ones; rerun and option changes


@pytest.fixture
def mixed_folder(tmp_path, shared):
    """2 good images (one in a subfolder, non-square) and 4 bad ones."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(shared / "data" / "faces" / "aligned" / "hyperstyle_pitt_256.jpg", src / "pitt.jpg")
    y, x = np.mgrid[0:200, 0:300]
    Image.fromarray(np.stack([x % 256, y, (x + y) % 256], -1).astype(np.uint8)).save(src / "sub" / "gradient.png")
    (src / "empty.jpg").write_bytes(b"")
    data = (shared / "data" / "faces" / "aligned" / "psp_input_img.jpg").read_bytes()
    (src / "sub" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (src / "notes.jpg").write_text("not an image\n")
    Image.new("RGB", (1, 1)).save(src / "tiny.png")
    return src


def test_bad_files_are_recorded_and_the_rest_goes_on(mixed_folder, tmp_path, small_w, capsys):
    """Bad files fail with their reason and the rest goes on; a rerun retries only them (the session's
    32 px checkpoint on the engine backend: what is checked does not depend on the model)."""
    out = tmp_path / "out"
    args = ["--input", str(mixed_folder), "--output", str(out), "--checkpoint", str(small_w), "--backend", "engine",
            "--batch-size", "3"]
    assert run.main(args) == 1
    err = capsys.readouterr().err
    assert "2 ok, 4 failed, 0 skipped" in err
    records = {Path(r["input"]).name: r for r in read_records(out)}
    assert {n: r["status"] for n, r in records.items()} == {
        "pitt.jpg": "ok", "gradient.png": "ok",
        "empty.jpg": "failed", "truncated.jpg": "failed", "notes.jpg": "failed", "tiny.png": "failed"}
    reasons = {"empty.jpg": "empty file", "truncated.jpg": "truncated", "notes.jpg": "not an image",
               "tiny.png": "too small"}
    for name, reason in reasons.items():
        assert name in records[name]["error"] and reason in records[name]["error"], records[name]["error"]
        assert records[name]["outputs"] == []
        assert f"failed: {records[name]['input']}" in err
    assert files_under(out) == sorted([MANIFEST_NAME, "pitt.png", "sub/gradient.png"])  # the input tree, mirrored
    assert_no_temp_files(out)

    # rerun: the good ones are skipped, the bad ones tried again
    assert run.main(args) == 1
    assert "0 ok, 4 failed, 2 skipped" in capsys.readouterr().err

    # other output options: a different fingerprint, so nothing is skipped
    assert run.main(args + ["--save-latents"]) == 1
    assert "2 ok, 4 failed, 0 skipped" in capsys.readouterr().err
    assert files_under(out) == sorted([MANIFEST_NAME, "pitt.npy", "pitt.png", "sub/gradient.npy", "sub/gradient.png"])
    assert_no_temp_files(out)


def test_couple_and_resize_outputs(mixed_folder, tmp_path, ffhq256_checkpoint, capsys, monkeypatch):
    seen = []
    synthesize = api.Engine.synthesize

    def spy(self, w_plus, resize=False):
        seen.append(resize)
        return synthesize(self, w_plus, resize=resize)

    monkeypatch.setattr(api.Engine, "synthesize", spy)
    out = tmp_path / "out"
    rc = run.main(["--input", str(mixed_folder / "sub" / "gradient.png"), "--output", str(out),
                   "--checkpoint", str(ffhq256_checkpoint), "--couple-outputs", "--resize-outputs"])
    assert rc == 0, capsys.readouterr().err
    assert seen == [True], "--resize-outputs must reach synthesize(resize=True) (the face_pool)"
    assert files_under(out) == sorted([MANIFEST_NAME, "gradient.png", "gradient_coupled.jpg"])
    main_out = np.asarray(Image.open(out / "gradient.png"))
    assert main_out.shape == (256, 256, 3)
    coupled = Image.open(out / "gradient_coupled.jpg")
    assert coupled.format == "JPEG" and coupled.size == (384 + 256, 256)  # 300x200 input -> 384x256, then output
    c = np.asarray(coupled).astype(float)
    inp = np.asarray(Image.open(mixed_folder / "sub" / "gradient.png").resize((384, 256), Image.BICUBIC))
    assert np.abs(c[:, :384] - inp).mean() < 3, "left: the input at the output's height"
    assert np.abs(c[:, 384:] - main_out).mean() < 0.1 * np.abs(main_out - main_out.mean()).mean(), \
        "right: the output (JPEG-compressed)"
    assert read_records(out)[0]["outputs"] == ["gradient.png", "gradient_coupled.jpg"]


# ------------------------------------------------------------------------------------------------
# Checkpoint and usage errors: exit 2, one line


def test_stylegan2_checkpoint_is_refused(tmp_path, shared):
    from reference import make_checkpoint, save_checkpoint

    ckpt = save_checkpoint(make_checkpoint("stylegan2_rosinality_256", 0), tmp_path / "stylegan2-ffhq-256.pt")
    try:
        proc = run_cli("--input", str(shared / "data" / "faces" / "aligned" / "hyperstyle_pitt_256.jpg"),
                       "--output", str(tmp_path / "out"), "--checkpoint", str(ckpt))
    finally:
        ckpt.unlink()  # 120 MB
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith("error: ") and str(ckpt) in line and "StyleGAN2" in line and "not a pSp" in line
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []


def test_missing_key_is_named(tmp_path, shared, ffhq256_checkpoint, capsys):
    ckpt = torch.load(ffhq256_checkpoint, map_location="cpu", weights_only=True, mmap=True)
    key = next(k for k in ckpt["state_dict"] if k.startswith("decoder.convs."))
    del ckpt["state_dict"][key]
    broken = tmp_path / "broken.pt"
    torch.save(ckpt, broken)
    del ckpt
    try:
        rc = run.main(["--input", str(shared / "data" / "faces" / "aligned" / "hyperstyle_pitt_256.jpg"),
                       "--output", str(tmp_path / "out"), "--checkpoint", str(broken)])
        assert rc == 2
        line = one_line(capsys.readouterr().err)
        assert "broken.pt" in line and "1 missing key(s)" in line and key in line
    finally:
        broken.unlink()  # 1 GB


@pytest.mark.parametrize("argv, message", [
    (["--input", "no/such/folder"], "--input no/such/folder: no such file or folder"),
    (["--input", "no/such/*.jpg"], "the pattern matches no file"),
    (["--input", "{empty}"], "no image found"),
    (["--input", "{empty}", "--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["--input", "{img}", "--backend", "fast"], "invalid choice: 'fast'"),
])
def test_usage_errors(argv, message, tmp_path, shared, capsys):
    (tmp_path / "empty").mkdir()
    img = shared / "data" / "faces" / "aligned" / "hyperstyle_pitt_256.jpg"
    argv = [a.format(empty=tmp_path / "empty", img=img) for a in argv]
    assert run.main(argv + ["--output", str(tmp_path / "out"), "--checkpoint", "unused.pt"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda(tmp_path, shared, capsys):
    img = shared / "data" / "faces" / "aligned" / "hyperstyle_pitt_256.jpg"
    rc = run.main(["--input", str(img), "--output", str(tmp_path / "out"), "--checkpoint", "unused.pt",
                   "--device", "cuda"])
    assert rc == 2
    assert "CUDA is not available" in one_line(capsys.readouterr().err)


def test_help(capsys):
    assert run.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--checkpoint", "--batch-size", "--device", "--resize-outputs",
                 "--couple-outputs", "--save-latents", "--trust-pickle", "--max-pixels"):
        assert flag in text
    assert "checkpoints you trust" in text


# ------------------------------------------------------------------------------------------------
# Python API


def test_load_and_invert(ffhq256_checkpoint, golden):
    """The Python API against the official outputs at atol 1e-4: fp32 asked for (auto is bf16 on a
    CPU with bf16 units)."""
    eng = engine.load(ffhq256_checkpoint, precision="fp32")
    assert (eng.input_nc, eng.label_nc, eng.output_size, eng.n_styles) == (3, 0, 256, 14)
    assert eng.checkpoint == Path(ffhq256_checkpoint) and not eng.is_demo
    x = (torch.from_numpy(golden["inputs_rgb256_uint8"][:1]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    img, w_plus = eng.invert(x)
    assert img.shape == (1, 3, 256, 256) and w_plus.shape == (1, 14, 512)
    torch.testing.assert_close(w_plus, torch.from_numpy(golden["latents"][:1]), rtol=0, atol=1e-4)
    torch.testing.assert_close(img, torch.from_numpy(golden["images_resize_false"][:1]), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"\[B, 3, 256, 256\]"):
        eng.invert(torch.zeros(1, 1, 256, 256))


def test_read_inputs_turns_image_files_into_the_official_encoder_input(ffhq256_checkpoint, golden, shared, tmp_path):
    """`Engine.read_inputs(paths)` (the README's Python example): golden input 0 is
    `data/faces/aligned/psp_input_img.jpg` resized by the official transform; the tensor is that,
    exactly, and a missing file is named."""
    eng = engine.load(ffhq256_checkpoint, backend="reference", precision="fp32")
    x = eng.read_inputs([shared / "data" / "faces" / "aligned" / "psp_input_img.jpg"])
    expected = (torch.from_numpy(golden["inputs_rgb256_uint8"][:1]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    assert torch.equal(x, expected)
    with pytest.raises(engine.InputImageError, match="nope.png"):
        eng.read_inputs([tmp_path / "nope.png"])


def test_load_option_errors():
    with pytest.raises(ValueError, match="unknown backend 'fast'; available: auto, reference"):
        engine.load("unused.pt", backend="fast")
    with pytest.raises(ValueError, match="not supported"):
        engine.load("unused.pt", device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(engine.UsageError, match="CUDA is not available"):
            engine.load("unused.pt", device="cuda")
    with pytest.raises(engine.CheckpointError, match="not found"):
        engine.load("no/such/checkpoint.pt")


# ------------------------------------------------------------------------------------------------
# Manifest and naming (no model)


def _manifest_setup(tmp_path):
    src = tmp_path / "a.jpg"
    src.write_bytes(b"x")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "a.png").write_bytes(b"png")
    return src, out


def test_manifest_resume_rules(tmp_path):
    src, out = _manifest_setup(tmp_path)
    config = {"checkpoint": "c", "resize_outputs": False}
    with Manifest(out, config) as m:
        m.append(InputStat.of(src), "ok", outputs=[out / "a.png"], timings_ms={"read": 1.0})
    assert read_records(out)[0]["outputs"] == ["a.png"]
    assert Manifest(out, config).done(InputStat.of(src)) is not None
    assert Manifest(out, {**config, "resize_outputs": True}).done(InputStat.of(src)) is None, "other options"
    src.write_bytes(b"xy")
    assert Manifest(out, config).done(InputStat.of(src)) is None, "input changed"
    src.write_bytes(b"x")
    os.utime(src, ns=(read_records(out)[0]["input_mtime_ns"],) * 2)
    assert Manifest(out, config).done(InputStat.of(src)) is not None
    (out / "a.png").unlink()
    assert Manifest(out, config).done(InputStat.of(src)) is None, "output deleted"


def test_manifest_latest_non_skipped_record_decides(tmp_path):
    src, out = _manifest_setup(tmp_path)
    a, b = {"opt": "a"}, {"opt": "b"}
    with Manifest(out, a) as m:
        m.append(InputStat.of(src), "ok", outputs=["a.png"])
        m.append(InputStat.of(src), "skipped", outputs=["a.png"])
    assert Manifest(out, a).done(InputStat.of(src)) is not None, "a skipped record keeps the ok one"
    with Manifest(out, b) as m:
        m.append(InputStat.of(src), "ok", outputs=["a.png"])  # same paths, overwritten with options b
    assert Manifest(out, a).done(InputStat.of(src)) is None
    with Manifest(out, b) as m:
        m.append(InputStat.of(src), "failed", error="boom\nsecond line")
    assert Manifest(out, b).done(InputStat.of(src)) is None
    assert read_records(out)[-1]["error"] == "boom second line"


def test_manifest_survives_a_torn_line(tmp_path):
    src, out = _manifest_setup(tmp_path)
    with Manifest(out, {}) as m:
        m.append(InputStat.of(src), "ok", outputs=["a.png"])
    with open(out / MANIFEST_NAME, "ab") as f:
        f.write(b'{"input": "/x", "sta')  # a crash mid-line
    m = Manifest(out, {})
    assert len(m.bad_lines) == 1 and m.done(InputStat.of(src)) is not None
    with m:
        m.append(InputStat.of(src), "skipped", outputs=["a.png"])
    lines = (out / MANIFEST_NAME).read_bytes().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["status"] == "skipped", "the torn line is compacted away"


def test_output_names_mirror_inputs_without_collisions(tmp_path):
    for rel in ("a/x.jpg", "b/x.jpg", "b/y.jpg", "b/y.PNG", "b/c/z.webp", "b/.hidden.jpg", "b/.git/h.jpg",
                "b/readme.txt", "out/old.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    files = find_inputs([str(tmp_path)], exclude=tmp_path / "out")
    bases = [j.base.as_posix() for j in plan_jobs(files)]
    assert bases == ["a/x", "b/x", "b/y.PNG", "b/y.jpg", "b/c/z"]
    assert [j.base.as_posix() for j in plan_jobs([tmp_path / "b" / "c" / "z.webp"])] == ["z"]
    globbed = find_inputs([str(tmp_path / "b" / "*")])
    assert sorted(p.name for p in globbed) == ["x.jpg", "y.PNG", "y.jpg", "z.webp"]  # folders scanned, .txt dropped
    assert find_inputs([str(tmp_path / "b" / "readme.txt")]) == [tmp_path / "b" / "readme.txt"]  # named: kept


# ------------------------------------------------------------------------------------------------
# The demo (1024, random weights) on the README's example photos


@pytest.mark.slow
def test_demo_checkpoint_end_to_end(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(cache))
    out = tmp_path / "out"
    try:
        rc = run.main(["--input", str(REPO / "examples" / "images"), "--output", str(out), "--batch-size", "2"])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert "DEMO checkpoint" in err and "RANDOM weights" in err and "NOT faces" in err
        assert "--checkpoint psp_ffhq_encode.pt" in err
        assert files_under(out) == sorted([MANIFEST_NAME, "matplotlib_grace_hopper.png", "skimage_astronaut.png"])
        for name in ("matplotlib_grace_hopper.png", "skimage_astronaut.png"):
            assert Image.open(out / name).size == (1024, 1024)
        assert sorted(p.name for p in cache.iterdir()) == ["demo_ffhq_encode_seed0_rule-v1.pt",
                                                           "demo_ffhq_encode_seed0_rule-v1.pt.json",
                                                           "digests.json", "onnx", "ov_cache"]
        # the default --backend auto is openvino on the CPU: its two ONNX graphs were exported and cached
        assert len(list((cache / "onnx").glob("*.onnx"))) == 2
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # 1.2 GB


# ------------------------------------------------------------------------------------------------
# Conditional inputs (sketch, segmentation) through the batch loop


def _conditional_engine(ffhq256_checkpoint, label_nc: int) -> api.Engine:
    """The 256 weights with the encoder's first conv widened to the conditional input (random weights)."""
    from reference import load_psp

    ckpt = torch.load(ffhq256_checkpoint, map_location="cpu", weights_only=True, mmap=True)
    channels = 1 if label_nc == 1 else label_nc
    weight = ckpt["state_dict"]["encoder.input_layer.0.weight"]  # [64, 3, 3, 3]
    ckpt["state_dict"]["encoder.input_layer.0.weight"] = weight[:, :1].repeat(1, channels, 1, 1) / channels
    ckpt["opts"] = {**ckpt["opts"], "input_nc": channels, "label_nc": label_nc}
    return api.Engine.around(load_psp(ckpt), Path(ffhq256_checkpoint))


@pytest.mark.parametrize("label_nc, rel", [(1, "sketch/psp_input_sketch.jpg"),
                                           (19, "segmentation/psp_input_mask.png")])
def test_conditional_inputs(label_nc, rel, shared, tmp_path, ffhq256_checkpoint):
    from engine.batch import RunOptions, run_jobs

    eng = _conditional_engine(ffhq256_checkpoint, label_nc)
    opts = RunOptions(out_dir=tmp_path / "out", couple_outputs=True, save_latents=True)
    bad = tmp_path / "mask_with_id_40.png"
    Image.fromarray(np.full((64, 64), 40, np.uint8), "L").save(bad)
    jobs = plan_jobs([shared / "data" / rel, bad])
    with Manifest(opts.out_dir, {"test": label_nc}) as m:
        summary = run_jobs(eng, jobs, opts, m)
    outputs = jobs[0].outputs(opts.out_dir, save_latents=True, couple_outputs=True)
    if label_nc == 1:  # any grey image is a valid sketch
        assert (summary.ok, summary.failed) == (2, 0)
    else:
        assert (summary.ok, summary.failed) == (1, 1)
        assert "class id 40" in summary.failures[0][1] and "label_nc=19" in summary.failures[0][1]
    assert outputs["image"].name == f"{Path(rel).stem}.png"
    assert np.asarray(Image.open(outputs["image"])).shape == (256, 256, 3)
    assert np.load(outputs["latent"]).shape == (14, 512)
    assert Image.open(outputs["coupled"]).size == (512, 256)


def test_inconsistent_label_nc_and_input_nc(ffhq256_checkpoint, tmp_path, shared):
    from engine.batch import RunOptions, run_jobs

    eng = _conditional_engine(ffhq256_checkpoint, 1)
    eng.model.description = eng.description.replace(label_nc=0)  # opts saying "RGB" for a 1-channel encoder
    opts = RunOptions(out_dir=tmp_path / "out")
    with Manifest(opts.out_dir, {}) as m, pytest.raises(engine.CheckpointError, match="inconsistent"):
        run_jobs(eng, plan_jobs([shared / "data" / "sketch" / "psp_input_sketch.jpg"]), opts, m)


def test_readme_shows_the_current_help(monkeypatch):
    """The README's `engine.run --help` block is the parser's help (at 100 columns), not a stale copy."""
    monkeypatch.setenv("COLUMNS", "100")
    text = (REPO / "README.md").read_text()
    start = text.index("```text\n", text.index("## The CLI: `python -m engine.run`")) + len("```text\n")
    block = text[start:text.index("```\n", start)].rstrip()
    assert block == run.build_parser().format_help().rstrip(), "regenerate the README block from `--help`"
