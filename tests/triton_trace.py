"""Trace a public kernels op through `torch.compile(fullgraph=True)` in a process without
Triton's interpreter (the GPU code path), capturing AOTAutograd's forward graph without running it.

Used by the op tests: under TRITON_INTERPRET=1 a triton_op cannot be compiled, so this is how the
custom-op registration is checked on a machine without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_SCRIPT = """
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._library.triton import get_triton_kernels_for_op
import kernels._triton as kt
kt.interpret_mode = lambda: True  # lets check_impl accept CPU tensors; @triton.jit stays a JITFunction
{setup}
graphs = []
class Captured(Exception):
    pass
def fw(gm, inputs):
    graphs.append(gm.code)
    def run(*args):
        raise Captured  # the graph is not run: no GPU here
    return run
f = torch.compile({fn}, backend=aot_autograd(fw_compiler=fw), fullgraph=True)
try:
    f({args})
except Captured:
    pass
print("KERNELS", [k.fn.__name__ for k in get_triton_kernels_for_op({op!r})])
print(graphs[0])
"""


def trace(setup: str, fn: str, args: str, op: str) -> str:
    """Run the trace script; returns its stdout ("KERNELS [...]" then the captured graph code).

    Args:
        setup: import lines (e.g. "import kernels.bias_act as ba").
        fn: the lambda to compile, calling the op with impl="triton".
        args: the example arguments, as Python source.
        op: the custom op's qualified name, e.g. "psp::bias_act".

    Raises:
        AssertionError: the script failed (its stderr tail in the message).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    script = _SCRIPT.format(setup=setup, fn=fn, args=args, op=op)
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout
