"""``block_refine_step``: one step of block-wise refinement (LLaDA2 / DiffusionGemma), fused.

The step of diffusers' ``BlockRefinementScheduler`` as one op: sample a token per position of the
active block, take its probability as the confidence, commit the confident positions and apply the
editing transfer. Two ops, one schema each (csrc/schema.cpp):

* ``block_refine_step(logits [B, L, V], sample [B, L], ...)``: sampling + commit. C++ CPU kernel
  (csrc/cpu/sampling.cpp: guided_sample's row sampler, then the commit per batch row), Triton on
  CUDA (sgkernels/kernels/block_refine.py: guided_sample's row kernel, then the commit kernel; two
  launches, no host sync). Neither makes a ``[B, L, V]`` probability tensor or sorts the vocabulary.
* ``block_commit(tokens [B, L], probs [B, L], sample [B, L], ...)``: the commit alone, for callers
  that sampled already (the fused LM head of :class:`sgkernels.integrations.diffusers.FusedLLaDA2Pipeline`).

Sampling (the law of ``BlockRefinementScheduler._sample_from_logits``):

* ``temperature == 0``: ``tokens = argmax(logits)`` (the first on ties), ``probs = softmax(logits)[token]``
  (untempered, the filters do not apply);
* else ``tokens ~ q``, ``q = softmax(logits / temperature)`` filtered by ``top_k`` then ``top_p`` in
  ``filter_order`` (default ``"hf"``: top-p on the top-k set renormalised, diffusers' order;
  ``"dream"``: both on one distribution, :mod:`sgkernels.ops.filters`), and ``probs = q[token]``.
  Tokens come from guided_sample's exact inverse CDF with Philox uniforms (``seed``, ``offset``,
  row = flat position): the same law as diffusers' ``torch.multinomial``, not the same draws.

Commit, per batch row, with candidates ``C``, quota ``n`` and confidence ``c = probs``:

* mask mode (``mask_token_id`` given): ``C = sample == mask_token_id``, ``n = quota`` (the step's
  entry of the transfer schedule; ``quota < 0``: no schedule, nothing is committed);
* uniform mode (``mask_token_id`` None, DiffusionGemma): ``C = ~committed``,
  ``n = max(quota - committed.sum(), 0)`` (``quota``: the cumulative target of this step);
* ``transfer = C & (c > threshold | rank_C(c) < n)``, ``rank_C`` the rank among the candidates by
  decreasing ``c``, ties to the lower position. (The scheduler's "all above the threshold if they
  are at least ``n``, else the ``n`` most confident" is the same set; the stock code leaves ties to
  ``torch.topk`` / ``argsort``.)
* editing (``editing_threshold`` not None): mask mode: ``~C & ~prompt_mask & (tokens != sample) &
  (c > editing_threshold)``; uniform mode: ``committed & (tokens != sample) & (c > editing_threshold)``;
* ``prev_sample = where(transfer | edit, tokens, sample)``; uniform mode then puts ``noise`` (the
  caller's random tokens) on the positions still uncommitted: ``where(committed | transfer, prev, noise)``.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import _rng
from . import _status, _validate
from ._dispatch import call_sampling_kernel, choose_impl, register_triton_cuda
from .filters import check_filter_order
from .guided_sample import _sample_rows_reference, bad_rows

_BAD_ROW = "logits: a sampled row had NaN or +inf logits (or all -inf)"


# ------------------------------------------------------------------------------------------------
# Checks


def check_threshold(name: str, value, *, optional: bool = False) -> float | None:
    """A commit threshold: any float but NaN (``> 1`` never commits by threshold; None if ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name}: expected a float, got NaN")
    return value


def check_quota(value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"quota: expected an int, got {type(value).__name__}")
    return int(value)


