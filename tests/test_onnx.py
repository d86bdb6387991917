"""ONNX export (export.onnx), the graph backends (export.graph) and the parity module (export.parity)."""

from __future__ import annotations

import hashlib
import math
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import engine
from export import onnx as xo
from export.engine_model import EnginePSP
from export.parity import run_parity
from reference import load_psp, save_checkpoint
from reference.configs import BASE_OPTS
from reference.description import read_sidecar, sidecar_path
from reference.weights import make_state_dict, psp_modules
from export.compare import assert_close


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A GradualStyleEncoder pSp at 32 px (batched map2style heads, up convs, skips), as a file."""
    opts = {**BASE_OPTS, "output_size": 32, "n_styles": 8}
    with torch.device("meta"):
        model = psp_modules(opts)
    la = (0.5 * torch.randn(512, generator=torch.Generator().manual_seed(1))).repeat(8, 1)
    path = tmp_path_factory.mktemp("ckpt") / "small32.pt"
    save_checkpoint({"state_dict": make_state_dict(model, 0), "opts": opts, "latent_avg": la}, path)
    yield path, load_psp(path)
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def exported(small, tmp_path_factory):
    path, psp = small
    out = tmp_path_factory.mktemp("onnx")
    model = EnginePSP(psp)
    files = {(part, fp16): xo.export_onnx(model, out / f"m.{part}{'.fp16' if fp16 else ''}.onnx", part, fp16=fp16,
                                          checkpoint=path)
             for part in ("psp", "generator") for fp16 in (False, True)}
    return psp, files


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


@pytest.mark.slow
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 3])
def test_psp_graph_matches_reference(exported, fp16, batch):
    psp, files = exported
    x = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(batch)) * 2 - 1
    with torch.inference_mode():
        ref_img, ref_w = psp(x)
    img, w_plus = _run(files[("psp", fp16)], {"x": x})
    what = ("onnx", "float16" if fp16 else "float32")
    assert_close(torch.from_numpy(w_plus), ref_w, *what)
    assert_close(torch.from_numpy(img), ref_img, *what)


@pytest.mark.slow
def test_generator_graph_matches_reference(exported):
    psp, files = exported
    w_plus = psp.latent_avg.expand(2, -1, -1) + 0.1 * torch.randn(2, 8, 512, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = psp.synthesize(w_plus)
    (img,) = _run(files[("generator", False)], {"w_plus": w_plus})
    assert_close(torch.from_numpy(img), ref, "onnx", "float32")


@pytest.mark.slow
def test_graph_contract(exported):
    """Named IO, dynamic batch, opset >= 17, only standard ops; fp16: IO fp32, style math fp32."""
    _, files = exported
    for (part, fp16), path in files.items():
        m = onnx.load(str(path))
        assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}, "no custom ops"
        ins, outs = xo.IO_NAMES[part]
        assert [i.name for i in m.graph.input] == ins and [o.name for o in m.graph.output] == outs
        for v in list(m.graph.input) + list(m.graph.output):
            assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            assert v.type.tensor_type.shape.dim[0].dim_param == "batch"
        if fp16:
            inits = {i.name: i.data_type for i in m.graph.initializer}
            affine = [n for n in m.graph.node if "/affine" in n.name and n.op_type in ("Gemm", "MatMul")]
            demod = [n for n in m.graph.node if "/demod" in n.name and n.op_type in ("Gemm", "MatMul")]
            assert affine and demod
            for n in affine + demod:
                weights = [inits[i] for i in n.input if i in inits]
                assert weights and all(t == onnx.TensorProto.FLOAT for t in weights), n.name
            convs = [n for n in m.graph.node if n.op_type == "Conv"]
            assert any(inits.get(n.input[1]) == onnx.TensorProto.FLOAT16 for n in convs)
        assert sidecar_path(path).name == path.name + ".json"
        desc, info = read_sidecar(path, "onnx")
        assert info["part"] == part and desc.n_styles == 8 and desc.output_size == 32
        assert desc.precision == ("fp16" if fp16 else "fp32") and info["opset"] == xo.OPSET
        assert list(info["inputs"]) == ins and list(info["outputs"]) == outs
        assert np.asarray(desc.latent_avg).shape == (8, 512)
        assert desc.checkpoint["size"] > 0


def test_cli_and_bad_checkpoint(small, tmp_path, capsys):
    path, _ = small
    assert xo.main(["--checkpoint", str(path), "--out", str(tmp_path), "--part", "generator"]) == 0  # the cheap part
    assert (tmp_path / "small32.generator.onnx").is_file() and (tmp_path / "small32.generator.onnx.json").is_file()
    (tmp_path / "bad.pt").write_bytes(b"")
    assert xo.main(["--checkpoint", str(tmp_path / "bad.pt"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and err.startswith("error: ") and err.count("\n") == 1
    assert xo.main(["--checkpoint", str(path), "--out", str(tmp_path), "--opset", "16"]) == 2
    assert "expected an integer >= 17" in capsys.readouterr().err


def test_auto_backend_picks_the_measured_fastest():
    from export.backends import resolve

    assert resolve("auto", torch.device("cpu"), "fp32")[0] == "openvino"  # installed with the project
    assert resolve("auto", torch.device("cuda"), "fp16")[:2] == ("triton", "fp16")  # triton: in the test extra
    assert resolve("reference", torch.device("cpu"))[:2] == ("reference", "fp32")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """One engine cache for the graph backends of `small`: onnxruntime exports, openvino reuses."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_graph_export_runs_in_a_child_process(small, small_cache, tmp_path, monkeypatch):
    """`cached_graphs` with a `ReferenceLoader` exports in a spawned child (its torch memory ends with
    it): the graphs and sidecars appear, no temp folder stays, no child is left; a bad checkpoint's
    error comes back from the child as the same `CheckpointError` a load in this process raises.
    (Exports into `small_cache`, where `test_engine_backends` then finds the graphs.)"""
    import multiprocessing

    import export.graph
    from export.graph import ReferenceLoader, cached_graphs
    from reference.errors import CheckpointError

    def not_here(*args, **kwargs):
        raise AssertionError("the export ran in the test's own process")

    monkeypatch.setattr(export.graph, "export_parts", not_here)  # the spawned child imports its own
    path, _ = small
    folder = small_cache / "onnx"
    assert not folder.exists(), "this test runs first on small_cache"
    notes = []
    paths = cached_graphs(path, ReferenceLoader(path), folder, notes.append)
    assert all(p.is_file() and xo.data_path(p).is_file() for p in paths.values())
    stem = paths["encoder"].name.split(".", 1)[0]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{stem}.lock"] + [n for p in paths.values() for n in (p.name, p.name + ".data", p.name + ".json")])
    assert notes[0].startswith("exporting small32.pt") and any("encoder:" in n for n in notes)
    assert not multiprocessing.active_children()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    notes.clear()
    with pytest.raises(CheckpointError, match="bad.pt"):
        cached_graphs(bad, ReferenceLoader(bad), tmp_path / "onnx2", notes.append)
    assert notes == [], "a bad checkpoint fails before the export is announced"
    assert not any((tmp_path / "onnx2").glob(".*")), "no temp folder left"


