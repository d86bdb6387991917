"""`engine.run --ray`: the distributed run on a local Ray cluster (2 CPUs) against the single-process run.

Inputs: three shared aligned faces plus three bad files; the model: the session's 32 px learn_in_w
checkpoint (`small_w`: the driver and every actor load it, so the cheapest load keeps the Ray runs
short; the pipeline does not depend on the model). Both runs mix (K=1, styles 4-7), edit, couple
and save latents, on the fp32 `engine` backend at batch size 1 with torch on one thread (an actor's
thread count), so every output file must be byte-identical.

Ray runs cost tens of seconds each on CI's 2 cores, so each run checks several things: the run with
a killed actor reads and writes `file://` URIs (pyarrow's LocalFileSystem: listing, fetching,
uploading, the manifest's copies and resuming from them), the run with a killed driver uses local
paths, and the `--align` run reads its photo from a zip archive through fsspec (`zip://`, a scheme
pyarrow does not know), in every read task's own process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from _ray_cluster import local_ray
from engine import run
from engine.cluster import remote
from engine.cluster.distributed import FAULT_ENV
from engine.manifest import MANIFEST_NAME, read_records


FACES = ("hyperstyle_pitt_256.jpg", "psp_input_img.jpg", "restyle_face_img.jpg")
BAD = {"bad.jpg": b"not an image", "empty.png": b"", "truncated.jpg": None}


@pytest.fixture(scope="module")
def ray_mod():
    """The module's local Ray instance (`_ray_cluster.local_ray`), shut down when the module ends."""
    with local_ray() as ray:
        yield ray


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
def options(tmp_path_factory, small_w) -> list[str]:
    """The 32 px learn_in_w checkpoint (IR-SE-50 into one w): the cheapest to load in the driver and
    in each actor, which every Ray run here does; the pipeline does not depend on the model."""
    edit = tmp_path_factory.mktemp("edit") / "dir.npy"
    np.save(edit, np.random.RandomState(3).randn(512).astype(np.float32))
    return ["--checkpoint", str(small_w), "--backend", "engine", "--precision", "fp32", "--batch-size", "1",
            "--save-latents", "--couple-outputs", "--n-outputs", "1", "--latent-mask", "4-7", "--seed", "5",
            "--edit", f"{edit}:0.5"]


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
            if p.is_file() and p.name != MANIFEST_NAME}


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
    assert ({Path(k).name: sorted(r["outputs"]) for k, r in recs.items()}  # keys: paths, or URIs
            == {Path(k).name: sorted(r["outputs"]) for k, r in latest(single).items()})


@pytest.mark.slow
def test_uris_same_files_as_single_process_survive_a_killed_actor_and_resume(ray_mod, inputs, options, single,
                                                                           tmp_path, monkeypatch, capsys):
    """`file://` URIs in and out. The actor dies at its 2nd batch (after uploading outputs); Ray
    restarts it and retries the batch. Reruns resume from the manifest copied to the output URI."""
    marker = tmp_path / "die"
    marker.write_text("2")
    monkeypatch.setenv(FAULT_ENV, str(marker))
    copies = []
    push = remote.RemoteOutput.push_manifest
    monkeypatch.setattr(remote.RemoteOutput, "push_manifest", lambda self: (copies.append(1), push(self)))
    monkeypatch.setattr(remote, "SYNC_RECORDS", 2)
    out = tmp_path / "out"
    argv = [*options, "--output", out.as_uri(), "--ray", "local"]
    assert run.main(["--input", inputs.as_uri(), *argv]) == 1
    assert not marker.exists(), "the fault was not injected: no actor reached its 2nd batch"
    check_same_as_single(out, single, inputs)
    records = read_records(out)  # the copy at the output URI
    counts = Counter(r["input"] for r in records)
    assert set(counts) == {f"{inputs.as_uri()}/{name}" for name in [*FACES, *BAD]}
    assert set(counts.values()) == {1}, f"an input recorded more than once: {counts}"
    ok = [r for r in records if r["status"] == "ok"]
    assert all(set(r["timings_ms"]) == {"read", "encode", "synthesize", "write"} for r in ok)
    assert len(copies) >= 1 + (len(FACES) + len(BAD)) // 2, "the manifest was not copied every 2 records"
    staging = remote.RemoteOutput(out.as_uri()).staging
    assert (staging / MANIFEST_NAME).read_bytes() == (out / MANIFEST_NAME).read_bytes()
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".psp-tmp", ".lock"))]

    # Reruns on the faces alone (each as its own URI: the same keys) from another machine's view: no
    # staging copy, so only the URI's manifest says they are done.
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != MANIFEST_NAME}
    faces = [f"{inputs.as_uri()}/{name}" for name in FACES]
    capsys.readouterr()
    shutil.rmtree(staging)
    assert run.main(["--input", *faces, *argv]) == 0
    assert "nothing to do: all 3 inputs are done" in capsys.readouterr().err  # the check before the model loads
    shutil.rmtree(staging)
    assert run.main(["--input", *faces, *argv, "--trust-pickle"]) == 0  # loads the model: the driver's own skip
    assert "0 ok, 0 failed, 3 skipped" in capsys.readouterr().err
    assert read_records(out) == records, "a rerun of done inputs added records"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != MANIFEST_NAME} == written


