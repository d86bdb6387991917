"""Benchmarks run under inference mode, as the engine does."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield
