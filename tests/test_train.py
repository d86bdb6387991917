"""Training (reference.train): the loss goes down, checkpoints load and reproduce, resume is exact, errors are clear.

The runs use a tiny configuration so that the file stays within its time budget: 16 px generators, the
small encoders (one w, or W+ from the last layer) and 32 px sources/targets (`--image-size 32`, a
test-only option: official training and inference use 256 px encoder inputs), batch 2, four aligned
faces from ../shared downscaled to 64 px. The GradualStyleEncoder (123 M parameters even at 32 px)
trains through the same code; one step of it costs seconds on 2 cores.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from reference import Generator, load_psp
from reference.configs import BASE_OPTS
from reference.plumbing.errors import InputImageError, PSPError
from reference.perceptual import LPIPS, MissingWeightsError
from reference.train import (
    RANGER_SETTINGS,
    TRAIN_STATE,
    ArcFace,
    IDLoss,
    PairedDataset,
    PSPLoss,
    TrainConfigError,
    TrainDataError,
    init_model,
    main,
    make_optimizer,
    pair_folders,
    psp_forward,
    resolve_opts,
    run,
    w_norm_loss,
)
from reference.weights import make_state_dict

from conftest import save_small_w

OUTPUT_SIZE = 16
N_FACES = 4


@pytest.fixture(scope="module")
def faces(shared, tmp_path_factory):
    """N_FACES aligned faces from ../shared, downscaled to 64 px PNGs in a temp folder."""
    src = sorted((shared / "data" / "faces" / "aligned").glob("*.jpg"))[:N_FACES]
    assert len(src) == N_FACES, "../shared/data/faces/aligned should hold at least 4 faces"
    out = tmp_path_factory.mktemp("faces")
    for p in src:
        Image.open(p).convert("RGB").resize((64, 64), Image.BILINEAR).save(out / f"{p.stem}.png")
    return out


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A learn_in_w pSp (BackboneEncoderUsingLastLayerIntoW) with a 16 px generator (6 styles), by the
    weight rule, in the official file layout. The smallest encoder keeps the runs within budget."""
    path = save_small_w(tmp_path_factory.mktemp("ckpt") / "small16.pt", OUTPUT_SIZE)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _drop_checkpoints(tmp_path):
    """Remove the test's checkpoints afterwards (pytest keeps old tmp folders; these hold ~1.5 GB)."""
    yield
    for path in [*tmp_path.rglob("*.pt"), *tmp_path.rglob("*.pth")]:
        path.unlink(missing_ok=True)


def _opts(faces, small_ckpt, exp_dir, **over):
    base = dict(exp_dir=str(exp_dir), source=str(faces), checkpoint_path=str(small_ckpt), image_size=32,
                batch_size=2, workers=0, test_workers=0, l2_lambda=1.0, lpips_lambda=0.0, w_norm_lambda=0.005,
                learning_rate=1e-3, board_interval=1, image_interval=1000, seed=3)
    base.update(over)
    return base


