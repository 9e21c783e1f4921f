"""Token filters (top-k, top-p, min-p) and remask confidences (logp, prob, margin, entropy): the references.

Plain PyTorch, sort-based; the specification the fused kernels (which do not sort) are held to.

Filters. All three are computed on the *same* distribution ``q = softmax(x)`` and intersected; the
kept tokens are renormalised by whoever samples from the result. In the ops, ``x`` is the guided,
tempered logits ``g / temperature`` in float64 (``g`` itself at ``temperature == 0``, as Dream does).
The token with the highest probability is always kept.

* ``top_k`` (0 = off): keep every token whose logit is >= the k-th largest logit. Ties: every token
  tied with the k-th is kept, so more than k may survive on exact ties.
* ``top_p`` (1.0 = off): in the order of decreasing probability, keep a token while the mass *before*
  it is ``<= top_p`` (Dream's ``top_p_logits`` and diffusers' ``BlockRefinementScheduler``: "remove
  where the previous cumulative mass > top_p"). Ties: tokens tied with the last one kept are all kept.
  Equivalently, keep ``{i : x_i >= tau}`` for the largest ``tau`` among the ``x_i`` with
  ``sum_{x_j >= tau} q_j > top_p`` (all tokens when none has). The masses are computed as the kernels
  compute them: ``exp(x - max)`` rounded to float32, summed in float64, so a prefix mass that is
  exactly ``top_p`` (e.g. probabilities 1/2, 1/4, 1/8, 1/8 and ``top_p = 0.5``: two tokens kept) is
  seen as equal. transformers' ``TopPLogitsWarper`` differs at that boundary: it removes the tokens
  whose ascending cumulative mass is ``<= 1 - top_p``, i.e. keeps while the mass before is
  ``< top_p`` (one token in the example).
* ``min_p`` (0.0 = off): keep the tokens with ``q_i >= min_p * max_j q_j``.

Order (``filter_order``), two named rules, which differ only when top-k and top-p are both set:

* ``"dream"`` (the default): the filters are computed on the *same* distribution and intersected,
  as Dream's ``sample_tokens`` does (top-p on the full tempered distribution, then top-k on the
  logits);
* ``"hf"``: top-k first, then top-p on the distribution *renormalised over the top-k set*, as Hugging
  Face's logits warpers, vLLM and diffusers' ``BlockRefinementScheduler`` do. It keeps at most as
  many tokens as ``"dream"`` (top-p then needs ``top_p`` of the top-k mass, which is <= 1).
  ``min_p`` is a ratio to the top probability, which renormalising does not change: the same in both.

Confidences (the score a remask step keeps the highest of; ``choice_temperature * Gumbel`` noise
is added to it). ``"logp"`` is the ops' default (MaskGIT's); the other three are Dream's
``sample_tokens`` definitions on the filtered, renormalised distribution ``q_f``:

* ``"logp"``: ``log_softmax(g)[token]``, the untempered, unfiltered guided log-probability (the
  ``logp`` output of :func:`sgkernels.guided_sample`);
* ``"prob"``: ``q_f[token]``, the probability of the sampled token (Dream's ``alg="maskgit_plus"``);
  at ``temperature == 1`` without filters it ranks the rows exactly as ``"logp"`` does;
* ``"margin"``: ``q_f top1 - q_f top2`` (Dream's ``alg="topk_margin"``; 0 when the top two tie);
* ``"entropy"``: ``sum_i q_f,i log(q_f,i + 1e-10)``, the negative entropy, so higher = more certain
  (Dream's ``alg="entropy"``, same epsilon).
"""

from __future__ import annotations

import math

import torch

from ._validate import CONFIDENCES, check_confidence, check_filters

DREAM_CONFIDENCES = ("prob", "margin", "entropy")
FILTER_ORDERS = ("dream", "hf")
ENTROPY_EPS = 1e-10  # Dream's epsilon inside the log


def filters_active(top_k: int, top_p: float, min_p: float) -> bool:
    return top_k > 0 or top_p < 1.0 or min_p > 0.0


def check_filter_order(order) -> str:
    """``order`` if it is one of :data:`FILTER_ORDERS`, else ValueError naming ``filter_order``."""
    if order not in FILTER_ORDERS:
        raise ValueError(f"filter_order: expected one of {FILTER_ORDERS}, got {order!r}")
    return order


def keep_mask_reference(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                        filter_order: str = "dream") -> torch.Tensor:
    """bool ``[..., V]``: the tokens the three filters keep (see the module docstring)."""
    top_k, top_p, min_p = check_filters(top_k, top_p, min_p)
    check_filter_order(filter_order)
    g = logits if logits.dtype == torch.float64 else logits.float()
    keep = torch.ones_like(g, dtype=torch.bool)
    vocab = g.shape[-1]
    in_top_k = None
    if top_k > 0 and top_k < vocab:
        kth = torch.topk(g, top_k, dim=-1).values[..., -1:]
        in_top_k = g >= kth
        keep &= in_top_k
    if top_p < 1.0 or min_p > 0.0:
        p = torch.softmax(g.double(), dim=-1)
        if min_p > 0.0:
            keep &= p >= min_p * p.amax(-1, keepdim=True)
        if top_p < 1.0:
            # the masses as the kernels compute them (and as Dream / diffusers do, in float32): e = exp(x - max)
            # rounded to float32, sums in float64, so that a prefix mass that equals top_p exactly is seen as equal
            x = g.double()
            if filter_order == "hf" and in_top_k is not None:  # top-p on the renormalised top-k set
                x = x.masked_fill(~in_top_k, -math.inf)
            e = torch.exp((x - x.amax(-1, keepdim=True)).float()).double()
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            sorted_e = e.gather(-1, order)
            mass_before = torch.cat([torch.zeros_like(sorted_e[..., :1]), torch.cumsum(sorted_e, dim=-1)[..., :-1]], -1)
            # a sorted position is kept while the mass before it is <= top_p (Dream's and diffusers' rule);
            # every token tied with the last kept one is kept
            n_needed = (mass_before <= top_p * e.sum(-1, keepdim=True)).sum(-1, keepdim=True).clamp_min(1)
            keep &= x >= sorted_x.gather(-1, n_needed - 1)
    return keep


def filter_logits_reference(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                            filter_order: str = "dream") -> torch.Tensor:
    """float32 ``logits`` with the tokens the filters drop set to ``-inf`` (sort-based reference)."""
    g = logits.float()
    if not filters_active(*check_filters(top_k, top_p, min_p)):
        return g
    return g.masked_fill(~keep_mask_reference(g, top_k, top_p, min_p, filter_order), -math.inf)


def confidence_reference(logits: torch.Tensor, kind: str, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Dream's confidence: float32 ``[...]`` confidence of each row of ``logits`` ``[..., V]`` (already tempered/filtered).

    ``kind``: ``"prob"`` (needs ``tokens`` ``[...]``, the sampled tokens), ``"margin"`` or ``"entropy"``,
    as defined in the module docstring, in float32 like Dream's float32 path.
    """
    check_confidence(kind, DREAM_CONFIDENCES)
    p = torch.softmax(logits.float(), dim=-1)
    if kind == "prob":
        if tokens is None:
            raise ValueError('tokens: required for confidence="prob"')
        return p.gather(-1, tokens[..., None].to(torch.int64))[..., 0]
    if kind == "margin":
        if p.shape[-1] < 2:
            return p[..., 0]
        top2 = torch.topk(p, 2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return (p * torch.log(p + ENTROPY_EPS)).sum(-1)
