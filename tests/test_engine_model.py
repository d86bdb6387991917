"""export.backends.engine_model.EnginePSP (static weights, folded BatchNorm, batched heads) equals the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from export.backends.engine_model import EnginePSP, _adaptive_pool_matrix
from reference import load_psp
from reference.psp import face_pool
from reference.configs import BASE_OPTS
from reference.weights import make_state_dict, psp_modules
from export.compare import assert_close


def small_psp(encoder_type: str, output_size: int = 32, input_nc: int = 3, seed: int = 0):
    learn_in_w = encoder_type == "BackboneEncoderUsingLastLayerIntoW"
    opts = {**BASE_OPTS, "encoder_type": encoder_type, "output_size": output_size, "input_nc": input_nc,
            "learn_in_w": learn_in_w, "n_styles": int(math.log2(output_size)) * 2 - 2}
    with torch.device("meta"):
        model = psp_modules(opts)
    v = 0.5 * torch.randn(512, generator=torch.Generator().manual_seed(seed + 1))
    la = v[None] if learn_in_w else v.repeat(opts["n_styles"], 1)
    return load_psp({"state_dict": make_state_dict(model, seed), "opts": opts, "latent_avg": la})


@pytest.mark.parametrize("encoder_type,input_nc,output_size", [
    ("GradualStyleEncoder", 3, 64), ("GradualStyleEncoder", 19, 32),
    ("BackboneEncoderUsingLastLayerIntoW", 1, 32), ("BackboneEncoderUsingLastLayerIntoWPlus", 3, 32),
])
def test_engine_model_equals_reference(encoder_type, input_nc, output_size):
    """Encode and resized synthesis of a batch of 2 (more than one image; each 256 px encode costs
    ~2 s on one thread, twice: reference and engine) at small generator sizes."""
    psp = small_psp(encoder_type, output_size, input_nc)
    eng = EnginePSP(psp)
    x = torch.rand(2, input_nc, 256, 256, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        ref_w = psp.encode(x)
        w = eng.encode(x)
        ref_img = psp.face_pool(psp.synthesize(ref_w))
        img = face_pool(eng.synthesize(ref_w))
    assert_close(w, ref_w, "engine_model")
    assert_close(img, ref_img, "engine_model")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_rounding_and_casting_never_reach_the_source_model(precision):
    """EnginePSP owns its memory: emulating or casting a precision on it leaves the reference model
    it was built from unchanged (once, the emulation rounded the reference's shared biases in place)."""
    from export.backends.engine_model import emulate_rounding

    psp = small_psp("GradualStyleEncoder", 32)
    before = {k: v.clone() for k, v in psp.state_dict().items()}
    emulate_rounding(EnginePSP(psp), precision)
    EnginePSP(psp, precision=precision)
    after = psp.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"the source model was changed: {changed[:5]}"


@pytest.mark.slow
def test_engine_model_golden(psp256, shared):
    """The engine formulation of the 256 px model against the official outputs, on the first 2 of the
    4 golden faces (~5 s of encode and synthesis each on one thread); all 4 go through the same
    formulation's exported graphs in tests/test_onnx.py::test_parity_report_against_golden, and
    through the reference in tests/test_golden.py."""
    golden = np.load(shared / "golden" / "public_ffhq_encode_256_seed0.npz")
    n = 2
    x = (torch.from_numpy(golden["inputs_rgb256_uint8"][:n]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    eng = EnginePSP(psp256)
    with torch.inference_mode():
        w_plus = eng.encode(x)
        img = eng.synthesize(w_plus)
        w = eng.mapping(torch.from_numpy(golden["stylemix_z"]))
    assert_close(w_plus, torch.from_numpy(golden["latents"][:n]), "golden")
    assert_close(img, torch.from_numpy(golden["images_resize_false"][:n]), "golden")
    assert_close(w[:, None].expand(-1, 14, -1), torch.from_numpy(golden["stylemix_inject_latents"]), "golden")


def test_adaptive_pool_matrix_is_adaptive_avg_pool():
    x = torch.randn(2, 5, 16)
    m = _adaptive_pool_matrix(16, 7)
    torch.testing.assert_close(x @ m.t(), torch.nn.functional.adaptive_avg_pool1d(x, 7))


@pytest.mark.parametrize("r", [64, 256, 1024])
def test_face_pool_equals_adaptive_avg_pool(r):
    img = torch.randn(1, 3, r, r)
    torch.testing.assert_close(face_pool(img), torch.nn.functional.adaptive_avg_pool2d(img, 256))
