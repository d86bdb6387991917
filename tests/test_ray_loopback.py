"""Every Ray instance this project starts itself listens on the loopback only (issue 18, item 1).

`engine.run --ray local` and `python -m engine.serve` run in a real second process with HOME and the
engine's cache in temp folders; the listening TCP sockets of the whole process tree (driver, GCS,
raylet, agents, workers, Serve's actors) are read from /proc while it runs and every one must be on
127.0.0.1 / ::1; the token and Ray's session files must be in the private 0700 folder, and nothing
may appear in `$HOME/.ray`. A two-node cluster on the loopback (`_ray_cluster.py two-nodes`, token
authentication on) is joined with `engine.run --ray ADDRESS` and must give the single-process run's
bytes (same thread count, batch size 1, as `tests/test_distributed.py`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from _ray_cluster import MARK_ENV, environ_of, is_loopback, kill_marked, listening_sockets, marked_processes, \
    process_tree
from engine import run
from engine.manifest import MANIFEST_NAME

pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[serve]'")

from engine.cluster import ray_local  # noqa: E402 - imports ray

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FACES = ("psp_input_img.jpg", "restyle_face_img.jpg")
STRICT_LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}  # what the local instance binds (node address 127.0.0.1)
RAY_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_TMPDIR",
           ray_local.CLUSTER_ENV)


@pytest.fixture(scope="module")
def inputs(shared, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("in")
    for name in FACES:
        shutil.copy(shared / "data" / "faces" / "aligned" / name, d / name)
    return d


@pytest.fixture
def short_dir():
    """A fresh 0700 folder under /tmp with a short path (Ray's unix sockets go below it)."""
    d = Path(tempfile.mkdtemp(prefix="psp-rl-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def user_env(home: Path, cache: Path, marker: str) -> dict[str, str]:
    """The environment of a user who has no Ray settings: HOME and the engine cache in temp folders."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV and k != "PYTEST_CURRENT_TEST"}  # Ray reads it
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home), "PSP_ENGINE_CACHE": str(cache), MARK_ENV: marker,
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


class Watch:
    """Polls a process tree: the union of its listening sockets, and the GCS server's environment and command line."""

    def __init__(self, roots):
        self.roots = list(roots)
        self.sockets: set = set()
        self.gcs_env: dict[str, str] = {}
        self.gcs_cmd = ""

    def poll(self) -> None:
        pids = process_tree(self.roots)
        self.sockets |= listening_sockets(pids)
        if not self.gcs_cmd:
            for pid in pids:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                if "gcs_server" in cmd.split(" ", 1)[0]:
                    self.gcs_cmd, self.gcs_env = cmd, environ_of(pid)

    def check(self, strict: bool = True, allow=lambda s: False) -> None:
        assert len({port for *_, port in self.sockets}) >= 3, f"too few sockets seen to judge: {self.sockets}"
        bad = sorted(s for s in self.sockets
                     if not (s[2] in STRICT_LOOPBACK if strict else is_loopback(s[2])) and not allow(s))
        assert not bad, "listening beyond the loopback:\n" + "\n".join(f"  {a}:{p}  pid {pid}  {cmd[:100]}"
                                                                    for pid, cmd, a, p in bad)


def check_private(folder: Path, watch: Watch, home: Path) -> None:
    """The token and Ray's session under `folder` (0700, token 0600), used by the GCS; nothing in ~/.ray."""
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    token = folder / ray_local.TOKEN_NAME
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    assert watch.gcs_env.get("RAY_AUTH_MODE") == "token", "the GCS runs without token authentication"
    assert watch.gcs_env.get("RAY_AUTH_TOKEN_PATH") == str(token)
    assert f"--session-dir={folder / ray_local.TEMP_NAME}/session_" in watch.gcs_cmd, watch.gcs_cmd[:300]
    assert list((folder / ray_local.TEMP_NAME).glob("session_*/logs")), "no Ray session in the private folder"
    assert not (home / ".ray").exists(), f"Ray wrote into the user's home: {list((home / '.ray').iterdir())}"


def test_private_folder_and_token(tmp_path, short_dir, monkeypatch):
    """`<cache>/ray` made 0700 (and put back to 0700), a 0600 token made once and reused; a cache
    path too long for Ray's unix sockets falls back to /tmp/psp-engine-ray-<uid>; a link refused."""
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(short_dir / "cache"))
    folder = ray_local.private_folder()
    assert folder == short_dir / "cache" / "ray" and stat.S_IMODE(folder.stat().st_mode) == 0o700
    token = ray_local.auth_token(folder)
    text = token.read_text()
    assert len(text) == 64 and int(text, 16) >= 0 and stat.S_IMODE(token.stat().st_mode) == 0o600
    os.chmod(folder, 0o755)
    assert ray_local.private_folder() == folder and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert ray_local.auth_token(folder).read_text() == text, "the token was made again"
    assert not [p for p in folder.iterdir() if p.name != "auth_token"], "a temp file was left"

    monkeypatch.setenv("PSP_ENGINE_CACHE", "/tmp/" + "c" * 80)
    fallback = ray_local.private_folder()
    assert fallback == Path(f"/tmp/psp-engine-ray-{os.getuid()}") and stat.S_IMODE(fallback.stat().st_mode) == 0o700
    assert not Path("/tmp/" + "c" * 80).exists()

    monkeypatch.setenv("PSP_ENGINE_CACHE", str(tmp_path / "cache2"))
    (tmp_path / "cache2").mkdir()
    (tmp_path / "cache2" / "ray").symlink_to(short_dir)
    monkeypatch.setattr(ray_local, "SOCKET_TAIL", 0)  # tmp_path is long: keep the cache folder
    with pytest.raises(ray_local.UsageError, match=r"cache2/ray: is not a folder \(a link or a file\)"):
        ray_local.private_folder()


def test_ray_local_refuses_a_bad_private_folder(inputs, small_w, short_dir, tmp_path, capsys, monkeypatch):
    """`engine.run --ray local` with `<cache>/ray` a file: one line naming it and the fix, exit 2, before Ray starts."""
    monkeypatch.setenv("PSP_ENGINE_CACHE", str(short_dir))
    (short_dir / "ray").write_text("")
    rc = run.main(["--input", str(inputs), "--output", str(tmp_path / "out"), "--checkpoint", str(small_w),
                   "--backend", "engine", "--precision", "fp32", "--ray", "local"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == (f"error: {short_dir}/ray: is not a folder (a link or a file) and would hold Ray's token; remove "
                       "it, or set PSP_ENGINE_CACHE to a folder of yours (it holds Ray's files in ray/)")


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:6379", True), ("localhost:6379", True), ("[::1]:6379", True), ("127.0.0.2:1", True),
    ("10.0.0.5:6379", False), ("head:6379", False), ("auto", False), ("ray://127.0.0.1:10001", False),
])
def test_is_loopback_address(address, loopback):
    assert ray_local.is_loopback_address(address) is loopback


@pytest.mark.slow
def test_run_ray_local_listens_on_loopback_only(inputs, small_w, short_dir, tmp_path):
    """`python -m engine.run --ray local` (a real second process): every listening socket of its
    process tree on the loopback, token auth on, the token and session in the private folder."""
    home, cache, marker = tmp_path / "home", short_dir / "cache", f"run-{os.getpid()}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "engine.run", "--input", str(inputs), "--output", str(tmp_path / "out"),
           "--checkpoint", str(small_w), "--backend", "engine", "--precision", "fp32", "--ray", "local"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=user_env(home, cache, marker), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    watch = Watch([proc.pid])
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None:
            assert time.monotonic() < deadline, "engine.run --ray local did not end in 600 s"
            watch.poll()
            time.sleep(0.5)
        err = proc.stderr.read().decode()
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_marked(marker)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(f.replace(".jpg", ".png") for f in FACES)
    watch.check()
    check_private(cache / "ray", watch, home)


@pytest.mark.slow
def test_serve_listens_on_loopback_only(small_w, short_dir, tmp_path):
    """`python -m engine.serve` (a real second process) until /readyz answers: every listening socket
    of its process tree (Serve's controller, proxy and replica included) on the loopback."""
    home, cache, marker = tmp_path / "home", short_dir / "cache", f"serve-{os.getpid()}-{time.time_ns()}"
    port = free_port()
    cmd = [sys.executable, "-m", "engine.serve", "--checkpoint", str(small_w), "--backend", "engine",
           "--precision", "fp32", "--port", str(port)]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=user_env(home, cache, marker), stdout=out, stderr=out,
                                start_new_session=True)
    watch = Watch([proc.pid])
    try:
        deadline = time.monotonic() + 600
        while not healthy(f"http://127.0.0.1:{port}/readyz"):  # the model loaded: every server is up
            assert proc.poll() is None, f"engine.serve ended: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /readyz in 600 s: {log.read_text()[-3000:]}"
            watch.poll()
            time.sleep(0.5)
        for _ in range(10):  # the replica's and proxy's servers are up by now; look a few more times
            watch.poll()
            time.sleep(0.3)
        assert any(p == port for *_, p in watch.sockets), "the HTTP proxy's socket was not seen"
        # `kill` (SIGTERM) stops it as Ctrl-C does: Ray's own SIGTERM handler (installed by ray.init)
        # used to kill the driver at once and leave Ray's agents running (engine.cluster.ray_local._keep_sigterm)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert "stopped:" in log.read_text().splitlines()[-1], log.read_text()[-3000:]
        deadline = time.monotonic() + 30
        while marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not marked_processes(marker), "processes of the service outlived it"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_marked(marker)
    # Ray Serve 2.60 binds each replica's inter-deployment gRPC server to "[::]:0" in code; the
    # deployment rebinds it to 127.0.0.1 (engine.cluster.ray_local.loopback_replica_grpc): no exception here.
    assert any(s[1].startswith("ray::ServeReplica") for s in watch.sockets), "the replica's sockets were not seen"
    watch.check()
    check_private(cache / "ray", watch, home)


def free_port() -> int:
    """A port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_two_node_cluster_on_loopback_same_files_as_single_process(inputs, small_w, short_dir, tmp_path):
    """A head and a second node on 127.0.0.1 with token auth (the token in a 0700 folder); `engine.run
    --ray ADDRESS` from a user's shell (the token in its environment) writes the single-process bytes."""
    opts = ["--checkpoint", str(small_w), "--backend", "engine", "--precision", "fp32", "--batch-size", "1",
            "--save-latents"]
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # an actor's thread count
    try:
        assert run.main(["--input", str(inputs), "--output", str(single), *opts]) == 0
    finally:
        torch.set_num_threads(threads)

    token = short_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    marker = f"cluster-{os.getpid()}-{time.time_ns()}"
    env = {**user_env(tmp_path / "home", short_dir / "cache", marker), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "RAY_TMPDIR": str(short_dir)}
    log = tmp_path / "cluster.log"
    with open(log, "wb") as f:
        cluster = subprocess.Popen([sys.executable, str(TESTS / "_ray_cluster.py"), "two-nodes"], cwd=REPO, env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=f, start_new_session=True)
    try:
        address = cluster.stdout.readline().decode().strip()
        assert address.startswith("127.0.0.1:"), f"the cluster did not start: {log.read_text()[-3000:]}"
        out = tmp_path / "ray"
        driver = subprocess.run([sys.executable, "-m", "engine.run", "--input", str(inputs), "--output", str(out),
                                 *opts, "--ray", address], cwd=REPO, env=env, capture_output=True, timeout=600)
        assert driver.returncode == 0, driver.stderr.decode()[-3000:]
        watch = Watch(marked_processes(marker))
        watch.poll()
    finally:
        cluster.stdin.close()
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(cluster.pid, signal.SIGKILL)
            cluster.wait()
        kill_marked(marker)
    files = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))  # noqa: E731
                       if p.is_file() and p.name != MANIFEST_NAME}
    got, want = files(out), files(single)
    assert sorted(want) == sorted(f.replace(".jpg", s) for f in FACES for s in (".npy", ".png"))
    assert sorted(got) == sorted(want) and [k for k in want if got[k] != want[k]] == [], "bytes differ"
    assert len({pid for pid, cmd, *_ in watch.sockets if cmd.split(" ", 1)[0].endswith("/raylet")}) == 2, \
        "the cluster does not have two nodes (raylets)"
    watch.check()
    assert not (tmp_path / "home" / ".ray").exists()
