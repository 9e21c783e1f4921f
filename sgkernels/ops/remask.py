"""``remask_lowest_confidence``: per row, pick the ``num_to_mask`` least confident masked positions.

Confidence ``c = logp + choice_temperature * G`` with ``G ~ Gumbel(0, 1)`` from the ``_rng`` words
w2, w3 of each position (so the fused step, which samples with w0, w1 of the same counter, gives
exactly ``remask(guided_sample(...).logp)``). Positions that are not candidates are never chosen.
Ties in ``c`` go to the lower position index, so the set chosen is exactly the
``min(num_to_mask[b], #candidates[b])`` smallest ``(c, index)`` pairs of row b.

One op, ``torch.ops.sgkernels.remask_lowest_confidence``: C++ CPU kernel (csrc/cpu/sampling.cpp),
Triton CUDA kernel (sgkernels/kernels/sampling.py), fake kernel and reference here.
"""
from __future__ import annotations

import torch

from .. import _rng
from .._backend import triton_available
from . import _validate
from ._dispatch import call_sampling_kernel, choose_impl


def noisy_confidence_reference(logp: torch.Tensor, choice_temperature: float, seed: int, offset: int) -> torch.Tensor:
    """``logp + choice_temperature * G`` in float32, ``G`` the Gumbel noise of each flattened position."""
    rows = torch.arange(logp.numel(), device=logp.device)
    _, _, w2, w3 = _rng.row_words(seed, offset, rows)
    g = _rng.gumbel(w2, w3).reshape(logp.shape)
    return logp.float() + torch.tensor(choice_temperature, dtype=torch.float32) * g


def select_lowest_reference(conf: torch.Tensor, candidates: torch.Tensor, num_to_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, N]: per row the ``min(n_b, #candidates)`` candidates with the smallest (conf, index)."""
    order = torch.argsort(conf, dim=-1, stable=True)
    order = order.gather(-1, torch.argsort((~candidates).gather(-1, order).to(torch.int8), dim=-1, stable=True))
    n = torch.minimum(num_to_mask.to(torch.int64), candidates.sum(-1))
    rank_chosen = torch.arange(conf.shape[-1], device=conf.device)[None, :] < n[:, None]
    return torch.zeros_like(candidates).scatter(-1, order, rank_chosen.expand_as(order))


def remask_reference(
    logp: torch.Tensor,
    is_masked: torch.Tensor,
    num_to_mask,
    *,
    choice_temperature: float = 0.0,
    seed,
    offset=0,
) -> torch.Tensor:
    """Plain-PyTorch spec of :func:`remask_lowest_confidence` (a stable sort per row)."""
    seed, offset = _validate.rng_ints(*_validate.check_rng(seed, offset, logp.device))
    n = _validate.num_to_mask_tensor(num_to_mask, logp.shape[0], logp.device)
    if bool((n < 0).any()):
        raise ValueError("num_to_mask: expected values >= 0, got a negative entry")
    conf = noisy_confidence_reference(logp, choice_temperature, seed, offset)
    return select_lowest_reference(conf, is_masked, n)


def remask_lowest_confidence(
    logp: torch.Tensor,
    is_masked: torch.Tensor,
    num_to_mask,
    *,
    choice_temperature: float = 0.0,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Choose which sampled positions to mask again: the lowest-confidence candidates of each row.

    Args:
        logp: ``[B, N]`` float32 (bf16/fp16 are upcast) log-probabilities of the sampled tokens.
        is_masked: ``[B, N]`` bool, the candidates (positions sampled this step).
        num_to_mask: int, or int64 tensor ``[B]`` on logp's device (never read on the host).
        choice_temperature: tau >= 0, scale of the Gumbel noise added to ``logp``.
        seed, offset: the RNG stream (see :mod:`sgkernels._rng`); seed None draws from torch. Either
            may be a 0-dim int64 tensor on logp's device, read by the kernel (as :func:`guided_sample`).
    Returns:
        bool ``[B, N]``: exactly ``min(num_to_mask[b], #candidates[b])`` True per row, only at candidates.
    Raises:
        TypeError/ValueError on bad arguments. A negative entry of a ``num_to_mask`` tensor raises at
        once on CPU, and through :func:`sgkernels.check_errors` on CUDA (no host sync per step).
    """
    if not isinstance(logp, torch.Tensor):
        raise TypeError(f"logp: expected a torch.Tensor, got {type(logp).__name__}")
    if not logp.dtype.is_floating_point or logp.dtype == torch.float64:
        raise TypeError(f"logp: expected a float32/bfloat16/float16 tensor, got {logp.dtype}")
    if logp.dim() != 2:
        raise ValueError(f"logp: expected shape [B, N], got {tuple(logp.shape)}")
    _validate.check_mask("is_masked", is_masked, logp.shape, logp.device)
    n = _validate.num_to_mask_tensor(num_to_mask, logp.shape[0], logp.device)
    tau = _validate.check_float("choice_temperature", choice_temperature)
    seed, offset, seed_t, offset_t = _validate.check_rng(seed, offset, logp.device)
    impl = choose_impl(logp.device)
    if impl == "torch":
        return remask_reference(logp, is_masked, n, choice_temperature=tau, seed=seed if seed_t is None else seed_t,
                                offset=offset if offset_t is None else offset_t)
    return call_sampling_kernel("remask_lowest_confidence", _triton().remask_triton, impl, logp.device, logp.float(),
                                is_masked, n, tau, seed, offset, seed_t, offset_t)


@torch.library.register_fake("sgkernels::remask_lowest_confidence")
def _remask_fake(logp, is_masked, num_to_mask, choice_temperature, seed, offset, seed_tensor, offset_tensor, status):
    return torch.empty_like(is_masked)


def _triton():
    from ..kernels import sampling

    return sampling


def _remask_cuda(*args):
    return _triton().remask_triton(*args)


if triton_available():
    torch.library.register_kernel("sgkernels::remask_lowest_confidence", "cuda", _remask_cuda)
