"""The GPU path in one prepared run: environment, kernel parity on CUDA, end-to-end parity, speed.

    python -m benchmarks.gpu_suite --out DIR [--quick] [--dry-run] [--golden FILE.npz] [--seed N]
                                   [--budget-s S]

On one CUDA GPU (made for a lent H200: minutes, not hours), in at most `--budget-s` seconds (default
450 full, 240 `--quick`), it runs and records:

1. `environment`: GPU name, memory, compute capability, driver, CUDA, torch, triton and Python
   versions, and the two ceilings measured on this GPU: device-to-device copy bandwidth (GB/s,
   bytes read + written) and the bf16 / fp16 matmul rate (TFLOP/s, 8192^3 on random data).
2. `kernel_parity`: the kernel tests marked `gpu` (the op table's test files, `kernels.ops`:
   tests/test_bias_act.py, test_upfirdn2d.py, test_modulated_conv2d.py: the same functions the CPU
   suite runs in Triton's interpreter; fp32, fp16, bf16, odd shapes), run by pytest in a subprocess
   with this module as a plugin (`-p benchmarks.gpu_suite`), which (a) poisons every fresh output:
   `torch.empty`, `torch.empty_like` and `torch.empty_strided` return NaN-filled floating tensors
   during each test, so an element a kernel does not write fails the test's NaN check, whatever
   the caching allocator hands out; (b) draws fresh random inputs: `torch.Generator().manual_seed(s)`
   and `torch.manual_seed(s)` mix in the run's `--seed`, recorded so a failure can be rerun;
   (c) writes one JSON line per test. A kernel that kills the process leaves the lines written so far.
3. `e2e_parity`: every CUDA row of the backend registry (`export.backends.BACKENDS`) x each of
   its precisions, loaded through `engine.load` and run through `Engine.invert`, against the fp32
   reference backend (TF32 off) on the same inputs: the golden inputs (`--golden`, or
   `../shared/golden/public_ffhq_encode_256_seed0.npz` where reachable; the reference is also
   checked against the official outputs) and random inputs at 256 and 1024 output. The
   checkpoints are rule checkpoints built here (`reference.make_checkpoint`) in a temporary folder,
   deleted at the end: nothing is carried. Per row: relative error of w_plus and img, worst |diff|,
   NaN/Inf, the share of uint8 pixels more than 2 levels off, pass/fail against the parity table
   (fp32 1e-5; bf16 / fp16: w_plus 1e-2, img 2e-2). A backend whose package is missing
   (tensorrt on the H200) is listed as skipped with that reason.
4. `e2e_speed`: per row, ms per image and images/s at batch 1, 8 and 32 at 1024 output (CUDA
   events around each call, warm-up apart, median), peak GPU memory
   (`torch.cuda.max_memory_allocated`), and for the rows whose model is torch modules on one device
   (engine, triton) the same forward captured as a fixed-batch CUDA graph (`torch.cuda.CUDAGraph`)
   and replayed: its time, whether it paid (>= 3 % faster), or why capture failed.
   `kernel_speed`: per op of the op table and layer shape of the 1024 generator (the ops the
   Triton generator calls first), `benchmarks.gpu_kernels.run_case`
   (triton vs ref vs the official formulation, `triton.testing.do_bench` medians) against the
   roofline of `kernels.inspect` (`PEAKS`, datasheet) and against the ceilings measured in step 1.

Results: `DIR/results.json` (rewritten after every section, so a killed run leaves what it did)
and `DIR/results.md`; the markdown tables are printed last. Exit code 0 when every section ran and
every check passed, 1 when a kernel test or a parity row failed or a section broke, 2 on a usage
error. Without CUDA (and without `--dry-run`) it says so and exits 0: nothing is measured.

`--dry-run` runs the same steps on the CPU, in Triton's interpreter (`TRITON_INTERPRET=1`, set here
before `kernels` is imported, so run it as a fresh process), with a small plan: a 32 px rule pSp
(the smallest the GradualStyleEncoder allows), batch 1, the ceilings on small buffers (a 16 MiB
copy, 256^3 products), the fp32 rows (fp16 / bf16 rows are CUDA only: a CPU without fp16 units
emulates them, minutes per image), a few kernel tests per test function and one kernel-timing case
per op; every timing is labelled `cpu-interpreter`, never GPU figures. That plan has no warm-up
and no repetitions, so an e2e_speed row is one call, and the e2e_parity call on the same engine at
the same batch is that call (`time_row`, `timed_by` in the row): each row's forward runs once, not
twice. tests/test_gpu_suite.py runs it, so the suite cannot rot.

Portability: torch >= 2.11 and triton >= 3.6 (the H200 image) as well as this project's pins; no
API newer than torch 2.11 is used, and version-dependent calls are guarded.

Source: issue 12; /work/.library/device/METHOD.md (two ceilings measured, poisoned outputs, fresh
inputs, events, warm-up apart, medians); house style shared/docs/STYLE.md.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from kernels.ops import OPS, kernel_test_files
from reference.plumbing.cli import ArgumentParser, run_cli, say
from reference.plumbing.files import write_json

REPO = Path(__file__).resolve().parent.parent
KERNEL_TESTS = kernel_test_files()  # the op table's test files (kernels/ops.py)
GOLDEN_NAME = "public_ffhq_encode_256_seed0.npz"
GOLDEN_CONFIG = "ffhq_encode_256"  # the golden vectors' checkpoint: make_checkpoint(GOLDEN_CONFIG, 0)
CONFIG_FOR_SIZE = {256: "ffhq_encode_256", 1024: "ffhq_encode"}
SECTIONS = ("environment", "kernel_parity", "e2e_parity", "e2e_speed", "kernel_speed")
NO_CUDA = ("no CUDA device: the GPU suite needs one (nothing measured); `python -m benchmarks.gpu_suite "
           "--dry-run --out DIR` runs the same steps on the CPU")
GRAPH_PAYS = 0.97  # a CUDA graph "pays" when its replay takes at most this share of the eager time
# the plugin's environment: report file, seed salt, tests kept per test function
ENV_REPORT, ENV_SEED, ENV_PER_FUNCTION = "PSP_GPU_SUITE_REPORT", "PSP_GPU_SUITE_SEED", "PSP_GPU_SUITE_PER_FUNCTION"


# ------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Plan:
    """What one run does.

    Attributes:
        mode: "cuda" or "dry-run" (the CPU, Triton's interpreter).
        parity_sizes: output sizes of the random-input parity (rule checkpoints per size).
        parity_batch: random inputs per size.
        precisions: the precisions run per registry row (dry-run: fp32 only).
        speed_size: the output size timed end to end; speed_batches: its batch sizes.
        warmup, reps: untimed and timed calls per measurement (median of reps).
        graphs: also time a fixed-batch CUDA graph of the engine and triton rows.
        kernel_tests_per_function: gpu-marked tests kept per test function (None: all).
        kernel_tests_k: a pytest `-k` expression narrowing them further (None: all).
        kernel_size, kernel_batches: the generator whose layer shapes the kernels are timed at.
        kernel_ops: ops timed; kernel_cases_per_op: cases kept per op (None: all).
        budget_s: the whole run's time budget; later steps are skipped (and say so) when it is spent.
    """

    mode: str
    parity_sizes: tuple[int, ...]
    parity_batch: int
    precisions: tuple[str, ...]
    speed_size: int
    speed_batches: tuple[int, ...]
    warmup: int
    reps: int
    graphs: bool
    kernel_tests_per_function: int | None
    kernel_tests_k: str | None
    kernel_size: int
    kernel_batches: tuple[int, ...]
    kernel_ops: tuple[str, ...]
    kernel_cases_per_op: int | None
    budget_s: float


GENERATOR_OPS = tuple(o.name for o in OPS if o.generator)  # the ops the Triton generator calls itself
ALL_OPS = GENERATOR_OPS + tuple(o.name for o in OPS if not o.generator)  # the generator's own kernels first
PLANS = {
    "full": Plan("cuda", (256, 1024), 2, ("fp32", "bf16", "fp16"), 1024, (1, 8, 32), 3, 10, True, None, None,
                 1024, (1, 8), ALL_OPS, None, 450.0),
    "quick": Plan("cuda", (256, 1024), 1, ("fp32", "bf16", "fp16"), 1024, (1, 8), 2, 5, True, 6, None,
                  1024, (8,), GENERATOR_OPS, None, 240.0),
    "dry-run": Plan("dry-run", (32,), 1, ("fp32",), 32, (1,), 0, 0, False, 1, "matches_reference",
                    8, (1,), ALL_OPS, 1, 900.0),
}


class Budget:
    """Seconds left of the run's budget."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


# ------------------------------------------------------------------------------------------------
# timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> dict[str, float]:
    """Time `fn`: `warmup` untimed calls, then `reps` timed ones (CUDA events on a GPU, a
    synchronised `perf_counter` on the CPU); the first call is timed apart.

    Returns:
        `{"first_ms", "median_ms", "min_ms", "reps"}`; with `reps=0` the median is the first call.
    """
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times = times or [first]
    return {"first_ms": first, "median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def _free(device: torch.device) -> None:
    """Hand memory back between steps on CUDA: collect the reference cycles that hold tensors, then
    empty the caching allocator. On the CPU (the dry run) there is no cache to empty and tensors go
    with their last reference; a full `gc.collect()` there costs ~0.4 CPU-s per call (torch and
    Dynamo imported) and frees nothing the steps need, so it is left to Python's own collector."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _error(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:500]


# ------------------------------------------------------------------------------------------------
# 1. environment and the two ceilings


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> dict[str, float]:
    """A large device-to-device copy of random data: GB/s counting bytes read plus bytes written."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, warmup=2, reps=reps)
    gbps = 2 * src.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9
    del src, dst
    return {"bytes": 2 * n * 4, "median_ms": t["median_ms"], "gb_per_s": gbps}


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> dict[str, float]:
    """`n^3` matrix product on random data (never zeros: METHOD.md): TFLOP/s, 2 n^3 per product."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, warmup=3, reps=reps)
    del a, b
    return {"n": n, "median_ms": t["median_ms"], "tflops": 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12}


def environment(plan: Plan, device: torch.device) -> dict[str, Any]:
    """Versions, the device, and the two ceilings (copy GB/s, bf16/fp16 matmul TFLOP/s)."""
    import triton

    from reference.plumbing.platform import cpu_summary

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "triton": triton.__version__, "cpu": cpu_summary(), "device_type": device.type}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), compute_capability=f"{p.major}.{p.minor}",
                   multiprocessors=p.multi_processor_count, cuda=torch.version.cuda, driver=_driver_version(),
                   cudnn=torch.backends.cudnn.version(), tf32="off (cudnn.allow_tf32 = matmul.allow_tf32 = False)")
        copy_mib, mm_n, reps = 4096, 8192, 10
        env["timing"] = "cuda-events"
    else:
        env.update(gpu=None, timing="cpu-interpreter: CPU wall clock, not GPU figures")
        # the same code on small buffers (no figure is kept; the fp16/bf16 products are emulated on a
        # CPU: 512^3 took ~1 s per dtype, 256^3 ~0.2 s)
        copy_mib, mm_n, reps = 16, 256, 3
    env["copy"] = copy_bandwidth(device, copy_mib * 2**20, reps)
    env["matmul"] = {name: matmul_rate(device, mm_n, dt, reps)
                     for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16))}
    _free(device)  # hand the buffers back before the tests' processes start
    return env


# ------------------------------------------------------------------------------------------------
# 2. kernel parity: the gpu-marked tests in a pytest subprocess, this module as its plugin


def _kernel_selection(items: list, per_function: int) -> tuple[list, list]:
    """Keep `per_function` items of each test function, spread evenly over its parametrisations
    (so dtypes and shapes both appear); the rest are deselected."""
    groups: dict[tuple[str, str], list] = {}
    for item in items:
        groups.setdefault((str(item.path), getattr(item, "originalname", item.name)), []).append(item)
    keep = set()
    for group in groups.values():
        k = min(per_function, len(group))
        keep.update(id(group[(i * len(group)) // k]) for i in range(k))
    return [i for i in items if id(i) in keep], [i for i in items if id(i) not in keep]


def _collection_modifyitems(session, config, items):  # pytest hook (active under the suite only)
    per = os.environ.get(ENV_PER_FUNCTION)
    if not os.environ.get(ENV_REPORT) or not per:
        return
    kept, dropped = _kernel_selection(list(items), int(per))
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


class _SaltedGenerator(torch.Generator):
    """`torch.Generator` whose `manual_seed(s)` mixes in the suite's seed: fresh inputs, reproducible."""

    def manual_seed(self, seed):  # noqa: D102
        return super().manual_seed(_salted(int(seed)))


def _salted(seed: int) -> int:
    salt = int(os.environ.get(ENV_SEED, "0"))
    return seed if salt == 0 else (seed * 1_000_003 + salt) % 2**63


def _poisoned(alloc: Callable, counter: list[int]) -> Callable:
    """`alloc` (torch.empty, torch.empty_like, torch.empty_strided) returning NaN-filled floating
    tensors (integers untouched), outside `torch.compile` tracing."""

    def wrapped(*args, **kwargs):
        t = alloc(*args, **kwargs)
        if not torch.compiler.is_compiling() and t.is_floating_point():
            t.fill_(float("nan"))
            counter[0] += 1
        return t

    return wrapped


@contextlib.contextmanager
def poisoned_and_salted() -> Iterator[list[int]]:
    """Within the block: fresh float allocations through `torch.empty*` are NaN, and seeds are salted.

    Yields:
        `[count]`: how many allocations were poisoned so far.
    """
    counter = [0]
    saved = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided", "Generator",
                                                      "manual_seed")}
    manual_seed = saved["manual_seed"]
    try:
        for name in ("empty", "empty_like", "empty_strided"):
            setattr(torch, name, _poisoned(saved[name], counter))
        torch.Generator = _SaltedGenerator
        torch.manual_seed = lambda seed: manual_seed(_salted(int(seed)))
        yield counter
    finally:
        for name, f in saved.items():
            setattr(torch, name, f)


