"""Cosine mask schedule and choice-temperature decays (docs/METHOD.md)."""
from __future__ import annotations

import math

import pytest
import torch

from sgkernels import schedule


def test_mask_len_matches_method():
    n_tok, steps = 256, 8
    masked = n_tok
    lens = []
    for k in range(steps):
        n = schedule.mask_len(k, steps, n_tok, masked)
        want = 0 if k == steps - 1 else max(1, min(math.floor(n_tok * math.cos(math.pi / 2 * (k + 1) / steps)), masked - 1))
        assert n == want
        lens.append(n)
        masked = n
    assert lens[-1] == 0 and all(a >= b for a, b in zip(lens, lens[1:]))


def test_mask_len_tensor_equals_int():
    masked = torch.tensor([256, 10, 2, 1, 0])
    for k in range(12):
        t = schedule.mask_len(k, 12, 256, masked)
        assert t.dtype == torch.int64
        assert t.tolist() == [schedule.mask_len(k, 12, 256, int(m)) for m in masked]


def test_choice_temperature_decays():
    assert schedule.choice_temperature(0, 10, 4.5) == pytest.approx(4.5 * 0.9)
    assert schedule.choice_temperature(9, 10, 4.5) == 0.0
    assert schedule.choice_temperature(1, 10, 4.5, "compound") == pytest.approx(4.5 * 0.9 * 0.8)
    with pytest.raises(ValueError, match="decay"):
        schedule.choice_temperature(0, 10, 1.0, "linear")


def test_bad_steps():
    with pytest.raises(ValueError, match="step"):
        schedule.mask_len(8, 8, 256, 256)
    with pytest.raises(ValueError, match="total_steps"):
        schedule.mask_len(0, 0, 256, 256)
