"""One Serve app per test process, shared by tests/test_serve.py and tests/test_web.py.

The model is a 32 px pSp by the weight rule (the `ffhq_encode_256` config with `output_size` 32,
8 styles): its IR-SE-50 encoder costs what a real one does, its generator little, so a load test
of 200 synthesize requests fits in CI's time on 2 cores. Two random edit directions
(`dir_a`, `dir_b`) are loaded from an edit folder.
"""

from __future__ import annotations

import atexit
import socket
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from _ray_cluster import local_ray

SIZE = 32  # px, output of the service's test model (the smallest GradualStyleEncoder allows)
LIMITS = {"max_upload_bytes": 400_000, "max_pixels": 1_100_000, "request_timeout_s": 60.0,
          "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "max_ongoing_requests": 16, "max_queued_requests": 16}


@lru_cache(maxsize=None)
def small_checkpoint() -> Path:
    """A 32 px pSp checkpoint (rule weights, seed 0) in a temporary folder removed at exit."""
    import torch

    from reference.configs import get_config, n_styles_for
    from reference.weights import LATENT_AVG_KEY, draw, make_state_dict, psp_modules

    opts = get_config("ffhq_encode_256").opts()
    opts.update(output_size=SIZE, n_styles=n_styles_for(SIZE))
    with torch.device("meta"):
        model = psp_modules(opts)
    latent_avg = (0.5 * draw(LATENT_AVG_KEY, (512,), 0)).repeat(opts["n_styles"], 1)
    folder = tempfile.TemporaryDirectory(prefix="psp_serve_")
    atexit.register(folder.cleanup)
    path = Path(folder.name) / f"ffhq_encode_{SIZE}_seed0.pt"
    torch.save({"state_dict": make_state_dict(model, 0), "opts": opts, "latent_avg": latent_avg}, path)
    edits = Path(folder.name) / "edits"
    edits.mkdir()
    rng = np.random.RandomState(7)
    np.save(edits / "dir_a.npy", rng.randn(512).astype(np.float32))
    np.save(edits / "dir_b.npy", rng.randn(opts["n_styles"], 512).astype(np.float32))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@lru_cache(maxsize=None)
def service() -> str:
    """Start the app once (engine backend, fp32, 1 replica) on a free local port; its base URL."""
    local_ray()
    pytest.importorskip("fastapi", reason="fastapi is not installed: pip install -e '.[serve]'")
    from ray import serve

    from engine.serve import ServeOptions, start

    ckpt = small_checkpoint()
    port = free_port()
    opts = ServeOptions(checkpoint=str(ckpt), backend="engine", precision="fp32", edit_dir=str(ckpt.parent / "edits"),
                        **LIMITS)
    t0 = time.perf_counter()
    start(opts, host="127.0.0.1", port=port)
    atexit.register(serve.shutdown)
    print(f"service started in {time.perf_counter() - t0:.1f} s on port {port}")
    return f"http://127.0.0.1:{port}"
