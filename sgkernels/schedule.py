"""MaskGIT schedules (docs/METHOD.md): the cosine mask schedule and the choice-temperature decays.

Pure Python / tensor arithmetic, no kernels: the sampler and users call these between steps.
"""
from __future__ import annotations

import math

import torch

TEMPERATURE_DECAYS = ("maskgit", "compound")


def _check_step(step: int, total_steps: int) -> None:
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if not isinstance(step, int) or not 0 <= step < total_steps:
        raise ValueError(f"step must be an int in [0, total_steps={total_steps}), got {step!r}")


def mask_ratio(step: int, total_steps: int) -> float:
    """cos(pi/2 * (step+1)/total_steps): the fraction of tokens still masked after ``step``."""
    _check_step(step, total_steps)
    return math.cos(math.pi / 2 * (step + 1) / total_steps)


def mask_len(step: int, total_steps: int, num_tokens: int, num_masked: torch.Tensor | int):
    """How many positions sampled at ``step`` are masked again (docs/METHOD.md, MaskGIT step 4).

    ``n = floor(num_tokens * cos(pi/2 * (step+1)/total_steps))`` clamped to
    ``[1, num_masked - 1]``; ``n = 0`` at the last step, and when at most one position is masked.

    Args:
        step: 0-based step index, in [0, total_steps).
        total_steps: T >= 1.
        num_tokens: N, tokens per image.
        num_masked: positions masked before this step: an int, or an int64 tensor ``[B]`` (kept on
            its device: no host sync).
    Returns:
        int, or int64 tensor ``[B]`` on ``num_masked``'s device.
    """
    _check_step(step, total_steps)
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    n = math.floor(num_tokens * mask_ratio(step, total_steps))
    last = step == total_steps - 1
    if isinstance(num_masked, torch.Tensor):
        if num_masked.dtype.is_floating_point or num_masked.dtype == torch.bool:
            raise TypeError(f"num_masked must be an integer tensor, got {num_masked.dtype}")
        if last:
            return torch.zeros_like(num_masked, dtype=torch.int64)
        upper = (num_masked.to(torch.int64) - 1).clamp_min(0)
        return torch.minimum(torch.full_like(upper, max(n, 1)), upper)
    if isinstance(num_masked, bool) or not isinstance(num_masked, int) or num_masked < 0:
        raise ValueError(f"num_masked must be a non-negative int or an int tensor, got {num_masked!r}")
    if last:
        return 0
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
