"""`python -m engine.cache` on a temp `PSP_ENGINE_CACHE`, the demo build's announcements, and the
cache's integrity: no damaged graph, compiled blob or demo checkpoint is ever used.

The listing tests lay the cache out as the engine leaves it (a demo checkpoint, an ONNX entry with
its sidecars, an OpenVINO cache file, a killed writer's temp file), with small files standing in for
the big ones; the ONNX cache key is computed by `export.backends.graph.cache_paths`, as the backends compute
it. The integrity tests copy the real graphs of the session's 32 px checkpoint (`small_w`, exported
once per test run into the session's cache) into a temp cache under the same names (the key is the
checkpoint's path and digest, so the copies are that checkpoint's graphs there), damage them, and
run the engine on that cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import cache, demo
from engine.manifest import fingerprint
from reference.plumbing.digests import checkpoint_identity
from export.backends.graph import cache_paths, cached_graphs, compiled_cache_dir, graph_problems
from reference.plumbing import digests
from reference.description import sidecar_path, verify_artifact, write_sidecar
from reference.plumbing.digests import file_records, file_sha256
from reference.plumbing.files import cache_dir

REPO = Path(__file__).resolve().parent.parent


def _write(p: Path, size: int, age_s: float = 0.0) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\0" * size)
    if age_s:
        t = time.time() - age_s
        os.utime(p, (t, t))
    return p


def _onnx_entry(ckpt: Path, onnx_dir: Path, new_sidecar: bool) -> list[Path]:
    """An exported graph pair of `ckpt` as the backends name it, with sidecars of either schema."""
    files = []
    for part, path in cache_paths(ckpt, onnx_dir).items():
        files.append(_write(path, 1000))
        if new_sidecar:  # reference.description: <artifact>.json, model.checkpoint.path, the files' sizes and digests
            data = path.with_name(path.name + ".data")
            files.append(data)
            data.write_bytes(bytes(range(250)) * 8)  # 2000 B of weights
            meta = {"format": "psp-engine/sidecar", "version": 2, "model": {"checkpoint": {"path": str(ckpt.resolve())}},
                    "files": file_records([path, data])}
            side = sidecar_path(path)
        else:  # before it: <stem>.json, checkpoint.path
            meta = {"part": part, "checkpoint": {"path": str(ckpt.resolve())}}
            side = path.with_suffix(".json")
        side.write_text(json.dumps(meta))
        files.append(side)
    return files


@pytest.fixture
def filled_cache(tmp_path, monkeypatch):
    """A cache with: the demo checkpoint, graphs of a live checkpoint (new sidecars), graphs of a deleted
    one and of one changed since (old sidecars), an OpenVINO cache blob, a stale and a fresh temp file."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(root))
    write_sidecar(_write(demo.demo_path(), 5000), None, "checkpoint")  # its size and digest, as a build records them
    live = _write(tmp_path / "live.pt", 10)
    gone = _write(tmp_path / "gone.pt", 10)
    changed = _write(tmp_path / "changed.pt", 10)
    _onnx_entry(live, root / "onnx", new_sidecar=True)
    _onnx_entry(gone, root / "onnx", new_sidecar=False)
    _onnx_entry(changed, root / "onnx", new_sidecar=False)
    gone.unlink()
    changed.write_bytes(b"\1" * 20)  # another size: its cache key changes
    _write(root / "ov_cache" / "123abc.blob", 300, age_s=40 * cache.DAY_S)
    _write(root / "onnx" / ".x.onnx.1a2b3c4d.psp-tmp", 700, age_s=cache.STALE_TEMP_S + 60)
    _write(root / "onnx" / ".y.onnx.5e6f7a8b.psp-tmp", 70)  # a writer still at work
    return root, live