try:  # the plugin's hooks that need pytest's markers; pytest is there whenever the suite runs its tests
    import pytest as _pytest

    # after `-m gpu` has deselected the other tests
    pytest_collection_modifyitems = _pytest.hookimpl(trylast=True)(_collection_modifyitems)

    @_pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):  # pytest hook
        if not os.environ.get(ENV_REPORT):
            yield
            return
        with poisoned_and_salted() as counter:
            yield
        item.user_properties.append(("poisoned_allocations", counter[0]))
except ImportError:  # pragma: no cover - pytest missing: the suite reports the kernel tests as failed
    pass


def pytest_runtest_logreport(report):  # pytest hook: one JSON line per test outcome
    path = os.environ.get(ENV_REPORT)
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):  # under pytest-xdist the controller writes every line
        return
    msg = ""
    if report.outcome != "passed":
        longrepr = report.longrepr
        if isinstance(longrepr, tuple):  # a skip: (file, line, reason)
            msg = str(longrepr[2])
        else:
            crash = getattr(getattr(longrepr, "reprcrash", None), "message", None)
            msg = crash or str(longrepr)
    props = dict(report.user_properties)
    line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "duration_s": round(report.duration, 4), "message": msg[:1000],
            "poisoned_allocations": props.get("poisoned_allocations")}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def kernel_parity(plan: Plan, out: Path, seed: int, budget: Budget) -> dict[str, Any]:
    """Run the `gpu`-marked kernel tests in a pytest subprocess (CUDA, or the interpreter in a dry run)."""
    report = out / "kernel_tests.jsonl"
    report.unlink(missing_ok=True)
    env = dict(os.environ, **{ENV_REPORT: str(report), ENV_SEED: str(seed), "PYTHONHASHSEED": str(seed % 2**32)})
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        env.pop(name, None)  # inherited when the suite itself runs inside an xdist worker (its own test)
    if plan.kernel_tests_per_function:
        env[ENV_PER_FUNCTION] = str(plan.kernel_tests_per_function)
    if plan.mode == "dry-run":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    timeout = max(60.0, min(budget.left() * 0.45, 240.0 if plan.mode == "cuda" else 600.0))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *KERNEL_TESTS, "-p", "benchmarks.gpu_suite",
           "-q", "--no-header", "-p", "no:cacheprovider", "-o", "addopts="]
    if plan.kernel_tests_k:
        cmd += ["-k", plan.kernel_tests_k]
    workers = min(8, (os.cpu_count() or 1) // 2)
    if plan.mode == "cuda" and workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]  # Triton compiles each configuration once per process: spread them
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc = None
        tail = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))[-3000:]
    rows = [json.loads(line) for line in report.read_text().splitlines() if line.strip()] if report.exists() else []
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "skipped")}
    errors = [r for r in rows if r["when"] != "call" and r["outcome"] == "failed"]
    counts["failed"] -= len(errors)
    counts["errors"] = len(errors)
    skipped = sorted({r["message"] for r in rows if r["outcome"] == "skipped"})
    result = {
        "command": " ".join(cmd[1:]), "device": "cuda" if plan.mode == "cuda" else "cpu-interpreter",
        "seed": seed, "per_function": plan.kernel_tests_per_function, "exit_code": rc,
        "timed_out": rc is None, "timeout_s": round(timeout), "seconds": round(time.perf_counter() - t0, 1),
        **counts, "tests": len(rows),
        "poisoned_allocations": sum(r.get("poisoned_allocations") or 0 for r in rows),
        "failures": [{"nodeid": r["nodeid"], "message": r["message"]} for r in rows if r["outcome"] == "failed"],
        "skip_reasons": skipped,
        "passed_all": rc == 0 and counts["passed"] > 0 and not errors and counts["failed"] == 0,
    }
    if not result["passed_all"]:
        result["output_tail"] = tail
    return result


