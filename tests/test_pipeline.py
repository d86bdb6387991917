"""engine.run's pipeline (issue 20, part 4): reading, the model and writing at once, and one PNG setting.

What `engine.batch.run_jobs` promises with its bounded pipeline: the same files and manifest rows as
the stages one after another (`RunOptions.queue_depth=0`); rows in input order whatever stage an
input failed in; one bad image fails alone; bounded queues (reading at most D + 1 batches ahead of
the model, the model at most D + 1 ahead of writing); an interruption, in the process and as a real
Ctrl-C of `python -m engine.run`, leaves whole files only and a manifest that lists exactly the
inputs whose files are written, and a rerun does the rest; an error of a stage thread stops the run
with that error. The service's PNG bytes are engine.run's (`reference.images.png_bytes`).

The pipeline's mechanics use the stand-in engine of tests/test_safety.py (8 px images, no weights,
instant); the runs whose outputs are compared byte for byte use the 32 px `small_w` checkpoint at
fp32 on the reference backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine.batch as batch
from engine.batch import QUEUE_DEPTH, RunOptions, run_jobs
from engine.inputs import find_inputs, plan_jobs
from engine.manifest import MANIFEST_NAME, Manifest, read_records
from reference.images import PNG_COMPRESS_LEVEL, atomic_write_image, png_bytes
from reference.plumbing.files import LOCK_NAME

from conftest import REPO
from test_safety import StandIn, draw_png, temp_files

PIPELINE_THREADS = ("psp-read", "psp-write")


@pytest.fixture
def stand_in(tmp_path) -> StandIn:
    ckpt = tmp_path / "stand_in.pt"
    ckpt.write_bytes(b"stand-in")  # the manifest's config stats the checkpoint
    return StandIn(ckpt)


def folder(path: Path, n: int, corrupt: tuple[int, ...] = (), black: tuple[int, ...] = ()) -> list[Path]:
    """`n` distinct 40 px PNGs `img00.png`...; `corrupt` ones are not images (a read failure), `black`
    ones all black (the stand-in's encoder gives NaN for them: a model-stage failure)."""
    files = []
    for i in range(n):
        p = path / f"img{i:02d}.png"
        if i in corrupt:
            path.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"not an image")
        elif i in black:
            path.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (0, 0, 0)).save(p)
        else:
            draw_png(p, 20 + 9 * i)
        files.append(p)
    return files


def run(eng, src: Path, out: Path, **options):
    """`run_jobs` over folder `src` into `out` (latents saved), as engine.run runs it; the summary."""
    opts = RunOptions(out_dir=out, save_latents=True, **options)
    jobs = plan_jobs(find_inputs([str(src)], exclude=out))
    with Manifest(out, opts.config(eng)) as m:
        return run_jobs(eng, jobs, opts, m)