@pytest.mark.parametrize("backend", ["engine", "onnxruntime", "openvino"])
def test_engine_backends(small, backend, small_cache, monkeypatch):
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(small_cache))
    path, psp = small
    x = torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    eng = engine.load(path, backend=backend)
    img, w_plus = eng.invert(x, resize=True)
    with torch.inference_mode():
        ref_w = psp.encode(x)
        ref_img = psp.synthesize(ref_w, resize=True)
    assert img.shape == (3, 3, 256, 256)
    assert_close(w_plus, ref_w, "onnx", "float32")
    assert_close(img, ref_img, "onnx", "float32")
    if backend != "engine":
        assert list(small_cache.glob("onnx/*.onnx")), "the exported graphs are cached"


def test_a_second_process_waits_for_the_export_and_reuses_it(small, small_cache, tmp_path):
    """While another holder has the export lock, `cached_graphs` says it waits, then finds the graphs
    the holder wrote and exports nothing itself."""
    import shutil
    import threading

    from filelock import FileLock

    from export.graph import ReferenceLoader, cache_paths, cached_graphs

    path, _ = small
    done = cached_graphs(path, ReferenceLoader(path), small_cache / "onnx")  # cached by test_engine_backends
    folder = tmp_path / "onnx"
    folder.mkdir()
    stem = cache_paths(path, folder)["encoder"].name.split(".", 1)[0]
    holder = FileLock(folder / f"{stem}.lock")
    holder.acquire()
    notes, result = [], {}

    def must_not_load():
        raise AssertionError("exported although the holder wrote the graphs")

    waiter = threading.Thread(target=lambda: result.update(cached_graphs(path, must_not_load, folder, notes.append)))
    waiter.start()
    for _ in range(200):
        if notes:
            break
        time.sleep(0.05)
    assert notes and notes[0].startswith(f"another process is exporting {path.name}") and "waiting" in notes[0], notes
    assert waiter.is_alive() and not result
    for p in done.values():  # the holder's export
        for f in (p, xo.data_path(p), sidecar_path(p)):
            shutil.copy(f, folder / f.name)
    holder.release()
    waiter.join(60)
    assert result == {part: folder / p.name for part, p in done.items()} and len(notes) == 1


