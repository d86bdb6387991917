"""The local Ray instance of a test module that needs Ray (num_cpus=2, as CI has).

Started by the module's fixture and shut down when the module ends: an idle instance (GCS, raylet,
agents, Ray Data's and Serve's actors, idle workers) costs ~0.1 CPU/s for as long as it lives, more
than a start (~12 CPU-s) costs once the xdist worker still has minutes of other files to run. A
module that finds Ray already running (started by someone else) uses it and leaves it running.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

# Idle workers are kept (up to this many processes) instead of being killed a second after their
# task: a read task's worker has imported torch and engine (~5 CPU-s), and the next Ray run of the
# same module reuses it. Ray's default keeps only `num_cpus` worker processes, and the model actor
# and Ray Data's own actors already count against that, so every run started fresh read workers.
SYSTEM_CONFIG = {"num_workers_soft_limit": 8}


@contextlib.contextmanager
def local_ray() -> Iterator:
    """The `ray` module, connected to a local Ray instance (2 CPUs) for the `with` block; the
    instance is shut down at its end if this call started it.

    Skips the calling test when ray is not installed (the `serve` extra).
    """
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[serve]'")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=SYSTEM_CONFIG)
    try:
        yield ray
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
