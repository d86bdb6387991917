"""The pSp tasks end to end with rule checkpoints of each official layout, on the shared real inputs.

Each official task checkpoint layout (`shared/golden/spec`: sketch_to_face, input_nc 1; seg_to_face,
input_nc = label_nc = 19; super_resolution, RGB with `resize_factors`) is built by the weight rule
in memory, and the shared sketch / segmentation map / face photo goes through the batch loop that
`python -m engine.run` uses. What is checked is the task plumbing: the official input transform of
each task (checked here against formulas written out independently), the encoder accepting it, and
the outputs written; random weights do not draw faces.

The task checkpoints keep each layout's official opts and encoder (GradualStyleEncoder, 256 px
inputs, the task's input_nc) but a 32 px generator (8 styles) instead of the 1024 px one: the
generator's size plays no part in the task plumbing, and a 1024 px render costs ~7 s on one core
(the official 1024 layouts, opts and keys, are checked in tests/test_weights.py, test_layout_matches_spec).
The --align run uses the session's 32 px `small_w` checkpoint for the same reason.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import api
from engine.batch import RunOptions, run_jobs
from engine.inputs import plan_jobs
from reference.images import to_input_tensor
from engine.manifest import Manifest
from reference import load_psp
from reference.configs import get_config, n_styles_for


TASK_OUTPUT_SIZE = 32  # the generator of the task checkpoints here (n_styles 8); official: 1024 (18)


def task_checkpoint(config: str) -> dict:
    """The rule checkpoint (seed 0) of an official task layout with a TASK_OUTPUT_SIZE generator: the
    config's opts but output_size and n_styles, the same encoder and input layer (~140 M parameters)."""
    from reference.weights import LATENT_AVG_KEY, draw, make_state_dict, psp_modules

    opts = {**get_config(config).opts(), "output_size": TASK_OUTPUT_SIZE, "n_styles": n_styles_for(TASK_OUTPUT_SIZE)}
    with torch.device("meta"):
        model = psp_modules(opts)
    latent_avg = (0.5 * draw(LATENT_AVG_KEY, (512,), 0)).repeat(opts["n_styles"], 1)
    return {"state_dict": make_state_dict(model, 0), "opts": opts, "latent_avg": latent_avg}


@pytest.fixture(scope="module")
def task_engine():
    """Build `task_checkpoint(config)` in memory and wrap it in an Engine (one model at a time)."""
    cache = {}

    def get(config: str) -> api.Engine:
        if config not in cache:
            cache.clear()
            psp = load_psp(task_checkpoint(config))
            cache[config] = api.Engine.around(psp, Path(f"rule-{config}-{TASK_OUTPUT_SIZE}.pt"))
        return cache[config]

    yield get
    cache.clear()


def assert_task_layout(eng: api.Engine, config: str) -> None:
    """The engine's opts are the official task's (1024 px, 18 styles) but for the smaller generator."""
    official = get_config(config).opts()
    assert (official["output_size"], official["n_styles"]) == (1024, 18)
    assert {**eng.opts, "output_size": 1024, "n_styles": 18} == official
    assert (eng.output_size, eng.n_styles) == (TASK_OUTPUT_SIZE, n_styles_for(TASK_OUTPUT_SIZE))


def official_onehot(ids: np.ndarray, n_classes: int) -> np.ndarray:
    """Official `ToOneHot` then `ToTensor`, written out: `[H, W]` ids -> `[n_classes, H, W]` {0, 1}."""
    out = np.zeros(ids.shape + (n_classes,), dtype=np.int64)
    rows, cols = np.ogrid[: ids.shape[0], : ids.shape[1]]
    out[rows, cols, ids] = 1
    return out.transpose(2, 0, 1)


@contextlib.contextmanager
def recorded_encodes(eng: api.Engine):
    """Within the block, every `eng.encode` call (on this instance) is recorded: yields the list of
    (input row [C, 256, 256], W+ row [n_styles, 512]) pairs of all calls, to check what a run encoded
    without encoding it a second time (a 256 px encode costs ~2 s per image on one thread)."""
    calls = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        w = api.Engine.encode(eng, x)
        calls.extend(zip(x.clone(), w.clone()))
        return w

    eng.encode = encode
    try:
        yield calls
    finally:
        del eng.encode


def run_one(eng: api.Engine, source: Path, tmp_path: Path, **kw):
    """Run `source` through the batch loop; returns the image and latent written, and the tensor
    [1, C, 256, 256] the run gave `eng.encode` (`recorded_encodes`)."""
    opts = RunOptions(out_dir=tmp_path / "out", save_latents=True, **kw)
    jobs = plan_jobs([source])
    with recorded_encodes(eng) as calls, Manifest(opts.out_dir, {"test": str(eng.checkpoint)}) as m:
        summary = run_jobs(eng, jobs, opts, m)
    assert (summary.ok, summary.failed) == (1, 0), summary.failures
    assert len(calls) == 1, "one input, one encoded image"
    paths = jobs[0].outputs(opts.out_dir, save_latents=True, couple_outputs=False)
    (x_seen, w_seen), = calls
    assert np.abs(np.load(paths["latent"]) - w_seen.numpy()).max() < 1e-4, "the latent written is the encoder's"
    return np.asarray(Image.open(paths["image"])), np.load(paths["latent"]), x_seen[None]