@pytest.mark.slow
def test_parity_report_against_golden(shared, ffhq256_checkpoint):
    """The graphs of the 256 px model on OpenVINO against the official outputs and the reference
    (onnxruntime runs the same graphs; it is checked against the reference in test_engine_backends).
    The session's engine cache: tests/test_cli.py's end-to-end run of this checkpoint shares the export."""
    golden = dict(np.load(shared / "golden" / "public_ffhq_encode_256_seed0.npz"))
    results, skipped = run_parity(ffhq256_checkpoint, ["reference", "openvino"], ["fp32"], golden=golden)
    assert len(results) == 8 and not skipped
    bad = [r for r in results if not r.passed]
    assert not bad, bad
    worst = max(r.max_abs for r in results if r.against == "golden")
    assert worst < 1e-4 and math.isfinite(worst)


@pytest.mark.slow
def test_openvino_gives_back_the_pages_of_its_weight_files(exported, tmp_path, monkeypatch):
    """After its first call, an OpenVINO runner gives back the resident pages of the weight file its
    compile mapped (the graph's .onnx.data here; its cached blob on a later process), once; the
    results stay identical and correct."""
    import export.graph as xg
    from reference import platform as rp

    psp, files = exported
    path = files[("generator", False)]
    calls = []

    def recording(paths):
        calls.append(set(paths))
        return rp.page_out(paths)

    monkeypatch.setattr(xg, "page_out", recording)
    run = xg.openvino_runner(path, "w_plus", "img", "fp32", tmp_path)
    w_plus = torch.randn(2, psp.n_styles, 512, generator=torch.Generator().manual_seed(3))
    first = run(w_plus.numpy())
    assert len(calls) == 1 and str(xo.data_path(path)) in calls[0], calls
    assert np.array_equal(run(w_plus.numpy()), first) and len(calls) == 1, "once, and nothing changes"
    with torch.inference_mode():
        assert_close(torch.from_numpy(first), psp.synthesize(w_plus), "onnx", "float32")


def _mapping_rss_kib(path) -> int:
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
    return rss


def _sha256(buf) -> str:
    return hashlib.sha256(buf).hexdigest()


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="page_out reads /proc (Linux only)")
def test_page_out_drops_resident_pages_and_keeps_the_data(tmp_path):
    import mmap

    from reference.platform import mapped_files, page_out

    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 255, 32 << 20, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert _sha256(m) == _sha256(data)  # every page read: resident
        assert str(path) in mapped_files()
        before = _mapping_rss_kib(path)
        assert before > 30 << 10, before
        assert page_out({str(path)}) >= 32 << 20
        after = _mapping_rss_kib(path)
        assert after < before // 4, (before, after)
        assert _sha256(m) == _sha256(data), "the pages read back from the file"
    assert page_out(set()) == 0 and page_out({str(tmp_path / "not-mapped")}) == 0