def test_list_shows_every_kind_with_size_and_source(filled_cache, capsys):
    root, live = filled_cache
    assert cache.main([]) == 0
    out = capsys.readouterr().out
    assert f"cache folder: {root}" in out
    lines = {ln.split()[0] + " " + ln.split()[5]: ln for ln in out.splitlines()[1:-1]}  # "kind name": line
    onnx = [k for k in lines if k.startswith("onnx ")]
    assert set(lines) - set(onnx) == {"checkpoint demo_ffhq_encode_seed0_rule-v1.pt", "compiled ov_cache/123abc.blob",
                                      "temp onnx/.x.onnx.1a2b3c4d.psp-tmp", "temp onnx/.y.onnx.5e6f7a8b.psp-tmp",
                                      "digests digests.json"}
    assert len(onnx) == 3
    live_line = next(ln for k, ln in lines.items() if k.startswith("onnx ") and f"from {live.resolve()}" in ln)
    stem = cache_paths(live, root / "onnx")["encoder"].name.split(".")[0]
    nbytes = sum(p.stat().st_size for p in (root / "onnx").glob(f"{stem}.*"))  # 2 graphs, their weights, 2 sidecars
    assert "(6 files)" in live_line and f" {cache.human(nbytes)} " in live_line and nbytes > 6000
    demo_line = lines["checkpoint demo_ffhq_encode_seed0_rule-v1.pt"]
    assert "(2 files)" in demo_line and f" {cache.human(5000 + sidecar_path(demo.demo_path()).stat().st_size)} " in demo_line
    assert out.splitlines()[-1].startswith("total ") and "in 8 entries" in out


def test_prune_removes_orphaned_graphs_and_stale_temp_files_only(filled_cache, capsys):
    """... and the loose OpenVINO blob, an older version's (blobs now live in a folder per graph)."""
    root, live = filled_cache
    live_paths = cache_paths(live, root / "onnx")
    before = {p for p in root.rglob("*") if p.is_file()}
    assert cache.main(["--prune", "--dry-run"]) == 0
    assert {p for p in root.rglob("*") if p.is_file()} == before, "--dry-run removes nothing"
    dry = capsys.readouterr().out
    assert "would remove 4 entries" in dry
    assert cache.main(["--prune"]) == 0
    out = capsys.readouterr().out
    assert "removed 4 entries" in out
    left = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    live_stem = live_paths["encoder"].name.split(".")[0]
    assert left == sorted(["demo_ffhq_encode_seed0_rule-v1.pt", "demo_ffhq_encode_seed0_rule-v1.pt.json",
                           "digests.json", "onnx/.y.onnx.5e6f7a8b.psp-tmp",
                           *(f"onnx/{live_stem}.{part}.onnx{ext}" for part in ("encoder", "generator")
                             for ext in ("", ".data", ".json"))])
    assert "no longer exists" in dry and "changed since the export" in dry and "written by an older version" in dry


def test_older_than_and_all(filled_cache, capsys):
    root, _ = filled_cache
    assert cache.main(["--older-than", "30"]) == 0
    assert not (root / "ov_cache").exists(), "the 40-day-old blob and its emptied folder are gone"
    assert (root / demo.demo_path().name).is_file()
    assert cache.main(["--all"]) == 0
    assert [p for p in root.rglob("*")] == []
    capsys.readouterr()
    assert cache.main([]) == 0
    assert "empty" in capsys.readouterr().out


def test_missing_cache_and_bad_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(tmp_path / "nothing"))
    assert cache.main([]) == 0
    assert "nothing is cached" in capsys.readouterr().out
    assert cache.main(["--older-than", "-1"]) == 2
    assert "expected a number of days >= 0" in capsys.readouterr().err
    assert cache.main(["--prnue"]) == 2
    assert "did you mean --prune?" in capsys.readouterr().err


