"""`engine.run --ray`: the distributed run on a local Ray cluster (2 CPUs) against the single-process run.

Inputs: three shared aligned faces plus three bad files. Both runs mix (K=1), edit, couple and save
latents, on the fp32 `engine` backend at batch size 1 with torch on one thread (an actor's thread
count), so every output file must be byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from _ray_cluster import local_ray
from engine import run
from engine.distributed import FAULT_ENV
from engine.manifest import read_records


FACES = ("hyperstyle_pitt_256.jpg", "psp_input_img.jpg", "restyle_face_img.jpg")
BAD = {"bad.jpg": b"not an image", "empty.png": b"", "truncated.jpg": None}


@pytest.fixture(scope="module")
def ray_mod():
    return local_ray()


@pytest.fixture(scope="module")
def inputs(shared, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("in")
    for name in FACES:
        shutil.copy(shared / "data" / "faces" / "aligned" / name, d / name)
    for name, data in BAD.items():
        if data is None:  # the first 2 kB of a real JPEG
            data = (shared / "data" / "faces" / "aligned" / FACES[1]).read_bytes()[:2048]
        (d / name).write_bytes(data)
    return d


@pytest.fixture(scope="module")
def options(tmp_path_factory, ffhq256_checkpoint) -> list[str]:
    edit = tmp_path_factory.mktemp("edit") / "dir.npy"
    np.save(edit, np.random.RandomState(3).randn(512).astype(np.float32))
    return ["--checkpoint", str(ffhq256_checkpoint), "--backend", "engine", "--precision", "fp32", "--batch-size", "1",
            "--save-latents", "--couple-outputs", "--n-outputs", "1", "--seed", "5", "--edit", f"{edit}:0.5"]


@pytest.fixture(scope="module")
def single(inputs, options, tmp_path_factory) -> Path:
    """The single-process run's output folder (torch on 1 thread, as an actor)."""
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run.main(["--input", str(inputs), "--output", str(out), *options]) == 1  # the bad files fail
    finally:
        torch.set_num_threads(threads)
    return out


def files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "manifest.jsonl"}


def latest(out: Path) -> dict[str, dict]:
    recs = {}
    for r in read_records(out):
        if r["status"] != "skipped" or r["error"]:
            recs[r["input"]] = r
    return recs


def check_same_as_single(out: Path, single: Path, inputs: Path) -> None:
    got, want = files(out), files(single)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"files differ from the single-process run: {differ}"
    assert len(want) == len(FACES) * 6  # png, npy, coupled, mix0 png + npy, grid
    recs = latest(out)
    assert {Path(k).name: r["status"] for k, r in recs.items()} == {
        **{f: "ok" for f in FACES}, **{b: "failed" for b in BAD}}
    assert {k: sorted(r["outputs"]) for k, r in recs.items()} == {k: sorted(r["outputs"]) for k, r in latest(single).items()}


def test_same_files_as_single_process_and_survives_a_killed_actor(ray_mod, inputs, options, single, tmp_path,
                                                                  monkeypatch):
    """The actor dies at its 2nd batch (after writing outputs); Ray restarts it and retries the batch."""
    marker = tmp_path / "die"
    marker.write_text("2")
    monkeypatch.setenv(FAULT_ENV, str(marker))
    out = tmp_path / "out"
    assert run.main(["--input", str(inputs), "--output", str(out), *options, "--ray", "local"]) == 1
    assert not marker.exists(), "the fault was not injected: no actor reached its 2nd batch"
    check_same_as_single(out, single, inputs)
    counts = Counter(r["input"] for r in read_records(out))
    assert set(counts.values()) == {1}, f"an input recorded more than once: {counts}"
    ok = [r for r in read_records(out) if r["status"] == "ok"]
    assert all(set(r["timings_ms"]) == {"read", "encode", "synthesize", "write"} for r in ok)


def test_rerun_after_a_killed_driver(ray_mod, inputs, options, single, tmp_path):
    """A driver killed (SIGKILL) after its first record; the rerun completes, each input once ok."""
    out = tmp_path / "out"
    address = ray_mod.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "engine.run", "--input", str(inputs), "--output", str(out), *options,
           "--ray", address]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.is_file() and any(json.loads(line)["status"] == "ok" for line in manifest.read_text().splitlines()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the driver ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = read_records(out)
    assert 1 <= len(first) < len(FACES) + len(BAD), f"not killed mid-job: {len(first)} records"

    assert run.main(["--input", str(inputs), "--output", str(out), *options, "--ray", "local"]) == 1
    check_same_as_single(out, single, inputs)
    again = read_records(out)[len(first):]  # inputs done before get no new record
    done_before = {r["input"] for r in first if r["status"] == "ok"}
    every = {os.path.abspath(p) for p in inputs.iterdir()}
    assert Counter(r["input"] for r in again) == Counter(every - done_before)
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".psp-tmp"))], "a half-written file was left"


@pytest.mark.parametrize("argv, message", [
    (["--ray", "local", "--output", "s3://bucket/out"], "--output s3://bucket/out: URIs are not supported with --ray"),
    (["--num-actors", "2"], "--num-actors, --cpus-per-actor and --gpus-per-actor need --ray ADDRESS"),
])
def test_usage_errors(argv, message, inputs, tmp_path, capsys):
    argv = ["--input", str(inputs), *argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {message}" or err[-1].startswith(f"error: {message}")