@pytest.mark.slow
def test_sketch_to_face(task_engine, shared, tmp_path):
    eng = task_engine("sketch_to_face")
    assert_task_layout(eng, "sketch_to_face")
    assert (eng.input_nc, eng.label_nc) == (1, 1)
    src = shared / "data" / "sketch" / "psp_input_sketch.jpg"
    x = to_input_tensor([Image.open(src)], eng.label_nc)
    # official SketchToImageTransforms: convert('L'), Resize((256, 256)), ToTensor (no Normalize)
    grey = np.array(Image.open(src).convert("L").resize((256, 256), Image.BILINEAR))
    assert torch.equal(x, torch.from_numpy(grey)[None, None].float() / 255)
    img, w_plus, x_seen = run_one(eng, src, tmp_path)
    assert img.shape == (32, 32, 3) and w_plus.shape == (8, 512)
    assert torch.equal(x_seen, x), "the run encoded the official transform of the sketch"


@pytest.mark.slow
def test_seg_to_face(task_engine, shared, tmp_path):
    eng = task_engine("seg_to_face")
    assert_task_layout(eng, "seg_to_face")
    assert (eng.input_nc, eng.label_nc) == (19, 19)
    src = shared / "data" / "segmentation" / "psp_input_mask.png"
    x = to_input_tensor([Image.open(src)], eng.label_nc)
    # official SegToImageTransforms: convert('L'), Resize((256, 256)) (bilinear, ids interpolated), ToOneHot(19)
    ids = np.asarray(Image.open(src).convert("L").resize((256, 256), Image.BILINEAR))
    assert torch.equal(x[0], torch.from_numpy(official_onehot(ids, 19)).float())
    assert float(x.sum()) == 256 * 256  # exactly one class per pixel
    img, w_plus, x_seen = run_one(eng, src, tmp_path)
    assert img.shape == (32, 32, 3) and w_plus.shape == (8, 512)
    assert torch.equal(x_seen, x), "the run encoded the official one-hot map"


@pytest.mark.slow
def test_super_resolution(task_engine, shared, tmp_path):
    eng = task_engine("super_resolution")
    assert_task_layout(eng, "super_resolution")
    assert eng.opts["dataset_type"] == "celebs_super_resolution" and eng.opts["resize_factors"] == "1,2,4,8,16,32"
    src = shared / "data" / "faces" / "aligned" / "hyperstyle_pitt_256.jpg"
    x8 = to_input_tensor([Image.open(src)], 0, degrade_factor=8)
    x_plain = to_input_tensor([Image.open(src)], 0)
    img, w_plus, x_seen = run_one(eng, src, tmp_path, degrade_factor=8)
    assert img.shape == (32, 32, 3) and w_plus.shape == (8, 512)
    assert torch.equal(x_seen, x8), "the run encoded the degraded input"
    assert not torch.equal(x8, x_plain), "and not the plain one, which differs"


# ------------------------------------------------------------------------------------------------
# --resize-factor and --align in the run loop


def test_resize_factor_resolution():
    from types import SimpleNamespace

    from engine.api import UsageError
    from engine.run import resolve_resize_factor

    def eng(dataset_type, factors=None):
        return SimpleNamespace(opts={"dataset_type": dataset_type, "resize_factors": factors}, checkpoint=Path("c.pt"))

    sr_multi, sr_one, enc = eng("celebs_super_resolution", "1,2,4,8,16,32"), eng("celebs_super_resolution", "4"), eng("ffhq_encode")
    assert resolve_resize_factor(None, enc) is None
    assert resolve_resize_factor(None, sr_one) == 4
    assert resolve_resize_factor("8", sr_multi) == 8
    assert resolve_resize_factor("input", sr_multi) is None
    warnings = []
    assert resolve_resize_factor("3", sr_one, warnings.append) == 3 and "not among" in warnings[0]
    with pytest.raises(UsageError, match="trained on factors 1,2,4,8,16,32.*--resize-factor"):
        resolve_resize_factor(None, sr_multi)
    with pytest.raises(UsageError, match="super-resolution checkpoints.*ffhq_encode"):
        resolve_resize_factor("4", enc)
    for bad in ("0", "x", "2.5"):
        with pytest.raises(UsageError, match="positive integer"):
            resolve_resize_factor(bad, sr_multi)


