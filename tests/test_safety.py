"""Nothing lost, nothing overwritten, nothing silent (issue 10, items 1-5): one test per fault class.

Classes: outputs that would overwrite inputs or leave `--output` (folder overlap, symlinks, dot
names, odd characters, long names); non-finite values (checkpoint tensors, per-item latents and
images, edits beyond float32); one run per output folder (lock, manifest proportional to the
inputs); interruptions (SIGKILL, SIGTERM, temp files swept); errors a user can cause (files that
are not checkpoints, refused pickles, options checked before the model loads).

Most tests need no model (they stop before the load) or use a stand-in engine; the CLI runs use a
32 px learn_in_w checkpoint (the cheapest encoder and generator) and images drawn here, so nothing
needs the shared test data.
"""

from __future__ import annotations

import argparse
import contextlib
import fractions
import gzip
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from PIL import Image

from engine import latents as lt
from engine import run, synthesize
from engine.batch import RunOptions, Summary, check_output_names, run_jobs
from engine.inputs import Job, find_inputs, plan_jobs
from engine.manifest import MANIFEST_NAME, InputStat, Manifest, read_records
from reference.plumbing import files as rfiles
from reference import load_psp, save_checkpoint
from reference.checkpoint import UnsafeLoadWarning, read_checkpoint
from reference.plumbing.cli import ArgumentParser, run_cli
from reference.plumbing.errors import CheckpointError, UsageError
from reference.plumbing.files import (LOCK_NAME, NAME_MAX, TEMP_SUFFIX, FolderBusyError, atomic_write_bytes, folder_lock,
                             is_under, temp_path)
from reference.psp import load_mapping

REPO = Path(__file__).resolve().parents[1]
N_STYLES = 8  # of the small_w checkpoint (tests/conftest.py)


# ------------------------------------------------------------------------------------------------
# Helpers


def call(main, argv) -> tuple[int, str]:
    """`main(argv)` with stderr captured: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


def error_line(err: str) -> str:
    """The one `error:` line of a CLI's stderr (fails when there is not exactly one)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def draw_png(path: Path, value: int = 128, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value // 2, 255 - value)).save(path, "PNG")
    return path


def temp_files(*folders: Path) -> list[Path]:
    return [p for d in folders for p in d.rglob(f"*{TEMP_SUFFIX}")]


@pytest.fixture(scope="module")
def small_dict(small_w) -> dict:
    """The checkpoint of `small_w`, loaded (memory-mapped; never mutate: copy the dicts)."""
    return torch.load(small_w, map_location="cpu", weights_only=True, mmap=True)


class StandIn:
    """An `engine.api.Engine` stand-in for the run loops: 8 styles, 8 px images, no weights.

    encode: w_plus = the input's mean, except NaN for an all-black input (x = -1 everywhere).
    synthesize: the mean of w, except +Inf pixels when that mean is above 0.9 (an all-white input).
    """

    label_nc, input_nc, n_styles, output_size = 0, 3, N_STYLES, 8
    backend, precision = "stand-in", "fp32"
    device = torch.device("cpu")

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)  # [B]
        w = m[:, None, None].expand(-1, N_STYLES, 512).clone()
        w[m < -0.99] = float("nan")
        return w

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(z)  # mixed into every style (mask 0-7), a mix renders +Inf

    def synthesize(self, w_plus: torch.Tensor, resize: bool = False) -> torch.Tensor:
        m = w_plus.flatten(1).mean(1)  # [B]
        img = m.clamp(-1, 1)[:, None, None, None].expand(-1, 3, 8, 8).clone()
        img[m > 0.9] = float("inf")
        return img


@pytest.fixture
def stand_in(tmp_path) -> StandIn:
    ckpt = tmp_path / "stand_in.pt"
    ckpt.write_bytes(b"stand-in")  # the manifest's config stats the checkpoint
    return StandIn(ckpt)


# ------------------------------------------------------------------------------------------------
# 1. Outputs never overwrite inputs and never leave --output


@pytest.mark.parametrize("layout", ["same", "symlink", "input_inside_output", "trailing_dot"])
def test_output_folder_overlapping_an_input_folder_is_refused(tmp_path, layout):
    src = draw_png(tmp_path / "in" / "a.png")
    before = src.read_bytes()
    inputs, output = {
        "same": (tmp_path / "in", tmp_path / "in"),
        "symlink": (tmp_path / "in", tmp_path / "link"),
        "input_inside_output": (tmp_path / "in", tmp_path),
        "trailing_dot": (tmp_path / "in", Path(f"{tmp_path}/in/sub/..")),
    }[layout]
    if layout == "symlink":
        (tmp_path / "link").symlink_to(tmp_path / "in", target_is_directory=True)
    # a checkpoint that does not exist: the refusal must come before any load
    rc, err = call(run.main, ["--input", inputs, "--output", output, "--checkpoint", tmp_path / "nope.pt"])
    line = error_line(err)
    assert rc == 2 and "--output" in line and "nope.pt" not in line, err
    assert src.read_bytes() == before and sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.png"]