def _check_commit_inputs(sample, mask_token_id, committed, noise, prompt_mask, threshold, editing_threshold, quota):
    """The commit's arguments checked; returns (threshold, editing_threshold, quota) normalised."""
    if not isinstance(sample, torch.Tensor) or sample.dtype != torch.int64:
        raise TypeError(f"sample: expected an int64 tensor [B, L], got {getattr(sample, 'dtype', type(sample).__name__)}")
    if sample.dim() != 2:
        raise ValueError(f"sample: expected shape [B, L], got {tuple(sample.shape)}")
    if mask_token_id is not None and (isinstance(mask_token_id, bool) or not isinstance(mask_token_id, numbers.Integral)):
        raise TypeError(f"mask_token_id: expected an int or None, got {type(mask_token_id).__name__}")
    if mask_token_id is None:
        if committed is None or noise is None:
            raise ValueError("committed, noise: both are required in the uniform mode (mask_token_id=None)")
        _validate.check_mask("committed", committed, sample.shape, sample.device)
        if not isinstance(noise, torch.Tensor) or noise.dtype != torch.int64:
            raise TypeError(f"noise: expected an int64 tensor, got {getattr(noise, 'dtype', type(noise).__name__)}")
        _validate.check_same("noise", noise, "sample", sample)
    if prompt_mask is not None:
        _validate.check_mask("prompt_mask", prompt_mask, sample.shape[1:], sample.device)
    threshold = check_threshold("threshold", threshold)
    editing_threshold = check_threshold("editing_threshold", editing_threshold, optional=True)
    if mask_token_id is not None and editing_threshold is not None and editing_threshold <= 0.0:
        editing_threshold = None  # the mask mode edits only with a positive threshold (diffusers)
    return threshold, editing_threshold, check_quota(quota)


# ------------------------------------------------------------------------------------------------
# References (the spec)


def block_commit_reference(tokens, probs, sample, *, mask_token_id=None, committed=None, noise=None, prompt_mask=None,
                           quota, threshold, editing_threshold=None):
    """Plain-PyTorch spec of :func:`block_commit`: ``(prev_sample, transfer, edit)`` (module docstring)."""
    threshold, editing_threshold, quota = _check_commit_inputs(sample, mask_token_id, committed, noise, prompt_mask,
                                                               threshold, editing_threshold, quota)
    c = probs.float()
    if mask_token_id is not None:
        cand = sample == mask_token_id
        need = torch.full((sample.shape[0],), quota, dtype=torch.int64, device=sample.device)
    else:
        cand = ~committed
        need = (quota - committed.sum(-1)).clamp_min(0)
    masked = torch.where(cand, c, -math.inf)
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(sample.shape[1], device=sample.device).expand_as(order))
    transfer = cand & ((c > threshold) | (rank < need[:, None]))
    if mask_token_id is not None and quota < 0:
        transfer = torch.zeros_like(transfer)
    edit = torch.zeros_like(transfer)
    if editing_threshold is not None:
        if mask_token_id is not None:
            editable = ~cand if prompt_mask is None else ~cand & ~prompt_mask[None, :]
        else:
            editable = committed
        edit = editable & (tokens != sample) & (c > editing_threshold)
    prev = torch.where(transfer | edit, tokens, sample)
    if mask_token_id is None:
        prev = torch.where(committed | transfer, prev, noise)
    return prev, transfer, edit


def block_refine_step_reference(logits, sample, *, mask_token_id=None, committed=None, noise=None, prompt_mask=None,
                                quota, threshold, editing_threshold=None, temperature=0.0, top_k=0, top_p=1.0,
                                filter_order="hf", seed, offset=0):
    """Plain-PyTorch spec of :func:`block_refine_step` (float64 softmax, sort-based filters, the ops'
    Philox stream). Returns ``(prev_sample, transfer, edit, tokens, probs)``."""
    _check_logits(logits, sample)
    temperature = _validate.check_float("temperature", temperature)
    top_k, top_p, _ = _validate.check_filters(top_k, top_p, 0.0)
    check_filter_order(filter_order)
    seed, offset = _validate.reference_rng(seed, offset, logits.device)
    g = logits.float().reshape(-1, logits.shape[-1])
    _status.raise_if(bad_rows(g).any(), _BAD_ROW)
    w0, w1, _, _ = _rng.row_words(seed, offset, torch.arange(g.shape[0], device=g.device))
    if temperature == 0.0:
        tokens, logp, _ = _sample_rows_reference(g, 0.0, _rng.token_uniform(w0, w1))
        probs = logp.exp()
    else:
        tokens, _, probs = _sample_rows_reference(g, temperature, _rng.token_uniform(w0, w1), top_k, top_p, 0.0,
                                                  "prob", filter_order)
    tokens, probs = tokens.reshape(sample.shape), probs.reshape(sample.shape)
    prev, transfer, edit = block_commit_reference(
        tokens, probs, sample, mask_token_id=mask_token_id, committed=committed, noise=noise, prompt_mask=prompt_mask,
        quota=quota, threshold=threshold, editing_threshold=editing_threshold)
    return prev, transfer, edit, tokens, probs


