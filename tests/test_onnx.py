"""ONNX export (export.onnx), the graph backends (export.backends.graph) and the parity module (export.parity)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import engine
from export import onnx as xo
from export.backends.engine_model import EnginePSP
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
def small_cache(tmp_path_factory):
    """One engine cache for the graph backends of `small`: `small_graphs` exports, onnxruntime and openvino reuse."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def small_graphs(small, small_cache):
    """The fp32 `encoder` and `generator` graphs of `small`, exported once into `small_cache` by
    `cached_graphs` with a `ReferenceLoader` (in a spawned child), with `export.backends.graph.export_parts`
    replaced in this process so that an export here would fail. Returns the paths and what
    `test_graph_export_runs_in_a_child_process` checks: the notes, the children left, the folder's files.
    The one export of these parts in this file: `exported`, `test_engine_backends` and
    `test_a_second_process_waits_for_the_export_and_reuses_it` reuse it."""
    import export.backends.graph
    from export.backends.graph import ReferenceLoader, cached_graphs

    def not_here(*args, **kwargs):
        raise AssertionError("the export ran in the test's own process")

    path, _ = small
    folder = small_cache / "onnx"
    assert not folder.exists(), "nothing exported into small_cache before"
    notes = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export.backends.graph, "export_parts", not_here)  # the spawned child imports its own
        paths = cached_graphs(path, ReferenceLoader(path), folder, notes.append)
        children = _child_commands()
    return paths, notes, children, sorted(p.name for p in folder.iterdir())