def test_output_folder_inside_an_input_folder_is_not_searched(tmp_path):
    draw_png(tmp_path / "in" / "a.png")
    draw_png(tmp_path / "in" / "out" / "a.png")  # a previous run's output
    draw_png(tmp_path / "elsewhere" / "b.png")
    (tmp_path / "in" / "via_link").symlink_to(tmp_path / "in" / "out", target_is_directory=True)
    found = find_inputs([str(tmp_path / "in")], exclude=tmp_path / "in" / "out")
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["in/a.png"]
    # the output folder named through a symlink is the same folder
    (tmp_path / "out_link").symlink_to(tmp_path / "in" / "out", target_is_directory=True)
    assert find_inputs([str(tmp_path / "in")], exclude=tmp_path / "out_link") == found


@pytest.mark.parametrize("inputs,options", [
    (["a.png"], []),  # its own output
    (["x.npy"], ["--save-latents"]),  # named files are taken whatever their extension
    (["c.jpg", "c_grid.jpg"], ["--n-outputs", "1"]),
    (["d.jpg", "sub/e.jpg", "d_coupled.jpg"], ["--couple-outputs"]),
])
def test_an_input_file_is_never_an_output(tmp_path, inputs, options):
    out = tmp_path / "out"
    srcs = [draw_png(out / n) for n in inputs]
    before = [s.read_bytes() for s in srcs]
    rc, err = call(run.main, ["--input", *srcs, "--output", out, "--checkpoint", tmp_path / "nope.pt", *options])
    assert rc == 2 and "would be overwritten" in error_line(err), err
    assert [s.read_bytes() for s in srcs] == before


ODD_NAMES = ["..png", "...png", ".png", "a..png", "-rf.png", "sp ace.png", "new\nline.png", "back\\slash.png",
             "ünï cödé.png", "日本.png", "x.PNG", os.fsdecode(b"bad\xff\xfe.png"), "sub/..png", "sub/deeper/...png"]


@pytest.mark.parametrize("save_aligned", [False, True])
def test_output_names_stay_inside_the_output_folder(tmp_path, save_aligned):
    files = [draw_png(tmp_path / "in" / n) for n in ODD_NAMES]
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "bystander.png").write_bytes(b"must stay")
    jobs = plan_jobs(files)
    opts = RunOptions(out_dir=out, save_latents=True, couple_outputs=True, n_outputs=2, save_aligned=save_aligned)
    check_output_names(jobs, opts)  # no collision, nothing outside, no input overwritten
    paths = [p for j in [*jobs, *(j.face(1) for j in jobs)]
             for p in j.outputs(out, True, True, 2, save_aligned).values()]
    assert len({str(p).casefold() for p in paths}) == len(paths)
    for p in paths:
        assert is_under(p.parent, out) and p.name not in (".", "..")
        assert os.path.realpath(p).startswith(os.path.realpath(out) + os.sep), p
        atomic_write_bytes(p, b"x")  # writable where it is named
    assert (tmp_path / "bystander.png").read_bytes() == b"must stay"
    assert sorted(os.listdir(tmp_path)) == ["bystander.png", "in", "out"]


@pytest.mark.parametrize("base", ["..", ".", "", "a/../b", "/abs/x", "a/.."])
def test_a_base_that_would_leave_the_output_folder_is_refused(tmp_path, base):
    with pytest.raises(ValueError, match="would leave the output folder"):
        Job(tmp_path / "x.png", PurePosixPath(base)).outputs(tmp_path / "out", True, True)


def test_a_symlinked_output_subfolder_pointing_elsewhere_is_refused(tmp_path):
    files = [draw_png(tmp_path / "in" / "a.png"), draw_png(tmp_path / "in" / "sub" / "b.png")]
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UsageError, match="outside the --output folder"):
        check_output_names(plan_jobs(files), RunOptions(out_dir=tmp_path / "out"))


@pytest.mark.parametrize("name", ["a" * 250 + ".png", "é" * 125 + ".png", os.fsdecode(b"\xff" * 250) + ".png",
                                  "b" * 255])
def test_long_names_fit_the_temp_names(tmp_path, name):
    target = tmp_path / name
    tmp = temp_path(target)
    assert len(os.fsencode(tmp.name)) <= NAME_MAX and tmp.name.endswith(TEMP_SUFFIX) and tmp.parent == tmp_path
    atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data" and temp_files(tmp_path) == []


def test_unusual_input_names_are_recorded(tmp_path):
    src = os.fsdecode(b"odd\xff.png")
    out = tmp_path / "out"
    with Manifest(out, {}) as m:
        m.append(InputStat(str(tmp_path / src), 1, 1), "ok", outputs=[out / src])
    (rec,) = read_records(out)
    assert rec["input"] == str(tmp_path / src) and rec["outputs"] == [src]


# ------------------------------------------------------------------------------------------------
# 2. Non-finite values are failures