def _check_logits(logits, sample) -> None:
    _validate.check_logits("logits", logits, min_dim=3)
    if logits.dim() != 3:
        raise ValueError(f"logits: expected shape [B, L, V], got {tuple(logits.shape)}")
    if isinstance(sample, torch.Tensor) and tuple(logits.shape[:2]) != tuple(sample.shape):
        raise ValueError(f"logits: expected shape [{', '.join(map(str, sample.shape))}, V] (sample's [B, L] and a "
                         f"vocabulary), got {tuple(logits.shape)}")
    if isinstance(sample, torch.Tensor) and logits.device != sample.device:
        raise ValueError(f"logits: expected device {sample.device} (same as sample), got {logits.device}")


# ------------------------------------------------------------------------------------------------
# The ops


def block_commit(tokens: torch.Tensor, probs: torch.Tensor, sample: torch.Tensor, *, mask_token_id: int | None = None,
                 committed: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 prompt_mask: torch.Tensor | None = None, quota: int, threshold: float,
                 editing_threshold: float | None = None):
    """The commit of a block-refinement step on already sampled ``tokens`` / ``probs`` (module docstring).

    Args:
        tokens: int64 ``[B, L]`` sampled tokens. probs: float32 ``[B, L]`` their probabilities (the confidence).
        sample: int64 ``[B, L]`` the block's current tokens.
        mask_token_id: the mask token (mask mode), or None (uniform mode: ``committed`` and ``noise`` required).
        committed: bool ``[B, L]`` positions committed before this step (uniform mode).
        noise: int64 ``[B, L]`` tokens for the uncommitted positions (uniform mode).
        prompt_mask: bool ``[L]`` positions never edited (mask mode), or None.
        quota: mask mode: tokens to commit this step (< 0: nothing); uniform: the cumulative target.
        threshold: commit every candidate with ``probs > threshold`` (any float but NaN).
        editing_threshold: None (no editing) or a float (mask mode: only > 0 enables editing).
    Returns:
        ``prev_sample`` int64 ``[B, L]``, ``transfer`` bool ``[B, L]``, ``edit`` bool ``[B, L]``.
    """
    threshold, editing_threshold, quota = _check_commit_inputs(sample, mask_token_id, committed, noise, prompt_mask,
                                                               threshold, editing_threshold, quota)
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64:
        raise TypeError(f"tokens: expected an int64 tensor, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
    _validate.check_same("tokens", tokens, "sample", sample)
    if not isinstance(probs, torch.Tensor) or not probs.dtype.is_floating_point:
        raise TypeError(f"probs: expected a float tensor, got {getattr(probs, 'dtype', type(probs).__name__)}")
    _validate.check_same("probs", probs, "sample", sample)
    impl = choose_impl(sample.device)
    if impl == "torch":
        return block_commit_reference(tokens, probs, sample, mask_token_id=mask_token_id, committed=committed,
                                      noise=noise, prompt_mask=prompt_mask, quota=quota, threshold=threshold,
                                      editing_threshold=editing_threshold)
    if impl == "triton":
        from ..kernels import block_refine as kernels

        return kernels.block_commit_triton(tokens, probs.float(), sample, committed, prompt_mask, noise, mask_token_id,
                                           quota, threshold, editing_threshold)
    return torch.ops.sgkernels.block_commit(tokens, probs.float(), sample, committed, prompt_mask, noise, mask_token_id,
                                            quota, threshold, editing_threshold)


def block_refine_step(
    logits: torch.Tensor,
    sample: torch.Tensor,
    *,
    mask_token_id: int | None = None,
    committed: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    quota: int,
    threshold: float,
    editing_threshold: float | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    filter_order: str = "hf",
    seed: int | torch.Tensor | None = None,
    offset: int = 0,
):
    """One block-refinement step, sampling and commit fused (module docstring for the semantics).

    Args:
        logits: ``[B, L, V]`` float32/bfloat16/float16, the block's logits (any strides: a
            ``[:, -L:, :]`` slice of a window's logits is read in place).
        sample, mask_token_id, committed, noise, prompt_mask, quota, threshold, editing_threshold:
            as :func:`block_commit`.
        temperature: >= 0; 0 is greedy (argmax, probabilities of the untempered softmax).
        top_k: int >= 0 (0 = off); top_p: float in (0, 1] (1 = off); ``filter_order``: ``"hf"``
            (default: top-k, then top-p on the renormalised top-k set) or ``"dream"``.
        seed: int in [0, 2**63), a 0-dim int64 tensor on the logits' device (read by the kernel: no
            host sync), or None (drawn from torch's default generator). offset: stream offset.
    Returns:
        ``prev_sample`` int64, ``transfer`` bool, ``edit`` bool, ``tokens`` int64 and ``probs``
        float32, each ``[B, L]``.
    Raises:
        TypeError/ValueError on bad arguments, nothing computed. A row with NaN/+inf logits (or all
        -inf) raises ValueError on CPU; on CUDA it sets the flag :func:`sgkernels.check_errors` raises.
    """
    _check_logits(logits, sample)
    threshold, editing_threshold, quota = _check_commit_inputs(sample, mask_token_id, committed, noise, prompt_mask,
                                                               threshold, editing_threshold, quota)
    temperature = _validate.check_float("temperature", temperature)
    top_k, top_p, _ = _validate.check_filters(top_k, top_p, 0.0)
    check_filter_order(filter_order)
    seed, offset, seed_t, _ = _validate.check_rng(seed, offset, logits.device)
    impl = choose_impl(logits.device)
    if impl == "torch":
        return block_refine_step_reference(
            logits, sample, mask_token_id=mask_token_id, committed=committed, noise=noise, prompt_mask=prompt_mask,
            quota=quota, threshold=threshold, editing_threshold=editing_threshold, temperature=temperature,
            top_k=top_k, top_p=top_p, filter_order=filter_order, seed=seed if seed_t is None else seed_t, offset=offset)
    return call_sampling_kernel(
        "block_refine_step", "block_refine.block_refine_step_triton", impl, logits.device,
        logits, sample, committed, prompt_mask, noise, mask_token_id, quota, threshold, editing_threshold,
        temperature, top_k, top_p, filter_order, seed, offset, seed_tensor=seed_t,
    )


@torch.library.register_fake("sgkernels::block_refine_step")
def _block_refine_step_fake(logits, sample, committed, prompt_mask, noise, mask_token_id, quota, threshold,
                            editing_threshold, temperature, top_k, top_p, filter_order, seed, offset, status,
                            seed_tensor=None):
    shape = sample.shape
    return (sample.new_empty(shape), sample.new_empty(shape, dtype=torch.bool), sample.new_empty(shape, dtype=torch.bool),
            sample.new_empty(shape), sample.new_empty(shape, dtype=torch.float32))


@torch.library.register_fake("sgkernels::block_commit")
def _block_commit_fake(tokens, probs, sample, committed, prompt_mask, noise, mask_token_id, quota, threshold,
                       editing_threshold):
    shape = sample.shape
    return sample.new_empty(shape), sample.new_empty(shape, dtype=torch.bool), sample.new_empty(shape, dtype=torch.bool)


register_triton_cuda("block_refine_step", "block_refine", "block_refine_step_triton")
register_triton_cuda("block_commit", "block_refine", "block_commit_triton")
