"""pytest-benchmark: fused_cross_entropy forward + backward against F.cross_entropy (``pytest benchmarks/``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgkernels.ops.cross_entropy import fused_cross_entropy

from ._pytest_support import DEVICE, synced
from sgkernels.bench.ops.cross_entropy import _step


@pytest.mark.parametrize("impl", ["sgkernels", "F.cross_entropy"])
def test_cross_entropy(benchmark, impl):
    logits = torch.randn(8192, 1024, device=DEVICE).requires_grad_()
    target = torch.randint(0, 1024, (8192,), device=DEVICE)
    benchmark(synced(_step(fused_cross_entropy if impl == "sgkernels" else F.cross_entropy, logits, target)))
