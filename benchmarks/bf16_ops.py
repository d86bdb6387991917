"""Does bf16 pay on this CPU? The generator's and encoder's op shapes in fp32 and bf16, side by side.

Run (from the repository root): `python -m benchmarks.bf16_ops [--repeats 3]`

Each op runs in fp32 and in bf16 in this process (warm-up apart, median of `--repeats`), and the
ratio bf16/fp32 is printed with the CPU model and its flags. On CPUs with bf16 units (AMX-BF16,
AVX512-BF16) bf16 is several times faster; without them torch emulates it through fp32 and it is
slower: this is why `--precision auto` picks bf16 only where `reference.plumbing.platform.bf16_units()` finds
them.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

# (name, inputs factory, op): shapes of the 1024 generator / IR-SE50 encoder, batch 2
OPS = {
    "conv3x3 64->64 @128^2": (lambda d: (torch.randn(2, 64, 128, 128, dtype=d), torch.randn(64, 64, 3, 3, dtype=d)),
                              lambda x, w: F.conv2d(x, w, padding=1)),
    "conv3x3 512->512 @16^2": (lambda d: (torch.randn(2, 512, 16, 16, dtype=d), torch.randn(512, 512, 3, 3, dtype=d)),
                               lambda x, w: F.conv2d(x, w, padding=1)),
    "convT3x3 512->512 @16^2 s2": (lambda d: (torch.randn(2, 512, 16, 16, dtype=d), torch.randn(512, 512, 3, 3, dtype=d)),
                                   lambda x, w: F.conv_transpose2d(x, w, stride=2)),
    "matmul 512x4608 @ 4608x512": (lambda d: (torch.randn(512, 4608, dtype=d), torch.randn(4608, 512, dtype=d)),
                                   lambda a, b: a @ b),
}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cpu_engines import time_stage
    from reference.plumbing.platform import cpu_summary

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f"CPU: {cpu_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'op':30s} {'fp32 ms':>10s} {'bf16 ms':>10s} {'bf16/fp32':>10s}")
    for name, (make, op) in OPS.items():
        t = {}
        for dt in (torch.float32, torch.bfloat16):
            a, b = make(dt)
            t[dt] = time_stage(lambda: op(a, b), args.repeats)
        print(f"{name:30s} {t[torch.float32] * 1e3:10.1f} {t[torch.bfloat16] * 1e3:10.1f} "
              f"{t[torch.bfloat16] / t[torch.float32]:9.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
