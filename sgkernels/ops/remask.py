"""``remask_lowest_confidence``: per row, pick the ``num_to_mask`` least confident masked positions.

Confidence ``c = logp + choice_temperature * G`` with ``G ~ Gumbel(0, 1)`` from the ``_rng`` words
w2, w3 of each position (so the fused step, which samples with w0, w1 of the same counter, gives
exactly ``remask(guided_sample(...).logp)``).

Candidates: the masked positions (``is_masked``); with ``decoded_confidence = c0`` the decoded
positions too, with confidence ``c0 + choice_temperature * G`` (the official UnlockMGM / open-muse
code: ``c0 = log(float32 max)``). Other positions are never chosen.

Tie rules (``tie_rule``):

* ``"exact_k"`` (MaskGIT JAX): exactly ``min(num_to_mask[b], #candidates[b])`` positions, the
  smallest ``(c, index)`` pairs: ties in ``c`` go to the lower position index;
* ``"strict_below"`` (the official PyTorch code, ``c < sort(c)[k]``): the candidates whose ``c`` is
  strictly below the ``c`` of rank ``k = num_to_mask[b]`` (0-based) among the candidates, all of
  them when ``k >= #candidates``; a tie at the cut can leave fewer than ``k`` chosen.

NaN confidences sort last, as in ``torch.sort``.

One op, ``torch.ops.sgkernels.remask_lowest_confidence``: C++ CPU kernel (csrc/cpu/sampling.cpp),
Triton CUDA kernel (sgkernels/kernels/sampling.py), fake kernel and reference here.
"""
from __future__ import annotations

import torch

from .. import _rng
from . import _status, _validate
from ._dispatch import call_sampling_kernel, choose_impl, register_triton_cuda


TIE_RULES = ("exact_k", "strict_below")


def noisy_confidence_reference(
    logp: torch.Tensor, choice_temperature: float, seed: int, offset: int,
    is_masked: torch.Tensor | None = None, decoded_confidence: float | None = None,
) -> torch.Tensor:
    """``base + choice_temperature * G`` in float32, ``G`` the Gumbel noise of each flattened position;
    ``base`` is ``logp``, and ``decoded_confidence`` where ``is_masked`` is False when it is given."""
    rows = torch.arange(logp.numel(), device=logp.device)
    _, _, w2, w3 = _rng.row_words(seed, offset, rows)
    g = _rng.gumbel(w2, w3).reshape(logp.shape)
    base = logp.float()
    if decoded_confidence is not None:
        base = torch.where(is_masked, base, torch.tensor(decoded_confidence, dtype=torch.float32))
    return base + torch.tensor(choice_temperature, dtype=torch.float32) * g


def select_lowest_reference(
    conf: torch.Tensor, candidates: torch.Tensor, num_to_mask: torch.Tensor, tie_rule: str = "exact_k"
) -> torch.Tensor:
    """bool [B, N]: per row the candidates chosen by ``tie_rule`` (module docstring) from ``conf``."""
    order = torch.argsort(conf, dim=-1, stable=True)
    order = order.gather(-1, torch.argsort((~candidates).gather(-1, order).to(torch.int8), dim=-1, stable=True))
    n_cand = candidates.sum(-1)
    if tie_rule == "strict_below":
        k = num_to_mask.to(torch.int64)
        cut = conf.gather(-1, order.gather(-1, k.clamp(max=conf.shape[-1] - 1)[:, None]))  # rank k's conf
        below = (conf < cut) | (torch.isnan(cut) & ~torch.isnan(conf))  # NaN sorts last
        return candidates & (below | (k >= n_cand)[:, None])
    n = torch.minimum(num_to_mask.to(torch.int64), n_cand)
    rank_chosen = torch.arange(conf.shape[-1], device=conf.device)[None, :] < n[:, None]
    return torch.zeros_like(candidates).scatter(-1, order, rank_chosen.expand_as(order))


