"""Shared test helpers: the one path helper for ../shared, the session-wide 256 px pSp model, and
the session-wide 32 px learn_in_w checkpoint (the cheapest for CLI runs).

`shared_dir()` and the `shared` fixture are the only way tests find the shared test data
(`data/`, `golden/`); files there are read in place, never copied into the repo.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# numpy's OpenBLAS on one thread (read when numpy loads; nothing has loaded it yet): Triton's
# interpreter runs tl.dot as np.matmul on small tiles, and an idle second BLAS thread spins between
# them (the 256 px golden synthesis in the interpreter: 102 CPU-s on two threads, 59 on one).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Triton kernels run in Triton's CPU interpreter where no GPU exists. The switch is read when a
# kernel is decorated, so it must be set before any test module imports `kernels`.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

# Under pytest-xdist (`-n N`) each worker is a process of its own: the cores are shared out
# (`$OMP_NUM_THREADS`, set by the controller in `pytest_configure`, one thread each on 2 cores), so
# N workers share the cores instead of each starting one thread per core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))

REPO = Path(__file__).resolve().parent.parent


SESSION_ENV = "PSP_TEST_SESSION_DIR"


def pytest_configure(config):
    """One temp folder for the whole test run (`$PSP_TEST_SESSION_DIR`), shared by the pytest-xdist
    workers (they inherit the controller's environment): the engine's cache (`PSP_ENGINE_CACHE`:
    ONNX graphs, compiled models, the demo checkpoint) and the session checkpoints live there, so a
    checkpoint is built and exported once per run, not once per worker; never the user's
    `~/.cache/psp-engine`. Removed at the end by the process that made it. Subprocesses of tests
    inherit it."""
    import tempfile

    config._psp_env_before = {k: os.environ.get(k) for k in (SESSION_ENV, "PSP_ENGINE_CACHE", "OMP_NUM_THREADS")}
    config._psp_session = None
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(SESSION_ENV):
        return  # a worker: the controller's folder
    workers = getattr(config.option, "numprocesses", None)
    if isinstance(workers, int) and workers >= 2 and not os.environ.get("OMP_NUM_THREADS"):
        # The workers and every process they start (CLI runs, Ray actors) size their
        # thread pools from it: torch, OpenBLAS (the Triton interpreter's numpy), and ONNX Runtime
        # and OpenVINO through `export.backends.graph.physical_cores`. Two threads per process on 2 shared
        # cores cost ~1.6x the CPU of one (spinning, measured with ONNX Runtime) and help no one.
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))
    config._psp_session = tempfile.mkdtemp(prefix="psp-test-session-")
    os.environ[SESSION_ENV] = config._psp_session
    os.environ["PSP_ENGINE_CACHE"] = os.path.join(config._psp_session, "cache")


def pytest_unconfigure(config):
    import shutil

    if getattr(config, "_psp_session", None):
        shutil.rmtree(config._psp_session, ignore_errors=True)
        for k, v in config._psp_env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


RUN_SLOW_ENV = "PSP_RUN_SLOW"


def slow_tests_left_out(file_or_dir, markexpr: str, env) -> bool:
    """Whether this run leaves out the tests marked `slow` (the quick set): only a run of the whole
    suite as the README gives it, with no test paths named, no `-m` expression and no
    `PSP_RUN_SLOW=1` (which `.ci/run` sets: CI runs every test). Naming files or nodes runs all of
    them, slow or not; `-m` decides for itself."""
    return not file_or_dir and not markexpr and env.get(RUN_SLOW_ENV) != "1"


def pytest_collection_modifyitems(config, items):
    """The quick set by default (`slow_tests_left_out`): the tests marked `slow` are deselected
    (each xdist worker collects and deselects the same)."""
    if not slow_tests_left_out(config.option.file_or_dir, config.option.markexpr, os.environ):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if slow_tests_left_out(config.option.file_or_dir, config.option.markexpr, os.environ):
        terminalreporter.write_line(
            f"the quick set ran: the tests marked slow were left out; {RUN_SLOW_ENV}=1 runs them too, "
            "as CI does (.ci/run)")


def session_file(name: str, build) -> Path:
    """`$PSP_TEST_SESSION_DIR/ckpt/<name>`, made once per test run by `build(path)` (under a lock:
    the xdist workers share it; the other waits). Tests must not modify it."""
    from filelock import FileLock

    folder = Path(os.environ[SESSION_ENV]) / "ckpt"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with FileLock(folder / f"{name}.lock"):
        if not path.is_file():
            build(path)  # writes atomically (save_checkpoint)
    return path


# The two kinds of CPU this project's machines alternate between, as `reference.plumbing.platform` reads them
# (model name, flags): tests of what `auto` picks fake one of these (`fake_cpu`) instead of depending
# on the CPU that runs them.
CPUS = {
    "zen3": ("AMD EPYC 7B13 (faked by the tests)", frozenset({"avx", "avx2", "fma", "f16c"})),
    "xeon_amx": ("Intel(R) Xeon(R) Platinum 8480+ (faked by the tests)",
                 frozenset({"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                            "amx_tile", "amx_bf16", "amx_int8"})),
}


@pytest.fixture
def fake_cpu(monkeypatch):
    """`fake_cpu("zen3")` / `fake_cpu("xeon_amx")`: make this test's process read that CPU's model name
    and flags (`CPUS`). Patches the one reader, `reference.plumbing.platform._cpuinfo`, so every caller
    (`cpu_flags`, `bf16_units`, `cpu_summary`, `export.backends.auto_precision`) sees the fake."""
    import reference.plumbing.platform as rp

    def fake(kind: str) -> tuple[str, frozenset[str]]:
        model, flags = CPUS[kind]
        monkeypatch.setattr(rp, "_cpuinfo", lambda: (model, flags))
        return model, flags

    return fake


def shared_dir() -> Path:
    """The shared test-data folder: `$PSP_SHARED` if set, else `<repo>/../shared`."""
    env = os.environ.get("PSP_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def shared_missing(d: Path) -> str:
    """Why a test that needs the shared test data cannot run: what the folder is and where it comes from."""
    return (f"shared test data not found at {d}: the folder shared/ that comes beside the checkout (../shared) "
            "with real photos and the official pSp implementation's outputs (not in the repository); "
            "put it there or set PSP_SHARED to where it is")


@pytest.fixture(scope="session")
def shared() -> Path:
    """`shared_dir()`; skips when it is missing, except in CI (`CI=true`), where it fails."""
    d = shared_dir()
    if not d.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{shared_missing(d)}; CI needs it")
        pytest.skip(shared_missing(d))
    return d


@pytest.fixture(scope="session")
def ffhq256_checkpoint() -> Path:
    """`make_checkpoint("ffhq_encode_256", 0)` saved once per test run (about 1 GB, ~10 s), shared by
    the xdist workers (`session_file`), so its ONNX export in the session's engine cache is too.

    The weights of `shared/golden/public_ffhq_encode_256_seed0.npz`.
    """
    from reference import make_checkpoint, save_checkpoint

    return session_file("ffhq_encode_256_seed0.pt",
                        lambda path: save_checkpoint(make_checkpoint("ffhq_encode_256", 0), path))


@pytest.fixture(scope="session")
def psp256(ffhq256_checkpoint):
    """`reference.PSP` of config ffhq_encode_256, seed 0 (eval, fp32, CPU), loaded from `ffhq256_checkpoint`."""
    from reference import load_psp

    return load_psp(ffhq256_checkpoint)


def save_small_w(path: Path, output_size: int) -> Path:
    """Save a learn_in_w pSp (BackboneEncoderUsingLastLayerIntoW, the cheapest encoder) with an
    `output_size` px generator, by the weight rule (seed 0), in the official file layout."""
    import math

    import torch

    from reference import save_checkpoint
    from reference.configs import BASE_OPTS
    from reference.weights import make_state_dict, psp_modules

    opts = {**BASE_OPTS, "encoder_type": "BackboneEncoderUsingLastLayerIntoW", "learn_in_w": True,
            "output_size": output_size, "n_styles": 2 * int(math.log2(output_size)) - 2}
    with torch.device("meta"):
        model = psp_modules(opts)
    la = 0.5 * torch.randn(1, 512, generator=torch.Generator().manual_seed(1))
    return save_checkpoint({"state_dict": make_state_dict(model, 0), "opts": opts, "latent_avg": la}, path)


@pytest.fixture(scope="session")
def small_w() -> Path:
    """`save_small_w` at 32 px (8 styles), once per test run (shared by the xdist workers): the
    cheapest checkpoint for CLI runs (about a second per encode)."""
    return session_file("small_w32.pt", lambda path: save_small_w(path, 32))