# ------------------------------------------------------------------------------------------------
# 3. + 4. end-to-end parity and speed of every CUDA row of the registry


def rule_checkpoint(size: int, folder: Path, seed: int = 0) -> Path:
    """A pSp rule checkpoint of `size` output saved in `folder` (built here from the weight rule,
    never carried): `make_checkpoint("ffhq_encode_256" | "ffhq_encode", seed)` at 256 / 1024; another
    size (the dry run's 32 px) takes ffhq_encode_256's opts with that `output_size`, its state dict
    and latent_avg by the same rule (`reference.weights`)."""
    from reference import make_checkpoint, save_checkpoint

    path = folder / f"rule_{size}_seed{seed}.pt"
    if not path.exists():
        save_checkpoint(make_checkpoint(CONFIG_FOR_SIZE[size], seed) if size in CONFIG_FOR_SIZE
                        else _small_checkpoint(size, seed), path)
    return path


def _small_checkpoint(size: int, seed: int) -> dict:
    from reference.configs import get_config, n_styles_for
    from reference.weights import LATENT_AVG_KEY, draw, make_state_dict, psp_modules

    opts = dict(get_config(GOLDEN_CONFIG).opts(), output_size=size, n_styles=n_styles_for(size))
    with torch.device("meta"):
        modules = psp_modules(opts)
    latent_avg = 0.5 * draw(LATENT_AVG_KEY, (512,), seed)
    return {"state_dict": make_state_dict(modules, seed), "opts": opts,
            "latent_avg": latent_avg.repeat(opts["n_styles"], 1)}


