"""The backend model as a declared interface (issue 19): every registry row's loader returns an
`export.backends.BackendModel` (a `description` saying which backend and precision run, `encode`,
`synthesize` at full resolution with no `resize`); the `Engine` and `engine.run` read the model's
facts from that description; callers read the registry's fields, never a backend's name; "auto" is
resolved once per load.

The loads use the session's 32 px `small_w` checkpoint (8 styles) in fp32.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch
from PIL import Image

import engine.api as api
import export.backends.registry as registry
from engine import run
from export.backends import BACKENDS, BASELINE, Backend, BackendModel, load_model, resolve
from reference.description import ENCODER_SIZE

CPU = torch.device("cpu")
SIZE, N_STYLES = 32, 8  # small_w
GRAPH_ROWS = ("onnxruntime", "openvino")  # their first load exports the ONNX graphs (once per test run)


def _why_not_here(row: Backend) -> str | None:
    """Why `row` cannot load on this CPU machine (None: it can)."""
    if "cpu" not in row.precisions:
        return (f"backend {row.name!r} runs on {', '.join(row.devices)} only (this machine has no GPU); its "
                "loader is checked where one is (python -m benchmarks.gpu_suite)")
    if not row.installed():
        return f"backend {row.name!r} needs the {row.package} package"
    if "cpu" in row.emulated_on and os.environ.get("TRITON_INTERPRET") != "1":
        return f"backend {row.name!r} runs on a CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)"
    return None


def _rows():
    """Every row; the graph rows are slow (their first load exports the graphs: ~40 s on one core)."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in GRAPH_ROWS else name for name in BACKENDS]


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_row_declares_what_it_loads(name):
    """What can be checked without loading: a loader, what it takes, where it runs, in what."""
    row = BACKENDS[name]
    assert row.name == name and callable(row.load)
    assert row.takes in ("checkpoint", "plans")
    assert row.devices and all(p in registry.PRECISIONS for ps in row.precisions.values() for p in ps)
    assert set(row.emulated_on) <= set(row.devices)
    assert BACKENDS[BASELINE].takes == "checkpoint"