@pytest.mark.parametrize("where", ["encoder", "decoder", "latent_avg"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused(small_dict, where, bad):
    sd = dict(small_dict["state_dict"])
    key = {"encoder": "encoder.linear.weight", "decoder": "decoder.convs.3.conv.weight",
           "latent_avg": "latent_avg"}[where]
    ckpt = dict(small_dict, state_dict=sd)
    poisoned = (small_dict if where == "latent_avg" else sd)[key].clone()
    poisoned.view(-1)[7] = bad
    if where == "latent_avg":
        ckpt["latent_avg"] = poisoned
    else:
        sd[key] = poisoned
    with pytest.raises(CheckpointError, match=rf"{key} holds NaN/Inf .*re-download"):
        load_psp(ckpt)


def test_float64_weights_beyond_float32_are_refused(small_dict):
    sd = dict(small_dict["state_dict"])
    sd["decoder.style.2.bias"] = sd["decoder.style.2.bias"].double().index_fill_(0, torch.tensor([3]), 1e300)
    with pytest.raises(CheckpointError, match="decoder.style.2.bias holds NaN/Inf"):
        load_psp(dict(small_dict, state_dict=sd))


def test_a_mapping_network_with_non_finite_weights_is_refused(small_dict, tmp_path):
    style = {k: v.clone() for k, v in small_dict["state_dict"].items() if k.startswith("decoder.style.")}
    style["decoder.style.5.weight"][0, 0] = float("nan")
    save_checkpoint(style, tmp_path / "mapping.pt")
    with pytest.raises(CheckpointError, match=r"5\.weight holds NaN/Inf"):
        load_mapping(tmp_path / "mapping.pt")


def test_non_finite_items_fail_and_the_run_goes_on(tmp_path, stand_in):
    ins = tmp_path / "in"
    ins.mkdir()
    files = [ins / "black.png", draw_png(ins / "gray.png", 128), ins / "white.png"]
    Image.new("RGB", (40, 40), (0, 0, 0)).save(files[0])
    Image.new("RGB", (40, 40), (255, 255, 255)).save(files[2])
    opts = RunOptions(out_dir=tmp_path / "out", save_latents=True, batch_size=3)
    with Manifest(opts.out_dir, opts.config(stand_in)) as m:
        summary = run_jobs(stand_in, plan_jobs(files), opts, m)
    assert (summary.ok, summary.failed) == (1, 2)
    reasons = {Path(r["input"]).stem: r["error"] for r in read_records(opts.out_dir) if r["status"] == "failed"}
    assert "NaN/Inf latents" in reasons["black"] and "NaN/Inf image" in reasons["white"]
    assert sorted(p.name for p in opts.out_dir.iterdir()) == sorted([MANIFEST_NAME, "gray.npy", "gray.png"])


def test_non_finite_mixes_fail_their_input(tmp_path, stand_in):
    files = [draw_png(tmp_path / "in" / "gray.png", 128)]
    opts = RunOptions(out_dir=tmp_path / "out", n_outputs=2, latent_mask=tuple(range(N_STYLES)))
    with Manifest(opts.out_dir, opts.config(stand_in)) as m:
        summary = run_jobs(stand_in, plan_jobs(files), opts, m)
    assert (summary.ok, summary.failed) == (0, 1) and "NaN/Inf mixed images" in summary.failures[0][1]
    assert sorted(p.name for p in opts.out_dir.iterdir()) == [MANIFEST_NAME]


def test_synthesize_fails_non_finite_renders(tmp_path, stand_in):
    lat = tmp_path / "lat"
    lat.mkdir()
    np.save(lat / "fine.npy", np.zeros((N_STYLES, 512), np.float32))
    np.save(lat / "hot.npy", np.ones((N_STYLES, 512), np.float32))  # the stand-in renders +Inf
    opts = synthesize.SynthOptions(out_dir=tmp_path / "out", batch_size=2)
    with Manifest(opts.out_dir, opts.config(stand_in)) as m:
        summary = synthesize.run_latents(stand_in, plan_jobs(sorted(lat.iterdir())), opts, m)
    assert (summary.ok, summary.failed) == (1, 1) and "NaN/Inf image" in summary.failures[0][1]
    assert sorted(p.name for p in opts.out_dir.iterdir()) == ["fine.png", MANIFEST_NAME]


@pytest.mark.parametrize("text", ["d.npy:1e39", "d.npy:-3.5e38", "d.npy:inf", "d.npy:nan", "d.npy:-Infinity"])
def test_edit_strengths_beyond_float32_are_refused(text):
    with pytest.raises(UsageError, match="float32"):
        lt.parse_edit(text)


@pytest.mark.parametrize("values,edits", [
    (np.full(512, 1e30, np.float32), ["1e10"]),  # strength x direction overflows
    (np.full(512, 1e300, np.float64), ["1"]),  # a float64 direction beyond float32
    (np.full(512, 3e38, np.float32), ["1", "1"]),  # each fits, the sum does not
])
def test_edit_directions_that_overflow_are_refused(tmp_path, values, edits):
    np.save(tmp_path / "d.npy", values)
    parsed = [lt.parse_edit(f"{tmp_path / 'd.npy'}:{s}") for s in edits]
    with pytest.raises(lt.LatentFileError, match="float32"):
        lt.load_edits(parsed, N_STYLES)


# ------------------------------------------------------------------------------------------------
# 3. One run per output folder; the manifest stays proportional to the inputs


HOLD = ("import sys, time; from reference.plumbing.files import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)\n")


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    draw_png(tmp_path / "in" / "a.png")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, err = call(run.main, ["--input", tmp_path / "in", "--output", out, "--checkpoint", tmp_path / "nope.pt"])
        line = error_line(err)
        assert rc == 2 and f"pid {holder.pid} on {socket.gethostname()}" in line, err
        holder.kill()  # SIGKILL: the kernel drops the flock; the lock file stays behind
        holder.wait()
        assert (out / LOCK_NAME).exists()
        with folder_lock(out):  # taken over
            assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert not (out / LOCK_NAME).exists(), "released and removed"
    finally:
        holder.kill()
        holder.wait()


def test_without_flock_a_dead_holders_lock_is_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(rfiles, "fcntl", None)
    lock = tmp_path / LOCK_NAME
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "then"}))
    with folder_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(FolderBusyError, match=f"pid {os.getppid()}"):
        with folder_lock(tmp_path):
            pass


