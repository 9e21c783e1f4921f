"""pytest-benchmark: remask_lowest_confidence against the eager Gumbel + full sort (``pytest benchmarks/``)."""
from __future__ import annotations

import pytest
import torch

import sgkernels as sgk

from ._pytest_support import DEVICE, synced
from sgkernels.bench.ops.remask_lowest_confidence import eager_remask


@pytest.mark.parametrize("impl", ["sgkernels", "eager"])
def test_remask(benchmark, impl):
    logp = -torch.rand(64, 1024, device=DEVICE) * 5
    is_masked = torch.rand(64, 1024, device=DEVICE) < 0.8
    n = torch.full((64,), 300, device=DEVICE)
    if impl == "sgkernels":
        fn = lambda: sgk.remask_lowest_confidence(logp, is_masked, n, choice_temperature=4.5, seed=0)  # noqa: E731
    else:
        fn = lambda: eager_remask(logp, is_masked, n, 4.5)  # noqa: E731
    out = benchmark(synced(fn))
    assert out.shape == (64, 1024)