def check_remask_options(decoded_confidence, tie_rule) -> tuple[float | None, bool]:
    """``(decoded_confidence as float or None, strict_below)``, validated; errors name the argument."""
    if decoded_confidence is not None:
        decoded_confidence = _validate.check_float("decoded_confidence", decoded_confidence, nonneg=False)
        if abs(decoded_confidence) > 3.4028234663852886e38:
            raise ValueError(f"decoded_confidence: expected a float32-representable value, got {decoded_confidence}")
    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule: expected one of {TIE_RULES}, got {tie_rule!r}")
    return decoded_confidence, tie_rule == "strict_below"


def remask_reference(
    logp: torch.Tensor,
    is_masked: torch.Tensor,
    num_to_mask,
    *,
    choice_temperature: float = 0.0,
    seed,
    offset=0,
    decoded_confidence: float | None = None,
    tie_rule: str = "exact_k",
) -> torch.Tensor:
    """Plain-PyTorch spec of :func:`remask_lowest_confidence` (a stable sort per row)."""
    seed, offset = _validate.reference_rng(seed, offset, logp.device)
    n = _validate.num_to_mask_tensor(num_to_mask, logp.shape[0], logp.device)
    _status.raise_if((n < 0).any(), "num_to_mask: expected values >= 0, got a negative entry")
    conf = noisy_confidence_reference(logp, choice_temperature, seed, offset, is_masked, decoded_confidence)
    candidates = is_masked if decoded_confidence is None else torch.ones_like(is_masked)
    return select_lowest_reference(conf, candidates, n, tie_rule)


def remask_lowest_confidence(
    logp: torch.Tensor,
    is_masked: torch.Tensor,
    num_to_mask,
    *,
    choice_temperature: float = 0.0,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    decoded_confidence: float | None = None,
    tie_rule: str = "exact_k",
) -> torch.Tensor:
    """Choose which sampled positions to mask again: the lowest-confidence candidates of each row.

    Args:
        logp: ``[B, N]`` float32 (bf16/fp16 are upcast) log-probabilities of the sampled tokens
            (read at masked positions only).
        is_masked: ``[B, N]`` bool, the positions sampled this step.
        num_to_mask: int, or int64 tensor ``[B]`` on logp's device (never read on the host).
        choice_temperature: tau >= 0, scale of the Gumbel noise added to ``logp``.
        seed, offset: the RNG stream (see :mod:`sgkernels._rng`); seed None draws from torch. Either
            may be a 0-dim int64 tensor on logp's device, read by the kernel (as :func:`guided_sample`).
        decoded_confidence: None (decoded positions are never chosen), or a finite float: the
            decoded positions compete with confidence ``decoded_confidence + tau * G``.
        tie_rule: ``"exact_k"`` or ``"strict_below"`` (module docstring).
    Returns:
        bool ``[B, N]``, True only at candidates: ``min(num_to_mask[b], #candidates[b])`` per row
        with ``"exact_k"``, at most that with ``"strict_below"``.
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
    dec, strict = check_remask_options(decoded_confidence, tie_rule)
    seed, offset, seed_t, offset_t = _validate.check_rng(seed, offset, logp.device)
    impl = choose_impl(logp.device)
    if impl == "torch":
        return remask_reference(logp, is_masked, n, choice_temperature=tau, seed=seed if seed_t is None else seed_t,
                                offset=offset if offset_t is None else offset_t, decoded_confidence=dec,
                                tie_rule=tie_rule)
    return call_sampling_kernel(
        "remask_lowest_confidence", "sampling.remask_triton", impl, logp.device,
        logp.float(), is_masked, n, tau, seed, offset, decoded_confidence=dec, strict_below=strict,
        seed_tensor=seed_t, offset_tensor=offset_t,
    )


@torch.library.register_fake("sgkernels::remask_lowest_confidence")
def _remask_fake(logp, is_masked, num_to_mask, choice_temperature, seed, offset, status, decoded_confidence=None,
                 strict_below=False, seed_tensor=None, offset_tensor=None):
    return torch.empty_like(is_masked)


register_triton_cuda("remask_lowest_confidence", "sampling", "remask_triton")