def _train_losses(exp_dir):
    lines = [json.loads(s) for s in (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e for e in lines if e["event"] == "train"}


def _quiet(_msg):
    pass


@pytest.mark.slow
def test_trains_saves_reloads_and_resumes_exactly(faces, small_ckpt, tmp_path):
    """The loss falls; the checkpoint loads with load_psp and gives the trained model's outputs; a run
    stopped at step 4 and resumed reaches the same weights at step 8 as the uninterrupted run.

    The uninterrupted run has 10 steps (0-9; each costs ~1.5 s on one core): enough for the loss to
    fall (measured: the last 4 steps' mean 0.69x the first 4's, the whole-set L2 0.47x; checked: below
    0.8x and 0.6x), one interval checkpoint (8) and a final one (9) off the interval."""
    max_steps = 9
    coach, result = run(_opts(faces, small_ckpt, tmp_path / "a", max_steps=max_steps, save_interval=8), say=_quiet)
    assert result["step"] == max_steps
    losses = _train_losses(tmp_path / "a")
    assert sorted(losses) == list(range(max_steps + 1))
    per_step = [losses[s]["loss"] for s in range(max_steps + 1)]
    assert all(math.isfinite(v) for v in per_step)
    k = 4
    first, last = np.mean(per_step[:k]), np.mean(per_step[-k:])
    assert last < 0.8 * first, f"loss did not fall: first {k} steps {first:.4f}, last {k} {last:.4f} ({per_step})"
    assert {"loss_l2", "loss_w_norm"} <= set(losses[0])
    # The same on the whole (4-image) set, without the batch-to-batch noise: initial vs trained weights.
    x_all = torch.stack([coach.train_set.load(i)[0] for i in range(N_FACES)])
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(psp_forward(load_psp(small_ckpt), x_all, None, 32)[0], x_all)
        after = torch.nn.functional.mse_loss(psp_forward(coach.net.eval(), x_all, None, 32)[0], x_all)
    assert after < 0.6 * before, f"L2 on the training faces: {float(before):.4f} before, {float(after):.4f} after"

    # Official layout, weights_only, loadable by load_psp, same outputs as the trained model.
    ckpt_dir = tmp_path / "a" / "checkpoints"
    final = ckpt_dir / f"iteration_{max_steps}.pt"
    assert sorted(p.name for p in ckpt_dir.glob("iteration_*.pt")) == ["iteration_8.pt", "iteration_9.pt"]
    raw = torch.load(final, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict", "opts", "latent_avg"}
    assert set(BASE_OPTS) <= set(raw["opts"]) and raw["opts"]["device"] == "cuda:0"
    assert raw["opts"]["output_size"] == OUTPUT_SIZE and raw["opts"]["n_styles"] == 6 and raw["opts"]["learn_in_w"]
    assert raw["latent_avg"].shape == (1, 512), "learn_in_w keeps the official [1, 512] latent_avg"
    trained = coach.net.eval()
    loaded = load_psp(final)
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.stack([coach.train_set.load(i)[0] for i in range(2)])
    with torch.no_grad():
        want_img, want_w = psp_forward(trained, x, None, 32)
        got_img, got_w = psp_forward(loaded, x, None, 32)
    assert torch.equal(got_w, want_w) and torch.equal(got_img, want_img)

    # Resume: 0..4 in one process, then 5..8 from train_state.pt.
    run(_opts(faces, small_ckpt, tmp_path / "c", max_steps=4, save_interval=4), say=_quiet)
    state = torch.load(tmp_path / "c" / "checkpoints" / TRAIN_STATE, map_location="cpu", weights_only=True)
    assert state["step"] == 4 and state["checkpoint"] == "iteration_4.pt"
    _, result = run({"exp_dir": str(tmp_path / "c"), "max_steps": 8}, resume=True, say=_quiet)
    assert result["step"] == 8
    resumed = torch.load(tmp_path / "c" / "checkpoints" / "iteration_8.pt", map_location="cpu", weights_only=True)
    straight = torch.load(ckpt_dir / "iteration_8.pt", map_location="cpu", weights_only=True)
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), f"{key} differs after resume"
    resumed_losses = _train_losses(tmp_path / "c")
    assert [resumed_losses[s]["loss"] for s in range(9)] == per_step[:9]
    # A finished run has nothing left to do; changing the objective on resume is refused.
    _, result = run({"exp_dir": str(tmp_path / "c"), "max_steps": 8}, resume=True, say=_quiet)
    assert result["step"] == 8 and result["checkpoint"] is None
    with pytest.raises(TrainConfigError, match="l2_lambda"):
        run({"exp_dir": str(tmp_path / "c"), "l2_lambda": 2.0}, resume=True, say=_quiet)


def test_missing_loss_weights_name_the_file_and_the_off_switch(faces, small_ckpt, tmp_path, capsys):
    args = ["--exp-dir", str(tmp_path / "x"), "--source", str(faces), "--checkpoint", str(small_ckpt),
            "--image-size", "32", "--batch-size", "2"]
    missing = tmp_path / "nowhere" / "alexnet-owt-7be5be79.pth"
    assert main(args + ["--lpips-lambda", "0.8", "--lpips-backbone", str(missing)]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert str(missing) in err and "--lpips-lambda 0" in err and "--lpips-backbone" in err
    assert main(args + ["--lpips-lambda", "0", "--id-lambda", "0.1"]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "model_ir_se50.pth" in err and "--ir-se50-weights" in err and "--id-lambda 0" in err
    assert not (tmp_path / "x" / "checkpoints").exists(), "nothing is written before the options are usable"


def test_segmentation_bad_label_names_the_file(faces, tmp_path, capsys):
    """A class id >= label_nc is reported with its file: by --check-data, by the dataset, and skipped in a batch."""
    seg = tmp_path / "seg"
    seg.mkdir()
    names = sorted(p.stem for p in faces.glob("*.png"))
    for i, name in enumerate(names):
        ids = (np.arange(64 * 64).reshape(64, 64) // 1024 + i) % 4
        if name == names[1]:
            ids[10:20, 10:20] = 7  # label_nc is 4
        Image.fromarray(ids.astype(np.uint8), "L").save(seg / f"{name}.png")
    bad = seg / f"{names[1]}.png"
    args = ["--exp-dir", str(tmp_path / "run"), "--dataset-type", "celebs_seg_to_face", "--label-nc", "4",
            "--input-nc", "4", "--source", str(seg), "--target", str(faces), "--check-data"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "class id 7" in err and "3 of 4 pair(s) usable" in err

    pairs, lone_src, lone_tgt = pair_folders(seg, faces)
    assert len(pairs) == 4 and not lone_src and not lone_tgt
    ds = PairedDataset(pairs, "celebs_seg_to_face", 4, image_size=32)
    x, y = ds.load(0)
    assert x.shape == (4, 32, 32) and y.shape == (3, 32, 32)
    assert torch.allclose(x.sum(0), torch.ones(32, 32)), "one-hot (area-averaged) sums to 1 per pixel"
    with pytest.raises(InputImageError, match="class id 7") as e:
        ds.load(1)
    assert str(e.value).startswith(str(bad))
    item = ds[(0, 1)]
    assert "error" in item and str(bad) in item["error"]

    # Training skips the bad pair (named once) and goes on: a W+ encoder from random init, 4 steps,
    # validation on the same folders (a sanity pass at step 0, then steps 2 and 3) writing best_model.pt.
    said = []
    coach, result = run({"exp_dir": str(tmp_path / "run"), "dataset_type": "celebs_seg_to_face", "label_nc": 4,
                         "input_nc": 4, "source": str(seg), "target": str(faces), "test_source": str(seg),
                         "test_target": str(faces), "output_size": 16, "val_interval": 2, "test_batch_size": 4,
                         "encoder_type": "BackboneEncoderUsingLastLayerIntoWPlus", "image_size": 32, "batch_size": 2,
                         "workers": 0, "test_workers": 0, "lpips_lambda": 0, "w_norm_lambda": 0.005, "max_steps": 3,
                         "latent_avg_samples": 1000, "board_interval": 1}, say=said.append)
    assert result["step"] == 3
    skipped = [m for m in said if m.startswith("skipping a sample")]
    assert len(skipped) == 1 and str(bad) in skipped[0], said
    log = [json.loads(s) for s in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [e["error"] for e in log if e["event"] == "skip"] == [skipped[0].split(": ", 1)[1]]
    assert [e["step"] for e in log if e["event"] == "test"] == [2, 3]
    assert result["best_val_loss"] == min(e["loss"] for e in log if e["event"] == "test")
    assert (tmp_path / "run" / "checkpoints" / "best_model.pt").is_file()
    raw = torch.load(tmp_path / "run" / "checkpoints" / "iteration_3.pt", map_location="cpu", weights_only=True)
    assert raw["opts"]["label_nc"] == 4 and raw["latent_avg"].shape == (512,), "estimated latent_avg is [512]"
    assert load_psp(raw).input_nc == 4


def test_option_and_data_errors(faces, tmp_path, capsys):
    base = {"exp_dir": str(tmp_path / "e"), "source": str(faces)}
    with pytest.raises(TrainConfigError, match="--input-nc 3 does not fit --label-nc 1"):
        resolve_opts({**base, "dataset_type": "celebs_sketch_to_face", "label_nc": 1})
    with pytest.raises(TrainConfigError, match="--label-nc N --input-nc N"):
        resolve_opts({**base, "dataset_type": "celebs_seg_to_face"})
    with pytest.raises(TrainConfigError, match="every loss weight is 0"):
        resolve_opts({**base, "l2_lambda": 0, "lpips_lambda": 0})
    with pytest.raises(TrainConfigError, match="--learn-in-w"):
        resolve_opts({**base, "learn_in_w": True})
    opts = resolve_opts({**base, "preset": "celebs_super_resolution"})
    assert opts["resize_factors"] == "1,2,4,8,16,32" and opts["w_norm_lambda"] == 0.005 and opts["id_lambda"] == 0.1
    assert resolve_opts({**base, "preset": "celebs_seg_to_face", "id_lambda": 0.5})["id_lambda"] == 0.5

    assert main(["--exp-dir", str(tmp_path / "e"), "--source", str(tmp_path / "missing")]) == 2
    assert "missing: --source folder not found" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (64, 64)).save(other / "unrelated.png")
    with pytest.raises(TrainDataError, match="no pairs"):
        pair_folders(faces, other)
    with pytest.raises(TrainDataError, match="fewer than --batch-size 8"):
        run({**base, "batch_size": 8}, say=_quiet)
    (tmp_path / "dup").mkdir()
    for ext in ("png", "jpg"):
        Image.new("RGB", (64, 64)).save(tmp_path / "dup" / f"a.{ext}")
    with pytest.raises(TrainDataError, match="two images share the name 'a'"):
        pair_folders(tmp_path / "dup")


def _official_ranger_step(p, grad, state, lr, eps=6.1e-5, beta1=0.95, beta2=0.999, k=6, alpha=0.5):
    """The arithmetic of official training/ranger.py (Ranger 20.4.11), restated as a test oracle."""
    grad = grad.clone()
    if not state:
        state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p), slow=p.clone())
    if grad.dim() > 1:
        grad -= grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)
    state["step"] += 1
    t = state["step"]
    state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    state["m"].mul_(beta1).add_(grad, alpha=1 - beta1)
    beta2_t = beta2**t
    n_sma_max = 2 / (1 - beta2) - 1
    n_sma = n_sma_max - 2 * t * beta2_t / (1 - beta2_t)
    if n_sma > 5:
        step_size = math.sqrt((1 - beta2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma * n_sma_max
                              / (n_sma_max - 2)) / (1 - beta1**t)
        p.addcdiv_(state["m"], state["v"].sqrt().add_(eps), value=-step_size * lr)
    else:
        p.add_(state["m"], alpha=-lr / (1 - beta1**t))
    if t % k == 0:
        state["slow"].add_(p - state["slow"], alpha=alpha)
        p.copy_(state["slow"])


def test_ranger_is_the_official_arithmetic():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (5, 7), (6,)]  # conv, linear (both centralised), bias
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    oracle = [p.detach().clone() for p in params]
    start = [p.detach().clone() for p in params]
    states = [{} for _ in params]
    opt = make_optimizer("ranger", params, lr=1e-2)
    assert RANGER_SETTINGS["degenerated_to_sgd"] and RANGER_SETTINGS["eps"] == 6.1e-5
    for _ in range(14):  # SGD phase (steps 1-5), rectified phase, two Lookahead syncs (6, 12)
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for q, gr, st in zip(oracle, grads, states):
            _official_ranger_step(q, gr, st, lr=1e-2)
    for p, q, p0 in zip(params, oracle, start):
        assert (p.detach() - p0).abs().max() > 1e-3, "the optimizer moved the parameters"
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


def test_losses_w_norm_lpips_crop_and_identity(tmp_path):
    g = torch.Generator().manual_seed(0)
    w_plus, latent_avg = torch.randn(3, 8, 512, generator=g), torch.randn(8, 512, generator=g)
    want = sum(torch.sqrt(((w_plus[b] - latent_avg) ** 2).sum()) for b in range(3)) / 3
    torch.testing.assert_close(w_norm_loss(w_plus, latent_avg), want)

    # LPIPS with a stand-in backbone file (torchvision layout), the crop variants at 256 px.
    backbone = tmp_path / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in LPIPS("alex").features.state_dict().items()}, backbone)
    opts = {**BASE_OPTS, "lpips_lambda": 0.8, "lpips_lambda_crop": 0.5, "l2_lambda_crop": 0.25, "w_norm_lambda": 0.1,
            "lpips_backbone": str(backbone)}
    loss_fn = PSPLoss(opts)
    y = torch.rand(2, 3, 256, 256, generator=g) * 2 - 1
    y_hat = (y + 0.3 * torch.randn(2, 3, 256, 256, generator=g)).requires_grad_(True)
    loss, d, _ = loss_fn(y, y, y_hat, w_plus[:2], latent_avg)
    assert set(d) == {"loss_l2", "loss_lpips", "loss_lpips_crop", "loss_l2_crop", "loss_w_norm", "loss"}
    parts = 1.0 * d["loss_l2"] + 0.8 * d["loss_lpips"] + 0.5 * d["loss_lpips_crop"] + 0.25 * d["loss_l2_crop"] \
        + 0.1 * d["loss_w_norm"]
    assert d["loss"] == pytest.approx(parts, rel=1e-6) and d["loss_lpips"] > 0
    crop = torch.nn.functional.mse_loss(y_hat[:, :, 35:223, 32:220], y[:, :, 35:223, 32:220])
    assert d["loss_l2_crop"] == pytest.approx(float(crop.detach()), rel=1e-6)
    loss.backward()
    assert y_hat.grad is not None and y_hat.grad.abs().sum() > 0

    # ID loss: TreB1eN's key layout loads (weights_only), identical images score 0, gradients flow.
    arcface = ArcFace()
    ir_path = tmp_path / "model_ir_se50.pth"
    torch.save(arcface.state_dict(), ir_path)
    id_loss_fn = PSPLoss({**BASE_OPTS, "l2_lambda": 0, "lpips_lambda": 0, "id_lambda": 0.1,
                          "ir_se50_weights": str(ir_path)})
    assert isinstance(id_loss_fn.id_loss, IDLoss)
    _, d, logs = id_loss_fn(y, y, y_hat, w_plus[:2], latent_avg)
    assert d["loss_id"] > 0 and len(logs) == 2 and {"diff_target", "diff_input", "diff_views"} <= set(logs[0])
    # x is y here: diff_views is the similarity of identical images, 1 (an ID loss of 0), per sample
    assert [entry["diff_views"] for entry in logs] == [pytest.approx(1.0, abs=1e-5)] * 2
    assert d["loss_id"] == pytest.approx(1 - sum(entry["diff_target"] for entry in logs) / 2, rel=1e-5)

    # Init as official load_weights: the IR-SE-50 body from the ArcFace file (input layer skipped for 1-channel
    # sketches), the decoder and latent_avg (repeated to n_styles) from a rosinality StyleGAN2 file.
    with torch.device("meta"):
        gen16 = Generator(16)
    g_ema = make_state_dict(gen16, 5)
    sg_path = tmp_path / "stylegan2_16.pt"
    torch.save({"g_ema": g_ema, "latent_avg": torch.full((512,), 0.25)}, sg_path)
    init_opts = resolve_opts({"exp_dir": str(tmp_path / "i"), "source": str(tmp_path), "output_size": 16,
                              "encoder_type": "BackboneEncoderUsingLastLayerIntoWPlus",
                              "dataset_type": "celebs_sketch_to_face", "label_nc": 1, "input_nc": 1,
                              "ir_se50_weights": str(ir_path), "stylegan_weights": str(sg_path)})
    net, latent_avg_saved = init_model(init_opts, say=_quiet)
    sd = arcface.state_dict()
    assert torch.equal(net.encoder.body[5].res_layer[1].weight, sd["body.5.res_layer.1.weight"])
    assert net.encoder.input_layer[0].weight.shape == (64, 1, 3, 3)
    assert all(torch.equal(net.decoder.state_dict()[k], v) for k, v in g_ema.items())
    assert latent_avg_saved.shape == (6, 512) and torch.equal(net.latent_avg, torch.full((6, 512), 0.25))
    with pytest.raises(TrainConfigError, match="pass --output-size 16"):
        init_model({**init_opts, "output_size": 32}, say=_quiet)
    with pytest.raises(MissingWeightsError):
        PSPLoss({**BASE_OPTS, "lpips_lambda": 0, "id_lambda": 0.1, "ir_se50_weights": None})
    with pytest.raises(PSPError, match="IR-SE-50"):
        PSPLoss({**BASE_OPTS, "lpips_lambda": 0, "id_lambda": 0.1, "ir_se50_weights": str(backbone)})


