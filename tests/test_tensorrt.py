"""`export.tensorrt`: what runs without TensorRT here, and the TensorRT builds, runs and reports where
`tensorrt` and a CUDA device exist (each skips with the reason elsewhere; nothing is mocked).

Without TensorRT (run everywhere): the fp32 layer matcher on the node names of a real ONNX export,
the precision decision, profiles and batch chunking, the plan sidecar writer, the plan tolerances, the
CLI parser and the one-line exit-2 error where tensorrt is missing, the package's pieces (common,
builder, runtime, report, cli) and its public face from a fresh process, the backend's description and
interface (`export.backends.BackendModel`) and its refusal of a --resize generator plan, and the C++
runner's CMake configuration (which must either configure or stop with the missing-TensorRT message).

Most tests read the names through the package's face (`export.tensorrt`, as users import them); where
each name lives is checked by test_package_pieces.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import torch
from torch import nn

from export import tensorrt as T
from export.backends import BackendModel
from export.compare import compare_outputs
from export.tensorrt import builder, cli, common, report, runtime
from reference.description import ModelDescription, read_sidecar, sidecar_path, write_sidecar
from reference.plumbing.errors import CheckpointError

REPO = Path(__file__).resolve().parent.parent
RUNNER_DIR = REPO / "examples" / "cpp" / "tensorrt_runner"

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()
NO_TRT = "tensorrt is not installed (its libraries cannot be installed on this CPU-only machine)"
NO_CUDA = "no CUDA device (torch sees none): TensorRT plans need an NVIDIA GPU"


# ----------------------------------------------------------------------------------------------
# a tiny model with the module names of export/backends/engine_model.py, exported the way export.onnx does


class PixelNorm(nn.Module):
    def forward(self, z):
        return z * torch.rsqrt(torch.mean(z * z, dim=1, keepdim=True) + 1e-8)


class Demod(nn.Module):
    def forward(self, styles, wsq):
        return torch.rsqrt((styles * styles) @ wsq.t() + 1e-8)  # [N, C_out]


class StyledConv(nn.Module):
    def __init__(self, cin: int, cout: int, wdim: int):
        super().__init__()
        self.affine = nn.Linear(wdim, cin)
        self.demod = Demod()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)

    def forward(self, x, w):
        styles = self.affine(w)                                                # [N, C_in]
        dcoefs = self.demod(styles, self.conv.weight.square().sum(dim=(2, 3)))  # [N, C_out]
        return self.conv(x * styles[:, :, None, None]) * dcoefs[:, :, None, None]


class TinyNet(nn.Module):
    """x [N, 3, 16, 16] -> img [N, 3, 16, 16]: mapping of a pooled code, two styled convs."""

    def __init__(self):
        super().__init__()
        self.mapping = nn.Sequential(PixelNorm(), nn.Linear(3, 8), nn.LeakyReLU(0.2))
        self.conv1 = StyledConv(3, 8, 8)
        self.conv2 = StyledConv(8, 3, 8)

    def forward(self, x):
        w = self.mapping(x.mean(dim=(2, 3)))
        return self.conv2(torch.nn.functional.leaky_relu(self.conv1(x, w), 0.2), w)


def description(n_styles: int = 2, output_size: int = 16) -> ModelDescription:
    """The model description an ONNX sidecar of export.onnx carries (the one schema of reference.description)."""
    return ModelDescription(input_nc=3, label_nc=0, output_size=output_size, n_styles=n_styles,
                            dataset_type="ffhq_encode", opts={"output_size": output_size, "input_nc": 3},
                            checkpoint={"path": "tiny.pt", "size": 123, "sha256_first_mib": "0" * 64},
                            latent_avg=[[0.25] * 512 for _ in range(n_styles)])


def onnx_info(part: str = "psp", output_size: int = 16) -> dict:
    """The artifact part of an ONNX sidecar as export.onnx writes it."""
    return {"part": part, "resize": False, "image_size": output_size, "opset": 17}


def write_onnx_sidecar(path: Path, part: str = "psp", n_styles: int = 2, output_size: int = 16) -> Path:
    return write_sidecar(path, description(n_styles, output_size), "onnx", **onnx_info(part, output_size))


def export_tiny(tmp_path: Path, seed: int = 0) -> tuple[Path, TinyNet]:
    """TinyNet as ONNX (TorchScript exporter, opset 17, dynamic "batch") plus its sidecar."""
    torch.manual_seed(seed)
    model = TinyNet().eval()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), str(path), input_names=["x"], output_names=["img"],
                      dynamic_axes={"x": {0: "batch"}, "img": {0: "batch"}}, opset_version=17, dynamo=False)
    write_onnx_sidecar(path)
    return path, model


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> tuple[Path, TinyNet]:
    return export_tiny(tmp_path_factory.mktemp("tiny"))


# ----------------------------------------------------------------------------------------------
# the fp32 layer matcher and the precision decision


def test_fp32_patterns_match_real_node_names(tiny_onnx):
    import onnx

    path, _ = tiny_onnx
    names = [n.name for n in onnx.load(str(path)).graph.node]
    matched = T.match_fp32_layers(names)
    # every node of the affine/demod/mapping/pixel_norm modules, and nothing else
    expect = [n for n in names if any(f"/{m}" in n for m in ("affine", "demod", "mapping"))]
    assert matched == expect
    assert any("/conv1/affine/" in n for n in matched), names
    assert any("/conv2/demod/" in n for n in matched), names
    assert any(n.startswith("/mapping/") for n in matched), names
    assert any("/pixel_norm" in n or "/mapping/mapping.0/" in n for n in matched), names
    assert not [n for n in matched if "/conv/Conv" in n]
    assert [n for n in names if "/conv/Conv" in n], "the convolutions must exist and stay unmatched"
    assert T.match_fp32_layers(["/decoder/convs.0/conv/Conv", "/decoder/convs.0/affine/Gemm_1",
                                "decoder.convs.0.conv.affine.weight", "decoder.convs.0.conv.weight"]) == [
        "/decoder/convs.0/affine/Gemm_1", "decoder.convs.0.conv.affine.weight"]


def test_pixel_norm_module_name_reaches_the_node_names(tmp_path):
    class Mapping(nn.Module):
        def __init__(self):
            super().__init__()
            self.pixel_norm = PixelNorm()
            self.fc = nn.Linear(4, 4)

        def forward(self, z):
            return self.fc(self.pixel_norm(z))

    import onnx

    path = tmp_path / "m.onnx"
    torch.onnx.export(Mapping().eval(), (torch.randn(2, 4),), str(path), input_names=["z"], output_names=["w"],
                      dynamic_axes={"z": {0: "batch"}, "w": {0: "batch"}}, opset_version=17, dynamo=False)
    names = [n.name for n in onnx.load(str(path)).graph.node]
    assert any(n.startswith("/pixel_norm/") for n in names), names
    assert set(T.match_fp32_layers(names)) == {n for n in names if n.startswith("/pixel_norm/")}


def test_onnx_fp16_count(tiny_onnx, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    assert T.onnx_fp16_count(tiny_onnx[0]) == 0
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16, name="/c/Cast"),
         helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT, name="/c/Cast_1")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path / "mixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert T.onnx_fp16_count(path) == 1


@pytest.mark.slow
def test_fp32_patterns_cover_the_real_export(ffhq256_checkpoint):
    """The contract with export.onnx: the pSp generator's style affines and demodulation nodes carry
    the patterns (else an FP16 build would silently lose its fp32 islands). The generator graph is
    the 256 px checkpoint's in the session's engine cache (`cached_graphs`, the export the onnxruntime
    and openvino backends use: tests/test_onnx.py's parity report and tests/test_cli.py's end-to-end
    run share it), not an export of its own. That an fp16 export is recognised as mixed precision
    (`onnx_fp16_count` > 0, built strongly typed) and an fp32 one is not is checked on real exports in
    tests/test_onnx.py::test_graph_contract."""
    import onnx

    from export.backends.graph import ReferenceLoader, cached_graphs
    from reference.plumbing.files import cache_dir

    path = cached_graphs(ffhq256_checkpoint, ReferenceLoader(ffhq256_checkpoint), cache_dir() / "onnx")["generator"]
    names = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]
    hits = {p: [n for n in names if p in n.replace(".", "/")] for p in T.FP32_NODE_PATTERNS}
    # one affine per styled conv and ToRGB, one demodulation per styled conv (13 + 7 at 256 px)
    assert len({n.rsplit("/affine/", 1)[0] for n in hits["/affine"]}) == 20, hits["/affine"][:5]
    assert len({n.rsplit("/demod/", 1)[0] for n in hits["/demod"]}) == 13, hits["/demod"][:5]
    assert not [n for n in T.match_fp32_layers(names) if n.endswith("/Conv") and "/demod/" not in n]
    assert T.onnx_fp16_count(path) == 0 and read_sidecar(path, "onnx")[1]["part"] == "generator"
    assert T.precision_mode(True, True, True) == "strong"


@pytest.mark.parametrize("fp16, onnx16, weak, mode", [
    (True, False, True, "fp16-weak"),   # TensorRT 10, fp32 ONNX: FP16 flag + fp32 pinning
    (False, False, True, "fp32"),
    (True, True, True, "strong"),       # the fp16 ONNX: its own types
    (False, True, True, "strong"),
    (True, True, False, "strong"),      # TensorRT 11: strong typing only
    (False, False, False, "strong"),
])
def test_precision_mode(fp16, onnx16, weak, mode):
    assert T.precision_mode(fp16, onnx16, weak) == mode


def test_precision_mode_refuses_fp16_from_fp32_onnx_on_trt11():
    with pytest.raises(T.TensorRTError, match=r"export.onnx --fp16"):
        T.precision_mode(True, False, False)


# ----------------------------------------------------------------------------------------------
# profiles and batching


def test_normalize_profiles():
    assert T.normalize_profiles([(1, 1, 1), (2, 4, 8)]) == [T.Profile("p0", 1, 1, 1), T.Profile("p1", 2, 4, 8)]
    assert T.normalize_profiles({"single": 1, "batch": (2, 4, 8)}) == [
        T.Profile("single", 1, 1, 1), T.Profile("batch", 2, 4, 8)]
    for bad in ([], [(4, 2, 8)], [(0, 1, 1)], [(1, 2)], ["x"]):
        with pytest.raises(ValueError):
            T.normalize_profiles(bad)


def test_parse_profile_arg():
    import argparse

    assert T.parse_profile_arg("1,4,8") == (1, 4, 8)
    assert T.parse_profile_arg("4") == (4, 4, 4)
    for bad in ("8,4,1", "1,2", "a", "0"):
        with pytest.raises(argparse.ArgumentTypeError, match="MIN,OPT,MAX"):
            T.parse_profile_arg(bad)


def test_profile_shapes_from_onnx_dims(tiny_onnx):
    import onnx

    shape = onnx.load(str(tiny_onnx[0])).graph.input[0].type.tensor_type.shape
    dims = [d.dim_value if d.dim_value else -1 for d in shape.dim]
    assert dims == [-1, 3, 16, 16]
    assert T.profile_shapes(dims, T.Profile("p", 1, 4, 8)) == ((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))
    with pytest.raises(ValueError, match="only dim 0"):
        T.profile_shapes([-1, 3, -1, 16], T.Profile("p", 1, 1, 1))


def test_select_profile():
    profs = T.normalize_profiles([(1, 1, 1), (2, 4, 8), (8, 16, 16)])
    assert T.select_profile(profs, 1) == 0
    assert T.select_profile(profs, 3) == 1
    assert T.select_profile(profs, 8) == 1   # covered by both; opt 4 is nearer than 16
    assert T.select_profile(profs, 13) == 2
    assert T.select_profile(profs, 17) is None


@pytest.mark.parametrize("profiles", [[(1, 1, 1)], [(1, 1, 1), (2, 4, 8)], [(4, 8, 8)], [(3, 3, 5), (1, 1, 2)]])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 13, 17])
def test_plan_chunks_tile_the_batch(profiles, n):
    profs = T.normalize_profiles(profiles)
    chunks = T.plan_chunks(n, profs)
    assert chunks[0].start == 0 and chunks[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    for c in chunks:
        assert profs[c.profile].covers(c.run_batch)
        assert c.run_batch >= c.stop - c.start
    assert all(c.run_batch == c.stop - c.start for c in chunks[:-1])  # padding only at the end


def test_plan_chunks_pads_below_every_min():
    assert T.plan_chunks(2, T.normalize_profiles([(4, 8, 8)])) == [T.Chunk(0, 2, 4, 0)]
    assert T.plan_chunks(10, T.normalize_profiles([(4, 8, 8)])) == [T.Chunk(0, 8, 8, 0), T.Chunk(8, 10, 4, 0)]


# ----------------------------------------------------------------------------------------------
# sidecars


def build_info(n_styles: int = 18, size: int = 1024) -> dict:
    return {
        "tensorrt_version": "10.9.0.34",
        "gpu": {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "index": 0},
        "inputs": [{"name": "x", "shape": [-1, 3, 256, 256], "dtype": "float32"}],
        "outputs": [{"name": "img", "shape": [-1, 3, size, size], "dtype": "float32"},
                    {"name": "w_plus", "shape": [-1, n_styles, 512], "dtype": "float32"}],
        "profiles": [{"name": "p0", "min": 1, "opt": 1, "max": 1}, {"name": "p1", "min": 2, "opt": 4, "max": 8}],
        "flags": {"precision": "fp16", "precision_mode": "fp16-weak", "version_compatible": False},
        "fp32_layers": ["/decoder/convs.0/affine/Gemm"],
        "build_time_s": 123.4567,
    }


def test_plan_sidecar_keeps_the_description_and_the_build(tmp_path):
    plan = tmp_path / "psp.plan"
    plan.write_bytes(b"plan")
    desc = description(n_styles=18, output_size=1024)
    path = T.write_plan_sidecar(plan, desc, {**onnx_info("psp", 1024), "inputs": {"x": {}}}, build_info())
    assert path.name == "psp.plan.json" and path == sidecar_path(plan)
    got, info = read_sidecar(plan, T.PLAN_KIND)
    assert got == desc.replace(precision="fp16") and got.latent_avg == desc.latent_avg   # the plan's precision
    assert info["kind"] == "tensorrt-plan"
    assert (info["part"], info["resize"], info["image_size"], info["opset"]) == ("psp", False, 1024, 17)
    assert info["tensorrt_version"] == "10.9.0.34"
    assert info["compute_capability"] == "8.0" and info["gpu"] == {"name": "NVIDIA A100-SXM4-80GB", "index": 0}
    assert info["inputs"] == [{"name": "x", "shape": [-1, 3, 256, 256], "dtype": "float32"}]   # the plan's IO
    assert [o["name"] for o in info["outputs"]] == ["img", "w_plus"]
    assert info["profiles"][1] == {"name": "p1", "min": 2, "opt": 4, "max": 8}
    assert info["flags"]["precision"] == "fp16" and info["build_time_s"] == 123.457
    assert info["fp32_layers"] == ["/decoder/convs.0/affine/Gemm"] and "built_at" in info
    with pytest.raises(CheckpointError, match="describes a 'tensorrt-plan' artifact, expected 'onnx'"):
        read_sidecar(plan, "onnx")


def test_plan_sidecar_names_what_is_missing(tmp_path):
    with pytest.raises(T.TensorRTError, match="lacks part"):
        T.plan_artifact_info({"resize": False}, build_info())
    info = build_info()
    del info["profiles"]
    with pytest.raises(T.TensorRTError, match="profiles"):
        T.plan_artifact_info(onnx_info(), info)
    (tmp_path / "m.onnx").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"m\.onnx\.json: the sidecar of m\.onnx is missing; export it again"):
        T.build_engine(tmp_path / "m.onnx", tmp_path / "m.plan")   # checked before TensorRT is needed
    with pytest.raises(CheckpointError, match=r"nothing\.plan\.json: the sidecar of nothing\.plan is missing"):
        read_sidecar(tmp_path / "nothing.plan", T.PLAN_KIND)


def test_check_compute_capability():
    info = {"gpu": {"name": "NVIDIA A100"}, "compute_capability": "8.0"}
    T.check_compute_capability(info, {"name": "NVIDIA A100", "compute_capability": "8.0"}, "a.plan")
    with pytest.raises(T.TensorRTError, match=r"a\.plan: built for compute capability 8\.0 \(NVIDIA A100\), this GPU "
                                              r"is 8\.9 \(NVIDIA L4\); rebuild"):
        T.check_compute_capability(info, {"name": "NVIDIA L4", "compute_capability": "8.9"}, "a.plan")


def test_default_inputs():
    desc = description(n_styles=4, output_size=64)
    info = T.plan_artifact_info(onnx_info("generator", 64), {
        **build_info(), "inputs": [{"name": "w_plus", "shape": [-1, 4, 512], "dtype": "float32"}]})
    a = T.default_inputs(desc, info, 3, seed=1)
    assert a["w_plus"].shape == (3, 4, 512) and a["w_plus"].dtype == np.float32
    assert abs(float(a["w_plus"].mean()) - 0.25) < 0.05   # latent_avg 0.25 + 0.5 N(0, 1)
    np.testing.assert_array_equal(a["w_plus"], T.default_inputs(desc, info, 3, seed=1)["w_plus"])


# ----------------------------------------------------------------------------------------------
# the backend's plan pair


def test_resolve_plan_pair(tmp_path):
    for name in ("psp.encoder.plan", "psp.generator.plan"):
        (tmp_path / name).write_bytes(b"")
    want = (tmp_path / "psp.encoder.plan", tmp_path / "psp.generator.plan")
    for given in ("psp", "psp.plan", "psp.encoder.plan", "psp.generator.plan"):
        assert T.resolve_plan_pair(tmp_path / given) == want
    (tmp_path / "psp.generator.plan").unlink()
    with pytest.raises(T.TensorRTError, match=r"missing: .*psp\.generator\.plan.*python -m export\.tensorrt"):
        T.resolve_plan_pair(tmp_path / "psp")


def test_check_plan_pair():
    enc, gen = (description(18, 1024), {"part": "encoder"}), (description(18, 1024), {"part": "generator"})
    T.check_plan_pair(enc, gen)
    with pytest.raises(T.TensorRTError, match="parts 'generator' and 'encoder'"):
        T.check_plan_pair(gen, enc)
    with pytest.raises(T.TensorRTError, match="disagree on n_styles"):
        T.check_plan_pair(enc, (description(14, 1024), {"part": "generator"}))
    other = description(18, 1024).replace(checkpoint={"path": "other.pt", "size": 1, "sha256_first_mib": "1" * 64})
    with pytest.raises(T.TensorRTError, match="disagree on checkpoint"):
        T.check_plan_pair(enc, (other, {"part": "generator"}))


def write_plan_pair(folder: Path, precisions: tuple[str, str] = ("fp16", "fp16"), resize: bool = False) -> Path:
    """Dummy plan bytes and real sidecars (`write_plan_sidecar`) of an encoder and a generator plan; the stem."""
    for part, precision in zip(("encoder", "generator"), precisions):
        plan = folder / f"psp.{part}.plan"
        plan.write_bytes(b"not a plan")
        build = build_info(2, 16)
        build["flags"] = {**build["flags"], "precision": precision}
        T.write_plan_sidecar(plan, description(2, 16), {**onnx_info(part, 16), "resize": resize and part == "generator"},
                             build)
    return folder / "psp"


def test_plan_pair_description(tmp_path):
    stem = write_plan_pair(tmp_path)
    d = T.plan_pair_description(f"{stem}.encoder.plan", f"{stem}.generator.plan")
    assert d == description(2, 16).replace(backend="tensorrt", precision="fp16")
    assert d.latent_avg == description(2, 16).latent_avg
    stem = write_plan_pair(tmp_path, ("fp32", "fp16"))
    d = T.plan_pair_description(f"{stem}.encoder.plan", f"{stem}.generator.plan")
    assert d.precision == "mixed: encoder fp32, generator fp16" and d.backend == "tensorrt"


def test_backend_model_interface():
    """`TensorRTPSP` offers what `export.backends.BackendModel` declares, with the same signatures, and
    keeps no copies of the description's facts (an instance needs TensorRT and a GPU:
    test_backend_encode_synthesize checks one where they exist)."""
    for name in ("encode", "synthesize"):
        want = inspect.signature(getattr(BackendModel, name))
        got = inspect.signature(getattr(T.TensorRTPSP, name))
        assert list(got.parameters) == list(want.parameters), (name, got, want)
    model = object.__new__(T.TensorRTPSP)
    model.description = description()
    assert isinstance(model, BackendModel)
    init = inspect.getsource(T.TensorRTPSP.__init__)
    for copied in ("opts", "input_nc", "label_nc", "output_size", "n_styles", "dataset_type", "generator_resized"):
        assert f"self.{copied}" not in init, copied


def test_backend_refuses_a_resized_generator_plan(tmp_path):
    """A generator plan exported with --resize cannot serve full resolution: refused when the pair is
    loaded, from its sidecar (before TensorRT is needed), with the one fix."""
    stem = write_plan_pair(tmp_path, resize=True)
    with pytest.raises(T.TensorRTError, match=r"psp\.generator\.plan: exported with --resize \(256 px output\).*"
                                              r"build the generator again without --resize") as e:
        T.load_tensorrt_backend(stem, "cuda")
    assert not isinstance(e.value, T.TensorRTUnavailableError)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# the package: its pieces, its face, its CLI as users run them


PIECES = {
    common: ("import_tensorrt", "tensorrt_major", "cuda_device", "gpu_info", "TensorRTError", "TensorRTUnavailableError",
             "TRT_MISSING", "PLAN_KIND", "Profile", "normalize_profiles", "parse_profile_arg", "profile_shapes",
             "select_profile", "Chunk", "plan_chunks"),
    builder: ("FP32_NODE_PATTERNS", "DEFAULT_WORKSPACE_MIB", "match_fp32_layers", "onnx_fp16_count", "precision_mode",
              "plan_artifact_info", "write_plan_sidecar", "build_engine"),
    runtime: ("check_compute_capability", "TensorRTRunner", "resolve_plan_pair", "check_plan_pair",
              "plan_pair_description", "TensorRTPSP", "load_tensorrt_backend"),
    report: ("default_inputs", "plan_tolerance", "parity_report", "latency_report"),
    cli: ("build_parser", "main"),
}


def test_package_pieces():
    """Each public name lives in one piece and the face re-exports that same object, nothing else."""
    for module, names in PIECES.items():
        for name in names:
            assert getattr(T, name) is getattr(module, name), (module.__name__, name)
            obj = getattr(module, name)
            if isinstance(obj, (type, types.FunctionType)):  # defined there, not imported from elsewhere
                assert obj.__module__ == module.__name__, (name, obj.__module__)
    assert sorted(T.__all__) == sorted(n for names in PIECES.values() for n in names)


def test_imports_and_cli_from_a_script(tmp_path):
    """As a user runs it: a script file, in a fresh process, imports a piece first and then the names
    callers use (no import cycle whatever comes first), then runs the package as `python -m
    export.tensorrt --help` does (`runpy`, its `__main__`)."""
    script = tmp_path / "use_tensorrt.py"
    script.write_text(
        "import runpy, sys\n"
        "from export.tensorrt.report import parity_report\n"
        "from export.tensorrt import PLAN_KIND, TensorRTError, build_engine, load_tensorrt_backend, onnx_fp16_count\n"
        "from export.tensorrt.runtime import TensorRTPSP\n"
        "from export.backends import BACKENDS\n"
        "from export.triton_repo import PLAN_KIND as TRITON_PLAN_KIND\n"
        "assert TRITON_PLAN_KIND == PLAN_KIND == 'tensorrt-plan'\n"
        "print('ok', BACKENDS['tensorrt'].takes, TensorRTPSP.__module__)\n"
        "sys.argv = ['export.tensorrt', '--help']\n"
        "runpy.run_module('export.tensorrt', run_name='__main__', alter_sys=True)\n")
    res = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    first, rest = res.stdout.split("\n", 1)
    assert first == "ok plans export.tensorrt.runtime"
    assert rest.startswith("usage: python -m export.tensorrt") and "--report" in rest, rest


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_parser():
    a = T.build_parser().parse_args(
        ["--onnx", "m.onnx", "--plan", "m.plan", "--fp16", "--profile", "1,4,8", "--profile", "16",
         "--timing-cache", "t.cache", "--version-compatible", "--report", "parity", "--report", "latency",
         "--batch-sizes", "1,8"])
    assert (a.onnx, a.plan, a.fp16, a.profile) == ("m.onnx", "m.plan", True, [(1, 4, 8), (16, 16, 16)])
    assert (a.timing_cache, a.version_compatible, a.report, a.batch_sizes) == (
        "t.cache", True, ["parity", "latency"], [1, 8])
    a = T.build_parser().parse_args(["--plan", "m.plan", "--report", "latency"])
    assert (a.onnx, a.fp16, a.profile, a.workspace_mib) == (None, False, None, T.DEFAULT_WORKSPACE_MIB)


@pytest.mark.parametrize("argv", [["--plan", "m.plan", "--profile", "8,4,1", "--onnx", "m.onnx"],
                                  ["--plan", "m.plan"],
                                  ["--onnx", "m.onnx"]])
def test_cli_usage_errors_exit_2(argv, capsys):
    assert T.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here: the missing-library path cannot be exercised")
def test_cli_without_tensorrt_one_line_exit_2(tmp_path):
    for argv in (["--onnx", str(tmp_path / "m.onnx"), "--plan", str(tmp_path / "m.plan"), "--fp16"],
                 ["--plan", str(tmp_path / "m.plan"), "--report", "latency"]):
        res = subprocess.run([sys.executable, "-m", "export.tensorrt", *argv], cwd=REPO, capture_output=True, text=True)
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1, res.stderr
        assert res.stderr.startswith("error: tensorrt is not installed (its libraries cannot be installed on this "
                                     "CPU-only machine)")
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here: the missing-library path cannot be exercised")
def test_backend_without_tensorrt_says_so(tmp_path):
    for part in ("encoder", "generator"):
        (tmp_path / f"psp.{part}.plan").write_bytes(b"not a plan")
        T.write_plan_sidecar(tmp_path / f"psp.{part}.plan", description(2, 16), onnx_info(part, 16), build_info(2, 16))
    with pytest.raises(T.TensorRTUnavailableError, match="tensorrt is not installed"):
        T.load_tensorrt_backend(tmp_path / "psp", "cuda")


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is visible here")
def test_gpu_info_without_cuda():
    with pytest.raises(T.TensorRTUnavailableError, match="no CUDA device"):
        T.gpu_info(0)
    with pytest.raises(T.TensorRTUnavailableError, match="no CUDA device"):
        T.cuda_device("cuda")


# ----------------------------------------------------------------------------------------------
# the C++ runner: configure always (it must configure or name what is missing), build where it can


def _configure_runner(build: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["cmake", "-S", str(RUNNER_DIR), "-B", str(build)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def runner_build(tmp_path_factory) -> Path:
    """The configured C++ runner's build folder; skips with the reason where it cannot configure."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("tensorrt_runner")
    res = _configure_runner(build)
    if res.returncode != 0:
        log = res.stdout + res.stderr
        if "NvInfer.h not found" in log:
            pytest.skip("NvInfer.h (TensorRT headers) not found: the C++ runner cannot be built here "
                        "(set TENSORRT_ROOT where TensorRT is installed)")
        if "CUDA toolkit not found" in log:
            pytest.skip("CUDA toolkit not found: the C++ runner cannot be built here")
        pytest.fail(f"cmake configure failed for another reason:\n{log}")
    return build