def test_demo_build_announces_size_and_shows_progress(tmp_path, monkeypatch, capsys):
    """The first build says what, where, how big and how long, and draws a byte progress bar.

    The build is a 256 px rosinality generator standing in for the 1.2 GB pSp (same code path:
    `make_checkpoint(..., progress=...)` then `save_checkpoint`). It runs in a spawned child process
    (its memory ends with it): `make_checkpoint` replaced in this process is never called."""
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "DEMO_CONFIG", "stylegan2_rosinality_256")

    def in_this_process(*args, **kwargs):
        raise AssertionError("the demo build ran in the test's process, not in a child")

    monkeypatch.setattr(demo, "make_checkpoint", in_this_process)
    notes: list[str] = []
    path = demo.demo_checkpoint_path(notes.append)
    assert path == demo.demo_path() and path.is_file()
    assert "first run: building the demo checkpoint" in notes[0] and "1.2 GB" in notes[0] and str(path) in notes[0]
    assert "python -m engine.cache" in notes[0]
    assert notes[1].startswith("writing the demo checkpoint (") and "GiB" in notes[1]
    assert notes[2].startswith("demo checkpoint built in ")
    assert verify_artifact(path) == [], "the build records the file's size and sha256 in its sidecar"
    bar = capsys.readouterr().err
    assert "demo weights" in bar and "100%" in bar
    notes.clear()
    assert demo.demo_checkpoint_path(notes.append) == path and notes == [], "built once"


def test_make_checkpoint_progress_counts_every_byte():
    from reference import make_checkpoint

    calls: list[tuple[int, int]] = []
    ckpt = make_checkpoint("stylegan2_rosinality_256", 0, progress=lambda done, total: calls.append((done, total)))
    nbytes = sum(t.numel() * t.element_size() for t in ckpt["g_ema"].values())
    assert len(calls) == len(ckpt["g_ema"])
    assert calls[-1] == (nbytes, nbytes)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:])), "done grows with every tensor"


# ------------------------------------------------------------------------------------------------
# Integrity: a damaged entry is never used


def _damage(p: Path, truncate: bool = False) -> None:
    """Truncate `p` to half, or zero up to 1 MiB in its middle keeping its size; mtime and atime
    restored either way (only the ctime, which no user call sets, tells)."""
    st = p.stat()
    with open(p, "r+b") as f:
        if truncate:
            f.truncate(st.st_size // 2)
        else:
            n = min(1 << 20, st.st_size // 4)
            f.seek((st.st_size - n) // 2)
            f.write(b"\0" * n)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert truncate or p.stat().st_size == st.st_size


def test_digests_are_remembered_per_file_version(tmp_path, monkeypatch):
    """A digest is read from the memo while the file's (inode, size, mtime, ctime) are unchanged, and
    computed again after any write, even one that keeps size and mtime."""
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "_memory", {})
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(range(256)) * 256)
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    memo = json.loads(digests.memo_path().read_text())
    assert len(memo) == 1
    key = next(iter(memo))
    memo[key]["sha256"] = "f" * 64  # what only the memo can answer
    digests.memo_path().write_text(json.dumps(memo))
    monkeypatch.setattr(digests, "_memory", {})  # as a new process
    assert file_sha256(f) == "f" * 64, "this version of the file was hashed before: not read again"
    _damage(f)
    assert file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest() != "f" * 64


def test_a_checkpoint_replaced_by_one_of_the_same_size_and_mtime_is_another_checkpoint(tmp_path, monkeypatch):
    """Issue 18: such a checkpoint kept its old graphs and its old manifest fingerprint. Its identity
    (one for the manifest and the graph cache) is its digest now; a touched file keeps it."""
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(tmp_path / "cache"))
    ckpt, onnx_dir = tmp_path / "a.pt", tmp_path / "cache" / "onnx"
    ckpt.write_bytes(bytes(range(256)) * 40)
    st = ckpt.stat()
    ident, paths = checkpoint_identity(ckpt), cache_paths(ckpt, onnx_dir)
    for path in paths.values():  # stand-in graphs with their recorded sizes and digests
        _write(path, 100)
        write_sidecar(path, None, "onnx")

    def must_not_load():
        raise AssertionError("the cached graphs are valid: nothing to export")

    assert cached_graphs(ckpt, must_not_load, onnx_dir) == paths
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched only
    assert checkpoint_identity(ckpt) == ident and cache_paths(ckpt, onnx_dir) == paths
    with open(ckpt, "r+b") as f:  # replaced in place: same inode, size and mtime
        f.write(bytes(reversed(range(256))) * 40)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (ckpt.stat().st_size, ckpt.stat().st_mtime_ns, ckpt.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert checkpoint_identity(ckpt) != ident
    assert fingerprint({"checkpoint": checkpoint_identity(ckpt)}) != fingerprint({"checkpoint": ident})

    class Exporting(Exception):
        pass

    def exporting():
        raise Exporting

    with pytest.raises(Exporting):  # its graphs are exported (the old ones are another checkpoint's)
        cached_graphs(ckpt, exporting, onnx_dir)


def test_damaged_graphs_are_listed_by_verify_and_removed_by_prune(tmp_path, monkeypatch, capsys):
    """Issue 18: a truncated `.onnx.data` made every run fail and `--prune` said "nothing to remove".
    `python -m engine.cache --verify` (its own process, as a user runs it) lists truncated and
    same-size changed weights and exits 1; `--prune` removes the entry."""
    root = tmp_path / "cache"
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(root))
    live = _write(tmp_path / "live.pt", 10)
    _onnx_entry(live, root / "onnx", new_sidecar=True)
    paths = cache_paths(live, root / "onnx")
    env = {**os.environ, "PSP_ENGINE_CACHE": str(root)}

    def verify() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "engine.cache", "--verify"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    assert cache.main(["--verify"]) == 0
    assert "verified: every graph" in capsys.readouterr().out
    _damage(paths["encoder"].with_name(paths["encoder"].name + ".data"), truncate=True)
    _damage(paths["generator"].with_name(paths["generator"].name + ".data"))
    bad = verify()
    assert bad.returncode == 1, bad.stdout + bad.stderr
    stem = paths["encoder"].name.split(".")[0]
    listed = [ln for ln in bad.stdout.splitlines() if ln.startswith(f"onnx/{stem}: ")]
    assert len(listed) == 1, bad.stdout
    assert f"{stem}.encoder.onnx.data: 1000 bytes, recorded 2000" in listed[0]
    assert f"{stem}.generator.onnx.data: contents differ from the recorded sha256 (same size)" in listed[0]
    assert cache.main(["--prune"]) == 0
    assert f"onnx/{stem}" in capsys.readouterr().out.splitlines()
    assert not list((root / "onnx").glob(f"{stem}.*")), "every file of the damaged entry is removed"


