"""The cluster paths against the single process, side by side: `engine.run` vs `engine.run --ray local`,
then the service's latency and throughput at 1/4/8 concurrent clients.

Run (from the repository root): `python -m benchmarks.distributed [--checkpoint C] [--images 12] [--backend engine]
      [--clients 1,4,8] [--requests 3] [--json out.json]`

Batch: both runs are `python -m engine.run` child processes on the same inputs (the shared aligned
faces, repeated to `--images`), each timed from its start to its exit (wall) and by its own summary
(the loop: reading to writing, without start-up); start-up = wall - loop (interpreter, imports,
checkpoint load; for Ray also the cluster start and the actors' own load). The single process
runs torch on every core; `--ray local` runs the default pool (CPUs - 1 actors of 1 CPU each).

Service: `engine.serve` on a local Ray instance (one replica on every CPU, batches of up to 8 with
a 50 ms wait), warmed up by one request; then for each client count C, C threads each send
`--requests` `POST /v1/invert` of a shared face one after another; p50/p99 latency, requests/s and
the mean requests per encoder batch (from `/v1/stats`).

Weights: the weight-rule checkpoint `ffhq_encode_256` (seed 0) unless `--checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """lscpu's "Model name" (or "unknown")."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    m = re.search(r"^Model name:\s*(.+)$", out, re.M)
    return m.group(1).strip() if m else "unknown"


def run_cli(args: list[str]) -> dict:
    """One `python -m engine.run` child: wall s, loop s and img/s from its summary, ms per stage."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "engine.run", *args], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"engine.run {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    m = re.search(r"(\d+) images in ([\d.]+) s", p.stderr)
    stages = dict((k, float(v)) for k, v in re.findall(r"(read|encode|synthesize|write) ([\d.]+)", p.stderr.split("mean ms per image:")[-1]))
    n, loop = int(m.group(1)), float(m.group(2))
    return {"wall_s": wall, "loop_s": loop, "startup_s": wall - loop, "images": n, "img_per_s": n / loop,
            "ms_per_image": stages}


def batch(ckpt: Path, backend: str, n_images: int, work: Path, shared: Path) -> dict:
    faces = sorted((shared / "data" / "faces" / "aligned").glob("*.jpg"))
    inputs = work / "in"
    inputs.mkdir()
    for i in range(n_images):
        src = faces[i % len(faces)]
        shutil.copy(src, inputs / f"{i:03d}_{src.name}")
    common = ["--input", str(inputs), "--checkpoint", str(ckpt), "--backend", backend, "--save-latents"]
    single = run_cli([*common, "--output", str(work / "single")])
    ray = run_cli([*common, "--output", str(work / "ray"), "--ray", "local"])
    return {"single": single, "ray": ray}


def service(ckpt: Path, backend: str, clients: list[int], requests: int, shared: Path) -> list[dict]:
    import httpx
    import ray
    from ray import serve

    from engine.serve.app import ServeOptions, start

    from engine.cluster.ray_local import start_local_ray

    cpus = len(os.sched_getaffinity(0))
    start_local_ray(cpus, log_to_driver=False)  # loopback only, token auth, files in a private folder
    port = 8765
    start(ServeOptions(checkpoint=str(ckpt), backend=backend, cpus_per_replica=cpus, max_batch_size=8,
                       batch_wait_timeout_s=0.05, request_timeout_s=600), "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    face = (shared / "data" / "faces" / "aligned" / "psp_input_img.jpg").read_bytes()

    def one(client: httpx.Client) -> float:
        t0 = time.perf_counter()
        r = client.post(f"{url}/v1/invert", files={"image": ("face.jpg", face)})
        r.raise_for_status()
        return time.perf_counter() - t0

    def worker(_) -> list[float]:
        with httpx.Client(timeout=600) as client:
            return [one(client) for _ in range(requests)]

    rows = []
    try:
        worker(0)  # warm-up
        for c in clients:
            before = httpx.get(f"{url}/v1/stats").json()["encode"]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                lat = sorted(t for ts in pool.map(worker, range(c)) for t in ts)
            wall = time.perf_counter() - t0
            after = httpx.get(f"{url}/v1/stats").json()["encode"]
            batches = after["batches"] - before["batches"]
            rows.append({"clients": c, "requests": len(lat), "p50_s": statistics.median(lat),
                         "p99_s": lat[max(0, int(round(0.99 * len(lat))) - 1)], "req_per_s": len(lat) / wall,
                         "requests_per_batch": len(lat) / batches if batches else 0.0})
            print(f"  {c} client(s): {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--backend", default="engine")
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--requests", type=int, default=3, help="requests per client")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    shared = Path(os.environ.get("PSP_SHARED", REPO.parent / "shared"))
    print(f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} CPUs; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = args.checkpoint
        if ckpt is None:
            from reference import make_checkpoint, save_checkpoint

            ckpt = work / "ffhq_encode_256_seed0.pt"
            save_checkpoint(make_checkpoint("ffhq_encode_256", 0), ckpt)
        b = batch(ckpt, args.backend, args.images, work, shared)
        s, r = b["single"], b["ray"]
        print(f"\nbatch, {args.images} images, backend {args.backend}:")
        print("| run | wall s | start-up s | loop s | img/s | ms/image encode / synthesize |")
        print("|---|---|---|---|---|---|")
        for name, x in (("single process", s), ("--ray local", r)):
            ms = x["ms_per_image"]
            print(f"| {name} | {x['wall_s']:.1f} | {x['startup_s']:.1f} | {x['loop_s']:.1f} | {x['img_per_s']:.3f} "
                  f"| {ms.get('encode', 0):.0f} / {ms.get('synthesize', 0):.0f} |")
        print(f"ratios ray / single: wall {r['wall_s'] / s['wall_s']:.2f}x, start-up {r['startup_s'] / s['startup_s']:.2f}x "
              f"(+{r['startup_s'] - s['startup_s']:.1f} s), time per image in the loop "
              f"{s['img_per_s'] / r['img_per_s']:.2f}x")
        clients = [int(c) for c in args.clients.split(",")]
        rows = service(ckpt, args.backend, clients, args.requests, shared)
    print(f"\nservice, POST /v1/invert, backend {args.backend}, {args.requests} requests per client:")
    print("| clients | requests | p50 s | p99 s | requests/s | requests per encoder batch |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['clients']} | {row['requests']} | {row['p50_s']:.2f} | {row['p99_s']:.2f} | "
              f"{row['req_per_s']:.2f} | {row['requests_per_batch']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "batch": b, "service": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