def test_runner_cmake_configures_or_names_what_is_missing(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    res = _configure_runner(tmp_path / "b")
    log = res.stdout + res.stderr
    if res.returncode == 0:
        assert "TensorRT headers:" in log
    else:
        assert ("NvInfer.h not found (TensorRT headers)" in log and "-DTENSORRT_ROOT" in log) or \
               "CUDA toolkit not found" in log, log


def test_runner_builds(runner_build):
    res = subprocess.run(["cmake", "--build", str(runner_build), "-j", "2"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (runner_build / "tensorrt_runner").is_file()


# ----------------------------------------------------------------------------------------------
# TensorRT for real: only where tensorrt imports and a CUDA device exists

needs_trt_cuda = pytest.mark.skipif(
    not (HAS_TRT and HAS_CUDA),
    reason="; ".join(r for r, missing in ((NO_TRT, not HAS_TRT), (NO_CUDA, not HAS_CUDA)) if missing))


@pytest.fixture(scope="module")
def fp16_plan(tiny_onnx, tmp_path_factory) -> Path:
    if not HAS_TRT:
        pytest.skip(NO_TRT)
    if not HAS_CUDA:
        pytest.skip(NO_CUDA)
    out = tmp_path_factory.mktemp("plans")
    return T.build_engine(tiny_onnx[0], out / "tiny.plan", fp16=True, profiles={"one": (1, 1, 1), "batch": (2, 4, 8)},
                          timing_cache=out / "timing.cache", workspace_mib=512)


@needs_trt_cuda
def test_build_writes_plan_sidecar_and_timing_cache(fp16_plan, tiny_onnx):
    trt = T.import_tensorrt()
    desc, meta = read_sidecar(fp16_plan, T.PLAN_KIND)
    assert fp16_plan.stat().st_size > 0
    assert (fp16_plan.parent / "timing.cache").stat().st_size > 0
    assert meta["tensorrt_version"] == trt.__version__
    gpu = T.gpu_info(0)
    assert meta["compute_capability"] == gpu.pop("compute_capability") and meta["gpu"] == gpu
    assert meta["inputs"] == [{"name": "x", "shape": [-1, 3, 16, 16], "dtype": "float32"}]
    assert meta["outputs"] == [{"name": "img", "shape": [-1, 3, 16, 16], "dtype": "float32"}]
    assert [p["name"] for p in meta["profiles"]] == ["one", "batch"]
    assert desc.latent_avg == description().latent_avg and desc.precision == "fp16"
    onnx_path = tiny_onnx[0]
    assert meta["onnx"] == {"path": str(onnx_path), "size": onnx_path.stat().st_size,
                            "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest()}
    assert meta["flags"]["precision"] == "fp16"
    if meta["flags"]["precision_mode"] == "fp16-weak":  # TensorRT 10: the fp32 islands were pinned
        assert any("/affine" in n for n in meta["fp32_layers"]) and any("/demod" in n for n in meta["fp32_layers"])
        assert not [n for n in meta["fp32_layers"] if "/conv/Conv" in n]


@needs_trt_cuda
@pytest.mark.parametrize("batch", [1, 5, 13])
def test_runner_matches_torch(fp16_plan, tiny_onnx, batch):
    model = tiny_onnx[1]
    x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
    with T.TensorRTRunner(fp16_plan) as r:
        assert [p.name for p in r.profiles] == ["one", "batch"] and r.max_batch == 8
        out = r.infer({"x": x})["img"]
    with torch.no_grad():
        ref = model(x)
    assert out.shape == ref.shape and out.is_cuda
    rel = (out.float().cpu() - ref).norm() / ref.norm()
    assert rel <= T.plan_tolerance("img", "fp16")["rel"], float(rel)


@needs_trt_cuda
def test_parity_and_latency_reports(fp16_plan, tiny_onnx):
    rep = T.parity_report(fp16_plan, tiny_onnx[0], batch_sizes=(1, 3, 8))
    assert rep["passed"], rep
    assert [r["batch"] for r in rep["runs"]] == [1, 3, 8]
    assert json.loads(Path(f"{fp16_plan}.parity.json").read_text())["passed"] is True
    lat = T.latency_report(fp16_plan, batch_sizes=(1, 8), warmup=2, iters=5)
    assert [r["batch"] for r in lat["results"]] == [1, 8]
    assert all(r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"] and r["img_per_s"] > 0 for r in lat["results"])


@needs_trt_cuda
def test_fp32_plan_is_tight(tiny_onnx, tmp_path):
    plan = T.build_engine(tiny_onnx[0], tmp_path / "tiny32.plan", fp16=False, profiles=[(1, 2, 4)], workspace_mib=512)
    rep = T.parity_report(plan, tiny_onnx[0], batch_sizes=(1, 4))
    assert rep["precision"] == "fp32" and rep["passed"], rep


@needs_trt_cuda
def test_runner_refuses_another_gpu(fp16_plan, tmp_path):
    plan = tmp_path / "other.plan"
    shutil.copyfile(fp16_plan, plan)
    desc, info = read_sidecar(fp16_plan, T.PLAN_KIND)
    info = {**{k: v for k, v in info.items() if k != "kind"}, "gpu": {"name": "some other GPU"},
            "compute_capability": "1.0"}
    write_sidecar(plan, desc, T.PLAN_KIND, **info)
    with pytest.raises(T.TensorRTError, match="built for compute capability 1.0"):
        T.TensorRTRunner(plan).activate()


@needs_trt_cuda
def test_parser_errors_name_the_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], name="/broken/NoSuchOp", domain="psp.test")],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path / "broken.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("psp.test", 1)]),
              str(path))
    write_onnx_sidecar(path)
    with pytest.raises(T.TensorRTError, match="ONNX parser failed: node 0"):
        T.build_engine(path, tmp_path / "broken.plan")


def _tiny_pair(tmp_path: Path) -> tuple[Path, nn.Module, nn.Module]:
    """An encoder (x -> w_plus) and a generator (w_plus -> img) ONNX pair with sidecars, n_styles 4, 32 px."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 4 * 512), nn.Unflatten(1, (4, 512))).eval()
    gen = nn.Sequential(nn.Flatten(), nn.Linear(4 * 512, 3 * 32 * 32), nn.Unflatten(1, (3, 32, 32)), nn.Tanh()).eval()
    for part, model, args, i, o in (("encoder", enc, torch.randn(2, 3, 256, 256), "x", "w_plus"),
                                    ("generator", gen, torch.randn(2, 4, 512), "w_plus", "img")):
        path = tmp_path / f"{part}.onnx"
        torch.onnx.export(model, (args,), str(path), input_names=[i], output_names=[o], opset_version=17,
                          dynamic_axes={i: {0: "batch"}, o: {0: "batch"}}, dynamo=False)
        write_onnx_sidecar(path, part, n_styles=4, output_size=32)
        T.build_engine(path, tmp_path / f"tiny.{part}.plan", fp16=False, profiles=[(1, 2, 4)], workspace_mib=512)
    return tmp_path / "tiny", enc, gen


@needs_trt_cuda
def test_backend_encode_synthesize(tmp_path):
    stem, enc, gen = _tiny_pair(tmp_path)
    model = T.load_tensorrt_backend(f"{stem}.encoder.plan", "cuda")
    try:
        assert isinstance(model, BackendModel)
        d = model.description
        assert (d.input_nc, d.label_nc, d.output_size, d.n_styles) == (3, 0, 32, 4)
        assert (d.backend, d.precision) == ("tensorrt", "fp32")   # built with fp16=False
        x = torch.rand(3, 3, 256, 256) * 2 - 1
        with torch.no_grad():
            w_ref = enc(x)
            img_ref = gen(w_ref)
        w = model.encode(x)
        img = model.synthesize(w)
        assert w.shape == (3, 4, 512) and img.shape == (3, 3, 32, 32)
        assert (w.cpu() - w_ref).norm() / w_ref.norm() <= T.plan_tolerance("w_plus", "fp32")["rel"]
        assert (img.cpu() - img_ref).norm() / img_ref.norm() <= T.plan_tolerance("img", "fp32")["rel"]
    finally:
        model.close()


@needs_trt_cuda
def test_cpp_runner_matches_python(runner_build, fp16_plan, tmp_path):
    subprocess.run(["cmake", "--build", str(runner_build), "-j", "2"], check=True, capture_output=True, timeout=600)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 16, 16)).astype("<f4")
    x.tofile(tmp_path / "x.f32")
    res = subprocess.run([str(runner_build / "tensorrt_runner"), str(fp16_plan), str(tmp_path / "x.f32"),
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "img: [3, 3, 16, 16]" in res.stdout
    cpp = np.fromfile(tmp_path / "img.f32", "<f4").reshape(3, 3, 16, 16)
    with T.TensorRTRunner(fp16_plan) as r:
        py = r.infer({"x": torch.from_numpy(x)})["img"].float().cpu().numpy()
    assert compare_outputs({"img": cpp}, {"img": py}, {"img": {"rel": 1e-3}})["passed"]
