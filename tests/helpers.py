"""Shared test helpers: whether an op has a C++ CPU kernel, and a chi-square test with torch only."""
from __future__ import annotations

import torch

import sgkernels  # noqa: F401  (loads the schemas)


def has_cpu_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sgkernels::{op}", "CPU")


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
