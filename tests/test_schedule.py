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


def test_float32_rounding_is_the_official_schedule():
    """rounding="float32": floor(N * cos(float32(r) * pi * 0.5)) in float32, as the official code
    (T = 18, N = 256, step 11 keeps 127, not 128; T = 12 step 7 too)."""
    assert schedule.mask_len(11, 18, 256, 200) == 128
    assert schedule.mask_len(11, 18, 256, 200, rounding="float32") == 127
    assert schedule.mask_len(7, 12, 256, 200, rounding="float32") == 127
    assert schedule.mask_len(7, 12, 256, 200) == 128
    for steps in (8, 12, 18):  # an independent float32 evaluation, every step
        for k in range(steps - 1):
            r = torch.tensor([1.0 * (k + 1) / steps], dtype=torch.float32)
            want = int(torch.floor(torch.tensor(256.0) * torch.cos(r * torch.tensor(math.pi / 2, dtype=torch.float32))))
            assert schedule.schedule_count(k, steps, 256, "float32") == want
    with pytest.raises(ValueError, match="rounding"):
        schedule.mask_len(0, 8, 256, 256, rounding="bf16")


def test_at_least_one_remask():
    """at_least_one: max(1, min(masked - 1, n)) before the last step (re-masks the last masked
    position too), 0 at the last step; the default clamps to 0 with one position left."""
    masked = torch.tensor([256, 10, 2, 1])
    for k in range(11):
        n = schedule.schedule_count(k, 12, 256, "float32")
        want = [max(1, min(int(m) - 1, n)) for m in masked]
        assert schedule.mask_len(k, 12, 256, masked, rounding="float32", at_least_one=True).tolist() == want
        assert [schedule.mask_len(k, 12, 256, int(m), rounding="float32", at_least_one=True) for m in masked] == want
    assert schedule.mask_len(5, 12, 256, 1, at_least_one=True) == 1
    assert schedule.mask_len(5, 12, 256, 1) == 0
    assert schedule.mask_len(11, 12, 256, 5, at_least_one=True) == 0
