"""export.aoti: AOTInductor packages of a small pSp, run from Python and from the C++ runner,
against the reference model (fp32, export.compare.TOL["aoti"]).

Inductor compiles C++ (tens of seconds per package on 2 cores): each package is built once per
module. The whole-model package has a dynamic batch (activation modulation); the generator package
goes through the CLI with a static batch (official grouped convolution) and `--resize`. The Python
tests share one loaded package and one reference output per batch.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from export import aoti
from reference import load_psp, save_checkpoint
from reference.configs import BASE_OPTS
from reference.description import read_sidecar, sidecar_path
from reference.weights import make_state_dict, psp_modules
from export.compare import assert_close

CXX = os.environ.get("CXX", "g++")
if shutil.which(CXX) is None:  # inductor itself compiles C++: nothing here can run without one
    if os.environ.get("CI") == "true":
        pytest.fail(f"no C++ compiler ({CXX}): CI needs one for AOTInductor", pytrace=False)
    pytest.skip(f"no C++ compiler ({CXX}) for AOTInductor; install g++ or set CXX", allow_module_level=True)

OUTPUT_SIZE = 16
N_STYLES = 6
RUNNER_SRC = REPO / "examples" / "cpp" / "aoti_runner" / "main.cpp"


def small_checkpoint(seed: int = 0) -> dict:
    """An official-layout pSp checkpoint of the smallest architecture: IR-SE50 into one w, 16 px generator."""
    opts = {**BASE_OPTS, "encoder_type": "BackboneEncoderUsingLastLayerIntoW", "output_size": OUTPUT_SIZE,
            "input_nc": 3, "learn_in_w": True, "n_styles": int(math.log2(OUTPUT_SIZE)) * 2 - 2}
    with torch.device("meta"):
        modules = psp_modules(opts)
    g = torch.Generator().manual_seed(seed + 1)
    return {"state_dict": make_state_dict(modules, seed), "opts": opts,
            "latent_avg": 0.5 * torch.randn(1, 512, generator=g)}


def rand_x(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def read_raw(path, shape) -> torch.Tensor:
    """A raw little-endian float32 file of exactly `prod(shape)` values as a tensor."""
    data = path.read_bytes()
    assert len(data) == 4 * math.prod(shape), f"{path}: {len(data)} bytes for {shape}"
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)


def reference_outputs(psp, x: torch.Tensor, resize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        w_plus = psp.encode(x)
        img = psp.synthesize(w_plus)
        return (psp.face_pool(img) if resize else img), w_plus


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    """`small_checkpoint()` once for the module: the Python tests' model and the CLI's checkpoint file."""
    return small_checkpoint()


@pytest.fixture(scope="module")
def psp(checkpoint):
    model = load_psp(checkpoint)
    assert model.n_styles == N_STYLES
    return model


@pytest.fixture(scope="module")
def psp_package(psp, tmp_path_factory):
    """The whole model, dynamic batch (traced at batch 2): `PSPPipeline(psp)` -> psp.pt2."""
    path = tmp_path_factory.mktemp("aoti") / "psp.pt2"
    pipe = aoti.PSPPipeline(psp).eval()
    out = aoti.package_model(pipe, aoti.example_inputs_for(psp, "psp", batch=2), path, dynamic_batch=True)
    assert out == path and path.is_file()
    return path


@pytest.fixture(scope="module")
def psp_loaded(psp_package):
    """`aoti.load_package(psp_package)` once for the Python tests (each load unpacks the .so and its
    weights): the package serves every batch, so one loaded model runs them all."""
    return aoti.load_package(psp_package)


@pytest.fixture(scope="module")
def reference_case(psp):
    """`reference_case(batch)` -> (x, reference img, reference w_plus), computed once per batch for
    the module: the Python loader and the C++ runner run the same batch-3 input."""
    cache = {}

    def case(batch: int):
        if batch not in cache:
            x = rand_x(batch, seed=10 + batch)
            cache[batch] = (x, *reference_outputs(psp, x))
        return cache[batch]

    return case


@pytest.fixture(scope="module")
def generator_package(checkpoint, tmp_path_factory):
    """The generator part through the CLI: static batch 2, `--resize` -> gen.pt2 (and its checkpoint file)."""
    d = tmp_path_factory.mktemp("aoti_cli")
    ckpt = d / "small.pt"
    save_checkpoint(checkpoint, ckpt)
    path = d / "gen.pt2"
    rc = aoti.main(["--checkpoint", str(ckpt), "--out", str(path), "--part", "generator", "--resize",
                    "--static-batch", "--batch", "2"])
    assert rc == 0 and path.is_file()
    return path


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """examples/cpp/aoti_runner built with the plain g++ command of `aoti.runner_build_command`."""
    exe = tmp_path_factory.mktemp("runner") / "aoti_runner"
    cmd = aoti.runner_build_command(RUNNER_SRC, exe, cxx=CXX)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"building the runner failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return exe


# ------------------------------------------------------------------------------------------------
# Python loader


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_python_package_matches_reference(psp_loaded, reference_case, batch):
    """Every batch size (the package was traced at 2) against the reference in the official formulation."""
    x, ref_img, ref_w_plus = reference_case(batch)
    img, w_plus = psp_loaded(x)
    assert img.shape == (batch, 3, OUTPUT_SIZE, OUTPUT_SIZE) and w_plus.shape == (batch, N_STYLES, 512)
    assert_close(w_plus, ref_w_plus, "aoti")
    assert_close(img, ref_img, "aoti")


@pytest.mark.slow
def test_sidecar_and_model_restored(psp, psp_package, psp_loaded):
    assert sidecar_path(psp_package).name == "psp.pt2.json"
    desc, meta = read_sidecar(psp_package, aoti.AOTI_KIND)
    assert meta["part"] == "psp" and meta["dynamic_batch"] is True
    assert meta["inputs"] == {"x": {"shape": ["batch", 3, 256, 256], "dtype": "float32"}}
    assert meta["outputs"] == {"img": {"shape": ["batch", 3, OUTPUT_SIZE, OUTPUT_SIZE], "dtype": "float32"},
                               "w_plus": {"shape": ["batch", N_STYLES, 512], "dtype": "float32"}}
    assert (desc.output_size, desc.n_styles, desc.input_nc, desc.precision) == (OUTPUT_SIZE, N_STYLES, 3, "fp32")
    assert desc.learn_in_w and torch.equal(torch.tensor(desc.latent_avg), psp.latent_avg.expand(N_STYLES, 512))
    assert psp_loaded.description == desc
    assert meta["modulated_conv"].startswith("activation modulation")
    assert meta["torch_version"] == torch.__version__
    # the export switched the formulation only while tracing
    assert all(m.fused_modconv for m in aoti._modulated_convs(psp))
    # the names travel inside the package too (the C++ runner reads them)
    assert psp_loaded.compiled.get_metadata()["output_names"] == "img,w_plus"


@pytest.mark.slow
def test_python_package_refuses_wrong_inputs(psp_loaded):
    model = psp_loaded
    with pytest.raises(ValueError, match=r"input 'x' must be float32 \['batch', 3, 256, 256\]"):
        model(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="float32"):
        model(torch.zeros(1, 3, 256, 256, dtype=torch.float64))


@pytest.mark.slow
def test_generator_part_static_batch_cli(psp, generator_package):
    """The official grouped-conv formulation, static batch, resize to 256 (pooling a 16 px image up)."""
    desc, meta = read_sidecar(generator_package, aoti.AOTI_KIND)
    assert desc.checkpoint["size"] > 0            # the CLI records the checkpoint
    assert meta["part"] == "generator" and meta["dynamic_batch"] is False and meta["resize"] is True
    assert meta["inputs"]["w_plus"]["shape"] == [2, N_STYLES, 512]
    assert meta["outputs"]["img"]["shape"] == [2, 3, 256, 256]
    assert meta["modulated_conv"].startswith("grouped conv")
    model = aoti.load_package(generator_package)
    w_plus = torch.randn(2, N_STYLES, 512, generator=torch.Generator().manual_seed(3))
    (img,) = model(w_plus)
    with torch.inference_mode():
        ref = psp.face_pool(psp.synthesize(w_plus))
    assert_close(img, ref, "aoti")
    with pytest.raises(ValueError, match=r"must be float32 \[2, 6, 512\]"):
        model(torch.randn(3, N_STYLES, 512))


# ------------------------------------------------------------------------------------------------
# C++ runner


@pytest.mark.slow
def test_cpp_runner_matches_reference(psp_package, runner, reference_case, tmp_path):
    x, ref_img, ref_w_plus = reference_case(3)  # a batch the package was not traced at
    x.numpy().tofile(tmp_path / "x.bin")
    proc = subprocess.run([str(runner), str(psp_package), str(tmp_path / "x.bin"), "3,3,256,256",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"img [3, 3, {OUTPUT_SIZE}, {OUTPUT_SIZE}] -> ")
    assert lines[1].startswith(f"w_plus [3, {N_STYLES}, 512] -> ")
    img = read_raw(tmp_path / "out" / "img.bin", (3, 3, OUTPUT_SIZE, OUTPUT_SIZE))
    w_plus = read_raw(tmp_path / "out" / "w_plus.bin", (3, N_STYLES, 512))
    assert_close(w_plus, ref_w_plus, "aoti")
    assert_close(img, ref_img, "aoti")


@pytest.mark.slow
def test_cpp_runner_errors(psp_package, runner, tmp_path):
    torch.zeros(1, 3, 256, 256).numpy().tofile(tmp_path / "x.bin")

    def run(*args):
        return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=300)

    bad_size = run(psp_package, tmp_path / "x.bin", "2,3,256,256", tmp_path / "out")
    assert bad_size.returncode == 2 and "needs 1572864" in bad_size.stderr
    # right byte count, wrong shape: refused by the package's own input checks, not read out of bounds
    bad_shape = run(psp_package, tmp_path / "x.bin", "1,3,128,512", tmp_path / "out")
    assert bad_shape.returncode == 1 and "input_handles[0]" in bad_shape.stderr
    assert run(tmp_path / "missing.pt2", tmp_path / "x.bin", "1,3,256,256", tmp_path / "out").returncode == 2
    assert run(psp_package).returncode == 2  # usage


# ------------------------------------------------------------------------------------------------
# Refusals (no compile)


class _GroupedByBatch(torch.nn.Module):
    """A per-sample-weight convolution as one grouped conv with `groups = batch` (official modconv shape)."""

    PART = "custom"

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
        self.affine = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, styles: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        wmod = self.weight[None] * self.affine(styles)[:, None, :, None, None]  # [N, O, I, k, k]
        out = F.conv2d(x.reshape(1, n * c, h, w), wmod.reshape(n * 4, c, 3, 3), padding=1, groups=n)
        return out.reshape(n, 4, h, w)


def test_batch_dependent_groups_refused(tmp_path):
    """Inductor would pin groups to the example batch and silently return 2 images for any batch."""
    with pytest.raises(aoti.AOTIError, match="batch-dependent groups"):
        aoti.package_model(_GroupedByBatch().eval(), (torch.randn(2, 3, 8, 8), torch.randn(2, 8)),
                           tmp_path / "g.pt2", dynamic_batch=True)
    assert not (tmp_path / "g.pt2").exists()


def test_package_model_refusals(psp, tmp_path):
    x = aoti.example_inputs_for(psp, "psp")
    with pytest.raises(aoti.AOTIError, match=r"must end in \.pt2"):
        aoti.package_model(aoti.PSPPipeline(psp).eval(), x, tmp_path / "m.onnx")
    pipe = aoti.PSPPipeline(psp).train()
    try:
        with pytest.raises(aoti.AOTIError, match="training mode"):
            aoti.package_model(pipe, x, tmp_path / "m.pt2")
    finally:
        psp.eval()
    with pytest.raises(TypeError, match="no encode"):
        aoti.PSPPipeline(torch.nn.Linear(2, 2))
    with pytest.raises(aoti.AOTIError, match="no such package"):
        aoti.load_package(tmp_path / "missing.pt2")


def test_cli_errors(tmp_path, capsys):
    assert aoti.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.pt2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "missing.pt" in err
    assert aoti.main(["--checkpoint", "x.pt", "--out", str(tmp_path / "m.pt2"), "--batch", "1"]) == 2
