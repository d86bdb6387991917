"""What the cache's integrity check costs: `cached_graphs` on graphs already exported, with the file
digests remembered (any process after the export) and with none remembered (a changed file, a lost
memo: the checkpoint and the graphs are hashed again), and sha256 throughput on this CPU.

Run (from the repository root): `python -m benchmarks.cache_integrity [--checkpoint C] [--rounds 3]`

Every cached graph is checked against the sizes and sha256 digests in its sidecar before use
(`export.backends.graph.cached_graphs`, `reference.plumbing.digests`); a digest is remembered per
file version (device, inode, size, mtime, ctime) in `<cache>/digests.json`, so a process pays the
hashing only for a file that changed. Medians of `--rounds`. The graphs are exported first if the
cache has none (not timed). Default checkpoint: the embedded demo (1024 px `ffhq_encode`, 1.2 GB).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from reference.plumbing import digests
from reference.plumbing.files import cache_dir
from reference.plumbing.platform import cpu_summary


def _must_not_export():
    raise AssertionError("the graphs were exported again: the check found them bad")


def main(argv: list[str] | None = None) -> int:
    from engine.demo import demo_checkpoint_path
    from export.backends.graph import ReferenceLoader, cache_paths, cached_graphs

    p = argparse.ArgumentParser(prog="python -m benchmarks.cache_integrity", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="pSp checkpoint (default: the demo)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    ckpt = args.checkpoint or demo_checkpoint_path(print)
    folder = cache_dir() / "onnx"
    cached_graphs(ckpt, ReferenceLoader(ckpt), folder, print)  # exported once if missing (not timed)
    stem = cache_paths(ckpt, folder)["encoder"].name.split(".", 1)[0]
    graphs = sum(f.stat().st_size for f in folder.glob(f"{stem}.*"))

    def timed(forget: bool) -> float:
        memo = digests.memo_path()
        hidden = memo.with_suffix(".hidden")
        digests._memory.clear()  # as in a new process
        if forget:
            memo.rename(hidden)
        try:
            t0 = time.perf_counter()
            cached_graphs(ckpt, _must_not_export, folder)
            return time.perf_counter() - t0
        finally:
            if forget:
                hidden.replace(memo)

    remembered = statistics.median(timed(False) for _ in range(args.rounds))
    forgotten = statistics.median(timed(True) for _ in range(args.rounds))
    digests._memory.clear()
    t0 = time.perf_counter()
    digests.file_sha256(ckpt, remember=False)  # hashed: neither this process nor the memo is asked
    rate = ckpt.stat().st_size / (time.perf_counter() - t0)
    print(f"CPU: {cpu_summary()}")
    print(f"checkpoint {ckpt.name}: {ckpt.stat().st_size / 2**20:,.0f} MiB; its graphs {graphs / 2**20:,.0f} MiB")
    print("| check before use | ms | ratio |\n|---|---|---|")
    print(f"| digests remembered (every process after the export) | {remembered * 1e3:.1f} | 1.00 |")
    print(f"| no digest remembered (checkpoint and graphs hashed) | {forgotten * 1e3:.1f} | {forgotten / remembered:.1f} |")
    print(f"sha256 throughput (page cache warm): {rate / 2**20:,.0f} MiB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