def _child_commands() -> list[str]:
    """Command lines of this process's live child processes (Linux `/proc`), e.g. a
    `python -m reference.plumbing.child` left running."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                out.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    return out


@pytest.fixture(scope="module")
def exported(small, small_graphs, tmp_path_factory):
    """Graphs of `small` by part and fp16: the psp pipeline in fp32 (`export_onnx`) and in fp16 (the
    CLI, `python -m export.onnx --part psp --fp16`: what test_cli_and_bad_checkpoint checks of the CLI
    is its run here), and the fp32 encoder and generator of `small_graphs` (the engine cache's export).
    No fp16 generator-only graph: the psp graph's generator is the same `EnginePSP.synthesize` with
    the same fp16 treatment (fp16 convolutions, fp32 style math, fp32 IO), checked on the psp graph,
    and each export costs ~15 s whatever the model's size. Returns (psp, files, CLI (exit code, stdout))."""
    path, psp = small
    out = tmp_path_factory.mktemp("onnx")
    files = {("psp", False): xo.export_onnx(EnginePSP(psp), out / "m.psp.onnx", "psp", checkpoint=path)}
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = xo.main(["--checkpoint", str(path), "--out", str(out), "--part", "psp", "--fp16"])
    files[("psp", True)] = out / "small32.psp.fp16.onnx"
    graphs = small_graphs[0]
    files.update({("encoder", False): graphs["encoder"], ("generator", False): graphs["generator"]})
    return psp, files, (rc, stdout.getvalue())


def _run(path, feeds):
    """Run a graph once on ONNX Runtime's CPU provider with torch's thread count (1 per pytest-xdist
    worker, tests/conftest.py) and no spinning: ORT's idle intra-op threads would otherwise spin
    for work and burn the core the other worker runs on."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


@pytest.fixture(scope="module")
def psp_refs(exported):
    """The reference pipeline's (img, w_plus) of the random input of each batch size, computed once:
    the fp32 and fp16 psp graphs at batch 1 are compared with the same reference outputs."""
    psp = exported[0]
    cache = {}

    def ref(batch):
        if batch not in cache:
            x = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(batch)) * 2 - 1
            with torch.inference_mode():
                cache[batch] = (x, *psp(x))
        return cache[batch]

    return ref


@pytest.mark.slow
@pytest.mark.parametrize("batch,fp16", [(1, False), (3, False), (1, True)], ids=["1-fp32", "3-fp32", "1-fp16"])
def test_psp_graph_matches_reference(exported, psp_refs, fp16, batch):
    """The psp graphs against the reference at batch sizes other than the export's example batch (2):
    the batch axis is dynamic. No batch 3 in fp16 (the slowest run, ~14 s: fp16 convolutions on the
    CPU): the batch axis is the same exporter setting in both precisions, and 1 != 2 already checks
    it; batch 3 is checked in fp32. (The reference outputs of each batch: `psp_refs`, computed once.)"""
    _, files, _ = exported
    x, ref_img, ref_w = psp_refs(batch)
    img, w_plus = _run(files[("psp", fp16)], {"x": x})
    what = ("onnx", "float16" if fp16 else "float32")
    assert_close(torch.from_numpy(w_plus), ref_w, *what)
    assert_close(torch.from_numpy(img), ref_img, *what)


@pytest.mark.slow
def test_generator_graph_matches_reference(exported):
    psp, files, _ = exported
    w_plus = psp.latent_avg.expand(2, -1, -1) + 0.1 * torch.randn(2, 8, 512, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = psp.synthesize(w_plus)
    (img,) = _run(files[("generator", False)], {"w_plus": w_plus})
    assert_close(torch.from_numpy(img), ref, "onnx", "float32")


@pytest.mark.slow
def test_graph_contract(exported):
    """Named IO, dynamic batch, opset >= 17, only standard ops; fp16: IO fp32, style math fp32, and
    `export.tensorrt.onnx_fp16_count` sees the fp16 graph as mixed precision (built strongly typed)
    and the fp32 ones as fp32 (the real-export half of tests/test_tensorrt.py's pattern checks)."""
    from export.tensorrt import onnx_fp16_count

    _, files, _ = exported
    assert sorted(files) == [("encoder", False), ("generator", False), ("psp", False), ("psp", True)]
    for (part, fp16), path in files.items():
        assert (onnx_fp16_count(path) > 0) == fp16, path.name
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


@pytest.mark.slow  # `exported`: whole-model exports
def test_cli_and_bad_checkpoint(small, exported, tmp_path, capsys):
    """The CLI's export is the fp16 psp graph of `exported` (its graph is checked there); here its exit
    code, files and report line, then the one-line exit-2 errors."""
    path, _ = small
    _, files, (rc, out) = exported
    assert rc == 0, out
    cli = files[("psp", True)]
    assert cli.name == "small32.psp.fp16.onnx"
    assert cli.is_file() and xo.data_path(cli).is_file() and (cli.parent / "small32.psp.fp16.onnx.json").is_file()
    assert out.startswith(f"wrote {cli} (") and out.count("\n") == 1, out
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


@pytest.mark.slow
def test_graph_export_runs_in_a_child_process(small_graphs, tmp_path):
    """`cached_graphs` with a `ReferenceLoader` exports in a spawned child (its torch memory ends with
    it): the graphs and sidecars appear, no temp folder stays, no child is left; a bad checkpoint's
    error comes back from the child as the same `CheckpointError` a load in this process raises.
    (The export is `small_graphs`', into `small_cache`, where `test_engine_backends` then finds the graphs.)"""
    from export.backends.graph import ReferenceLoader, cached_graphs
    from reference.plumbing.errors import CheckpointError

    paths, notes, children, listing = small_graphs
    assert all(p.is_file() and xo.data_path(p).is_file() for p in paths.values())
    stem = paths["encoder"].name.split(".", 1)[0]
    assert listing == sorted(
        [f"{stem}.lock"] + [n for p in paths.values() for n in (p.name, p.name + ".data", p.name + ".json")])
    assert notes[0].startswith("exporting small32.pt") and any("encoder:" in n for n in notes)
    assert not children
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    notes = []
    with pytest.raises(CheckpointError, match="bad.pt"):
        cached_graphs(bad, ReferenceLoader(bad), tmp_path / "onnx2", notes.append)
    assert notes == [], "a bad checkpoint fails before the export is announced"
    assert not any((tmp_path / "onnx2").glob(".*")), "no temp folder left"


@pytest.fixture(scope="module")
def backend_refs(small):
    """3 random inputs, the reference's W+ and 256 px images of them, and 3 z (`mixing_z(5, 3)`) with
    the reference's mapping of them: computed once for the three backends."""
    from engine.latents import mixing_z

    _, psp = small
    x = torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.from_numpy(mixing_z(5, 3))
    with torch.inference_mode():
        ref_w = psp.encode(x)
        ref_img = psp.face_pool(psp.synthesize(ref_w))
        ref_mapped = psp.mapping(z)
    return x, ref_w, ref_img, z, ref_mapped


@pytest.mark.parametrize("backend", ["engine", "onnxruntime", "openvino"])
def test_engine_backends(small, backend, small_cache, small_graphs, backend_refs, monkeypatch):
    """Each backend inverts like the reference; the graph backends run the graphs `small_graphs`
    exported into `small_cache`.

    And `Engine.mapping` (z -> w, for style mixing) per backend: the graph backends hold no torch
    mapping, so the Engine builds it once from the checkpoint and caches it, equal to the reference's;
    the engine formulation folds lr_mul into the weights: equal to fp32 rounding. (Here, on graphs
    this file exports anyway, rather than on an export of its own in tests/test_synthesize.py.)"""
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(small_cache))
    path, _ = small
    x, ref_w, ref_img, z, ref_mapped = backend_refs
    eng = engine.load(path, backend=backend, precision="fp32")  # fp32 tolerances: never what auto picks
    img, w_plus = eng.invert(x, resize=True)
    assert img.shape == (3, 3, 256, 256)
    assert_close(w_plus, ref_w, "onnx", "float32")
    assert_close(img, ref_img, "onnx", "float32")
    mapped = eng.mapping(z)
    if backend == "engine":
        assert_close(mapped, ref_mapped, "engine_model")
    else:
        assert list(small_cache.glob("onnx/*.onnx")), "the exported graphs are cached"
        assert getattr(eng.model, "mapping", None) is None, f"the {backend} model holds no torch mapping"
        torch.testing.assert_close(mapped, ref_mapped, rtol=0, atol=1e-6)
        assert eng._mapping is not None and eng.mapping(z).equal(mapped), "built once, cached on the Engine"


def test_a_second_process_waits_for_the_export_and_reuses_it(small, small_cache, small_graphs, tmp_path):
    """While another holder has the export lock, `cached_graphs` says it waits, then finds the graphs
    the holder wrote and exports nothing itself."""
    import shutil
    import threading

    from filelock import FileLock

    from export.backends.graph import ReferenceLoader, cache_paths, cached_graphs

    path, _ = small
    done = cached_graphs(path, ReferenceLoader(path), small_cache / "onnx")  # cached by small_graphs
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
    The session's engine cache: tests/test_cli.py's end-to-end run of this checkpoint shares the export.
    The reference backend is not among the compared (run_parity computes it as the baseline anyway):
    the reference against the official outputs is tests/test_golden.py's."""
    golden = dict(np.load(shared / "golden" / "public_ffhq_encode_256_seed0.npz"))
    results, skipped = run_parity(ffhq256_checkpoint, ["openvino"], ["fp32"], golden=golden)
    assert len(results) == 4 and not skipped
    bad = [r for r in results if not r.passed]
    assert not bad, bad
    worst = max(r.max_abs for r in results if r.against == "golden")
    assert worst < 1e-4 and math.isfinite(worst)


@pytest.mark.slow
def test_openvino_gives_back_the_pages_of_its_weight_files(exported, tmp_path, monkeypatch):
    """After its first call, an OpenVINO runner gives back the resident pages of the weight file its
    compile mapped (the graph's .onnx.data here; its cached blob on a later process), once; the
    results stay identical and correct."""
    import export.backends.graph as xg
    from reference.plumbing import platform as rp

    psp, files, _ = exported
    path = files[("generator", False)]
    calls = []

    def recording(paths):
        calls.append(set(paths))
        return rp.page_out(paths)

    monkeypatch.setattr(xg, "page_out", recording)
    run = xg.openvino_runner(path, "w_plus", "img", "fp32", tmp_path)
    assert len(calls) == 1 and str(xo.data_path(path)) in calls[0], "the compile's pages, right after it"
    calls.clear()
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

    from reference.plumbing.platform import mapped_files, page_out

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
