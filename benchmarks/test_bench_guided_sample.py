"""pytest-benchmark: guided_sample against the eager softmax + multinomial (``pytest benchmarks/``)."""
from __future__ import annotations

import pytest
import torch

import sgkernels as sgk

from ._pytest_support import DEVICE, synced
from sgkernels.bench.ops.guided_sample import eager_guided_sample


@pytest.mark.parametrize("impl", ["sgkernels", "eager"])
def test_guided_sample(benchmark, impl):
    logits = torch.randn(8, 256, 1024, device=DEVICE)
    guide = torch.randn(8, 256, 1024, device=DEVICE)
    if impl == "sgkernels":
        fn = lambda: sgk.guided_sample(logits, guide, guidance_scale=1.0, seed=0)  # noqa: E731
    else:
        fn = lambda: eager_guided_sample(logits, guide, 1.0, 1.0)  # noqa: E731
    tokens, _ = benchmark(synced(fn))
    assert tokens.shape == (8, 256)