def test_transforms_per_task(faces):
    """Encoding: x is y, flipped together; super-resolution: a degraded x drawn per (epoch, sample); sketch: grey."""
    pairs, _, _ = pair_folders(faces)
    enc = PairedDataset(pairs, "ffhq_encode", 0, image_size=32, seed=1)
    plain = PairedDataset(pairs, "ffhq_encode", 0, image_size=32, seed=1, train=False)
    flips = 0
    for epoch in range(6):
        x, y = enc.load(0, epoch)
        assert x is y
        ref = plain.load(0)[1]
        assert torch.equal(y, ref) or torch.equal(y, ref.flip(-1))
        flips += not torch.equal(y, ref)
    assert 0 < flips < 6, "RandomHorizontalFlip(0.5) flips some epochs and not others"

    sr = PairedDataset(pairs, "celebs_super_resolution", 0, image_size=256, resize_factors=[8, 16], seed=1)
    x, y = sr.load(2, epoch=0)
    assert x.shape == y.shape == (3, 256, 256) and not torch.equal(x, y)
    assert torch.equal(sr.load(2, epoch=0)[0], x), "the factor is a function of (seed, epoch, index)"
    # A 16x-degraded image is blockier than the target: less high-frequency energy.
    hf = lambda t: (t[:, :, 1:] - t[:, :, :-1]).abs().mean()  # noqa: E731
    assert hf(x) < 0.8 * hf(y)

    sketch = PairedDataset(pairs, "celebs_sketch_to_face", 1, image_size=64)
    x, y = sketch.load(1)
    assert x.shape == (1, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 1 and y.shape == (3, 64, 64)
