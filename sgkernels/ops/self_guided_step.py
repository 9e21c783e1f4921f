"""``self_guided_step``: one fused MaskGIT step with self-guidance.

Masked positions get a token sampled from the guided logits (as :func:`guided_sample`); known
positions keep theirs and their logits are never read. Then the ``num_to_mask`` least confident of
the positions just sampled are masked again (as :func:`remask_lowest_confidence`, same seed and
offset), and their token is reset to what ``tokens`` held there (the mask id).

One op, ``torch.ops.sgkernels.self_guided_step``: C++ CPU kernel (csrc/cpu/sampling.cpp), Triton CUDA
kernels (sgkernels/kernels/sampling.py), fake kernel and reference here.
"""
from __future__ import annotations

import torch

from .. import _rng
from . import _status, _validate
from ._dispatch import call_sampling_kernel, choose_impl, register_triton_cuda
from .guided_sample import _sample_rows_reference, bad_rows, guided_logits
from .remask import check_remask_options, noisy_confidence_reference, select_lowest_reference


def self_guided_step_reference(
    tokens, is_masked, logits, guide_logits, num_to_mask, *, guidance_scale, temperature, choice_temperature, seed,
    offset=0, decoded_confidence=None, tie_rule="exact_k", mask_token_id=None, top_k=0, top_p=1.0, min_p=0.0,
    confidence="logp",
):
    """Plain-PyTorch spec of :func:`self_guided_step`."""
    top_k, top_p, min_p = _validate.check_filters(top_k, top_p, min_p)
    _validate.check_confidence(confidence)
    seed, offset = _validate.reference_rng(seed, offset, logits.device)
    batch, n_tok, vocab = logits.shape
    n = _validate.num_to_mask_tensor(num_to_mask, batch, logits.device)
    _status.raise_if((n < 0).any(), "num_to_mask: expected values >= 0, got a negative entry")
    # Every row is sampled and the known ones discarded (no data-dependent shapes: torch.compile
    # traces it in one graph); a known row's logits are replaced by zeros before sampling.
    flat_mask = is_masked.reshape(-1)
    rows = torch.arange(flat_mask.numel(), device=logits.device)
    g = guided_logits(logits.reshape(-1, vocab), None if guide_logits is None else guide_logits.reshape(-1, vocab), guidance_scale)
    _status.raise_if(
        (bad_rows(g) & flat_mask).any(), "logits: a sampled row had NaN or +inf guided logits (or all -inf)"
    )
    g = torch.where(flat_mask[:, None], g, 0.0)
    w0, w1, _, _ = _rng.row_words(seed, offset, rows)
    sampled, _, conf_rows = _sample_rows_reference(
        g, temperature, _rng.token_uniform(w0, w1), top_k, top_p, min_p, confidence
    )
    new_tokens = torch.where(flat_mask, sampled.to(torch.int64), tokens.reshape(-1))
    score = torch.where(flat_mask, conf_rows, 0.0)
    conf = noisy_confidence_reference(score.reshape(batch, n_tok), choice_temperature, seed, offset, is_masked,
                                      decoded_confidence)
    candidates = is_masked if decoded_confidence is None else torch.ones_like(is_masked)
    remask = select_lowest_reference(conf, candidates, n, tie_rule)
    reset = tokens if mask_token_id is None else torch.full_like(tokens, mask_token_id)
    new_tokens = torch.where(remask, reset, new_tokens.reshape(batch, n_tok))
    return new_tokens, remask


