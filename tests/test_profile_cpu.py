"""`python -m benchmarks.profile_cpu` (the roofline profile, issue 20) on the 32 px checkpoint: every
layer group in the table, group FLOPs adding up to `FlopCounterMode`'s total of the whole model, group
times adding up to a sane share of the measured stage time, positive peaks; and the classification
of node names the graph runtimes report."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import _roofline as R


def test_classify_names_the_groups_of_both_formulations():
    """Module paths of the engine formulation (`synthesis.convs.3`), of the reference
    (`decoder.convs.3.conv.blur`) and of an ONNX graph (`/model/...`) land in the same groups."""
    c = R.classify
    assert c("encode", "encoder.backbone.units.3.conv1", "conv") == "enc: body (IR-SE-50)"
    assert c("encode", "encoder.body.3.res_layer.1", "conv") == "enc: body (IR-SE-50)"
    assert c("encode", "encoder.middle.convs.1", "conv") == c("encode", "encoder.styles.4.convs.0", "conv") \
        == "enc: map2style heads"
    assert c("encode", "encoder", "resize") == c("encode", "encoder.latlayer1", "conv") \
        == "enc: FPN (latlayers, upsample+add)"
    assert c("encode", "encoder", "matmul") == "enc: map2style heads"  # the W encoders' linear
    assert c("encode", "", "add") == "enc: other"  # latent_avg
    assert c("synthesize", "synthesis.conv1", "conv") == "gen: conv 4"
    assert c("synthesize", "synthesis.convs.0", "conv") == "gen: conv 8"
    assert c("synthesize", "decoder.convs.11.conv", "conv") == "gen: conv 256"
    assert c("synthesize", "synthesis.convs.4", "conv", depthwise=True) == "gen: FIR (blur, skip up)"
    assert c("synthesize", "decoder.convs.4.conv.blur", "conv") == "gen: FIR (blur, skip up)"
    assert c("synthesize", "synthesis.to_rgbs.2.skip_up", "conv") == "gen: FIR (blur, skip up)"
    assert c("synthesize", "synthesis.convs.4", "mul", scale_of="style") == "gen: modulate/demodulate x"
    assert c("synthesize", "synthesis.convs.4", "mul") == "gen: bias+noise+lrelu"  # the gain
    assert c("synthesize", "decoder.convs.4.activate", "add") == "gen: bias+noise+lrelu"
    assert c("synthesize", "synthesis.convs.4.affine", "matmul") == "gen: styles (affine, demod coefs)"
    assert c("synthesize", "synthesis.to_rgbs.2", "conv") == "gen: to_rgb"
    assert c("synthesize", "", "reorder") == "gen: layout reorders"
    assert c("resize", "", "pool") == "resize 256"
    index = R.GraphIndex("synthesize", {"/model/synthesis/convs.3/Conv_81": "gen: conv 32", "conv2d_9": "gen: conv 32"})
    assert index.group_of("/model/synthesis/convs.3/Conv_81") == "gen: conv 32"
    assert index.group_of("/model/synthesis/convs.3/Conv_81/WithoutBiases") == "gen: conv 32"  # OpenVINO suffix
    assert index.group_of("conv2d_9_nchwc") == "gen: conv 32"  # ONNX Runtime's NCHWc rewrite
    assert index.group_of("/model/synthesis/convs.2/Mul_72_abcd_acdb_/model/synthesis/convs.3/Conv_81",
                          "Reorder") == "gen: layout reorders"
    assert index.group_of("ReorderOutput_token_69") == "gen: layout reorders"


def test_roof_arithmetic():
    """A group right of the ridge point is compute-bound and measured against the compute roof;
    left of it, against intensity x bandwidth."""
    row = R.GroupRow("g", ms=10.0, gflop=1.0, mb=10.0)  # 100 GFLOP/s, 1 GB/s, 100 FLOP/B
    x = row.roof(peak_gflops=200.0, bandwidth_gbs=20.0)  # ridge 10 FLOP/B
    assert x["bound"] == "compute" and x["pct_peak"] == pytest.approx(50) and x["pct_roof"] == pytest.approx(50)
    lean = R.GroupRow("g", ms=10.0, gflop=0.01, mb=100.0)  # 0.1 FLOP/B, 10 GB/s
    y = lean.roof(peak_gflops=200.0, bandwidth_gbs=20.0)
    assert y["bound"] == "memory" and y["pct_bw"] == pytest.approx(50) and y["pct_roof"] == pytest.approx(50)


def _flop_total(model, x) -> dict[str, int]:
    from torch.utils.flop_counter import FlopCounterMode

    from reference.psp import face_pool

    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            w = model.encode(x)
        enc = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            face_pool(model.synthesize(w))
        return {"encode": enc, "synthesize": fc.get_total_flops()}


@pytest.mark.slow  # ~1 min on 2 busy cores: two 256 px IR-SE-50 encoders profiled, plus the peaks
def test_profile_torch_rows_add_up(small_w, tmp_path):
    """The torch rows of the 32 px checkpoint: every group of the model in the table, group FLOPs
    equal to `FlopCounterMode`'s total per stage, the profiled op times within a sane share of the
    stage's wall time, positive peaks, and the printed table."""
    import engine
    from benchmarks import profile_cpu

    out = tmp_path / "profile.json"
    assert profile_cpu.main(["--checkpoint", str(small_w), "--backends", "reference,engine", "--precisions", "fp32",
                             "--repeats", "1", "--peak-size", "256", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["peaks"]["fp32_gflops"] > 0 and res["peaks"]["bandwidth_gbs"] > 0
    assert res["peaks"]["bf16_gflops"] is None or res["peaks"]["bf16_gflops"] > 0
    assert res["output_size"] == 32 and res["groups"] == R.group_order(32)
    for variant, backend in (("engine:fp32", "engine"), ("reference:fp32", "reference")):
        v = res["variants"][variant]
        groups = {g["group"]: g for g in v["groups"]}
        # the learn_in_w checkpoint: no FPN, no reorders (torch); everything else has ops
        expected = set(R.group_order(32)) - {"enc: FPN (latlayers, upsample+add)", "enc: layout reorders",
                                             "gen: layout reorders"}
        assert expected <= set(groups), (variant, expected - set(groups))
        model = engine.load(small_w, backend=backend, precision="fp32").model
        x = profile_cpu.encoder_input(model.description, 1)
        total = _flop_total(model, x)
        enc = sum(g["gflop"] for g in v["groups"] if g["group"].startswith("enc")) * 1e9
        syn = sum(g["gflop"] for g in v["groups"] if not g["group"].startswith("enc")) * 1e9
        assert enc == pytest.approx(total["encode"], rel=1e-9) and total["encode"] > 1e9
        assert syn == pytest.approx(total["synthesize"], rel=1e-9) and total["synthesize"] > 1e6
        for stage in ("encode", "synthesize"):
            profiled, wall = v["profiled_ms_per_image"][stage], v["stage_ms_per_image"][stage]
            assert 0.2 * wall < profiled < 3 * wall, (variant, stage, profiled, wall)  # timed apart, on busy cores
        assert all(g["ms"] >= 0 and g["mb"] >= 0 for g in v["groups"])


@pytest.mark.slow  # ~1.5 min: exports the 32 px graphs, compiles them on OpenVINO and ONNX Runtime
def test_profile_graph_rows_cover_the_nodes(small_w, tmp_path):
    """The graph rows: OpenVINO's and ONNX Runtime's executed nodes all land in a named group (none
    left in "other" beyond trivial shape ops), their FLOPs are the engine formulation's, and the
    summed node times are a sane share of the measured inference time."""
    pytest.importorskip("openvino", reason="the openvino row needs the openvino package")
    pytest.importorskip("onnxruntime", reason="the onnxruntime row needs the onnxruntime package")
    from benchmarks import profile_cpu

    out = tmp_path / "profile.json"
    assert profile_cpu.main(["--checkpoint", str(small_w), "--backends", "engine,openvino,onnxruntime",
                             "--precisions", "fp32", "--repeats", "1", "--peak-size", "256", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    eng = {g["group"]: g for g in res["variants"]["engine:fp32"]["groups"]}
    for variant in ("openvino:fp32", "onnxruntime:fp32"):
        v = res["variants"][variant]
        groups = {g["group"]: g for g in v["groups"]}
        assert groups["enc: body (IR-SE-50)"]["ms"] > 0 and groups["gen: conv 32"]["ms"] > 0
        for g, row in eng.items():
            if g != "resize 256":
                assert groups[g]["gflop"] == pytest.approx(row["gflop"]), (variant, g)
        for stage in ("encode", "synthesize"):
            profiled, wall = v["profiled_ms_per_image"][stage], v["stage_ms_per_image"][stage]
            assert 0.3 * wall < profiled < 3 * wall, (variant, stage, profiled, wall)
        other = sum(groups[g]["ms"] for g in ("enc: other", "gen: other") if g in groups)
        assert other < 0.05 * sum(v["stage_ms_per_image"].values()), (variant, other)
