"""pytest-benchmark: vq_lookup against faiss / cdist / taming (``pytest benchmarks/``)."""
from __future__ import annotations

import pytest
import torch

from ._pytest_support import DEVICE, synced
from sgkernels.bench.ops.vq_lookup import _impls

Z = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
CODEBOOK = torch.randn(4096, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
IMPLS = _impls(Z, CODEBOOK, DEVICE)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_vq_lookup(benchmark, impl):
    benchmark(synced(IMPLS[impl]))