def test_the_lock_is_released_on_error(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with folder_lock(tmp_path):
            raise KeyboardInterrupt
    with folder_lock(tmp_path):
        with pytest.raises(FolderBusyError):  # the same process, a second holder: busy too
            with folder_lock(tmp_path):
                pass


def test_reruns_add_no_records(tmp_path, stand_in):
    files = [draw_png(tmp_path / "in" / f"{i}.png", 60 + 40 * i) for i in range(3)]
    opts = RunOptions(out_dir=tmp_path / "out")
    for attempt in range(3):
        with Manifest(opts.out_dir, opts.config(stand_in)) as m:
            summary = run_jobs(stand_in, plan_jobs(files), opts, m)
        assert (summary.ok, summary.skipped) == ((3, 0) if attempt == 0 else (0, 3))
    records = read_records(opts.out_dir)
    assert len(records) == 3 and {r["status"] for r in records} == {"ok"}


def test_the_manifest_is_compacted_to_what_a_rerun_needs(tmp_path):
    srcs = [draw_png(tmp_path / f"{n}.png") for n in "abc"]
    out = tmp_path / "out"
    a, b, c = (InputStat.of(s) for s in srcs)
    with Manifest(out, {"opt": 1}) as m:
        for _ in range(4):
            m.append(a, "failed", error="boom")
            m.append(a, "ok", outputs=["a.png"])
            m.append(a, "skipped", outputs=["a.png"])  # as older versions recorded no-op skips
        m.append(b, "ok", outputs=["b.png"])
        m.append(c, "ok", outputs=["c.png"])
        m.append(c, "skipped", error="no face found")  # newer than its ok: kept with it
    with open(out / MANIFEST_NAME, "ab") as f:
        f.write(b'{"torn')
    for name in "abc":
        (out / f"{name}.png").write_bytes(b"x")
    with Manifest(out, {"opt": 1}) as m:
        assert m.done(a) and m.done(b) and m.done(c)
    kept = [(Path(r["input"]).stem, r["status"]) for r in read_records(out)]
    assert kept == [("a", "ok"), ("b", "ok"), ("c", "ok"), ("c", "skipped")]
    assert len((out / MANIFEST_NAME).read_bytes().splitlines()) == 4


# ------------------------------------------------------------------------------------------------
# 4. Interruptions leave nothing behind after the next run


def test_claiming_the_output_folder_sweeps_stale_temp_files(tmp_path, monkeypatch):
    out, cache = tmp_path / "out", tmp_path / "cache"
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(cache))
    stale = [out / f".a.png.0badf00d{TEMP_SUFFIX}", out / "sub" / f".b.npy.12345678{TEMP_SUFFIX}",
             cache / "onnx" / f".graph.onnx.deadbeef{TEMP_SUFFIX}"]
    kept = [out / "a.png", out / "notes.tmp", out / f"visible{TEMP_SUFFIX}", cache / "onnx" / f".fresh.onnx.1{TEMP_SUFFIX}"]
    for p in stale + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    export_dir = cache / "onnx" / f".g.encoder.onnx.c0ffee00{TEMP_SUFFIX}"  # a killed export's atomic_files folder
    (export_dir / "g.encoder.onnx.data").parent.mkdir(parents=True)
    (export_dir / "g.encoder.onnx.data").write_bytes(b"w" * 100)
    hour_ago = time.time() - 2 * run.CACHE_TEMP_AGE_S
    for p in (stale[2], export_dir):  # the cache's: only old ones (another process may be exporting)
        os.utime(p, (hour_ago, hour_ago))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), run.claim_output_folder(out):
        assert (out / LOCK_NAME).exists()
    assert not any(p.exists() for p in stale + [export_dir]) and all(p.exists() for p in kept)
    assert "removed 4 temp files" in err.getvalue()
    with run.claim_output_folder(tmp_path / "never_used"):
        pass
    assert not (tmp_path / "never_used").exists(), "a folder the run created and left empty is removed"


