"""Shared test helpers: whether an op has a C++ CPU kernel, chi-square tests (torch only, and two-sample with scipy)."""
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


def joint_counts(seqs: torch.Tensor) -> dict:
    """How often each whole row (as a tuple) occurs in ``seqs``."""
    keys, counts = torch.unique(seqs, dim=0, return_counts=True)
    return {tuple(k.tolist()): int(c) for k, c in zip(keys, counts)}


def two_sample_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of a chi-square test that the rows of ``a`` and ``b`` come from one joint distribution."""
    from scipy.stats import chi2_contingency

    ca, cb = joint_counts(a), joint_counts(b)
    keys = sorted(set(ca) | set(cb))
    table = torch.tensor([[ca.get(k, 0) for k in keys], [cb.get(k, 0) for k in keys]], dtype=torch.float64)
    # pool cells with few expected counts
    small = table.sum(0) < 20
    table = torch.cat([table[:, ~small], table[:, small].sum(1, keepdim=True)], dim=1)
    table = table[:, table.sum(0) > 0]
    return float(chi2_contingency(table.numpy())[1])
