"""The weight rule (shared/golden/spec/WEIGHT_RULE.md): every key of every spec config.

Checks, against `shared/golden/spec/<config>.json.gz`: the key list in module order, shapes,
dtypes, each key's init_class, the saved opts, and, where the spec gives them, every key's
checksum (float64 sum, abs-sum, first 4 values).
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from reference import CONFIGS, make_checkpoint, weights
from reference.configs import get_config
from reference.psp import PSP
from reference.stylegan2 import Generator
from reference.weights import init_classes, psp_modules

PSP_CONFIGS = [n for n, c in CONFIGS.items() if c.kind == "psp"]
SG_CONFIGS = [n for n, c in CONFIGS.items() if c.kind == "stylegan2"]


def load_spec(shared, name: str) -> dict:
    with gzip.open(shared / "golden" / "spec" / f"{name}.json.gz", "rt") as f:
        return json.load(f)


def test_every_spec_config_is_known(shared):
    names = sorted(p.name[: -len(".json.gz")] for p in (shared / "golden" / "spec").glob("*.json.gz"))
    assert names == sorted(CONFIGS)


@pytest.mark.parametrize("name", PSP_CONFIGS)
def test_layout_matches_spec(shared, name):
    spec = load_spec(shared, name)
    opts = get_config(name).opts()
    assert opts == spec["opts_as_saved"]
    with torch.device("meta"):
        model = psp_modules(opts)
    classes = init_classes(model)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in model.state_dict().items()}
    rows = spec["state_dict"]
    assert list(classes) == [r["key"] for r in rows], "keys or their order differ from the official state_dict"
    for r in rows:
        assert shapes[r["key"]] == r["shape"], r["key"]
        assert dtypes[r["key"]] == r["dtype"], r["key"]
        assert classes[r["key"]] == r["init_class"], r["key"]
    assert len(rows) == spec["n_keys"]
    n_params = sum(v.numel() for k, v in model.named_parameters())
    assert n_params == spec["param_counts"]["total_params"]
    # n_styles is recomputed from output_size, as official pSp does
    with torch.device("meta"):
        assert PSP(opts).n_styles == spec["n_styles"]


@pytest.mark.parametrize("name", SG_CONFIGS)
def test_stylegan2_layout_matches_spec(shared, name):
    spec = load_spec(shared, name)
    with torch.device("meta"):
        gen = Generator(spec["size"])
    sd = gen.state_dict()
    assert [k for k in sd] == [r["key"] for r in spec["g_ema_keys"]]
    assert all(list(sd[r["key"]].shape) == r["shape"] for r in spec["g_ema_keys"])
    assert gen.n_latent == spec["n_latent"] and gen.num_layers == spec["num_layers(noise buffers)"]
    assert sum(p.numel() for p in gen.parameters()) == spec["params"]


def _checksum_configs():
    return ["ffhq_encode_256", "ffhq_encode", "seg_to_face", "w_encoder_1024"]


# (key, init_class, shape, seed) -> (sum, abs-sum, first 4 values) of `rule_value`, for the keys an earlier
# config of this process already made; see test_every_key_checksum.
_CHECKSUMS: dict[tuple, tuple[float, float, list[float]]] = {}


@pytest.mark.parametrize("name", _checksum_configs())
def test_every_key_checksum(shared, name, monkeypatch, request):
    """Every key of `make_checkpoint(name, seed)` against the spec's checksums.

    ffhq_encode_256 at seed 0 is the session's checkpoint (`ffhq256_checkpoint`, tests/conftest.py:
    `make_checkpoint` saved once per test run), read back instead of made again.

    `rule_value` is a function of (key, init_class, shape, seed) only (WEIGHT_RULE.md), and the 1024 px
    configs share most keys (the decoder; the encoder body; seg_to_face differs from ffhq_encode only in
    its input layer). A key already made for an earlier config of this process (the order above) is
    not drawn again: `make_checkpoint` gets an empty tensor for it and the earlier value's checksum is
    compared with this config's row, which is the same check on the same value. Run alone, a config
    makes all of its keys."""
    spec = load_spec(shared, name)
    rows = spec["state_dict"]
    field = next(k for k in rows[0] if k.startswith("checksum_seed"))
    seed = int(field[len("checksum_seed") :])
    made_as: dict[str, tuple] = {}  # key -> the rule_value arguments it was made with
    if (name, seed) == ("ffhq_encode_256", 0):
        ckpt = torch.load(request.getfixturevalue("ffhq256_checkpoint"), map_location="cpu", weights_only=True,
                          mmap=True)
        with torch.device("meta"):
            model = psp_modules(get_config(name).opts())
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        made_as = {k: (k, cls, shapes[k], seed) for k, cls in init_classes(model).items()}
    else:
        real_rule_value = weights.rule_value

        def rule_value(key, init_class, shape, seed_):
            made_as[key] = ident = (key, init_class, tuple(shape), seed_)
            return torch.empty(0) if ident in _CHECKSUMS else real_rule_value(key, init_class, shape, seed_)

        monkeypatch.setattr(weights, "rule_value", rule_value)
        ckpt = make_checkpoint(name, seed)
    sd = ckpt["state_dict"]
    assert list(sd) == [r["key"] for r in rows]
    assert all(made_as[r["key"]][1:] == (r["init_class"], tuple(r["shape"]), seed) for r in rows)
    failures = []
    for r in rows:
        c = r[field]
        ident = made_as[r["key"]]
        if ident not in _CHECKSUMS:
            v = sd[r["key"]]
            _CHECKSUMS[ident] = (v.double().sum().item(), v.double().abs().sum().item(), v.flatten()[:4].tolist())
        s, a, first = _CHECKSUMS[ident]
        ok = (
            abs(s - c["sum"]) <= 1e-9 * max(1.0, c["abs_sum"])
            and abs(a - c["abs_sum"]) <= 1e-9 * max(1.0, c["abs_sum"])
            and first == c["first"][: len(first)]
        )
        if not ok:
            failures.append(f"{r['key']} ({r['init_class']}): sum {s} vs {c['sum']}, first {first} vs {c['first']}")
    assert not failures, f"{len(failures)} keys differ, e.g. " + "; ".join(failures[:3])
    assert ckpt["opts"] == spec["opts_as_saved"]
    expected_la_shape = [1, 512] if spec["opts_as_saved"]["learn_in_w"] else [spec["n_styles"], 512]
    assert list(ckpt["latent_avg"].shape) == expected_la_shape
    assert set(ckpt) == {"state_dict", "opts", "latent_avg"}


def test_make_checkpoint_is_deterministic_and_seeded():
    a = make_checkpoint("stylegan2_rosinality_256", 3)
    b = make_checkpoint("stylegan2_rosinality_256", 3)
    c = make_checkpoint("stylegan2_rosinality_256", 4)
    assert set(a) == {"g_ema", "latent_avg"} and a["latent_avg"].shape == (512,)
    for k in a["g_ema"]:
        assert torch.equal(a["g_ema"][k], b["g_ema"][k]), k
    assert not torch.equal(a["g_ema"]["style.1.weight"], c["g_ema"]["style.1.weight"])
    # fir kernels are constants, the same for every seed
    assert torch.equal(a["g_ema"]["convs.0.conv.blur.kernel"], c["g_ema"]["convs.0.conv.blur.kernel"])


def test_unknown_config():
    with pytest.raises(ValueError, match="known: ffhq_encode"):
        make_checkpoint("ffhq_encode_2048", 0)