def test_a_damaged_demo_checkpoint_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    """The demo checkpoint is checked against its sidecar before use; a damaged one is rebuilt with
    one line. The build itself (a child process, `test_demo_build_announces_size_and_shows_progress`)
    is replaced by one that writes a small file, as it would: the file, then its sidecar."""
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(tmp_path / "cache"))
    path = demo.demo_path()
    builds = []

    def build(fn, args, notify=None, what=""):
        builds.append(args)
        path.write_bytes(bytes(range(256)) * 20)
        write_sidecar(path, None, "checkpoint")

    monkeypatch.setattr(demo, "call_in_child", build)
    notes: list[str] = []
    assert demo.demo_checkpoint_path(notes.append) == path and len(builds) == 1
    notes.clear()
    assert demo.demo_checkpoint_path(notes.append) == path and len(builds) == 1 and notes == [], "intact: used"
    _damage(path)
    assert demo.demo_checkpoint_path(notes.append) == path and len(builds) == 2
    assert notes[0].startswith(f"the cached demo checkpoint {path} is damaged (")
    assert "contents differ from the recorded sha256" in notes[0] and notes[0].endswith("not used, building it again")
    assert verify_artifact(path) == []


@pytest.fixture(scope="module")
def small_w_graphs(small_w) -> dict[str, Path]:
    """The fp32 graphs of `small_w` in the session's engine cache (exported once per test run)."""
    from export.backends.graph import ReferenceLoader

    return cached_graphs(small_w, ReferenceLoader(small_w), cache_dir() / "onnx")


@pytest.fixture(scope="module")
def small_w_reference(small_w):
    """`small_w` on the fp32 reference backend: the outputs a rebuilt graph must reproduce."""
    import engine

    return engine.load(small_w, backend="reference", precision="fp32")


