"""The Philox stream: known-answer vectors, and the uniform and Gumbel transforms."""
from __future__ import annotations

import math

import torch

from sgkernels import _rng


def words(seed, c):
    return [int(w) for w in _rng.philox4x32(seed, *(torch.tensor(x) for x in c))]


def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32_10: (counter, key) -> output.
    assert words(0, (0, 0, 0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert words((ones << 32) | ones, (ones,) * 4) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    seed = (0x299F31D0 << 32) | 0xA4093822
    assert words(seed, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1,
    ]


def test_offset_gives_disjoint_streams():
    rows = torch.arange(1000)
    a = _rng.row_words(7, 0, rows)[0]
    b = _rng.row_words(7, 1, rows)[0]
    assert not torch.isin(a, b).any()


def test_token_uniform_is_inside_unit_interval():
    lo = _rng.token_uniform(torch.tensor([0]), torch.tensor([0]))
    hi = _rng.token_uniform(torch.tensor([0xFFFFFFFF]), torch.tensor([0xFFFFFFFF]))
    assert 0.0 < lo.item() < 1e-15 and 1.0 - 1e-15 < hi.item() < 1.0


def test_gumbel_is_finite_at_the_extremes_and_keeps_the_tails():
    w = torch.tensor([0, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
    for w3 in (0, 0xFFFFFFFF):
        g = _rng.gumbel(w, torch.full_like(w, w3))
        assert torch.isfinite(g).all()
    g = _rng.gumbel(torch.tensor([0]), torch.tensor([0]))
    assert g.item() > 40  # upper tail beyond a 24-bit uniform's ~16.6
    g = _rng.gumbel(torch.tensor([0x80000000]), torch.tensor([0]))
    assert g.item() < -3.5


def test_gumbel_distribution():
    """Kolmogorov-Smirnov against the Gumbel CDF exp(-exp(-x)) on 200k draws."""
    n = 200_000
    _, _, w2, w3 = _rng.row_words(3, 0, torch.arange(n))
    g = _rng.gumbel(w2, w3).double().sort().values
    cdf = torch.exp(-torch.exp(-g))
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    d = torch.maximum(grid - cdf, cdf - (grid - 1.0 / n)).max().item()
    assert d < 1.95 / math.sqrt(n)  # the 0.1% critical value
    assert abs(g.mean().item() - 0.5772156649) < 0.01


def test_resolve_seed():
    torch.manual_seed(0)
    a = _rng.resolve_seed(None)
    torch.manual_seed(0)
    assert _rng.resolve_seed(None) == a
    assert _rng.resolve_seed(5) == 5
