"""pytest-benchmark: self_guided_step against the open-muse eager step (``pytest benchmarks/``)."""
from __future__ import annotations

import pytest
import torch

import sgkernels as sgk

from sgkernels.bench import anchors
from ._pytest_support import DEVICE, synced
from sgkernels.bench.ops.self_guided_step import _inputs


@pytest.mark.parametrize("impl", ["sgkernels", "open-muse eager"])
def test_self_guided_step(benchmark, impl):
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    tokens, is_masked, logits, guide, n = _inputs(8, 256, 1024, dtype, DEVICE)
    kw = dict(guidance_scale=1.0, temperature=1.0, choice_temperature=25.0)
    if impl == "sgkernels":
        fn = lambda: sgk.self_guided_step(tokens, is_masked, logits, guide, n, seed=0, **kw)  # noqa: E731
    else:
        fn = lambda: anchors.open_muse_step(tokens, is_masked, logits, guide, n, mask_id=1024, **kw)  # noqa: E731
    new_tokens, _ = benchmark(synced(fn))
    assert new_tokens.shape == (8, 256)

