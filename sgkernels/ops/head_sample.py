"""``head_sample``: the LM head fused with guided sampling: ``guided_sample(hidden @ W^T + b)`` without the logits.

One op, ``torch.ops.sgkernels.head_sample``: C++ CPU kernel (csrc/cpu/head_sample.cpp), Triton
CUDA kernels (sgkernels/kernels/head_sample.py), fake kernel here, and
:func:`head_sample_reference`, the plain-PyTorch spec the kernels are tested against.

Two exact facts make it cheap (docs/METHOD.md):

* the guidance blend commutes with a linear head,
  ``g + (1+s)(c - g)`` on logits = ``W (h_g + (1+s)(h_c - h_g)) + b``: guidance costs ONE GEMM on the
  blended hidden states (CFG, self-guidance, and the TOAST guide, which shares the output projection);
* only the rows that are decoded need logits (``rows``): the others are never projected.

Sampling method (every backend): guided_sample's exact inverse CDF with the same float64 uniform per
row (Philox words w0, w1 of the row's index in ``hidden``'s flattened leading dims), made two-level
over vocabulary tiles: pass 1 keeps each tile's max and float64 exp-sums, the uniform picks the tile,
and only that tile's logits are computed again. So with the same seed/offset the tokens equal
guided_sample's on the materialised logits, except where the GEMM's rounding moves a CDF step
across the uniform (a difference of ~1 float32 ulp in a logit; tests/op_contract.py TOLERANCES).

Filters (top_k / top_p / min_p) are not part of this op yet. Their extension point is pass 1: a
filter needs order statistics of the whole row, which the per-tile statistics can carry (per-tile
top-k candidates merged across tiles, then the filter and the inverse CDF on the candidates);
``head_sample`` takes no filter arguments until its kernels do that.
"""
from __future__ import annotations

import torch

from .. import _rng
from .._backend import triton_available
from . import _status, _validate
from ._dispatch import call_sampling_kernel, choose_impl
from .guided_sample import _sample_rows_reference, bad_rows


def blend_hidden(hidden: torch.Tensor, guide_hidden: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """``guide + (1 + s) * (hidden - guide)`` in float32 (``hidden`` as float32 without a guide)."""
    h = hidden.float()
    if guide_hidden is None:
        return h
    u = guide_hidden.float()
    return u + (1.0 + guidance_scale) * (h - u)


def _row_ids(rows, lead: torch.Size, n: int, device: torch.device):
    """(kind, int64 row ids): kind "all" (ids None), "mask" or "index"; checked by _validate.check_rows."""
    if rows is None:
        return "all", None
    if rows.dtype == torch.bool:
        return "mask", rows.reshape(-1).nonzero().squeeze(1)
    return "index", rows.to(torch.int64)


def _expand(kind: str, lead: torch.Size, ids, tokens: torch.Tensor, logp: torch.Tensor):
    """The outputs of the selected rows in the documented layout of ``rows``'s kind."""
    if kind == "all":
        return tokens.reshape(lead), logp.reshape(lead)
    if kind == "index":
        return tokens, logp
    n = lead.numel()
    full_t = torch.full((n,), -1, dtype=torch.int64, device=tokens.device)
    full_l = torch.zeros((n,), dtype=torch.float32, device=tokens.device)
    full_t[ids] = tokens
    full_l[ids] = logp
    return full_t.reshape(lead), full_l.reshape(lead)


def head_sample_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    guide_hidden: torch.Tensor | None = None,
    *,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    seed: int,
    offset: int = 0,
    rows: torch.Tensor | None = None,
):
    """Plain-PyTorch spec of :func:`head_sample`: float32 ``blend(hidden) @ weight.T + bias`` of the
    selected rows, then guided_sample's float64 inverse-CDF sampler with each row's Philox uniform.

    Raises ValueError for a selected row that cannot be sampled (NaN/+inf logits, or all -inf).
    """
    lead, d = hidden.shape[:-1], hidden.shape[-1]
    n = lead.numel()
    kind, ids = _row_ids(rows, lead, n, hidden.device)
    sel = torch.arange(n, device=hidden.device) if ids is None else ids
    h = blend_hidden(
        hidden.reshape(n, d)[sel], None if guide_hidden is None else guide_hidden.reshape(n, d)[sel], guidance_scale
    )
    logits = h @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    _status.raise_if(bad_rows(logits).any(),
                     "logits: a sampled row had NaN or +inf logits (hidden @ weight.T + bias), or all -inf")
    w0, w1, _, _ = _rng.row_words(seed, offset, sel)
    tokens, logp, _ = _sample_rows_reference(logits, temperature, _rng.token_uniform(w0, w1))
    return _expand(kind, lead, ids, tokens, logp)