def test_atomic_files_appear_together_or_not_at_all(tmp_path):
    """`atomic_files` (an ONNX graph and its weights): on success both appear, the graph last; on an
    error (a kill mid-export is swept by the next run, above) neither does, and no temp is left."""
    from reference.plumbing.files import atomic_files

    dest = tmp_path / "cache" / "m.onnx"
    with atomic_files(dest) as tmp:
        (tmp / "m.onnx.data").write_bytes(b"w" * 10)
        (tmp / "m.onnx").write_bytes(b"g")
    assert dest.read_bytes() == b"g" and (tmp_path / "cache" / "m.onnx.data").read_bytes() == b"w" * 10
    with pytest.raises(KeyboardInterrupt), atomic_files(tmp_path / "cache" / "n.onnx") as tmp:
        (tmp / "n.onnx.data").write_bytes(b"w")
        raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m.onnx", "m.onnx.data"]


def _start(args: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.run", *map(str, args)], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, f"exited {proc.returncode} too early: {proc.stderr.read()}"
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_and_sigterm_mid_run_then_a_rerun_completes(tmp_path, small_w):
    """Three `engine.run` processes on one folder: SIGKILLed while loading, SIGTERMed after the first
    output, then a rerun that completes. Four inputs (one encode each, ~1 s): three still to do when
    SIGTERM comes. The runs use one torch thread, as the xdist workers do (tests/conftest.py)."""
    ins, out = tmp_path / "in", tmp_path / "out"
    names = ["a.png", "b.png", "c.png", "l" * 246 + ".png"]  # a name of 250 characters too
    for i, n in enumerate(names):
        draw_png(ins / n, 30 + 50 * i)
    env = {**os.environ, "PSP_ENGINE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["--input", ins, "--output", out, "--checkpoint", small_w, "--backend", "reference", "--save-latents"]
    out.mkdir()
    (out / f".a.png.0badf00d{TEMP_SUFFIX}").write_bytes(b"half")  # as a kill mid-write leaves

    # SIGKILL while the model loads: nothing cleans up; the lock's holder is dead
    proc = _start(args, env)
    _wait_for(lambda: (out / LOCK_NAME).exists(), proc)
    proc.kill()
    proc.wait()

    # SIGTERM once the first output is written: handled as Ctrl-C
    proc = _start(args, env)
    _wait_for(lambda: (out / "a.png").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130 and "interrupted: " in err and "rerun the same command" in err, err
    assert not (out / LOCK_NAME).exists()

    proc = _start(args, env)
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 0, err
    assert temp_files(out, tmp_path / "cache") == [] and not (out / LOCK_NAME).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_NAME] + [n[:-4] + e for n in names for e in (".png", ".npy")])
    records = read_records(out)
    assert sorted(Path(r["input"]).name for r in records if r["status"] == "ok") == sorted(names)
    assert len(records) == len(names), "no duplicate or no-op rows"


# ------------------------------------------------------------------------------------------------
# 5. Errors a user can cause name the file and the fix, and only give advice that works


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, fmt)
    return buf.getvalue()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, w=np.zeros(3))
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "hello")
    return buf.getvalue()


NOT_CHECKPOINTS = [
    ("x.jpg", lambda: _image_bytes("JPEG"), "a JPEG image"),
    ("x.pt", lambda: _image_bytes("PNG"), "a PNG image"),
    ("x.gif", lambda: _image_bytes("GIF"), "a GIF image"),
    ("x.webp", lambda: _image_bytes("WEBP"), "a WebP image"),
    ("x.bmp", lambda: _image_bytes("BMP"), "a BMP image"),
    ("x.tif", lambda: _image_bytes("TIFF"), "a TIFF image"),
    ("w.npy", lambda: b"\x93NUMPY\x01\x00" + b"{}" * 40, "a NumPy .npy array"),
    ("w.npz", _npz, "a NumPy .npz archive"),
    ("a.zip", _zip, "a zip archive without a PyTorch checkpoint"),
    ("g.onnx", lambda: b"\x08\x07\x12\x07pytorch\x1a\x032.1" + bytes(range(256)), "an ONNX graph"),
    ("p.plan", lambda: bytes(range(256)) * 4, "a TensorRT plan"),
    ("README.md", lambda: b"# psp-engine\nFast inference.\n", "a text file"),
    ("psp.pt", lambda: b"\n  <!DOCTYPE html><html><body>Google Drive can't scan this file", "an HTML page"),
    ("lfs.pt", lambda: b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1\n", "a Git LFS pointer"),
    ("x.pt.gz", lambda: gzip.compress(b"abc"), "a gzip-compressed file"),
]


@pytest.mark.parametrize("name,content,what", NOT_CHECKPOINTS, ids=[n[0] for n in NOT_CHECKPOINTS])
def test_files_that_are_not_checkpoints_are_named(tmp_path, name, content, what):
    path = tmp_path / name
    path.write_bytes(content())
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path, trust_pickle=True)  # never unpickled, whatever the flag
    msg = str(e.value)
    assert msg.startswith(f"{path} is {what}") and "--checkpoint" in msg and "trust" not in msg, msg