@pytest.mark.slow
def test_rerun_after_a_killed_driver(ray_mod, inputs, options, single, tmp_path):
    """A driver killed (SIGKILL) after its first record; the rerun completes, each input once ok."""
    out = tmp_path / "out"
    address = ray_mod.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "engine.run", "--input", str(inputs), "--output", str(out), *options,
           "--ray", address]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 600  # Ray's start and the model loads take minutes on a busy CI machine
    try:
        while not (manifest.is_file() and any(json.loads(line)["status"] == "ok"
                                              for line in manifest.read_text().splitlines() if line.endswith("}"))):
            assert proc.poll() is None, f"the driver ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the driver recorded no result in 600 s"
            time.sleep(0.05)
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


@pytest.mark.slow
def test_align_reads_a_zip_through_fsspec_same_files_as_single_process(ray_mod, shared, small_w, tmp_path):
    """`--align` under `--ray local` gives the single-process `--align` run's files; its photo is read
    from a zip archive by fsspec (`zip://`) in the read task's process."""
    pytest.importorskip("fsspec", reason="fsspec is not installed")
    try:
        from engine import align

        align.model_path()
    except (ImportError, align.AlignmentSetupError) as e:
        msg = f"face alignment needs dlib and its models (pip install -e '.[align]'): {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    photo = shared / "data" / "faces" / "unaligned" / "hyperstyle_face_image.jpg"  # one face, 582x768
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(photo, photo.name)
    opts = ["--checkpoint", str(small_w), "--backend", "engine", "--precision", "fp32",
            "--align", "--save-aligned", "--save-latents"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # an actor's thread count
    try:
        assert run.main(["--input", str(photo), "--output", str(tmp_path / "single"), *opts]) == 0
    finally:
        torch.set_num_threads(threads)
    uri = f"zip://::{archive.as_uri()}"
    assert run.main(["--input", uri, "--output", str(tmp_path / "ray"), *opts, "--ray", "local"]) == 0
    got, want = files(tmp_path / "ray"), files(tmp_path / "single")
    assert sorted(want) == [f"hyperstyle_face_image{s}" for s in (".npy", ".png", "_aligned.png")]
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want), "files differ from the single process"
    [rec] = read_records(tmp_path / "ray")
    assert rec["input"] == f"zip://{photo.name}::{archive.as_uri()}" and rec["status"] == "ok"


def test_uri_listing_and_names_match_the_local_scan(tmp_path):
    """A `file://` folder lists the files `engine.inputs.find_inputs` finds, in its order, with its
    output names (hidden names and other extensions skipped, the output folder excluded)."""
    from engine.inputs import find_inputs, plan_jobs

    src = tmp_path / "in"
    for name in ["b.jpg", "a.PNG", "notes.txt", ".hidden.jpg", "sub/z.jpg", "sub/.cache/c.jpg", "a/x.png",
                 "out/old.png"]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"x")
    output = remote.RemoteOutput((src / "out").as_uri() + "/")
    assert output.uri == (src / "out").as_uri()
    local = plan_jobs(find_inputs([str(src)], exclude=src / "out"))
    uri = remote.plan_jobs(remote.find_inputs([src.as_uri()], output))
    assert [str(j.source) for j in uri] == [p.as_uri() for p in (j.source for j in local)]
    assert [j.base for j in uri] == [j.base for j in local] == [PurePosixPath(n) for n in ("a", "b", "a/x", "sub/z")]
    assert remote.join_uri("s3://b/in/?region=x", "a/b.jpg") == "s3://b/in/a/b.jpg?region=x"
    assert remote.join_uri("zip://::file:///p.zip", "a.jpg") == "zip://a.jpg::file:///p.zip"
    assert remote.is_uri("file:///x") and remote.is_uri("simplecache::s3://b/k") and not remote.is_uri("./a://b")
    with pytest.raises(ValueError, match="would leave the output folder"):
        output.locate("../escape.png")


@pytest.mark.parametrize("argv, message", [
    (["--ray", "local", "--output", "nosuch://bucket/out"],
     ("--output nosuch://bucket/out: no filesystem knows the scheme 'nosuch'; pyarrow.fs knows file, s3, gs, hdfs "
      "and abfs; for another scheme install its fsspec package (e.g. pip install s3fs, gcsfs, adlfs)")),
    (["--ray", "local", "--input", "file://{tmp}/missing"], "--input file://{tmp}/missing: no such file or folder"),
    (["--output", "file://{tmp}/out"], ("--output file://{tmp}/out: URIs are read and written by the distributed "
                                        "run; add --ray local to run it on this machine")),
    (["--num-actors", "2"], "--num-actors, --cpus-per-actor and --gpus-per-actor need --ray ADDRESS"),
])
def test_usage_errors(argv, message, inputs, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    message = message.replace("{tmp}", str(tmp_path))
    if "--input" not in argv:
        argv = ["--input", str(inputs), *argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "out")]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {message}" or err[-1].startswith(f"error: {message}")
    assert sum("error:" in line for line in err) == 1, err