def _copy_graphs(graphs: dict[str, Path], cache: Path) -> dict[str, Path]:
    """`graphs` (with weights and sidecars) copied into `cache/onnx` under the same names: the cached
    graphs of the same checkpoint there (`cache_paths` keys on the checkpoint, not the folder)."""
    (cache / "onnx").mkdir(parents=True)
    for p in graphs.values():
        for f in (p, p.with_name(p.name + ".data"), sidecar_path(p)):
            shutil.copy2(f, cache / "onnx" / f.name)
    return {part: cache / "onnx" / p.name for part, p in graphs.items()}


def _w_plus(n_styles: int) -> torch.Tensor:
    return 0.5 * torch.randn(1, n_styles, 512, generator=torch.Generator().manual_seed(18))


@pytest.mark.slow
def test_truncated_graph_weights_are_rebuilt_by_the_cli(small_w, small_w_graphs, small_w_reference, tmp_path):
    """Issue 18: a truncated `.onnx.data` failed every later run with a traceback. The CLI (its own
    process) says so in one line, exports the part again and writes the right images."""
    from PIL import Image

    from export.compare import U8_LEVELS
    from reference.images import tensor_to_uint8

    cache_root = tmp_path / "cache"
    paths = _copy_graphs(small_w_graphs, cache_root)
    assert cache_paths(small_w, cache_root / "onnx") == paths
    _damage(paths["generator"].with_name(paths["generator"].name + ".data"), truncate=True)
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(REPO / "examples" / "images" / "skimage_astronaut.png", src)
    r = subprocess.run([sys.executable, "-m", "engine.run", "--checkpoint", str(small_w), "--backend", "onnxruntime",
                        "--precision", "fp32", "--input", str(src), "--output", str(tmp_path / "out"), "--save-latents"],
                       cwd=REPO, env={**os.environ, "PSP_ENGINE_CACHE": str(cache_root)}, capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out
    notes = [ln for ln in out.splitlines() if "damaged" in ln]
    assert len(notes) == 1 and paths["generator"].name + ".data" in notes[0], out
    assert notes[0].endswith("not used, exporting it again") and "bytes, recorded" in notes[0]
    assert graph_problems(paths) == {}, "rebuilt, with its new sizes and digests recorded"
    w = torch.from_numpy(np.load(tmp_path / "out" / "skimage_astronaut.npy"))[None]
    with torch.inference_mode():
        ref = tensor_to_uint8(small_w_reference.synthesize(w))[0].astype(int)
    got = np.asarray(Image.open(tmp_path / "out" / "skimage_astronaut.png").convert("RGB")).astype(int)
    assert np.abs(got - ref).max() <= U8_LEVELS


@pytest.mark.slow
def test_zeroed_bytes_in_graph_weights_are_detected_and_rebuilt(small_w, small_w_graphs, small_w_reference, tmp_path):
    """Issue 18: 1 MiB zeroed inside a `.onnx.data` (same size, mtime restored) gave wrong images with
    exit 0. The digest differs: the part is announced, exported again, and matches the fp32 reference."""
    from export.compare import assert_close
    from export.backends.graph import ReferenceLoader, load_graph_backend

    cache_root = tmp_path / "cache"
    paths = _copy_graphs(small_w_graphs, cache_root)
    _damage(paths["generator"].with_name(paths["generator"].name + ".data"))
    notes: list[str] = []
    model = load_graph_backend("onnxruntime", small_w, ReferenceLoader(small_w), cache_root, "fp32", notes.append, 1)
    damaged = [n for n in notes if "damaged" in n]
    assert len(damaged) == 1 and "generator.onnx.data: contents differ from the recorded sha256" in damaged[0], notes
    assert not any("encoder" in n for n in damaged), "the intact encoder is kept"
    w = _w_plus(small_w_reference.n_styles)
    with torch.inference_mode():
        assert_close(model.synthesize(w), small_w_reference.synthesize(w), "img")


@pytest.mark.slow
def test_a_damaged_openvino_blob_is_not_used(small_w, small_w_graphs, small_w_reference, tmp_path):
    """Issue 18: 1 MiB zeroed inside a compiled OpenVINO blob gave images 32 levels off. The blobs'
    digests are recorded after the compile that wrote them; a damaged one is listed by `--verify`,
    announced, removed and compiled again, and the output matches the fp32 reference."""
    from export.compare import assert_close
    from export.backends.graph import load_graph_backend

    def must_not_export():
        raise AssertionError("the graphs are intact: nothing to export")

    cache_root = tmp_path / "cache"
    paths = _copy_graphs(small_w_graphs, cache_root)
    notes: list[str] = []
    load_graph_backend("openvino", small_w, must_not_export, cache_root, "fp32", notes.append, 1)
    folder = compiled_cache_dir(paths["generator"], cache_root)
    blobs = sorted(p for p in folder.iterdir())
    assert notes == [] and blobs and verify_artifact(folder) == [], (notes, blobs)
    _damage(blobs[0])
    entry = next(e for e in cache.scan(cache_root, verify=True) if e.name == f"ov_cache/{folder.name}")
    assert "contents differ from the recorded sha256" in entry.damaged and entry.stale
    model = load_graph_backend("openvino", small_w, must_not_export, cache_root, "fp32", notes.append, 1)
    assert len(notes) == 1 and notes[0].startswith(f"damaged compiled-model cache {folder} ("), notes
    assert verify_artifact(folder) == [], "the new blob is recorded"
    w = _w_plus(small_w_reference.n_styles)
    with torch.inference_mode():
        assert_close(model.synthesize(w), small_w_reference.synthesize(w), "img")


def _read_only(folder: Path) -> list[str]:
    """A command prefix under which `folder` cannot be written, even by root: as a user other than
    root, its mode (a-w on it and its subfolders); as root (who ignores modes), a read-only bind
    mount in a private user and mount namespace (`unshare -rm`), a real EROFS. Skips where neither works."""
    if os.geteuid() != 0:
        for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
            d.chmod(0o555)
        return []
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(folder), "true"], capture_output=True, text=True) \
        if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("running as root, which ignores file modes, and no read-only bind mount is possible here "
                    f"(unshare -rm: {probe.stderr.strip() if probe else 'not installed'})")
    return ["unshare", "-rm", "sh", "-c", script, str(folder)]


