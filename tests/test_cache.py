"""`python -m engine.cache` on a temp `PSP_ENGINE_CACHE`, and the demo build's announcements.

The cache is laid out as the engine leaves it (a demo checkpoint, an ONNX entry with its sidecars,
an OpenVINO cache file, a killed writer's temp file), with small files standing in for the big ones;
the ONNX cache key is computed by `export.graph.cache_paths`, as the backends compute it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from engine import cache, demo
from export.graph import cache_paths
from reference.description import sidecar_path


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
        if new_sidecar:  # reference.description: <artifact>.json, model.checkpoint.path
            meta = {"format": "psp-engine/sidecar", "version": 2, "model": {"checkpoint": {"path": str(ckpt.resolve())}}}
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
    _write(demo.demo_path(), 5000)
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
                                      "temp onnx/.x.onnx.1a2b3c4d.psp-tmp", "temp onnx/.y.onnx.5e6f7a8b.psp-tmp"}
    assert len(onnx) == 3
    live_line = next(ln for k, ln in lines.items() if k.startswith("onnx ") and f"from {live.resolve()}" in ln)
    stem = cache_paths(live, root / "onnx")["encoder"].name.split(".")[0]
    nbytes = sum(p.stat().st_size for p in (root / "onnx").glob(f"{stem}.*"))  # 2 graphs of 1000 B + 2 sidecars
    assert "(4 files)" in live_line and f" {cache.human(nbytes)} " in live_line and nbytes > 2000
    assert "4.9 KiB" in lines["checkpoint demo_ffhq_encode_seed0_rule-v1.pt"]
    assert out.splitlines()[-1].startswith("total ") and "in 7 entries" in out


def test_prune_removes_orphaned_graphs_and_stale_temp_files_only(filled_cache, capsys):
    root, live = filled_cache
    before = {p for p in root.rglob("*") if p.is_file()}
    assert cache.main(["--prune", "--dry-run"]) == 0
    assert {p for p in root.rglob("*") if p.is_file()} == before, "--dry-run removes nothing"
    dry = capsys.readouterr().out
    assert "would remove 3 entries" in dry
    assert cache.main(["--prune"]) == 0
    out = capsys.readouterr().out
    assert "removed 3 entries" in out
    left = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    live_stem = cache_paths(live, root / "onnx")["encoder"].name.split(".")[0]
    assert left == sorted(["demo_ffhq_encode_seed0_rule-v1.pt", "ov_cache/123abc.blob", "onnx/.y.onnx.5e6f7a8b.psp-tmp",
                           *(f"onnx/{live_stem}.{part}.onnx{ext}" for part in ("encoder", "generator")
                             for ext in ("", ".json"))])
    assert "no longer exists" in dry and "changed since the export" in dry


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