def head_sample(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    guide_hidden: torch.Tensor | None = None,
    *,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    seed: int | None = None,
    offset: int = 0,
    rows: torch.Tensor | None = None,
):
    """Sample one token per row of ``logits = blend(hidden) @ weight.T + bias`` without forming the logits.

    Same contract as ``guided_sample(hidden @ weight.T + bias, guide_hidden @ weight.T + bias, ...)``:
    ``blend(hidden) = guide + (1 + s) * (hidden - guide)`` (the blend commutes with the linear head, so
    one GEMM serves base and guide); ``tokens ~ Categorical(softmax(logits / temperature))``, argmax
    at ``temperature == 0``; ``logp`` is the untempered log-softmax at the token. The same seed and
    offset give the same tokens as that guided_sample call up to the logits' rounding.

    Args:
        hidden: ``[..., d]`` float32/bfloat16/float16 hidden states (the head's input).
        weight: ``[V, d]`` the head's weight (``nn.Linear(d, V).weight``), same device, float dtype.
        bias: ``[V]`` or None. ``-inf`` entries forbid their tokens.
        guide_hidden: ``[..., d]`` like ``hidden`` (guide / unconditional branch), or None.
        guidance_scale: s, any finite float.
        temperature: >= 0.
        seed: int in [0, 2**63), or None to draw one from torch's default generator.
        offset: stream offset. A row's uniform is keyed by its index in ``hidden``'s flattened
            leading dims, whatever ``rows`` selects.
        rows: which rows to decode; the others are never projected. None: all. A bool mask of
            ``hidden.shape[:-1]``: outputs keep that shape, with token -1 and logp 0 on the rows
            outside (on CUDA the mask costs one host sync, ``nonzero``). An integer index tensor
            ``[K]`` into the flattened leading dims (no sync): outputs are ``[K]``, in its order.
    Returns:
        ``tokens`` int64 and ``logp`` float32, shaped as described under ``rows``.
    Raises:
        TypeError/ValueError on bad arguments. A selected row whose logits have NaN/+inf (non-finite
        hidden states or weights) or are all -inf raises ValueError at once on CPU; on CUDA it sets the
        device flag that :func:`sgkernels.check_errors` raises (token 0, logp NaN meanwhile).
    """
    _validate.check_logits("hidden", hidden)
    d = hidden.shape[-1]
    _validate.check_head(weight, bias, d, hidden.device)
    if guide_hidden is not None:
        _validate.check_logits("guide_hidden", guide_hidden)
        _validate.check_same("guide_hidden", guide_hidden, "hidden", hidden)
    guidance_scale = _validate.check_guidance_scale(guidance_scale)
    temperature = _validate.check_float("temperature", temperature)
    seed = _rng.resolve_seed(seed)
    offset = _rng.check_offset(offset)
    lead = hidden.shape[:-1]
    n = lead.numel()
    _validate.check_rows(rows, lead, hidden.device)
    impl = choose_impl(hidden.device)
    if impl == "torch":
        return head_sample_reference(
            hidden, weight, bias, guide_hidden, guidance_scale=guidance_scale, temperature=temperature,
            seed=seed, offset=offset, rows=rows,
        )
    kind, ids = _row_ids(rows, lead, n, hidden.device)
    h2 = hidden.reshape(n, d)
    g2 = None if guide_hidden is None else guide_hidden.reshape(n, d)
    if ids is not None:
        h2 = h2.index_select(0, ids)
        g2 = None if g2 is None else g2.index_select(0, ids)
    tokens, logp = call_sampling_kernel(
        "head_sample", "head_sample.head_sample_triton", impl, hidden.device,
        h2, weight, bias, g2, ids, guidance_scale, temperature, seed, offset,
    )
    return _expand(kind, lead, ids, tokens, logp)


@torch.library.register_fake("sgkernels::head_sample")
def _head_sample_fake(hidden, weight, bias, guide_hidden, row_ids, guidance_scale, temperature, seed, offset, status):
    r = hidden.shape[0]
    return hidden.new_empty((r,), dtype=torch.int64), hidden.new_empty((r,), dtype=torch.float32)


def _triton():
    from ..kernels import head_sample

    return head_sample


def _head_sample_cuda(*args):
    return _triton().head_sample_triton(*args)


if triton_available():
    torch.library.register_kernel("sgkernels::head_sample", "cuda", _head_sample_cuda)