@pytest.mark.slow
def test_a_read_only_cache_runs_without_compiled_models_with_one_warning(small_w, small_w_graphs, tmp_path):
    """Issue 18: a read-only cache holding graphs but no `ov_cache/` crashed openvino with a traceback.
    The CLI (its own process, the cache really read-only) runs without the compiled-model cache and
    says so once; with no graphs to use it stops with one line (exit 2)."""
    cache_root = tmp_path / "cache"
    _copy_graphs(small_w_graphs, cache_root)
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(REPO / "examples" / "images" / "skimage_astronaut.png", src)
    before = sorted(p.relative_to(cache_root) for p in cache_root.rglob("*"))

    def run(cache: Path, out: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "engine.run", "--checkpoint", str(small_w), "--backend", "openvino",
               "--precision", "fp32", "--input", str(src), "--output", str(tmp_path / out)]
        return subprocess.run(_read_only(cache) + cmd, cwd=REPO, env={**os.environ, "PSP_ENGINE_CACHE": str(cache)},
                              capture_output=True, text=True, timeout=600)

    r = run(cache_root, "out")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out
    warnings = [ln for ln in out.splitlines() if "compiled-model cache" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: the compiled-model cache "), out
    assert "Set PSP_ENGINE_CACHE to a writable folder" in warnings[0]
    assert (tmp_path / "out" / "skimage_astronaut.png").is_file()
    assert sorted(p.relative_to(cache_root) for p in cache_root.rglob("*")) == before, "nothing written to the cache"
    r = run(empty, "out2")
    err = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert len(err) == 1 and f"the engine cache {empty / 'onnx'} is not writable" in err[0], r.stderr
