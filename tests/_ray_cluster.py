"""One local Ray instance per test process, shared by the test files that need Ray (num_cpus=2, as CI has).

Started on first use and shut down when the process exits: a cluster start costs ~10 s, too much
to pay per file.
"""

from __future__ import annotations

import atexit

import pytest


def local_ray():
    """The `ray` module, connected to this process's local Ray instance (started once, 2 CPUs).

    Skips the calling test when ray is not installed (the `serve` extra).
    """
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[serve]'")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        atexit.register(ray.shutdown)
    return ray