@pytest.mark.parametrize("name", _rows())
def test_every_row_loads_a_backend_model(name, small_w):
    """The registry's load of each row presents the interface: its description names the row and the
    precision resolved; `synthesize` takes only w_plus and renders at full resolution."""
    row = BACKENDS[name]
    why = _why_not_here(row)
    if why:
        pytest.skip(why)
    choice = resolve(name, CPU, "fp32")
    model = load_model(choice, small_w, CPU)
    assert isinstance(model, BackendModel), f"{name}: {type(model).__name__} lacks the interface"
    d = model.description
    assert (d.backend, d.precision) == (name, "fp32") == (choice.backend, choice.precision)
    assert (d.input_nc, d.output_size, d.n_styles, d.encoder_size) == (3, SIZE, N_STYLES, ENCODER_SIZE)
    assert list(inspect.signature(model.synthesize).parameters) == ["w_plus"], "no resize: the Engine resizes"
    x = torch.rand(1, 3, ENCODER_SIZE, ENCODER_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        w_plus = model.encode(x)
        img = model.synthesize(w_plus)
    assert w_plus.shape == (1, N_STYLES, 512) and w_plus.dtype == torch.float32
    assert img.shape == (1, 3, SIZE, SIZE) and img.dtype == torch.float32


def test_tensorrt_backend_model_presents_the_interface():
    """The row that cannot load here: what its model class declares (no TensorRT needed to import it)."""
    row = BACKENDS["tensorrt"]
    assert row.takes == "plans" and "cpu" not in row.devices
    from export.tensorrt.runtime import TensorRTPSP

    assert list(inspect.signature(TensorRTPSP.synthesize).parameters) == ["self", "w_plus"]
    assert list(inspect.signature(TensorRTPSP.encode).parameters) == ["self", "x"]


def test_load_model_refuses_a_model_that_misstates_its_facts(small_w, monkeypatch):
    """A loader whose model names another backend (or lacks the interface) is a bug, named."""
    reference = BACKENDS[BASELINE]

    def wrong(req):
        model = reference.load(req)
        model.description = model.description.replace(backend="engine")
        return model

    monkeypatch.setitem(BACKENDS, BASELINE, Backend(BASELINE, "x", reference.precisions, None, wrong))
    with pytest.raises(TypeError, match=r"'reference' loader .* description\.backend 'engine'"):
        load_model(resolve(BASELINE, CPU, "fp32"), small_w, CPU)
    monkeypatch.setitem(BACKENDS, BASELINE, Backend(BASELINE, "x", reference.precisions, None, lambda req: object()))
    with pytest.raises(TypeError, match="does not present export.backends.BackendModel"):
        load_model(resolve(BASELINE, CPU, "fp32"), small_w, CPU)


def test_engine_reads_its_facts_from_the_description(small_w):
    """No fact copied: the Engine's sizes, backend and precision are its model's description's."""
    eng = api.load(small_w, backend="engine", precision="fp32")
    facts = ("backend", "precision", "input_nc", "label_nc", "output_size", "n_styles", "dataset_type", "opts")
    assert not set(facts) & set(vars(eng)), "the Engine keeps copies of the description's fields"
    d = eng.model.description
    assert eng.description is d
    assert (eng.backend, eng.precision, eng.n_styles, eng.output_size, eng.encoder_size) == \
        (d.backend, d.precision, d.n_styles, d.output_size, d.encoder_size) == ("engine", "fp32", N_STYLES, SIZE, ENCODER_SIZE)
    assert eng.reason == eng.plan.choice.reason and eng.opts == d.opts


def test_preload_facts_are_the_loaded_description(small_w, tmp_path):
    """`engine.run` checks its manifest against the description the load will have, read from the
    checkpoint's opts without its weights (`describe_opts`), with the plan's backend and precision."""
    args = run.build_parser().parse_args(["--input", "x", "--output", str(tmp_path), "--checkpoint", str(small_w),
                                          "--backend", "engine", "--precision", "fp32"])
    plan = run.plan_for(args)
    facts = run.preload_facts(args, plan)
    eng = api.load_planned(plan)
    assert facts.description == eng.description  # every field but latent_avg (not recorded before the load)
    assert facts.plan is eng.plan


def _count_resolves(monkeypatch) -> list:
    """Count calls of the registry's `resolve`, under every name a caller may hold it by."""
    calls, original = [], registry.resolve

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    for module in (registry, api, run):
        if hasattr(module, "resolve"):
            monkeypatch.setattr(module, "resolve", counted)
    return calls


def test_a_run_resolves_backend_and_precision_once(small_w, tmp_path, monkeypatch, capsys):
    """`engine.run` plans the load once: the pre-load manifest check and the load use the same
    resolution (first run: checked, then loaded; rerun: checked, nothing to load)."""
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / "a.png")
    argv = ["--input", str(src), "--output", str(tmp_path / "out"), "--checkpoint", str(small_w),
            "--backend", "reference", "--precision", "auto"]
    calls = _count_resolves(monkeypatch)
    assert run.main(argv) == 0
    assert len(calls) == 1, f"resolved {len(calls)} times in one run"
    calls.clear()
    assert run.main(argv) == 0
    assert "the model was not loaded" in capsys.readouterr().err
    assert len(calls) == 1


def test_benchmark_variants_follow_the_rows_fields(monkeypatch):
    """benchmarks.cpu_engines picks its CPU rows by `precisions` and `emulated_on`, not by name."""
    from benchmarks.cpu_engines import variants

    engine_row = BACKENDS["engine"]
    monkeypatch.setitem(BACKENDS, "interpreted", Backend("interpreted", "x", {"cpu": ("fp32",)}, None, engine_row.load,
                                                         emulated_on=("cpu",)))
    monkeypatch.setitem(BACKENDS, "cpu_twin", Backend("cpu_twin", "x", {"cpu": ("fp32",)}, None, engine_row.load))
    out, _ = variants(["fp32"])
    assert "cpu_twin:fp32" in out and "interpreted:fp32" not in out
    assert not any(v.startswith(("triton:", "tensorrt:")) for v in out)
    assert out[0] == f"{BASELINE}:fp32"
