"""MaskGIT schedules (docs/METHOD.md): the cosine mask schedule and the choice-temperature decays.

Pure Python / tensor arithmetic, no kernels: the sampler and users call these between steps.
"""
from __future__ import annotations

import math

import torch

TEMPERATURE_DECAYS = ("maskgit", "compound")
ROUNDINGS = ("float64", "float32")


def _check_step(step: int, total_steps: int) -> None:
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not isinstance(step, int) or not 0 <= step < total_steps:
        raise ValueError(f"step must be an int in [0, total_steps={total_steps}), got {step!r}")


def mask_ratio(step: int, total_steps: int) -> float:
    """cos(pi/2 * (step+1)/total_steps): the fraction of tokens still masked after ``step``."""
    _check_step(step, total_steps)
    return math.cos(math.pi / 2 * (step + 1) / total_steps)


def schedule_count(step: int, total_steps: int, num_tokens: int, rounding: str = "float64") -> int:
    """``floor(num_tokens * cos(pi/2 * (step+1)/total_steps))``, unclamped.

    ``rounding="float64"``: in Python floats (MaskGIT JAX). ``"float32"``: as the official UnlockMGM /
    open-muse code computes it, ``floor(N * cos(float32(r) * pi * 0.5))`` in float32 torch ops: one
    less where the product lands just below an integer (T = 18, N = 256, step 11: 127, not 128), and
    -1 at the last step (cos(pi/2) < 0 in float32).
    """
    _check_step(step, total_steps)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding: expected one of {ROUNDINGS}, got {rounding!r}")
    ratio = 1.0 * (step + 1) / total_steps
    if rounding == "float32":
        r = torch.cos(torch.tensor(ratio, dtype=torch.float32) * math.pi * 0.5)
        return int(torch.floor(num_tokens * r))
    return math.floor(num_tokens * math.cos(math.pi / 2 * ratio))


def mask_len(step: int, total_steps: int, num_tokens: int, num_masked: torch.Tensor | int, *,
             rounding: str = "float64", at_least_one: bool = False):
    """How many positions sampled at ``step`` are masked again (docs/METHOD.md, MaskGIT step 4).

    ``n = floor(num_tokens * cos(pi/2 * (step+1)/total_steps))`` (:func:`schedule_count`, with its
    ``rounding``), then

    * ``at_least_one=False`` (MaskGIT JAX): ``n`` clamped to ``[1, num_masked - 1]``; 0 when at most
      one position is masked;
    * ``at_least_one=True`` (the official UnlockMGM code): ``max(1, min(num_masked - 1, n))``, so
      at least one position is re-masked every step, even the last one masked;

    and 0 at the last step either way (the official code re-masks there too, but returns the
    step's sampled ids: the same tokens).

    Args:
        step: 0-based step index, in [0, total_steps).
        total_steps: T >= 1.
        num_tokens: N, tokens per image.
        num_masked: positions masked before this step: an int, or an int64 tensor ``[B]`` (kept on
            its device: no host sync).
        rounding: ``"float64"`` or ``"float32"`` (:func:`schedule_count`).
        at_least_one: the clamp (above).
    Returns:
        int, or int64 tensor ``[B]`` on ``num_masked``'s device.
    """
    _check_step(step, total_steps)
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    n = schedule_count(step, total_steps, num_tokens, rounding)
    last = step == total_steps - 1
    if isinstance(num_masked, torch.Tensor):
        if num_masked.dtype.is_floating_point or num_masked.dtype == torch.bool:
            raise TypeError(f"num_masked must be an integer tensor, got {num_masked.dtype}")
        if last:
            return torch.zeros_like(num_masked, dtype=torch.int64)
        if at_least_one:
            return (num_masked.to(torch.int64) - 1).clamp(max=n).clamp_min(1)
        upper = (num_masked.to(torch.int64) - 1).clamp_min(0)
        return torch.minimum(torch.full_like(upper, max(n, 1)), upper)
    if isinstance(num_masked, bool) or not isinstance(num_masked, int) or num_masked < 0:
        raise ValueError(f"num_masked must be a non-negative int or an int tensor, got {num_masked!r}")
    if last:
        return 0
    if at_least_one:
        return max(1, min(num_masked - 1, n))
    return max(0, min(max(n, 1), num_masked - 1))


def choice_temperature(step: int, total_steps: int, tau0: float, decay: str = "maskgit") -> float:
    """Choice temperature used at ``step``.

    * ``"maskgit"`` (default, MaskGIT): ``tau0 * (1 - (step+1)/T)``.
    * ``"compound"`` (open-muse and the official self-guidance code): the temperature is updated in
      place each step, ``tau <- tau * (1 - (k+1)/T)`` for k = 0..step, so it decays geometrically.
    """
    _check_step(step, total_steps)
    if tau0 < 0 or not math.isfinite(tau0):
        raise ValueError(f"tau0 must be a finite non-negative float, got {tau0!r}")
    if decay == "maskgit":
        return tau0 * (1.0 - (step + 1) / total_steps)
    if decay == "compound":
        tau = tau0
        for k in range(step + 1):
            tau *= 1.0 - (k + 1) / total_steps
        return tau
    raise ValueError(f"decay must be one of {TEMPERATURE_DECAYS}, got {decay!r}")
