"""The int8 precision (issue 20): openvino only, never auto, refused where OpenVINO reports no INT8,
cached by checkpoint, calibration set and recipe, and inside its row of the one tolerance table on
the golden inputs and the 12 real faces.

Source: `export.quantize` (NNCF post-training quantization), `export.backends.registry`,
`export.parity`, `export.compare.TOL`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
from export.backends import BACKENDS, auto_precision, resolve
from export.compare import compare
from export.quantize import DEFAULT_RECIPE, RECIPES, Calibration, int8_path
from reference.description import describe_opts, write_sidecar
from reference.plumbing.errors import UsageError

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Where int8 runs, and where not


@pytest.mark.parametrize("cpu", ["zen3", "xeon_amx"])
def test_auto_never_picks_int8(fake_cpu, cpu):
    fake_cpu(cpu)
    assert auto_precision(CPU)[0] != "int8"
    assert resolve("auto", CPU).precision != "int8"
    assert resolve("openvino", CPU).precision != "int8"


def test_int8_is_openvino_only():
    assert resolve("openvino", CPU, "int8") == ("openvino", "int8", resolve("openvino", CPU, "int8").reason)
    assert resolve("auto", CPU, "int8").backend == "openvino"  # asked for int8, auto picks the row that has it
    rows = [name for name, row in BACKENDS.items() if "int8" in row.precisions.get("cpu", ())]
    assert rows == ["openvino"]
    for name in ("engine", "onnxruntime", "reference"):
        with pytest.raises(UsageError, match="backends with int8 on cpu: openvino"):
            resolve(name, CPU, "int8")


def test_refused_where_openvino_reports_no_int8(monkeypatch, small_w, tmp_path):
    """A CPU whose OpenVINO plugin has no INT8 capability: refused with the reason, before any export."""
    import export.backends.graph as graph

    monkeypatch.setattr(graph, "openvino_capabilities", lambda: ["FP32", "EXPORT_IMPORT"])
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UsageError, match=r"cannot run int8 on this CPU .*no INT8 capability.*--precision fp32"):
        engine.load(small_w, backend="openvino", precision="int8")
    assert not (tmp_path / "cache" / "onnx").exists()  # refused before exporting anything


def test_calibration_is_for_int8_only(small_w, tmp_path, shared):
    with pytest.raises(UsageError, match="--calibration applies to --precision int8 only"):
        engine.load(small_w, backend="openvino", precision="fp32", calibration=tmp_path)
    inputs = _faces(shared, tmp_path / "in", 1)
    r = subprocess.run([sys.executable, "-m", "engine.run", "--checkpoint", str(small_w), "--input", str(inputs),
                        "--output", str(tmp_path / "out"), "--precision", "fp32", "--calibration", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--calibration applies to --precision int8 only" in r.stderr, r.stderr


def test_parity_refuses_calibrating_on_the_checked_faces(tmp_path, shared):
    """Calibration images are never the images the contract is checked on (by content, any name)."""
    faces = shared / "data" / "faces" / "aligned"
    calib = tmp_path / "calib"
    calib.mkdir()
    one = sorted(faces.iterdir())[0]
    shutil.copy(one, calib / "renamed.jpg")
    r = subprocess.run([sys.executable, "-m", "export.parity", "--checkpoint", "none.pt", "--backends", "openvino",
                        "--precision", "int8", "--faces", str(faces), "--calibration", str(calib)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "renamed.jpg" in r.stderr and "also among the --faces" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------------
# The cache key and the calibration set


def _fake_graph(folder: Path, content: bytes = b"graph", input_nc: int = 3) -> Path:
    """A file with a sidecar recording it, as `cached_graphs` leaves one (only what `int8_path` reads)."""
    from reference.configs import get_config

    opts = get_config("sketch_to_face" if input_nc == 1 else "ffhq_encode_256").opts()
    folder.mkdir(parents=True, exist_ok=True)
    g = folder / "m-0123.generator.onnx"
    g.write_bytes(content)
    write_sidecar(g, describe_opts(opts), "onnx", part="generator")
    return g


def _faces(shared: Path, folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    for f in sorted((shared / "data" / "faces" / "aligned").iterdir())[:n]:
        shutil.copy(f, folder / f.name)
    return folder


def test_cache_key(tmp_path, shared):
    g = _fake_graph(tmp_path / "onnx")
    recipe = RECIPES[DEFAULT_RECIPE]
    own = int8_path(g, Calibration(), recipe)
    assert own.parent == g.parent and own.name.startswith("m-0123.generator.int8-") and own.suffix == ".xml"
    assert int8_path(g, Calibration(), recipe) == own  # deterministic
    a = _faces(shared, tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    from_a = int8_path(g, Calibration(a), recipe)
    assert from_a != own
    assert int8_path(g, Calibration(b), recipe) == from_a  # the same images under another folder: the same set
    (b / sorted(p.name for p in b.iterdir())[0]).write_bytes((a / sorted(p.name for p in a.iterdir())[1]).read_bytes())
    assert int8_path(g, Calibration(b), recipe) != from_a  # one image changed: another set
    others = {int8_path(g, Calibration(), r) for r in RECIPES.values()}
    assert len(others) == len(RECIPES)  # every recipe its own entry
    assert int8_path(g, Calibration(size=8), recipe) != own
    g2 = _fake_graph(tmp_path / "onnx2", b"other graph")  # another checkpoint's graph (same name)
    assert int8_path(g2, Calibration(), recipe).name != own.name


def test_calibration_folder_errors(tmp_path):
    with pytest.raises(UsageError, match="not a folder"):
        Calibration(tmp_path / "missing").files()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no image found"):
        Calibration(tmp_path / "empty").identity()


def test_self_made_calibration_needs_rgb(tmp_path):
    """A sketch encoder cannot be calibrated on rendered faces: refused, pointing at --calibration."""
    from export.quantize import cached_int8_graphs

    g = _fake_graph(tmp_path / "onnx", input_nc=1)
    with pytest.raises(UsageError, match="give --calibration DIR"):
        cached_int8_graphs({"encoder": g, "generator": g}, tmp_path / "sketch.pt")


def test_self_made_w_plus(small_w):
    from export.quantize import self_made_w_plus

    w = self_made_w_plus(small_w, 8, 6, seed=3)
    assert w.shape == (6, 8, 512) and w.dtype.name == "float32"
    assert (w[0] == w[0, :1]).all()  # a plain W sample: one w repeated
    assert not (w[1] == w[1, :1]).all()  # a style-mixed one: two w's
    assert (self_made_w_plus(small_w, 8, 6, seed=3) == w).all()


# ------------------------------------------------------------------------------------------------
# The contract, as a user checks it


@pytest.mark.slow
def test_int8_contract_on_golden_inputs_and_real_faces(ffhq256_checkpoint, shared):
    """`python -m export.parity --precision int8` on the golden checkpoint: the 4 golden faces and the
    12 real faces, against the fp32 reference, inside the int8 row of the table; then the cache:
    the entry records its choices and a second load does not quantize again."""
    from export.parity import parity_inputs, run_parity

    lines = []
    results, skipped = run_parity(ffhq256_checkpoint, ["openvino"], ["int8"], x=parity_inputs(shared),
                                  say=lines.append)
    assert not skipped, skipped
    assert [(c.output, c.passed) for c in results] == [("w_plus", True), ("img", True)], \
        [(c.output, c.rel, c.tolerance) for c in results]
    notes = []
    eng = engine.load(ffhq256_checkpoint, backend="openvino", precision="int8", announce=notes.append)
    assert eng.precision == "int8" and not any("quantizing" in n for n in notes), notes
    from reference.plumbing.files import cache_dir

    irs = sorted((cache_dir() / "onnx").glob(f"{ffhq256_checkpoint.stem}-*.int8-*.xml"))
    assert irs, "no int8 graph cached"
    meta = json.loads(Path(str(irs[0]) + ".json").read_text())
    assert meta["artifact"]["recipe"]["name"] == DEFAULT_RECIPE and meta["artifact"]["calibration"].startswith("self:")
    assert {Path(f).suffix for f in meta["files"]} == {".xml", ".bin"}


@pytest.mark.slow
def test_damaged_int8_graph_is_listed_and_rebuilt(small_w, tmp_path):
    """engine.cache --verify lists a damaged int8 graph; the next use announces it and quantizes again
    (a 4-sample calibration set: the cache's behaviour, not the accuracy, is under test)."""
    from engine.cache import scan
    from export.backends.graph import GraphPSP, ReferenceLoader, cached_graphs
    from export.quantize import cached_int8_graphs

    cache = tmp_path / "cache"
    graphs = cached_graphs(small_w, ReferenceLoader(small_w), cache / "onnx")
    calibration = Calibration(size=4)

    def int8_model(notes):
        parts = cached_int8_graphs(graphs, small_w, calibration, announce=notes.append)
        return parts, GraphPSP(parts["encoder"], parts["generator"], "openvino", "int8", cache)

    first = []
    parts, model = int8_model(first)
    assert any("quantizing" in n for n in first), first
    ir = parts["encoder"]
    assert ir.suffix == ".xml" and parts["generator"] == graphs["generator"]  # the default recipe: encoder only
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    w_before = model.encode(x)
    del model
    again = []
    int8_model(again)
    assert not any("quantizing" in n for n in again), again  # cached
    assert not [e for e in scan(cache, verify=True) if e.stale]
    b = ir.with_suffix(".bin")
    data = bytearray(b.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    b.write_bytes(bytes(data))
    damaged = [e for e in scan(cache, verify=True) if e.damaged]
    assert len(damaged) == 1 and ir.name in damaged[0].damaged, [(e.name, e.damaged) for e in damaged]
    notes = []
    _, model = int8_model(notes)
    assert any(f"damaged int8 graph {ir.name}" in n for n in notes), notes
    assert compare(model.encode(x), w_before, {"rel": 1e-4}).passed  # rebuilt from the same calibration set
    assert not [e for e in scan(cache, verify=True) if e.stale]


def test_manifest_config_keys_int8_runs_by_calibration_set(small_w, tmp_path, shared):
    """A rerun with another calibration set makes other images: its manifest config differs, so
    `engine.run` does not take the first run's outputs for its own; fp32 runs keep their config."""
    from engine import api
    from engine.batch import RunOptions
    from reference.description import describe_opts
    from reference.psp import psp_opts

    def config(precision: str, calibration: Path | None) -> dict:
        plan = api.plan_load(small_w, backend="openvino", precision=precision, calibration=calibration)
        facts = api.Facts(describe_opts(psp_opts(small_w), small_w, precision, "openvino"), plan)
        return RunOptions(tmp_path / "out").config(facts)

    own = config("int8", None)
    assert own["int8"]["calibration"].startswith("self:") and own["int8"]["recipe"] == DEFAULT_RECIPE
    theirs = config("int8", _faces(shared, tmp_path / "calib"))
    assert theirs["int8"]["calibration"].startswith("dir:") and theirs != own
    assert "int8" not in config("fp32", None)
