"""OpenVINO's resident memory with and without giving back the pages of its mapped weight files.

Run (from the repository root): `python -m benchmarks.openvino_memory [--checkpoint C] [--images 4] [--rounds 1]`

`export.backends.graph.openvino_runner` compiles a cached ONNX graph; the CPU plugin maps the weight file
(the graph's `.onnx.data`, or its compiled blob in the cache) and, on the first inference, reorders
the weights into buffers of its own, while the mapped pages stay resident. Since 2026-12-01 the
runner gives them back after its first call (`reference.plumbing.platform.page_out`); `release_pages=False`
keeps them (before). Peak memory is per process, so each variant runs in a child process of its own
(alternating, `--rounds` times each): the child compiles the encoder and the generator of the
checkpoint's cached graphs (OpenVINO fp32, the compiled-model cache warm, as in every run after the
first), inverts `--images` random inputs one at a time, and reports its peak RSS (`ru_maxrss`), the
RSS after the first image, seconds per image after the first, and whether its outputs equal the
other variant's (bit for bit). The table gives each variant's figures and the ratio to "pages kept",
with the CPU model and flags.

Default checkpoint: the embedded demo (1024 px `ffhq_encode`, 1.2 GB; built and exported on first use).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

from benchmarks._children import medians, print_header, run_child

VARIANTS = {"pages kept": False, "pages given back": True}


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(release: bool, checkpoint: str, images: int) -> dict:
    """Compile both parts, invert `images` inputs; this process's figures."""
    import numpy as np

    from export.backends.graph import ReferenceLoader, cached_graphs, openvino_runner
    from reference.plumbing.files import cache_dir

    cache = cache_dir()
    paths = cached_graphs(Path(checkpoint), ReferenceLoader(Path(checkpoint)), cache / "onnx")
    encoder = openvino_runner(paths["encoder"], "x", "w_plus", "fp32", cache, release_pages=release)
    generator = openvino_runner(paths["generator"], "w_plus", "img", "fp32", cache, release_pages=release)
    rng = np.random.default_rng(0)
    digest, seconds, after_first = hashlib.sha256(), [], 0.0
    for i in range(images):
        x = rng.uniform(-1, 1, (1, 3, 256, 256)).astype(np.float32)
        t0 = time.perf_counter()
        img = generator(encoder(x))
        seconds.append(time.perf_counter() - t0)
        digest.update(img.tobytes())
        if i == 0:
            after_first = _rss_gib()
    later = sorted(seconds[1:]) or seconds
    return {"release": release, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rss_after_first_gib": after_first, "s_per_image": later[len(later) // 2], "digest": digest.hexdigest()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="pSp checkpoint (default: the embedded demo, built on first use)")
    p.add_argument("--images", type=int, default=4, help="images per child, one at a time (default 4)")
    p.add_argument("--rounds", type=int, default=1, help="children per variant (alternating)")
    p.add_argument("--child", choices=("0", "1"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child == "1", args.checkpoint, args.images)))
        return 0

    ckpt = args.checkpoint
    if ckpt is None:
        from engine.demo import demo_checkpoint_path

        ckpt = str(demo_checkpoint_path(print))
    rows = []
    for _ in range(args.rounds):
        for name, release in VARIANTS.items():
            row = run_child(["-m", "benchmarks.openvino_memory", "--child", str(int(release)), "--checkpoint", ckpt, "--images", str(args.images)])
            if row is None:
                return 1
            rows.append({**row, "variant": name})
    print_header(f"checkpoint: {ckpt}; {args.images} images per child, one at a time; rounds: {args.rounds}",
                 ["variant", "peak RSS GiB", "RSS after the first image GiB", "s/image (after the first)",
                  "peak vs kept", "s/image vs kept"])
    base = {}
    for name in VARIANTS:
        med = medians(rows, name, ("peak_gib", "rss_after_first_gib", "s_per_image"))
        base = base or med
        print(f"| {name} | {med['peak_gib']:.2f} | {med['rss_after_first_gib']:.2f} | {med['s_per_image']:.3f} | "
              f"{med['peak_gib'] / base['peak_gib']:.2f}x | {med['s_per_image'] / base['s_per_image']:.2f}x |")
    same = len({r["digest"] for r in rows}) == 1
    print(f"\noutputs identical across variants and rounds: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
