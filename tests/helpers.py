"""Shared test helpers: which backends can run here, and a chi-square test with torch only."""
from __future__ import annotations

import os

import pytest
import torch

import sgkernels  # noqa: F401  (loads the schemas)
from sgkernels._backend import triton_available


def has_cpu_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sgkernels::{op}", "CPU")


def backend_params(op: str):
    """pytest params (backend, device) for every implementation of ``op`` that can run here."""
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    cuda = torch.cuda.is_available()
    return [
        pytest.param(("torch", "cpu"), id="torch"),
        pytest.param(("cpp", "cpu"), id="cpp", marks=pytest.mark.skipif(not has_cpu_kernel(op), reason="no C++ kernel")),
        pytest.param(
            ("triton", "cpu"),
            id="triton-interpret",
            marks=pytest.mark.skipif(not (interp and triton_available()), reason="needs TRITON_INTERPRET=1"),
        ),
        pytest.param(
            ("auto", "cuda"), id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not cuda, reason="no CUDA device")]
        ),
    ]


def is_interpreter(backend) -> bool:
    return backend[0] == "triton" and backend[1] == "cpu"


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square goodness of fit; cells with small expectation are pooled."""
    counts = counts.double().cpu()
    probs = probs.double().cpu()
    total = counts.sum()
    expected = probs * total
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    if bool((obs[~keep] > 0).any()):
        return 0.0  # a count where the probability is zero
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2.0))
