"""Shared bits of the pytest-benchmark files (``pytest benchmarks/``): device choice and a synced call."""
from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synced(fn):
    """``fn`` followed by a CUDA sync, so pytest-benchmark's wall clock measures the kernels."""
    if DEVICE == "cpu":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call