def rows(out: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """The manifest's rows as (input name, status, outputs), in file order."""
    return [(Path(r["input"]).name, r["status"], tuple(r["outputs"])) for r in read_records(out)]


def files_in(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in (MANIFEST_NAME, LOCK_NAME)}


def no_pipeline_threads() -> bool:
    return not [t for t in threading.enumerate() if t.name in PIPELINE_THREADS]


# ------------------------------------------------------------------------------------------------
# Order, failures, and the same outcome as the stages one after another


@pytest.mark.parametrize("depth", [0, 1, QUEUE_DEPTH])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_rows_follow_input_order_and_a_bad_image_fails_alone(tmp_path, stand_in, depth, batch_size):
    """A corrupt file (read stage) and an all-black one (NaN latents, model stage) in the middle of a
    folder: each is recorded failed at its place in input order, every other input is written.
    Before the pipeline, a batch's read failures were recorded ahead of its good inputs."""
    src = tmp_path / "in"
    folder(src, 7, corrupt=(3,), black=(4,))
    summary = run(stand_in, src, tmp_path / "out", batch_size=batch_size, queue_depth=depth)
    assert (summary.ok, summary.failed, summary.skipped) == (5, 2, 0)
    got = rows(tmp_path / "out")
    assert [name for name, _, _ in got] == [f"img{i:02d}.png" for i in range(7)]
    assert [status for _, status, _ in got] == ["ok"] * 3 + ["failed"] * 2 + ["ok"] * 2
    assert [Path(src).name for src, _ in summary.failures] == ["img03.png", "img04.png"]
    assert "not an image" in summary.failures[0][1] and "NaN" in summary.failures[1][1]
    written = sorted(files_in(tmp_path / "out"))
    assert written == sorted(f"img{i:02d}{e}" for i in (0, 1, 2, 5, 6) for e in (".png", ".npy"))
    assert temp_files(tmp_path / "out") == [] and no_pipeline_threads()


def test_the_pipeline_writes_what_the_stages_one_after_another_write(tmp_path, stand_in):
    """Same files byte for byte and the same rows, pipelined or not (stand-in engine: instant)."""
    src = tmp_path / "in"
    folder(src, 9, corrupt=(2,), black=(6,))
    run(stand_in, src, tmp_path / "seq", batch_size=2, queue_depth=0)
    run(stand_in, src, tmp_path / "pipe", batch_size=2)
    assert files_in(tmp_path / "seq") == files_in(tmp_path / "pipe")
    assert rows(tmp_path / "seq") == rows(tmp_path / "pipe")


@pytest.mark.slow
def test_the_pipeline_writes_what_the_stages_one_after_another_write_small_w(tmp_path, small_w):
    """The same with a real checkpoint (32 px, reference backend, fp32): identical bytes."""
    import engine

    eng = engine.load(small_w, backend="reference", precision="fp32")
    src = tmp_path / "in"
    folder(src, 4, corrupt=(1,))
    run(eng, src, tmp_path / "seq", batch_size=2, queue_depth=0)
    summary = run(eng, src, tmp_path / "pipe", batch_size=2)
    assert (summary.ok, summary.failed) == (3, 1)
    seq, pipe = files_in(tmp_path / "seq"), files_in(tmp_path / "pipe")
    assert seq == pipe and len(pipe) == 6
    assert rows(tmp_path / "seq") == rows(tmp_path / "pipe")


# ------------------------------------------------------------------------------------------------
# Bounded queues


class Log:
    """Stage events in the order they happen, across threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[str] = []

    def add(self, what: str) -> None:
        with self.lock:
            self.events.append(what)

    def most_ahead(self, first: str, second: str) -> int:
        """The largest count(first) - count(second) seen at any event."""
        a = b = worst = 0
        for what in self.events:
            a += what == first
            b += what == second
            worst = max(worst, a - b)
        return worst


def instrument(monkeypatch, log: Log, read_s: float = 0.0, model_s: float = 0.0, write_s: float = 0.0) -> None:
    """Log each batch's read start, model start and write start (batch size 1: one item per batch),
    each stage taking at least the given seconds."""
    def logged(what: str, stage, seconds: float):
        def wrapper(*args, **kwargs):
            log.add(what)
            time.sleep(seconds)
            return stage(*args, **kwargs)

        return wrapper

    for name, what, seconds in (("read_items", "read", read_s), ("invert_items", "model", model_s),
                                ("write_item", "write", write_s)):
        monkeypatch.setattr(batch, name, logged(what, getattr(batch, name), seconds))


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("slow, ahead", [("model", "read"), ("write", "model")])
def test_a_stage_runs_at_most_depth_plus_one_batches_ahead_of_a_slow_next_one(tmp_path, stand_in, monkeypatch,
                                                                            depth, slow, ahead):
    """A slow model (writer): the reader (the model) fills the queue between them, D batches, holds
    one more, then waits. Unbounded queues would let it run 10 batches ahead."""
    folder(tmp_path / "in", 10)
    log = Log()
    instrument(monkeypatch, log, **{f"{slow}_s": 0.05})
    assert run(stand_in, tmp_path / "in", tmp_path / "out", queue_depth=depth).ok == 10
    # D queued + 1 in the faster stage's hands; + 1 while the slow one has taken a batch but not yet logged it
    assert depth + 1 <= log.most_ahead(ahead, slow) <= depth + 2
    assert log.most_ahead("read", "write") <= 2 * (depth + 2)
    assert no_pipeline_threads()


def test_without_a_pipeline_each_batch_is_written_before_the_next_is_read(tmp_path, stand_in, monkeypatch):
    folder(tmp_path / "in", 4)
    log = Log()
    instrument(monkeypatch, log)
    run(stand_in, tmp_path / "in", tmp_path / "out", queue_depth=0)
    assert log.events == ["read", "model", "write"] * 4


# ------------------------------------------------------------------------------------------------
# Interruption and errors


def consistent(out: Path, names: list[str]) -> list[str]:
    """Check an interrupted output folder; the inputs recorded ok. Every file is whole (no temp
    file; each PNG decodes, each .npy loads), the ok rows are exactly the inputs with files, and
    each of their files is listed."""
    assert temp_files(out) == []
    ok = [r for r in read_records(out) if r["status"] == "ok"]
    done = sorted(Path(r["input"]).stem for r in ok)
    on_disk = files_in(out)
    assert sorted(on_disk) == sorted(f"{stem}{e}" for stem in done for e in (".png", ".npy"))
    for r in ok:
        assert sorted(Path(p).name for p in r["outputs"]) == sorted(f"{Path(r['input']).stem}{e}" for e in (".png", ".npy"))
    for name in on_disk:
        if name.endswith(".png"):
            Image.open(out / name).load()
        else:
            np.load(out / name)
    assert set(done) <= {Path(n).stem for n in names}
    return done


def test_an_interruption_stops_cleanly_and_a_rerun_does_the_rest(tmp_path, stand_in, monkeypatch):
    """Ctrl-C raised in the model stage (the calling thread) while the writer is busy: the run
    raises KeyboardInterrupt after joining its threads; the folder and the manifest agree; a rerun
    skips what was done and completes the rest, one row per input."""
    names = [p.name for p in folder(tmp_path / "in", 12)]
    log = Log()
    instrument(monkeypatch, log, write_s=0.05)
    invert_items = batch.invert_items
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return invert_items(*args, **kwargs)

    monkeypatch.setattr(batch, "invert_items", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(stand_in, tmp_path / "in", tmp_path / "out")
    assert no_pipeline_threads()
    done = consistent(tmp_path / "out", names)
    assert 1 <= len(done) <= 5, done  # the writer finished what it was writing, not all inverted batches

    monkeypatch.setattr(batch, "invert_items", invert_items)
    summary = run(stand_in, tmp_path / "in", tmp_path / "out")
    assert (summary.ok, summary.skipped, summary.failed) == (12 - len(done), len(done), 0)
    assert sorted(consistent(tmp_path / "out", names)) == sorted(Path(n).stem for n in names)
    assert len(read_records(tmp_path / "out")) == 12


def test_an_error_in_the_writer_thread_stops_the_run_with_that_error(tmp_path, stand_in, monkeypatch):
    """The manifest cannot be written (disk full) at the third record: the run raises that OSError
    (as the sequential run did), its threads joined; the rows written before it stay."""
    folder(tmp_path / "in", 8)
    append = Manifest.append
    calls = []

    def full(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return append(self, *args, **kwargs)

    monkeypatch.setattr(Manifest, "append", full)
    with pytest.raises(OSError, match="No space left"):
        run(stand_in, tmp_path / "in", tmp_path / "out")
    assert no_pipeline_threads()
    assert [status for _, status, _ in rows(tmp_path / "out")] == ["ok", "ok"]


@pytest.mark.slow
def test_ctrl_c_of_a_real_engine_run_then_a_rerun_completes(tmp_path, small_w):
    """SIGINT to a real `python -m engine.run` once its first output is written: exit 130 with the
    resume hint, no temp or partial file, the manifest lists exactly the inputs whose files are
    written; the rerun (same command) does the rest and only the rest."""
    names = [p.name for p in folder(tmp_path / "in", 6)]
    out = tmp_path / "out"
    env = {**os.environ, "PSP_ENGINE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "engine.run", "--input", str(tmp_path / "in"), "--output", str(out),
            "--checkpoint", str(small_w), "--backend", "reference", "--precision", "fp32", "--save-latents"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    t0 = time.monotonic()
    while not (out / "img00.png").exists():
        assert proc.poll() is None, f"exited {proc.returncode} too early: {proc.stderr.read()}"
        assert time.monotonic() - t0 < 300, "timed out"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130 and "interrupted: " in err and "rerun the same command" in err, err
    assert not (out / LOCK_NAME).exists()
    done = consistent(out, names)
    assert 1 <= len(done) < 6, done

    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{6 - len(done)} ok, 0 failed, {len(done)} skipped" in rerun.stderr
    assert sorted(consistent(out, names)) == [Path(n).stem for n in names]
    assert len(read_records(out)) == 6


# ------------------------------------------------------------------------------------------------
# PNG: one setting, the service's bytes are engine.run's


def test_png_outputs_are_lossless_at_the_project_level(tmp_path, stand_in, shared):
    """engine.run's .png is Pillow's PNG at `PNG_COMPRESS_LEVEL` (not the default level 6, which is
    slower: benchmarks/RESULTS.md, issue 20) and decodes to the pixels it was made from."""
    import io

    face = np.asarray(Image.open(shared / "data" / "faces" / "aligned" / "psp_input_img.jpg").convert("RGB"))
    path = tmp_path / "face.png"
    atomic_write_image(path, face)
    want = io.BytesIO()
    Image.fromarray(face).save(want, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    default = io.BytesIO()
    Image.fromarray(face).save(default, format="PNG")
    assert path.read_bytes() == want.getvalue() == png_bytes(face)
    assert PNG_COMPRESS_LEVEL == 6 or want.getvalue() != default.getvalue()
    assert np.array_equal(np.asarray(Image.open(path)), face)


@pytest.mark.slow
def test_the_services_png_bytes_are_engine_runs(tmp_path, stand_in):
    """The service answers with `engine.serve.app.png_bytes`: for each image engine.run wrote, the
    service's bytes of the same pixels are the file's bytes."""
    pytest.importorskip("ray.serve", reason="engine.serve needs Ray Serve (pip install -e '.[serve]')")
    from engine.serve import app

    folder(tmp_path / "in", 3)
    run(stand_in, tmp_path / "in", tmp_path / "out")
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 3
    for p in pngs:
        assert app.png_bytes(np.asarray(Image.open(p))) == p.read_bytes(), p.name
