"""Rule checkpoints for benchmarks, built once per process (seed 0)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def model(config: str):
    """`load_psp(make_checkpoint(config, 0))`: ffhq_encode_256 (golden config) or ffhq_encode (1024)."""
    from reference import load_psp, make_checkpoint

    return load_psp(make_checkpoint(config, 0))
