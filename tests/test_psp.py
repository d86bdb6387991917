"""The reference pSp model: encoders of every type and any input_nc, latent_avg handling,
mapping, synthesis, face_pool, and checkpoint loading (errors included)."""

from __future__ import annotations

import argparse
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from reference import CheckpointError, load_psp, load_stylegan2, make_checkpoint, save_checkpoint
from reference.checkpoint import UnsafeLoadWarning
from reference.configs import BASE_OPTS
from reference.encoders import ENCODER_TYPES
from reference.weights import make_state_dict, psp_modules


def small_ckpt(encoder_type="GradualStyleEncoder", output_size=32, input_nc=3, learn_in_w=False, seed=0):
    """An official-layout checkpoint of a small architecture (fast to build and run; cached, never mutate)."""
    # one cache key per architecture, however the arguments are spelled (each build costs ~2-4 s)
    return _small_ckpt(encoder_type, output_size, input_nc, learn_in_w, seed)


@functools.lru_cache(maxsize=None)
def _small_ckpt(encoder_type, output_size, input_nc, learn_in_w, seed):
    opts = {**BASE_OPTS, "encoder_type": encoder_type, "output_size": output_size, "input_nc": input_nc,
            "learn_in_w": learn_in_w, "n_styles": int(math.log2(output_size)) * 2 - 2}
    with torch.device("meta"):
        model = psp_modules(opts)
    sd = make_state_dict(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    v = 0.5 * torch.randn(512, generator=g)
    latent_avg = v[None] if learn_in_w else v.repeat(opts["n_styles"], 1)
    return {"state_dict": sd, "opts": opts, "latent_avg": latent_avg}


def rand_input(n, c, seed=0):
    return torch.rand(n, c, 256, 256, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def encode_with_codes(model, x):
    """`(model.encode(x), the encoder's own output in that call)`: one pass of the encoder (a 256 px
    encode costs ~2 s per image on one thread), its output taken by a forward hook."""
    codes = []
    hook = model.encoder.register_forward_hook(lambda module, args, out: codes.append(out))
    try:
        with torch.inference_mode():
            w_plus = model.encode(x)
    finally:
        hook.remove()
    assert len(codes) == 1
    return w_plus, codes[0]


@pytest.mark.parametrize(
    "encoder_type,input_nc",
    [("GradualStyleEncoder", 1), ("GradualStyleEncoder", 19)] + [(t, 3) for t in ENCODER_TYPES],
)
def test_encoder_types_and_input_nc(encoder_type, input_nc):
    learn_in_w = encoder_type == "BackboneEncoderUsingLastLayerIntoW"
    ckpt = small_ckpt(encoder_type, output_size=32, input_nc=input_nc, learn_in_w=learn_in_w)
    model = load_psp(ckpt)
    assert model.n_styles == 8 and model.input_nc == input_nc and not model.training
    x = rand_input(2, input_nc)
    w_plus, codes = encode_with_codes(model, x)
    with torch.inference_mode():
        img = model.synthesize(w_plus)
    assert w_plus.shape == (2, 8, 512) and w_plus.dtype == torch.float32
    assert img.shape == (2, 3, 32, 32)
    assert torch.isfinite(img).all()
    if learn_in_w:
        assert codes.shape == (2, 512)
        # one w for every style: codes + latent_avg, repeated
        torch.testing.assert_close(w_plus, (codes + ckpt["latent_avg"][0])[:, None].expand(2, 8, 512))
    else:
        assert codes.shape == (2, 8, 512)
        torch.testing.assert_close(w_plus, codes + ckpt["latent_avg"])
    # batch independence: each sample alone gives the same result
    with torch.inference_mode():
        one = model.encode(x[1:])
    torch.testing.assert_close(one, w_plus[1:], rtol=1e-5, atol=2e-5)


def test_gradual_encoder_taps_and_pyramid():
    model = load_psp(small_ckpt(output_size=64))
    x = rand_input(1, 3)
    with torch.inference_mode():
        c1, c2, c3 = model.encoder.features(x)
    assert c1.shape == (1, 128, 64, 64) and c2.shape == (1, 256, 32, 32) and c3.shape == (1, 512, 16, 16)
    assert model.n_styles == 10 and len(model.encoder.styles) == 10
    assert [s.spatial for s in model.encoder.styles] == [16] * 3 + [32] * 4 + [64] * 3


def test_latent_avg_shapes_and_flags():
    ckpt = small_ckpt()
    x = rand_input(1, 3)
    ref = load_psp(ckpt)
    ref_w, ref_codes = encode_with_codes(ref, x)
    flat = dict(ckpt, latent_avg=ckpt["latent_avg"][0])  # a stored [512] broadcasts
    with torch.inference_mode():
        torch.testing.assert_close(load_psp(flat).encode(x), ref_w, rtol=0, atol=0)
        no_avg = load_psp(dict(ckpt, opts={**ckpt["opts"], "start_from_latent_avg": False}))
        torch.testing.assert_close(no_avg.encode(x), ref_codes, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="no 'latent_avg'"):
        load_psp({k: v for k, v in ckpt.items() if k != "latent_avg"})
    with pytest.raises(CheckpointError, match="latent_avg has shape"):
        load_psp(dict(ckpt, latent_avg=torch.zeros(3, 512)))


def test_gradual_encoder_needs_seven_styles():
    with pytest.raises(CheckpointError, match="n_styles >= 7"):
        load_psp(small_ckpt("BackboneEncoderUsingLastLayerIntoW", output_size=16, learn_in_w=True) | {
            "opts": {**BASE_OPTS, "output_size": 16, "encoder_type": "GradualStyleEncoder"}})


def test_encode_rejects_wrong_input():
    model = load_psp(small_ckpt())
    with pytest.raises(ValueError, match=r"\[B, 3, 256, 256\]"):
        model.encode(torch.zeros(1, 3, 512, 512))
    with pytest.raises(ValueError, match="input_nc is 3"):
        model.encode(torch.zeros(1, 1, 256, 256))
    with pytest.raises(ValueError, match="w_plus must be"):
        model.synthesize(torch.zeros(1, 7, 512))


def test_mapping_is_the_official_mlp():
    model = load_psp(small_ckpt())
    z = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    x = z.double()
    x = x * torch.rsqrt((x**2).mean(dim=1, keepdim=True) + 1e-8)
    for i in range(1, 9):
        lin = model.decoder.style[i]
        x = x @ (lin.weight.double() * 0.01 / math.sqrt(512)).t() + lin.bias.double() * 0.01
        x = F.leaky_relu(x, 0.2) * math.sqrt(2)
    with torch.inference_mode():
        torch.testing.assert_close(model.mapping(z).double(), x, rtol=1e-5, atol=1e-5)
        w = model.mapping(z)
        # a [B, 512] w renders like the same w repeated to every style
        torch.testing.assert_close(model.synthesize(w), model.synthesize(w[:, None].repeat(1, 8, 1)))


def test_generator_formulations_and_batches():
    model = load_psp(small_ckpt(output_size=64))
    w_plus = 0.5 * torch.randn(3, 10, 512, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        grouped = model.synthesize(w_plus)
        model.decoder.set_fused_modconv(False)
        activation = model.synthesize(w_plus)
        model.decoder.set_fused_modconv(True)
        single = torch.cat([model.synthesize(w_plus[i : i + 1]) for i in range(3)])
    from export.compare import assert_close

    assert_close(activation, grouped, "generator_formulations")
    assert_close(single, grouped, "generator_formulations")
    # stored noise is used: the output is deterministic (the same call again, on one sample: cheaper)
    with torch.inference_mode():
        assert torch.equal(model.synthesize(w_plus[:1]), single[:1])


def test_face_pool_is_a_box_mean():
    model = load_psp(small_ckpt())
    img = torch.randn(2, 3, 1024, 1024)
    torch.testing.assert_close(model.face_pool(img), F.avg_pool2d(img, 4))
    img = torch.randn(1, 3, 512, 512)
    torch.testing.assert_close(model.face_pool(img), F.avg_pool2d(img, 2))


# ---------------------------------------------------------------------------------------------
# checkpoint files


def file_ckpt():
    """The smallest official-layout checkpoint (W encoder, 16 px generator, ~145 MB) for file tests."""
    return small_ckpt("BackboneEncoderUsingLastLayerIntoW", output_size=16, learn_in_w=True)


def test_roundtrip_through_a_file(tmp_path):
    ckpt = file_ckpt()
    path = save_checkpoint(ckpt, tmp_path / "model.pt")
    assert not list(tmp_path.glob("*.tmp"))
    x = rand_input(1, 3)
    with torch.inference_mode():
        torch.testing.assert_close(load_psp(path).encode(x), load_psp(ckpt).encode(x), rtol=0, atol=0)


def test_stylegan2_checkpoint_as_psp_is_named(tmp_path):
    path = save_checkpoint(make_checkpoint("stylegan2_rosinality_256", 0), tmp_path / "sg2.pt")
    with pytest.raises(CheckpointError, match="StyleGAN2 generator checkpoint"):
        load_psp(path)
    gen, latent_avg = load_stylegan2(path)
    assert gen.size == 256 and gen.n_latent == 14 and latent_avg.shape == (512,)
    with pytest.raises(CheckpointError, match="this is a pSp checkpoint"):
        load_stylegan2(small_ckpt())


def test_missing_unexpected_misshaped_keys_are_named():
    ckpt = small_ckpt()
    sd = dict(ckpt["state_dict"])
    del sd["decoder.convs.0.conv.weight"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["decoder.to_rgb1.bias"] = torch.zeros(1, 4, 1, 1)
    with pytest.raises(CheckpointError) as e:
        load_psp(dict(ckpt, state_dict=sd))
    msg = str(e.value)
    assert "1 missing key(s): decoder.convs.0.conv.weight" in msg
    assert "1 unexpected key(s): encoder.extra.weight" in msg
    assert "decoder.to_rgb1.bias (1, 4, 1, 1) (expected (1, 3, 1, 1))" in msg


def test_opts_that_do_not_fit_the_weights_give_the_cause():
    ckpt = small_ckpt(output_size=32)
    with pytest.raises(CheckpointError, match="opts say output_size=64 but the weights look like output_size=32"):
        load_psp(dict(ckpt, opts={**ckpt["opts"], "output_size": 64}))


@pytest.mark.parametrize(
    "content,match",
    [(b"", "empty"), (b"this is not a checkpoint\n", "is a text file, not a PyTorch checkpoint")],
)
def test_unreadable_files(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_psp(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_psp(tmp_path / "nope.pt")


def test_truncated_file(tmp_path):
    path = save_checkpoint(file_ckpt(), tmp_path / "full.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_psp(cut)


def test_pickled_objects_need_explicit_trust(tmp_path):
    ckpt = file_ckpt()
    old = dict(ckpt, opts=argparse.Namespace(**ckpt["opts"]))  # as some old training scripts saved it
    path = tmp_path / "old.pt"
    torch.save(old, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_psp(path)
    with pytest.warns(UnsafeLoadWarning, match="argparse.Namespace"):
        model = load_psp(path, trust_pickle=True)
    assert model.output_size == 16


def test_bare_state_dict_and_fp16_checkpoint():
    ckpt = small_ckpt(output_size=32)
    x = rand_input(1, 3)
    ref = load_psp(ckpt)
    bare = load_psp({k: v for k, v in ckpt["state_dict"].items()}, opts={"start_from_latent_avg": False})
    assert bare.output_size == 32  # read off the noise buffers
    half = dict(ckpt, state_dict={k: (v.half() if v.is_floating_point() else v) for k, v in ckpt["state_dict"].items()})
    model16 = load_psp(half)
    assert all(p.dtype == torch.float32 for p in model16.parameters())
    with torch.inference_mode():
        assert torch.isfinite(bare.encode(x)).all()
        ref_w = ref.encode(x)
        rel = (model16.encode(x) - ref_w).norm() / ref_w.norm()
    assert rel < 1e-2  # fp16-rounded weights, fp32 compute
