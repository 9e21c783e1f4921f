"""Token filters (top-k, top-p, min-p) and remask confidences (prob, margin, entropy): the references.

Plain PyTorch, one full-vocabulary pass each; the specification the fused kernels are held to.

Filters. All three are computed on the *same* distribution ``p = softmax(logits)`` (the caller
passes the guided, tempered logits) and intersected; the kept tokens are renormalised by whoever
samples from the result. The token with the highest probability is always kept.

* ``top_k`` (0 = off): keep every token whose logit is >= the k-th largest logit (tokens tied with
  the k-th are all kept, so more than k may survive on exact ties).
* ``top_p`` (1.0 = off): keep the smallest set of most probable tokens whose mass is >= top_p;
  tokens tied in probability with the last one kept are kept too. Equivalently, keep
  ``{i : p_i >= tau}`` for the largest ``tau`` with ``sum_{p_j >= tau} p_j >= top_p``.
* ``min_p`` (0.0 = off): keep the tokens with ``p_i >= min_p * max_j p_j``.

Order: intersecting filters computed on one distribution is what Dream's ``sample_tokens`` does
(top-p on the full tempered distribution, then top-k on the logits). Hugging Face's and vLLM's
warpers instead apply top-p to the distribution *renormalised after top-k*, which may keep fewer
tokens when both are set. Dream's own top-p keeps a token while the mass before it is <= top_p,
which differs from the rule above only when a prefix mass equals top_p exactly.

Confidences (the ranking a remask step keeps the highest of), as Dream's ``sample_tokens`` defines
them on the filtered distribution ``p``:

* ``"prob"``: ``p[token]``, the probability of the sampled token;
* ``"margin"``: ``p_top1 - p_top2`` (Dream's ``alg="topk_margin"``);
* ``"entropy"``: ``sum_i p_i log(p_i + 1e-10)``, the negative entropy, so higher = more certain
  (Dream's ``alg="entropy"``, same epsilon).
"""
from __future__ import annotations

import math

import torch

CONFIDENCES = ("prob", "margin", "entropy")
_ENTROPY_EPS = 1e-10  # Dream's epsilon inside the log


def check_filters(top_k=0, top_p=1.0, min_p=0.0) -> tuple[int, float, float]:
    """The one validator of filter arguments: returns ``(top_k, top_p, min_p)`` as int, float, float."""
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k: expected an int >= 0 (0 = off), got {type(top_k).__name__}")
    if top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0 (0 = off), got {top_k}")
    for name, value in (("top_p", top_p), ("min_p", min_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    top_p, min_p = float(top_p), float(min_p)
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected a float in (0, 1] (1 = off), got {top_p}")
    if not (math.isfinite(min_p) and 0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p: expected a float in [0, 1] (0 = off), got {min_p}")
    return top_k, top_p, min_p


def check_confidence(kind) -> str:
    if kind not in CONFIDENCES:
        raise ValueError(f"confidence: expected one of {CONFIDENCES}, got {kind!r}")
    return kind


def filters_active(top_k: int, top_p: float, min_p: float) -> bool:
    return top_k > 0 or top_p < 1.0 or min_p > 0.0


def keep_mask_reference(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """bool ``[..., V]``: the tokens the three filters keep (see the module docstring)."""
    top_k, top_p, min_p = check_filters(top_k, top_p, min_p)
    g = logits.float()
    keep = torch.ones_like(g, dtype=torch.bool)
    vocab = g.shape[-1]
    if top_k > 0 and top_k < vocab:
        kth = torch.topk(g, top_k, dim=-1).values[..., -1:]
        keep &= g >= kth
    if top_p < 1.0 or min_p > 0.0:
        p = torch.softmax(g.double(), dim=-1)
        if min_p > 0.0:
            keep &= p >= min_p * p.amax(-1, keepdim=True)
        if top_p < 1.0:
            sorted_p = torch.sort(p, dim=-1, descending=True).values
            mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
            # the last sorted position still needed: mass before it < top_p; its probability is tau
            n_needed = (mass_before < top_p).sum(-1, keepdim=True).clamp_min(1)
            tau = sorted_p.gather(-1, n_needed - 1)
            keep &= p >= tau
    return keep


def filter_logits_reference(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """float32 ``logits`` with the tokens the filters drop set to ``-inf`` (sort-based reference)."""
    g = logits.float()
    if not filters_active(*check_filters(top_k, top_p, min_p)):
        return g
    return g.masked_fill(~keep_mask_reference(g, top_k, top_p, min_p), -math.inf)


def confidence_reference(logits: torch.Tensor, kind: str, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[...]`` confidence of each row of ``logits`` ``[..., V]`` (already tempered/filtered).

    ``kind``: ``"prob"`` (needs ``tokens`` ``[...]``, the sampled tokens), ``"margin"`` or ``"entropy"``,
    as defined in the module docstring, in float32 like Dream's float32 path.
    """
    check_confidence(kind)
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
    return (p * torch.log(p + _ENTROPY_EPS)).sum(-1)