def _compare(out: torch.Tensor, ref: Any, output: str, precision: str, backend: str, against: str) -> dict[str, Any]:
    """One output against its reference under the parity table (`export.compare`): rel error, worst
    |diff|, NaN/Inf, uint8 share (images), pass/fail."""
    from export.compare import compare, parity_tolerance

    tol = parity_tolerance(output, precision, against)
    return compare(out, ref, tol, output=output, backend=backend, against=against).as_dict()


def golden_file(given: Path | None) -> tuple[Path | None, str]:
    """The golden vectors to use and why (or why none): `--golden`, else `$PSP_SHARED/golden/...` or
    `../shared/golden/...` beside the repository."""
    if given is not None:
        return (given, "--golden") if given.is_file() else (None, f"--golden {given}: no such file")
    shared = Path(os.environ["PSP_SHARED"]) if os.environ.get("PSP_SHARED") else REPO.parent / "shared"
    path = shared / "golden" / GOLDEN_NAME
    if path.is_file():
        return path, str(path)
    return None, (f"{path} not found (../shared is not carried to a GPU machine: copy the .npz into the "
                  "repository and pass --golden PATH)")


def registry_rows(plan: Plan) -> list[dict[str, Any]]:
    """Every (backend, precision) the registry offers on CUDA, with why a row is not run (or None)."""
    from export.backends import BACKENDS

    rows = []
    for b in BACKENDS.values():
        for precision in b.precisions.get("cuda", ()):
            skip = None
            if not b.installed():
                skip = f"not installed: backend {b.name!r} needs the {b.package} package"
            elif b.takes != "checkpoint":
                skip = f"backend {b.name!r} runs prebuilt plans (python -m export.tensorrt), not a checkpoint"
            elif precision not in plan.precisions:
                skip = (f"dry-run: {precision} runs on CUDA only (a CPU without fp16/bf16 units emulates it, "
                        "minutes per image in the interpreter)")
            rows.append({"backend": b.name, "precision": precision, "skip": skip})
    return rows


def load_row(path: Path, backend: str, precision: str, device: torch.device):
    """The `Engine` of one registry row: `engine.load` on CUDA; in a dry run the CUDA row's own
    loader on the CPU (`resolve` would refuse a CUDA-only precision there)."""
    import engine
    from engine.api import Engine, LoadPlan
    from export.backends import Choice, load_model

    if device.type == "cuda":
        return engine.load(path, backend=backend, device=str(device), precision=precision)
    choice = Choice(backend, precision, "dry-run: the CUDA row's loader on the CPU")
    return Engine(load_model(choice, path, device), LoadPlan(path, device, choice))