def test_a_folder_a_fifo_and_an_unreadable_file(tmp_path, monkeypatch):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "psp_ffhq_encode.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file.*psp_ffhq_encode\.pt"):
        read_checkpoint(tmp_path / "ckpts")
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match="is not a regular file"):  # and it does not block on the pipe
        read_checkpoint(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        read_checkpoint(tmp_path / "missing.pt")
    locked = tmp_path / "locked.pt"
    locked.write_bytes(b"\x80\x02}q\x00.")

    def denied(*args, **kwargs):  # root reads any file: refuse the open as a chmod 000 file would be refused
        raise PermissionError(13, "Permission denied", str(locked))

    monkeypatch.setattr("reference.checkpoint.open", denied, raising=False)
    with pytest.raises(CheckpointError, match="permission denied: make the checkpoint readable"):
        read_checkpoint(locked)


@pytest.mark.parametrize("obj,refused", [(argparse.Namespace(a=1), "argparse.Namespace"),
                                         (fractions.Fraction(1, 3), "fractions.Fraction")])
def test_a_refused_global_is_named_in_full_and_trust_pickle_warns(tmp_path, obj, refused):
    path = tmp_path / "old.pt"
    torch.save({"opts": obj, "w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=rf"of type {refused}, which safe loading .* --trust-pickle"):
        read_checkpoint(path)
    parser = ArgumentParser(prog="t")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = run_cli(parser, lambda args: len(read_checkpoint(path, trust_pickle=True)) - 2, [])
    assert rc == 0 and err.getvalue().count("\n") == 1, err.getvalue()
    assert err.getvalue().startswith(f"warning: {path}: loaded with full unpickling (--trust-pickle)")
    assert refused in err.getvalue()
    with pytest.warns(UnsafeLoadWarning):
        read_checkpoint(path, trust_pickle=True)


@pytest.mark.parametrize("content", [b"\x80\x02garbage", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00"])
def test_a_damaged_pickle_gets_no_trust_pickle_advice(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="damaged or not a PyTorch checkpoint") as e:
        read_checkpoint(tmp_path / "bad.pt")
    assert "trust" not in str(e.value)


@pytest.mark.parametrize("extra,message", [
    (["--resize-factor", "x"], "--resize-factor"),
    (["--resize-factor", "0"], "--resize-factor"),
    (["--resize-factor", "1000"], "--resize-factor"),
    (["--n-outputs", "1"], "would both write"),  # a.png's a_mix0.png and the input a_mix0.png
    (["--largest-face"], "only used with --align"),
])
def test_options_are_checked_before_the_model_loads(tmp_path, extra, message):
    draw_png(tmp_path / "in" / "a.png")
    draw_png(tmp_path / "in" / "a_mix0.png")
    out = tmp_path / "out"
    rc, err = call(run.main, ["--input", tmp_path / "in", "--output", out, "--checkpoint", tmp_path / "nope.pt",
                              *extra])
    assert rc == 2 and message in err and "nope.pt" not in err, err
    assert not out.exists(), "no output folder, no empty manifest"


def test_counts_read_as_english():
    assert "1 image in" in Summary(ok=1, seconds=1.0).format()
    assert "2 images in" in Summary(ok=2, seconds=1.0).format()
    assert "1 image in" in synthesize.SynthSummary(ok=1, images=1, seconds=1.0).format()


# ------------------------------------------------------------------------------------------------
# reference.plumbing.child: memory-heavy steps in a spawned child process


def _child_counts(n: int, notify) -> int:
    for i in range(n):
        notify(("step", i, os.getpid()))
    return os.getpid()


def _child_fails(kind: str, notify) -> None:
    notify("started")
    if kind == "usage":
        raise UsageError("bad option --x; use --y")
    if kind == "unpicklable":
        class Local(Exception):  # a local class does not pickle
            pass
        raise Local("from a local exception class")
    os._exit(3)  # dies without an answer (as the kernel's OOM killer would leave it)


def test_call_in_child_relays_messages_result_and_errors():
    """Messages arrive in order from another process, the result comes back, the child's exception
    is raised here with its type, and a child that dies without a word is a clear RuntimeError."""
    from reference.plumbing.child import call_in_child

    messages: list = []
    child_pid = call_in_child(_child_counts, (3,), messages.append, what="test step")
    assert child_pid != os.getpid(), "ran in this process"
    assert messages == [("step", i, child_pid) for i in range(3)]
    seen: list = []
    with pytest.raises(UsageError, match="bad option --x; use --y"):
        call_in_child(_child_fails, ("usage",), seen.append)
    assert seen == ["started"]
    with pytest.raises(RuntimeError, match="Local: from a local exception class"):
        call_in_child(_child_fails, ("unpicklable",))
    with pytest.raises(RuntimeError, match=r"the test step died \(exit code 3; out of memory\?\); rerun the command"):
        call_in_child(_child_fails, ("die",), what="test step")


# ------------------------------------------------------------------------------------------------
# 5. An output is tied to the input it was made from; 6. bounds on every size a file declares


def _run_argv(src: Path, out: Path, ckpt: Path, *extra) -> list:
    return ["--input", src, "--output", out, "--checkpoint", ckpt, "--backend", "reference", "--precision", "fp32",
            *extra]


@pytest.mark.slow
def test_another_folders_input_does_not_replace_an_output(tmp_path, small_w):
    """a/x.png into out/, then b/x.png (other content) into out/: b stops naming both files (a real
    `python -m engine.run` process, exit 1) and out/x.png stays a's; --overwrite replaces it, and a
    rerun of a/ is then not "done" (its output was made from b) until it is redone."""
    a, b, out = draw_png(tmp_path / "a" / "x.png", 40), draw_png(tmp_path / "b" / "x.png", 200), tmp_path / "out"
    assert call(run.main, _run_argv(a.parent, out, small_w))[0] == 0
    made_from_a = (out / "x.png").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "engine.run", *map(str, _run_argv(b.parent, out, small_w))],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    failed = [ln for ln in proc.stderr.splitlines() if ln.startswith("failed:")]
    assert len(failed) == 1 and str(b) in failed[0] and str(a) in failed[0] and "--overwrite" in failed[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "x.png").read_bytes() == made_from_a
    rc, err = call(run.main, _run_argv(a.parent, out, small_w))
    assert rc == 0 and "nothing to do" in err, err

    assert call(run.main, _run_argv(b.parent, out, small_w, "--overwrite"))[0] == 0
    assert (out / "x.png").read_bytes() != made_from_a
    rc, err = call(run.main, _run_argv(a.parent, out, small_w))
    assert rc == 1 and "nothing to do" not in err and f"made from another input, {b}" in err, err
    rc, err = call(run.main, _run_argv(a.parent, out, small_w, "--overwrite"))
    assert rc == 0 and "1 ok" in err, err
    assert (out / "x.png").read_bytes() == made_from_a
    records = {(Path(r["input"]).parent.name, r["status"]) for r in read_records(out)}
    assert ("a", "ok") in records and all(isinstance(r["input_sha256"], str) for r in read_records(out))


def test_a_moved_folder_is_the_same_input(tmp_path, small_w, monkeypatch):
    """The same files under another path are the same inputs (same digests): nothing to do, the model
    not loaded; a file of it changed afterwards is another input's content: a conflict."""
    src = tmp_path / "a"
    for i, v in enumerate((40, 120)):
        draw_png(src / f"{i}.png", v)
    out = tmp_path / "out"
    assert call(run.main, _run_argv(src, out, small_w))[0] == 0
    moved = tmp_path / "moved"
    src.rename(moved)
    from engine import api

    monkeypatch.setattr(api, "load_planned", lambda *a, **k: pytest.fail("api.load was called"))  # every load
    rc, err = call(run.main, _run_argv(moved, out, small_w))
    assert rc == 0 and "nothing to do" in err, err


def test_inputs_matched_by_path_content_and_owner(tmp_path, stand_in):
    """`Manifest.done`/`conflict` on the stand-in run loop: same content elsewhere is done, other
    content elsewhere conflicts (recorded failed, nothing written), `overwrite` replaces."""
    a, b = draw_png(tmp_path / "a" / "x.png", 40), draw_png(tmp_path / "b" / "x.png", 200)
    copy = tmp_path / "c" / "x.png"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    opts = RunOptions(out_dir=tmp_path / "out")

    def run_one(src: Path, **kw) -> Summary:
        o = RunOptions(out_dir=opts.out_dir, **kw)
        with Manifest(o.out_dir, o.config(stand_in)) as m:
            return run_jobs(stand_in, plan_jobs([src]), o, m)

    assert run_one(a).ok == 1
    before = (opts.out_dir / "x.png").read_bytes()
    assert run_one(copy).skipped == 1, "a copy of a's bytes is a's input"
    s = run_one(b)
    assert (s.failed, s.ok) == (1, 0) and str(a) in s.failures[0][1]
    assert (opts.out_dir / "x.png").read_bytes() == before
    assert run_one(b, overwrite=True).ok == 1 and (opts.out_dir / "x.png").read_bytes() != before
    assert run_one(copy).failed == 1, "a's content, but the output is now b's"


def _huge_npy(path: Path, shape: tuple) -> Path:
    """A ~1 KiB .npy whose header declares `shape` float32 (the data is not there)."""
    from numpy.lib import format as npy_format

    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        f.write(b"\0" * 1000)
    return path


def test_declared_npy_sizes_are_checked_before_allocation(tmp_path, small_w):
    """.npy headers declaring (1000000, 14, 512), (1000000, 8, 512) or (1000, 8, 512) in a 1 KiB file: engine.synthesize
    fails each file with its reason and renders the next (exit 1); engine.run --edit refuses the
    direction before loading (exit 2, one line); no MemoryError anywhere."""
    lat = tmp_path / "lat"
    lat.mkdir()
    _huge_npy(lat / "a_wrong_shape.npy", (1000000, 14, 512))
    _huge_npy(lat / "b_too_many.npy", (1000000, N_STYLES, 512))
    _huge_npy(lat / "c_missing_data.npy", (1000, N_STYLES, 512))
    np.save(lat / "d_fine.npy", np.zeros((N_STYLES, 512), np.float32))
    rc, err = call(synthesize.main, ["--latents", lat, "--output", tmp_path / "out", "--checkpoint", small_w,
                                     "--backend", "reference", "--precision", "fp32"])
    assert rc == 1 and "MemoryError" not in err and "Traceback" not in err, err
    assert (tmp_path / "out" / "d_fine.png").is_file() and "1 ok, 3 failed" in err
    failures = {Path(r["input"]).stem: r["error"] for r in read_records(tmp_path / "out") if r["status"] == "failed"}
    assert "does not fit this checkpoint (8 styles)" in failures["a_wrong_shape"]
    assert f"a batch of 1000000 latents; at most {lt.MAX_LATENT_BATCH}" in failures["b_too_many"]
    assert "declares shape [1000, 8, 512]" in failures["c_missing_data"]
    assert "but the file holds 1000;" in failures["c_missing_data"]

    rc, err = call(run.main, ["--input", draw_png(tmp_path / "in" / "x.png"), "--output", tmp_path / "o2",
                              "--checkpoint", small_w, "--edit", _huge_npy(tmp_path / "d.npy", (1000000, 512))])
    assert rc == 2 and "MemoryError" not in err and "Traceback" not in err
    assert str(tmp_path / "d.npy") in error_line(err) and "is neither a W direction" in error_line(err)
    with pytest.raises(lt.LatentFileError, match="MiB accepted"):
        lt.read_npy(_huge_npy(tmp_path / "big.npy", (300, 2**20)))


@pytest.mark.parametrize("k", [lt.MAX_N_OUTPUTS + 1, 100000])
def test_n_outputs_is_bounded(tmp_path, k, capsys):
    assert run.main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--n-outputs", str(k)]) == 2
    assert f"--n-outputs: expected 1 to {lt.MAX_N_OUTPUTS} mixes per input, got {k}" in capsys.readouterr().err


class MixingStandIn(StandIn):
    """`StandIn` whose mapping gives finite mixes; records, per synthesize call, the mix files on disk."""

    def __init__(self, checkpoint: Path, out_dir: Path):
        super().__init__(checkpoint)
        self.out_dir, self.seen = out_dir, []

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        return torch.full_like(z, 0.1)

    def synthesize(self, w_plus: torch.Tensor, resize: bool = False) -> torch.Tensor:
        self.seen.append(sorted(p.name for p in self.out_dir.glob("*_mix*.png")))
        return super().synthesize(w_plus, resize)


def test_mixes_are_written_as_they_are_made(tmp_path, stand_in):
    """With --n-outputs K and batch size 1, mix k is on disk before mix k+1 is rendered (a run holds
    one chunk of renders, not every mix)."""
    out = tmp_path / "out"
    eng = MixingStandIn(stand_in.checkpoint, out)
    opts = RunOptions(out_dir=out, n_outputs=3, latent_mask=(6, 7))
    with Manifest(out, opts.config(eng)) as m:
        summary = run_jobs(eng, plan_jobs([draw_png(tmp_path / "in" / "g.png", 128)]), opts, m)
    assert summary.ok == 1
    assert eng.seen == [[], [], ["g_mix0.png"], ["g_mix0.png", "g_mix1.png"]], eng.seen  # inversion, then mix 0, 1, 2
    assert {p.name for p in out.iterdir()} >= {"g.png", "g_mix2.png", "g_grid.jpg"}


def test_malformed_manifest_lines_are_warned_and_skipped(tmp_path, small_w):
    """A line whose "input" is a list, one that is not JSON: one warning with their line numbers, the
    rerun works (and compacts them away), the next rerun has nothing to do and no warning."""
    src, out = draw_png(tmp_path / "in" / "x.png").parent, tmp_path / "out"
    assert call(run.main, _run_argv(src, out, small_w))[0] == 0
    with open(out / MANIFEST_NAME, "ab") as f:
        f.write(b'{"input": ["a", "b"], "status": "ok", "outputs": []}\nnot json at all\n'
                b'{"input": "/x.png", "status": "ok", "outputs": "x.png"}\n')
    rc, err = call(run.main, _run_argv(src, out, small_w))
    assert rc == 0 and "Traceback" not in err, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ignored")]
    assert len(warnings) == 1 and "3 unreadable line(s)" in warnings[0] and "line 2, 3, 4" in warnings[0], err
    assert "1 skipped" in err and len(read_records(out)) == 1
    rc, err = call(run.main, _run_argv(src, out, small_w))
    assert rc == 0 and "nothing to do" in err and "warning" not in err, err