@pytest.mark.slow
def test_align_in_the_run_loop(shared, tmp_path, small_w):
    """Photos aligned in the run loop: every face, its kept crop and its inversion, a photo without a
    face failed with a hint, a rerun, --largest-face. The 32 px `small_w` checkpoint: what is checked
    is the loop, which any photo checkpoint exercises (the crop is 1024 px whatever the model)."""
    pytest.importorskip("dlib", reason="--align needs dlib (pip install -e '.[align]')")
    from engine.align import align_image
    from reference.images import read_image

    eng = api.Engine.around(load_psp(small_w), Path(small_w))
    unaligned = shared / "data" / "faces" / "unaligned"
    files = [unaligned / "face_recognition_two_people.jpg", unaligned / "hyperstyle_face_image.jpg",
             shared / "data" / "other" / "skimage_coffee.png"]
    opts = RunOptions(out_dir=tmp_path / "out", align=True, save_aligned=True, save_latents=True, batch_size=2)
    jobs = plan_jobs(files)
    with recorded_encodes(eng) as encoded, Manifest(opts.out_dir, opts.config(eng)) as m:
        summary = run_jobs(eng, jobs, opts, m)
    assert (summary.ok, summary.failed, summary.skipped) == (2, 1, 0), summary.format()
    assert "skimage_coffee.png" in summary.failures[0][1] and "no face" in summary.failures[0][1]
    assert "--upsample 2" in summary.failures[0][1], "the hint names a real option"
    root = opts.out_dir
    out = root / "faces" / "unaligned"  # outputs mirror the inputs under their common folder (shared/data)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    expect = sorted(["manifest.jsonl"] + [f"faces/unaligned/{n}" for n in (
        "hyperstyle_face_image.png", "hyperstyle_face_image.npy", "hyperstyle_face_image_aligned.png",
        *(f"face_recognition_two_people_face{i}{s}" for i in (0, 1) for s in (".png", ".npy", "_aligned.png")))])
    assert names == expect
    # the kept crop is engine.align's, and the inversion encoded that crop
    crop = align_image(read_image(files[1]), name="x", output_size=1024, transform_size=1024)[0][1]
    assert np.array_equal(np.asarray(Image.open(out / "hyperstyle_face_image_aligned.png")), np.asarray(crop))
    assert len(encoded) == 3, "three faces encoded"
    (w,) = [w for x, w in encoded if torch.equal(x, to_input_tensor([crop], 0)[0])]
    assert np.abs(np.load(out / "hyperstyle_face_image.npy") - w.numpy()).max() < 1e-4
    # one manifest record per input, listing all its faces' outputs; a rerun skips them and retries the photo without a face
    import json

    records = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    two = [r for r in records if r["input"].endswith("two_people.jpg")]
    assert len(two) == 1 and len(two[0]["outputs"]) == 6
    coffee = [r for r in records if r["input"].endswith("coffee.png")]
    assert coffee[0]["status"] == "failed" and "no face" in coffee[0]["error"]
    with Manifest(opts.out_dir, opts.config(eng)) as m:
        again = run_jobs(eng, jobs, opts, m)
    assert (again.ok, again.skipped, again.failed) == (0, 2, 1)
    # --largest-face: one face, the input's own name
    opts1 = RunOptions(out_dir=tmp_path / "largest", align=True, largest_face=True)
    with Manifest(opts1.out_dir, opts1.config(eng)) as m:
        one = run_jobs(eng, plan_jobs(files[:1]), opts1, m)
    assert one.ok == 1 and (opts1.out_dir / "face_recognition_two_people.png").is_file()
    assert not list(opts1.out_dir.glob("*_face*"))


def test_align_usage_errors(tmp_path, shared, capsys):
    from engine import run

    img = shared / "data" / "faces" / "aligned" / "hyperstyle_pitt_256.jpg"
    for extra in (["--largest-face"], ["--all-faces"], ["--upsample", "2"], ["--save-aligned"]):
        assert run.main(["--input", str(img), "--output", str(tmp_path / "o")] + extra) == 2
        assert f"{extra[0]}: only used with --align" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_align_without_dlib_stops_before_the_load(tmp_path, shared, capsys, monkeypatch):
    """A missing dlib is found while the options are checked: one line with the install command, no model load."""
    from engine import align, run

    def no_load(*args, **kwargs):
        raise AssertionError("api.load was called")

    monkeypatch.setitem(sys.modules, "dlib", None)  # `import dlib` raises ImportError
    monkeypatch.setattr(api, "load_planned", no_load)  # every load goes through it
    img = shared / "data" / "faces" / "unaligned" / "skimage_astronaut.png"
    assert run.main(["--input", str(img), "--output", str(tmp_path / "o"), "--align"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -e '.[align]'" in err and "dlib" in err
    assert align.main(["--input", str(img), "--output", str(tmp_path / "a")]) == 2
    assert "pip install -e '.[align]'" in capsys.readouterr().err