def where_tensors_live(eng) -> dict[str, Any]:
    """Devices and dtypes of the model's parameters and buffers, and the encoder's memory format."""
    model = eng.model
    if not isinstance(model, torch.nn.Module):
        return {}
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    info: dict[str, Any] = {"devices": sorted({str(t.device) for t in tensors}),
                            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors})}
    enc = getattr(model, "encoder", None)
    if enc is not None:
        convs = [m.weight for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
        info["encoder_conv_dtype"] = str(convs[0].dtype).removeprefix("torch.") if convs else None
        info["encoder_channels_last"] = bool(convs) and all(
            w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    return info


def cuda_graph(model, x: torch.Tensor, warmup: int) -> tuple[Callable[[], Any], torch.Tensor]:
    """Capture `model.synthesize(model.encode(x))` at the fixed batch of `x` as one CUDA graph.

    Returns:
        `(replay, static_img)`: replaying writes the image of `x` (the captured input buffer) into
        `static_img`.
    """
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(max(warmup, 2)):  # Triton JIT, cuDNN handles: before capture
            model.synthesize(model.encode(static_x))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        static_img = model.synthesize(model.encode(static_x))
    return graph.replay, static_img


def time_row(eng, plan: Plan, device: torch.device, size: int, seed: int, budget: Budget,
             first_calls: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """End-to-end speed of one loaded row at each batch: eager `Engine.invert`, then its CUDA graph.

    `first_calls` ({batch: ms} of the e2e_parity calls on this engine at this size): a plan without
    warm-up or repetitions (the dry run) times one call per batch, so a batch that e2e_parity
    already ran is timed by that call instead of running the same forward again.
    """
    rows = []
    timing = "cuda-events" if device.type == "cuda" else "cpu-interpreter"
    for batch in plan.speed_batches:
        row: dict[str, Any] = {"backend": eng.backend, "precision": eng.precision, "size": size, "batch": batch,
                               "timing": timing}
        rows.append(row)
        if budget.left() < 20:
            row["skipped"] = "time budget spent"
            continue
        x = (torch.rand(batch, eng.input_nc, eng.encoder_size, eng.encoder_size, generator=torch.Generator().manual_seed(seed + batch)) * 2
             - 1).to(device)
        reuse = plan.warmup == 0 and plan.reps == 0 and batch in (first_calls or {})
        if reuse:
            ms = first_calls[batch]
            row["timed_by"] = "its e2e_parity call (no warm-up, no repetitions in this plan)"
        try:
            _free(device)
            _reset_peak(device)
            t = ({"first_ms": ms, "median_ms": ms, "min_ms": ms, "reps": 0} if reuse
                 else measure(lambda: eng.invert(x), device, plan.warmup, plan.reps))
            row.update(ms_per_image=t["median_ms"] / batch, images_per_s=1e3 * batch / t["median_ms"],
                       median_ms=t["median_ms"], first_ms=t["first_ms"], reps=t["reps"], peak_mib=_peak_mib(device))
        except Exception as e:  # noqa: BLE001 - an OOM or a failure is a result; the other rows still run
            row["error"] = _error(e)
            _free(device)
            continue
        if not plan.graphs or device.type != "cuda":
            row["graph"] = {"skipped": "CUDA graphs need a GPU" if device.type != "cuda" else "not in this plan"}
            continue
        if not isinstance(eng.model, torch.nn.Module):
            row["graph"] = {"skipped": f"backend {eng.backend!r} is no torch module: nothing to capture"}
            continue
        try:
            with torch.inference_mode():
                eager_img = eng.model.synthesize(eng.model.encode(x))
            _reset_peak(device)
            replay, static_img = cuda_graph(eng.model, x, plan.warmup)
            g = measure(replay, device, plan.warmup, plan.reps)
            torch.cuda.synchronize(device)
            ratio = g["median_ms"] / t["median_ms"]
            row["graph"] = {"ms_per_image": g["median_ms"] / batch, "images_per_s": 1e3 * batch / g["median_ms"],
                            "median_ms": g["median_ms"], "vs_eager": ratio, "paid": ratio <= GRAPH_PAYS,
                            "peak_mib": _peak_mib(device),
                            "max_abs_vs_eager": float((static_img.float() - eager_img.float()).abs().max())}
            del replay, static_img, eager_img
        except Exception as e:  # noqa: BLE001 - capture can fail (a host sync, an allocation): say why
            row["graph"] = {"error": _error(e), "paid": False}
        _free(device)
    return rows


def end_to_end(plan: Plan, device: torch.device, seed: int, golden_path: Path | None, golden_why: str,
               work: Path, budget: Budget, record: Callable[[str, dict], None]) -> tuple[dict, dict]:
    """Parity (section e2e_parity) and speed (section e2e_speed) of every CUDA row, one load per row and size."""
    import numpy as np

    from export.backends import BASELINE
    from export.parity import golden_inputs

    rows = registry_rows(plan)
    parity: dict[str, Any] = {"rows": [], "skipped_rows": [r for r in rows if r["skip"]], "golden": golden_why,
                              "device": device.type, "sizes": list(plan.parity_sizes)}
    speed: dict[str, Any] = {"rows": [], "size": plan.speed_size, "batches": list(plan.speed_batches),
                             "timing": "cuda-events" if device.type == "cuda" else "cpu-interpreter: not GPU figures",
                             "placement": {}}
    run = sorted((r for r in rows if not r["skip"]), key=lambda r: r["backend"] != BASELINE)  # baseline first
    golden = None
    if golden_path is not None and plan.mode == "dry-run":
        parity["golden"] = (f"dry-run: skipped ({golden_path} needs the 256 px checkpoint, minutes per image in "
                            "the interpreter; tests/test_golden.py checks it on the CPU)")
    elif golden_path is not None:
        golden = dict(np.load(golden_path))
    for size in sorted(set(plan.parity_sizes) | {plan.speed_size}):
        if budget.left() < 60:
            parity["rows"].append({"size": size, "skipped": "time budget spent"})
            continue
        t0 = time.perf_counter()
        ckpt = rule_checkpoint(size, work, 0)
        build_s = time.perf_counter() - t0
        inputs = {}
        if size in plan.parity_sizes:
            g = torch.Generator().manual_seed(seed)
            inputs["random"] = torch.rand(plan.parity_batch, 3, 256, 256, generator=g) * 2 - 1
            if size == 256 and golden is not None:
                inputs["golden"] = golden_inputs(golden)
        refs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for r in run:
            first_calls: dict[int, float] = {}  # batch -> ms of this row's parity calls (time_row may reuse)
            entry = {"size": size, "backend": r["backend"], "precision": r["precision"], "checkpoint_build_s": build_s}
            if budget.left() < 30:
                parity["rows"].append(dict(entry, skipped="time budget spent"))
                continue
            try:
                t0 = time.perf_counter()
                eng = load_row(ckpt, r["backend"], r["precision"], device)
                entry["load_s"] = time.perf_counter() - t0
                speed["placement"][f"{r['backend']} {r['precision']}"] = where_tensors_live(eng)
            except Exception as e:  # noqa: BLE001
                parity["rows"].append(dict(entry, error=_error(e), passed=False))
                continue
            for name, x in inputs.items():
                e2 = dict(entry, inputs=name, batch=x.shape[0])
                try:
                    t0 = time.perf_counter()
                    img, w_plus = eng.invert(x)
                    _sync(device)
                    e2["run_s"] = time.perf_counter() - t0
                    first_calls.setdefault(int(x.shape[0]), e2["run_s"] * 1e3)
                    img, w_plus = img.cpu(), w_plus.cpu()
                except Exception as e:  # noqa: BLE001
                    parity["rows"].append(dict(e2, error=_error(e), passed=False))
                    continue
                label = f"{r['backend']}:{r['precision']}"
                if r["backend"] == BASELINE:
                    refs[name] = (w_plus, img)
                    e2["baseline"] = True
                elif name in refs:
                    e2["against"] = "reference fp32"
                    e2["w_plus"] = _compare(w_plus, refs[name][0], "w_plus", r["precision"], label, "reference")
                    e2["img"] = _compare(img, refs[name][1], "img", r["precision"], label, "reference")
                else:
                    e2["error"] = "no fp32 reference output to compare with (the reference row failed)"
                if name == "golden":  # every row also against the official outputs
                    e2["golden_w_plus"] = _compare(w_plus, golden["latents"], "w_plus", r["precision"], label, "golden")
                    e2["golden_img"] = _compare(img, golden["images_resize_false"], "img", r["precision"], label,
                                                "golden")
                e2["passed"] = "error" not in e2 and all(
                    e2[k]["passed"] for k in ("w_plus", "img", "golden_w_plus", "golden_img") if k in e2)
                parity["rows"].append(e2)
            if size == plan.speed_size:
                speed["rows"].extend(time_row(eng, plan, device, size, seed, budget, first_calls))
            del eng
            _free(device)
            record("e2e_parity", parity)
    speed["fastest"] = fastest(speed["rows"])
    return parity, speed


def fastest(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per precision, the rows that ran, fastest first (eager ms per image at the largest batch each
    ran): the measurement `export.backends.AUTO_ORDER` is to cite for CUDA."""
    best: dict[tuple[str, str], tuple[int, float]] = {}
    for r in rows:
        if "ms_per_image" in r:
            key = (r["precision"], r["backend"])
            if key not in best or r["batch"] > best[key][0]:
                best[key] = (r["batch"], r["ms_per_image"])
    order: dict[str, list[str]] = {}
    for (precision, backend), (batch, ms) in sorted(best.items(), key=lambda kv: kv[1][1]):
        order.setdefault(precision, []).append(f"{backend} ({ms:.3g} ms/img at batch {batch})")
    return order


# ------------------------------------------------------------------------------------------------
# 5. per-kernel speed against the roofline (benchmarks/gpu_kernels.py's cases and timing)


def kernel_speed(plan: Plan, device: torch.device, env: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """Per op and layer shape: triton / ref / official times (`gpu_kernels.run_case` on CUDA; the
    interpreter and a wall clock in a dry run), the roofline of `kernels.inspect` (datasheet peaks of
    the GPU's arch) and the roofline from the ceilings measured in `environment`."""
    from benchmarks import gpu_kernels as gk
    from kernels.inspect import PEAKS

    cases = gk.build_cases(plan.kernel_size, plan.kernel_batches, plan.kernel_ops)
    cases.sort(key=lambda c: (not c.used, plan.kernel_ops.index(c.op), c.batch))  # what the generator runs first
    if plan.kernel_cases_per_op:
        by_op: dict[str, list] = {}
        for c in sorted(cases, key=lambda c: c.flops):
            by_op.setdefault(c.op, []).append(c)
        cases = [c for op in plan.kernel_ops for c in by_op.get(op, [])[: plan.kernel_cases_per_op]]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        arch = 10 * p.major + p.minor
    else:
        arch = 90  # the dry run reports against the H100/H200 line to exercise the code; not a figure
    peak = PEAKS.get(arch) or PEAKS[max(PEAKS)]
    rate = (env.get("matmul", {}).get("fp16", {}).get("tflops") or 0) * 1e12
    bw = (env.get("copy", {}).get("gb_per_s") or 0) * 1e9
    out: dict[str, Any] = {"roofline_gpu": peak.gpu, "arch": f"sm_{arch}", "rows": [],
                           "timing": "do_bench median" if device.type == "cuda" else "cpu-interpreter: not GPU figures",
                           "measured_ceilings": {"tflops_fp16": rate / 1e12, "gb_per_s": bw / 1e9}}
    for case in cases:
        if budget.left() < 15:
            out["rows"].append({"op": case.op, "layer": case.layer, "batch": case.batch, "skipped": "time budget spent"})
            continue
        if device.type == "cuda":
            results = [dict(vars(r)) for r in gk.run_case(case)]
        else:
            results = []
            for impl, fn in gk.make_impls(case, "cpu", torch.float32, impls=("triton", "ref")).items():
                t = measure(fn, device, plan.warmup, plan.reps)
                results.append({"op": case.op, "layer": case.layer, "batch": case.batch, "impl": impl,
                                "dtype": "float32", "used": case.used, "median_ms": t["median_ms"],
                                "first_ms": t["first_ms"], "error": None})
        roof_s, bound = peak.seconds(case.flops, case.nbytes)
        measured_s = max(case.flops / rate if rate else 0.0, case.nbytes / bw if bw else 0.0)
        for r in results:
            ms = r.get("median_ms")
            ok = ms is not None and ms == ms and ms > 0
            r.update(flops=case.flops, nbytes=case.nbytes, roofline_ms=roof_s * 1e3, bound=bound,
                     roofline_measured_ms=measured_s * 1e3,
                     of_roofline=(roof_s * 1e3 / ms) if ok else None,
                     of_measured_roofline=(measured_s * 1e3 / ms) if ok and measured_s else None)
            out["rows"].append(r)
    out["failed"] = [f"{r['op']} {r['layer']} {r['impl']}: {r['error']}" for r in out["rows"] if r.get("error")]
    return out


# ------------------------------------------------------------------------------------------------
# the report


def _f(v: Any, fmt: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """`results.md`: one table per section, the statuses first."""
    s, sec = results["suite"], results["sections"]
    out = [f"# GPU suite: {s['mode']}" + (" (CPU, Triton interpreter: no GPU figures)" if s["mode"] == "dry-run" else ""),
           "", f"`{s['command']}` at {s['started']}; seed {s['seed']}; {s['elapsed_s']:.0f} s; "
           f"passed: {s['passed']}", ""]
    out.append(_table(["section", "status", "s", "note"],
                      [[n, v.get("status"), _f(v.get("seconds"), ".1f"), v.get("reason") or v.get("error") or ""]
                       for n, v in sec.items()]))
    env = sec.get("environment", {}).get("data")
    if env:
        out += ["", "## Environment", "",
                f"{env.get('gpu') or 'CPU: ' + env['cpu']}" + (f", {env['memory_gib']} GiB, sm {env['compute_capability']},"
                f" {env['multiprocessors']} SMs; driver {env['driver']}, CUDA {env['cuda']}" if env.get("gpu") else "")
                + f"; torch {env['torch']}, triton {env['triton']}, Python {env['python']}",
                f"Ceilings ({env['timing']}): copy {env['copy']['gb_per_s']:.0f} GB/s; matmul bf16 "
                f"{env['matmul']['bf16']['tflops']:.3g}, fp16 {env['matmul']['fp16']['tflops']:.3g} TFLOP/s "
                f"(n = {env['matmul']['fp16']['n']})"]
    kp = sec.get("kernel_parity", {}).get("data")
    if kp:
        out += ["", "## Kernel parity (`-m gpu` tests, outputs poisoned, inputs salted)", "",
                f"{kp['device']}: {kp['passed']} passed, {kp['failed']} failed, {kp['errors']} errors, "
                f"{kp['skipped']} skipped of {kp['tests']} in {kp['seconds']} s; "
                f"{kp['poisoned_allocations']} poisoned allocations"
                + ("; TIMED OUT" if kp["timed_out"] else "")]
        out += [f"- FAILED {f['nodeid']}: {f['message'][:200]}" for f in kp["failures"][:20]]
        out += [f"- skipped: {r[:200]}" for r in kp["skip_reasons"][:10]]
    par = sec.get("e2e_parity", {}).get("data")
    if par:
        out += ["", "## End-to-end parity against the fp32 reference", "", f"golden: {par['golden']}", ""]
        rows = []
        for r in par["rows"]:
            if "w_plus" in r or "error" in r or "skipped" in r or r.get("baseline"):
                w, i = r.get("w_plus", {}), r.get("img", {})
                gw, gi = r.get("golden_w_plus", {}), r.get("golden_img", {})
                verdict = ("skipped: " + r["skipped"] if "skipped" in r else "ERROR " + r["error"] if "error" in r
                           else "pass" if r.get("passed") else "FAIL") + (" (baseline)" if r.get("baseline") else "")
                rows.append([r.get("size"), r.get("backend", ""), r.get("precision", ""), r.get("inputs", ""),
                             r.get("against", ""), _f(w.get("rel")), _f(i.get("rel")), _f(i.get("max_abs")),
                             _f((w.get("nan", 0) + w.get("inf", 0) + i.get("nan", 0) + i.get("inf", 0)) if w else None),
                             _f(i.get("u8_share"), ".2%") if i.get("u8_share") is not None else "",
                             _f(gw.get("rel")), _f(gi.get("rel")), _f(gi.get("max_abs")), verdict])
        out.append(_table(["size", "backend", "precision", "inputs", "against", "rel w_plus", "rel img",
                           "worst abs img", "NaN/Inf", "u8 > 2", "golden rel w_plus", "golden rel img",
                           "golden worst abs img", "result"], rows))
        out += [f"- {r['backend']} {r['precision']}: skipped: {r['skip']}" for r in par["skipped_rows"]]
    sp = sec.get("e2e_speed", {}).get("data")
    if sp:
        out += ["", f"## End-to-end speed at {sp['size']} px ({sp['timing']})", ""]
        rows = []
        for r in sp["rows"]:
            g = r.get("graph", {})
            graph = (g.get("error") or g.get("skipped") or "") if "ms_per_image" not in g else \
                f"{g['ms_per_image']:.3g} ms ({'paid' if g['paid'] else 'did not pay'}, x{g['vs_eager']:.2f})"
            rows.append([r["backend"], r["precision"], r["batch"], _f(r.get("ms_per_image")), _f(r.get("images_per_s")),
                         _f(r.get("peak_mib"), ".0f"), graph, r.get("error") or r.get("skipped") or ""])
        out.append(_table(["backend", "precision", "batch", "ms/img", "img/s", "peak MiB", "CUDA graph", "note"], rows))
        out += [f"- fastest {p}: {', '.join(o)}" for p, o in sp.get("fastest", {}).items()]
        for name, p in sp["placement"].items():
            out.append(f"- {name}: {p}")
    ks = sec.get("kernel_speed", {}).get("data")
    if ks:
        out += ["", f"## Kernels against the roofline ({ks['timing']}; roofline: {ks['roofline_gpu']} datasheet, "
                f"and the measured ceilings)", ""]
        rows = [[r["op"], r["layer"], r["batch"], r.get("impl", ""), _f(r.get("median_ms"), ".4g"),
                 _f(r.get("roofline_ms"), ".3g"), r.get("bound", ""), _f(r.get("of_roofline"), ".1%"),
                 _f(r.get("of_measured_roofline"), ".1%"), r.get("error") or r.get("skipped") or ""]
                for r in ks["rows"]]
        out.append(_table(["op", "layer", "batch", "impl", "ms", "roofline ms", "bound", "of roofline",
                           "of measured", "note"], rows))
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# the command line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md and the test log")
    p.add_argument("--quick", action="store_true", help="fewer tests, batches 1 and 8, fewer kernel cases (~4 min)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same steps on the CPU in Triton's interpreter, tiny plan (no GPU figures)")
    p.add_argument("--golden", type=Path, default=None, help=f"{GOLDEN_NAME} (default: ../shared/golden/ if there)")
    p.add_argument("--seed", type=int, default=None, help="salt of the random inputs (default: fresh, recorded)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget in s (default 450 full, 240 quick)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    return p


def _run(args) -> int:
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(sections) - set(SECTIONS)
    if bad:
        from reference.plumbing.errors import UsageError

        raise UsageError(f"unknown sections {sorted(bad)}; choose from {','.join(SECTIONS)}")
    cuda = torch.cuda.is_available()
    if not args.dry_run and not cuda:
        print(NO_CUDA, flush=True)
        return 0
    if args.dry_run:
        # the op table (kernels.ops, imported above) is strings only; any other kernels module fixes the switch
        if any(m.startswith("kernels.") and m != "kernels.ops" for m in sys.modules) and \
                os.environ.get("TRITON_INTERPRET") != "1":
            from reference.plumbing.errors import UsageError

            raise UsageError("--dry-run sets TRITON_INTERPRET=1 before kernels is imported: run it as a fresh process")
        os.environ["TRITON_INTERPRET"] = "1"
    plan = PLANS["dry-run" if args.dry_run else "quick" if args.quick else "full"]
    if args.budget_s is not None:
        plan = replace(plan, budget_s=args.budget_s)
    device = torch.device("cuda", torch.cuda.current_device()) if plan.mode == "cuda" else torch.device("cpu")
    if device.type == "cuda":  # the fp32 reference is IEEE fp32 (cuDNN's convolutions default to TF32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31 - 1) + 1
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(plan.budget_s)
    results: dict[str, Any] = {
        "suite": {"command": " ".join(["python -m benchmarks.gpu_suite", *sys.argv[1:]]),
                  "mode": plan.mode, "quick": bool(args.quick), "seed": seed,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "plan": vars(plan), "elapsed_s": 0.0,
                  "passed": False},
        "sections": {name: {"status": "not run", "reason": "not asked for (--sections)"}
                     for name in SECTIONS if name not in sections},
    }

    def save() -> None:
        results["suite"]["elapsed_s"] = budget.elapsed()
        write_json(out / "results.json", results)

    def record(name: str, data: dict) -> None:  # partial data of a running section
        results["sections"].setdefault(name, {"status": "running"})["data"] = data
        save()

    def section(name: str, body: Callable[[], Any]) -> Any:
        if name not in sections:
            return None
        say(f"[gpu_suite] {name} ({budget.elapsed():.0f} s elapsed)")
        t0 = time.perf_counter()
        entry = results["sections"].setdefault(name, {})
        try:
            data = body()
            entry.update(status="ran", data=data)
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
            entry.update(status="failed", error=_error(e), traceback=traceback.format_exc()[-4000:])
            data = None
        entry["seconds"] = time.perf_counter() - t0
        save()
        return data

    golden_path, golden_why = golden_file(args.golden)
    work = Path(tempfile.mkdtemp(prefix="psp_gpu_suite_"))  # rule checkpoints: built here, never carried
    try:
        env = section("environment", lambda: environment(plan, device)) or {}
        section("kernel_parity", lambda: kernel_parity(plan, out, seed, budget))
        speed: dict[str, Any] = {}

        def e2e() -> dict:
            parity, speed["data"] = end_to_end(plan, device, seed, golden_path, golden_why, work, budget, record)
            return parity

        if "e2e_parity" in sections or "e2e_speed" in sections:  # one pass: one load per row and size
            section("e2e_parity", e2e)
            if "e2e_speed" in sections:
                results["sections"]["e2e_speed"] = (
                    {"status": "ran", "data": speed["data"], "reason": "timed in the e2e_parity pass (one load per row)"}
                    if "data" in speed else {"status": "failed", "error": "the end-to-end pass failed (see e2e_parity)"})
        section("kernel_speed", lambda: kernel_speed(plan, device, env, budget))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["suite"]["passed"] = passed(results)
    save()
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md, flush=True)
    return 0 if results["suite"]["passed"] else 1


def passed(results: dict[str, Any]) -> bool:
    """Every asked-for section ran, every kernel test and parity row passed, no timing failed."""
    sec = results["sections"]
    if any(v["status"] not in ("ran", "not run") for v in sec.values()):
        return False
    kp = sec.get("kernel_parity", {}).get("data")
    if kp is not None and not kp["passed_all"]:
        return False
    par = sec.get("e2e_parity", {}).get("data")
    if par is not None and not all(r.get("passed", True) and "error" not in r for r in par["rows"]):
        return False
    sp = sec.get("e2e_speed", {}).get("data")
    if sp is not None and any("error" in r for r in sp["rows"]):
        return False
    ks = sec.get("kernel_speed", {}).get("data")
    return not (ks is not None and ks["failed"])


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.gpu_suite`: 0 all ran and passed (or no CUDA, said so), 1 a failure, 2 usage."""
    return run_cli(build_parser(), _run, argv, interrupted="rerun the suite (results.json holds what finished)")


if __name__ == "__main__":
    sys.exit(main())