def self_guided_step(
    tokens: torch.Tensor,
    is_masked: torch.Tensor,
    logits: torch.Tensor,
    guide_logits: torch.Tensor | None,
    num_to_mask,
    *,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    choice_temperature: float = 0.0,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    decoded_confidence: float | None = None,
    tie_rule: str = "exact_k",
    mask_token_id: int | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    confidence: str = "logp",
):
    """One fused MaskGIT step: sample masked positions, re-mask the least confident.

    Args:
        tokens: ``[B, N]`` int64 (int32 is accepted); masked positions hold the mask id.
        is_masked: ``[B, N]`` bool.
        logits, guide_logits: ``[B, N, V]`` float32/bfloat16/float16 (guide may be None), any strides.
        num_to_mask: int or int64 tensor ``[B]``: how many just-sampled positions to mask again.
        guidance_scale, temperature, choice_temperature: s, t_tok >= 0, tau >= 0.
        seed, offset: the RNG stream; use a distinct offset per step (e.g. the step index). Either may
            be a 0-dim int64 tensor on logits' device, read by the kernels: a CUDA graph or a compiled
            step replays with the value it holds (update it in place between replays).
        decoded_confidence: None (a known position is never re-masked), or a finite float with
            which known positions compete for re-masking (confidence ``decoded_confidence + tau * G``;
            the official code: ``log(float32 max)``); see :func:`remask_lowest_confidence`.
        tie_rule: ``"exact_k"`` or ``"strict_below"`` (:func:`remask_lowest_confidence`).
        mask_token_id: the token written at re-masked positions; None keeps what ``tokens`` held
            there (the mask id: right unless known positions can be re-masked, so it is required
            with ``decoded_confidence``).
        top_k, top_p, min_p: token filters on the tempered guided distribution, as :func:`guided_sample`.
        confidence: the remask score ``c`` of a sampled position (ranked as ``c + tau * Gumbel``,
            lowest re-masked): ``"logp"`` (default: the untempered, unfiltered log-probability of the
            sampled token, MaskGIT's), or Dream's ``"prob" | "margin" | "entropy"`` of the filtered
            tempered distribution (:mod:`sgkernels.ops.filters`); computed by the sampling pass itself.
    Returns:
        ``new_tokens`` int64 ``[B, N]`` and ``new_is_masked`` bool ``[B, N]``.
    Raises:
        as :func:`guided_sample` and :func:`remask_lowest_confidence` (only masked rows are checked
        for NaN; on CUDA through :func:`sgkernels.check_errors`).
    """
    _validate.check_logits("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits: expected shape [B, N, V], got {tuple(logits.shape)}")
    if guide_logits is not None:
        _validate.check_logits("guide_logits", guide_logits)
        _validate.check_same("guide_logits", guide_logits, "logits", logits)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens: expected an int64 tensor [B, N], got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens: expected an int64 (or int32) tensor, got {tokens.dtype}")
    if tokens.shape != logits.shape[:2] or tokens.device != logits.device:
        raise ValueError(
            f"tokens: expected shape {tuple(logits.shape[:2])} on {logits.device} (logits' [B, N]), "
            f"got {tuple(tokens.shape)} on {tokens.device}"
        )
    _validate.check_mask("is_masked", is_masked, tokens.shape, logits.device)
    n = _validate.num_to_mask_tensor(num_to_mask, logits.shape[0], logits.device)
    guidance_scale = _validate.check_guidance_scale(guidance_scale)
    temperature = _validate.check_float("temperature", temperature)
    tau = _validate.check_float("choice_temperature", choice_temperature)
    dec, strict = check_remask_options(decoded_confidence, tie_rule)
    if mask_token_id is not None and (isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int)):
        raise TypeError(f"mask_token_id: expected an int or None, got {type(mask_token_id).__name__}")
    if dec is not None and mask_token_id is None:
        raise ValueError("mask_token_id: expected an int when decoded_confidence is set (re-masked decoded "
                         "positions get it), got None")
    top_k, top_p, min_p = _validate.check_filters(top_k, top_p, min_p)
    _validate.check_confidence(confidence)
    seed, offset, seed_t, offset_t = _validate.check_rng(seed, offset, logits.device)
    tokens = tokens.to(torch.int64)
    impl = choose_impl(logits.device)
    if impl == "torch":
        return self_guided_step_reference(
            tokens, is_masked, logits, guide_logits, n, guidance_scale=guidance_scale, temperature=temperature,
            choice_temperature=tau, seed=seed if seed_t is None else seed_t,
            offset=offset if offset_t is None else offset_t, decoded_confidence=dec, tie_rule=tie_rule,
            mask_token_id=mask_token_id, top_k=top_k, top_p=top_p, min_p=min_p, confidence=confidence,
        )
    return call_sampling_kernel(
        "self_guided_step", "sampling.self_guided_step_triton", impl, logits.device,
        tokens, is_masked, logits, guide_logits, n, guidance_scale, temperature, tau, seed, offset,
        decoded_confidence=dec, strict_below=strict, mask_token_id=mask_token_id, top_k=top_k, top_p=top_p,
        min_p=min_p, confidence=confidence, seed_tensor=seed_t, offset_tensor=offset_t,
    )


@torch.library.register_fake("sgkernels::self_guided_step")
def _self_guided_step_fake(tokens, is_masked, logits, guide_logits, num_to_mask, s, t, tau, seed, offset, status,
                           decoded_confidence=None, strict_below=False, mask_token_id=None, top_k=0, top_p=1.0,
                           min_p=0.0, confidence="logp", seed_tensor=None, offset_tensor=None):
    return torch.empty_like(tokens), torch.empty_like(is_masked)


register_triton_cuda("self_guided_step", "sampling", "self_guided_step_triton")
