"""Trace a public kernels op through `torch.compile(fullgraph=True)` in a process without
Triton's interpreter (the GPU code path), capturing AOTAutograd's forward graph without running it.

Used by the op tests: under TRITON_INTERPRET=1 a triton_op cannot be compiled, so this is how the
custom-op registration is checked on a machine without a GPU.

The trace process imports torch, Dynamo and the kernels (~10 CPU-s before it traces anything), so
one process traces every op a test run asks for: a test declares its trace with `@traces(...)`,
and the first of them to run (`trace_for(request)`) traces the ops of all the `@traces` tests
selected in this run, each after `torch._dynamo.reset()`; the others read the results, kept for
the run in `$PSP_TEST_SESSION_DIR` (tests/conftest.py; shared by the pytest-xdist workers under a
lock) or, without it, in this process. A trace that fails fails only the test that asked for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_SCRIPT = """
import json, sys, traceback
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._library.triton import get_triton_kernels_for_op
import kernels._triton as kt
kt.interpret_mode = lambda: True  # lets check_impl accept CPU tensors; @triton.jit stays a JITFunction
class Captured(Exception):
    pass
requests, results = json.loads(open(sys.argv[1]).read()), {}
for key, r in requests.items():
    try:
        torch._dynamo.reset()
        graphs = []
        def fw(gm, inputs, graphs=graphs):
            graphs.append(gm.code)
            def run(*args):
                raise Captured  # the graph is not run: no GPU here
            return run
        ns = {"torch": torch}
        exec(r["setup"], ns)
        f = torch.compile(eval(r["fn"], ns), backend=aot_autograd(fw_compiler=fw), fullgraph=True)
        try:
            f(*eval("(" + r["args"] + ",)", ns))
        except Captured:
            pass
        kernels = [k.fn.__name__ for k in get_triton_kernels_for_op(r["op"])]
        results[key] = {"stdout": f"KERNELS {kernels}\\n{graphs[0]}\\n"}
    except Exception:
        results[key] = {"error": traceback.format_exc()}
open(sys.argv[2], "w").write(json.dumps(results))
"""

_CACHE = "triton_traces.json"
_traced_here: dict[str, dict] = {}  # this process's results, where there is no session folder


@dataclass(frozen=True)
class TraceRequest:
    """What to trace.

    Attributes:
        op: the custom op's qualified name, e.g. "psp::bias_act".
        setup: import lines (e.g. "import kernels.bias_act as ba").
        fn: the lambda to compile, calling the op with impl="triton".
        args: the example arguments, as Python source.
    """

    op: str
    setup: str
    fn: str
    args: str

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def traces(op: str, setup: str, fn: str, args: str):
    """Decorator: the test traces `op` (see `TraceRequest`) and reads the result with `trace_for`."""

    def mark(test):
        test._triton_trace = TraceRequest(op, setup, fn, args)
        return test

    return mark


def trace_for(request) -> str:
    """The trace of the calling test's `@traces` request: "KERNELS [...]" then the captured graph code.

    Traces it together with the `@traces` requests of every other test selected in this run that
    has none yet (one process for all of them).

    Args:
        request: the test's pytest `request` fixture.

    Raises:
        AssertionError: the trace failed (its traceback in the message).
    """
    own = request.function._triton_trace
    selected = [getattr(getattr(item, "function", None), "_triton_trace", None) for item in request.session.items]
    result = _traced([own] + [r for r in selected if r is not None and r != own])[own.key()]
    assert "error" not in result, f"tracing {own.op} failed:\n{result['error'][-3000:]}"
    return result["stdout"]


def _traced(wanted: list[TraceRequest]) -> dict[str, dict]:
    """{key: {"stdout": ...} or {"error": traceback}} for every request of `wanted`, tracing those
    not traced yet in this run in one process."""
    session = os.environ.get("PSP_TEST_SESSION_DIR")
    if not session:
        missing = {r.key(): asdict(r) for r in wanted if r.key() not in _traced_here}
        if missing:
            _traced_here.update(_run(missing))
        return _traced_here
    from filelock import FileLock

    cache = Path(session) / _CACHE
    with FileLock(f"{cache}.lock"):
        known = json.loads(cache.read_text()) if cache.is_file() else {}
        missing = {r.key(): asdict(r) for r in wanted if r.key() not in known}
        if missing:
            known.update(_run(missing))
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(cache)
    return known


def _run(requests: dict[str, dict]) -> dict[str, dict]:
    """Trace `requests` ({key: TraceRequest as a dict}) in one process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory(prefix="triton-trace-") as d:
        src, dst = Path(d) / "requests.json", Path(d) / "results.json"
        src.write_text(json.dumps(requests))
        p = subprocess.run([sys.executable, "-c", _SCRIPT, str(src), str(dst)], cwd=REPO, env=env,
                           check=False, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and dst.is_file(), p.stderr[-3000:]
        return json.loads(dst.read_text())
