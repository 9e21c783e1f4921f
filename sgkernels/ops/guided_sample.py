"""``guided_sample``: blend base and guide logits, sample a token per row, return its log-probability.

One op, ``torch.ops.sgkernels.guided_sample``: C++ CPU kernel (csrc/cpu/sampling.cpp), Triton CUDA
kernel (sgkernels/kernels/sampling.py), fake kernel here, and :func:`guided_sample_reference`, the
plain-PyTorch spec the kernels are tested against.

Sampling method (all backends): exact inverse CDF with one float64 uniform per row (``_rng``
words w0, w1), the running sum in float64, so the tail of the distribution is kept.
"""
from __future__ import annotations

import math

import torch

from .. import _rng
from . import _status, _validate
from ._dispatch import call_sampling_kernel, choose_impl, register_triton_cuda
from .filters import ENTROPY_EPS, check_filter_order, filters_active, keep_mask_reference

BLEND_RULE = """The blend ``g = guide + (1 + s) * (logits - guide)``, i.e. ``(1 + s) * logits + (-s) * guide``,
    in float32, with non-finite terms defined exactly:

    * a term whose coefficient is 0 does not contribute at all: ``s = 0`` gives exactly the logits,
      ``s = -1`` exactly the guide (a NaN or inf in the dropped term has no effect);
    * otherwise a token that is -inf in either term is excluded (g = -inf), whatever the signs of
      the coefficients (banned tokens, top-k/top-p filters applied upstream);
    * NaN or +inf in either term makes g NaN: the row cannot be sampled (an error).
    """


def guided_logits(logits: torch.Tensor, guide_logits: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """The guided logits ``g`` [..., V] float32 (``logits`` as float32 when no guide): see :data:`BLEND_RULE`."""
    if guide_logits is None or guidance_scale == 0.0:
        return logits.float()
    u = guide_logits.float()
    if 1.0 + guidance_scale == 0.0:
        return u
    g = logits.float()
    x = u + (1.0 + guidance_scale) * (g - u)
    x = torch.where(torch.isneginf(g) | torch.isneginf(u), float("-inf"), x)
    bad_term = torch.isnan(g) | torch.isposinf(g) | torch.isnan(u) | torch.isposinf(u)
    return torch.where(bad_term, float("nan"), x)


def _sample_rows_reference(
    g: torch.Tensor, temperature: float, u: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
    confidence: str = "logp", filter_order: str = "dream",
):
    """Inverse-CDF sample of each row of float32 ``g`` [R, V] with uniforms ``u`` [R] (float64).

    The filters (:mod:`.filters`) act on ``q = softmax(x)``, ``x = g / temperature`` in float64
    (``x = g`` when ``temperature == 0``), combined as ``filter_order`` says; the token is drawn from ``q`` renormalised over the kept
    tokens (argmax of ``g`` when ``temperature == 0``, always kept). Returns ``tokens`` int64 [R],
    ``logp`` float32 [R] (untempered, unfiltered ``log_softmax(g)[token]``) and ``conf`` float32 [R],
    the ``confidence`` score (``logp`` itself for ``"logp"``).
    """
    g64 = g.double()
    # log-probabilities relative to the row max (g - M): exact at any scale (two maxima at 1e30
    # give log(1/2), where logsumexp(g) - g would round to 0)
    d = g64 - g64.max(dim=-1, keepdim=True).values
    log_z = torch.log(torch.exp(d).sum(dim=-1))
    x = d if temperature == 0.0 else d / temperature
    if filters_active(top_k, top_p, min_p):
        x = x.masked_fill(~keep_mask_reference(x, top_k, top_p, min_p, filter_order), -math.inf)
    w = torch.softmax(x, dim=-1)
    if temperature == 0.0:
        tokens = torch.argmax(g64, dim=-1)
    else:
        cdf = torch.cumsum(w, dim=-1)
        r = u.to(cdf.device) * cdf[:, -1]
        tokens = (cdf <= r[:, None]).sum(dim=-1)
        last_nonzero = g.shape[-1] - 1 - torch.argmax(torch.flip(w > 0, dims=[-1]).to(torch.int8), dim=-1)
        tokens = torch.minimum(tokens, last_nonzero)
    logp = (d.gather(-1, tokens[:, None])[:, 0] - log_z).float()
    if confidence == "logp":
        conf = logp
    elif confidence == "prob":
        conf = w.gather(-1, tokens[:, None])[:, 0].float()
    elif confidence == "margin":
        top2 = torch.topk(w, min(2, w.shape[-1]), dim=-1).values
        conf = (top2[:, 0] - (top2[:, 1] if w.shape[-1] > 1 else 0.0)).float()
    else:
        conf = (w * torch.log(w + ENTROPY_EPS)).sum(-1).float()
    return tokens, logp, conf


def bad_rows(g: torch.Tensor) -> torch.Tensor:
    """Rows of float ``g`` [..., V] that cannot be sampled: NaN or +inf anywhere, or all -inf."""
    return torch.isnan(g).any(-1) | torch.isposinf(g).any(-1) | torch.isneginf(g).all(-1)


def guided_sample_reference(
    logits, guide_logits=None, *, guidance_scale=0.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, confidence=None,
    seed, offset=0, filter_order="dream",
):
    """Plain-PyTorch spec of :func:`guided_sample` (float64 softmax, sort-based filters, same Philox stream).

    The arguments and outputs of :func:`guided_sample`, except that ``seed`` is required (an int or a
    0-dim int64 tensor). Raises ValueError for a row that cannot be sampled (see :func:`bad_rows`).
    """
    top_k, top_p, min_p = _validate.check_filters(top_k, top_p, min_p)
    check_filter_order(filter_order)
    seed, offset = _validate.reference_rng(seed, offset, logits.device)
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    g = guided_logits(logits, guide_logits, guidance_scale).reshape(-1, vocab)
    _status.raise_if(bad_rows(g).any(), "logits: a sampled row had NaN or +inf guided logits (or all -inf)")
    w0, w1, _, _ = _rng.row_words(seed, offset, torch.arange(g.shape[0], device=g.device))
    tokens, logp, conf = _sample_rows_reference(
        g, temperature, _rng.token_uniform(w0, w1), top_k, top_p, min_p, confidence or "logp", filter_order
    )
    if confidence is None:
        return tokens.reshape(lead), logp.reshape(lead)
    return tokens.reshape(lead), logp.reshape(lead), conf.reshape(lead)


def guided_sample(
    logits: torch.Tensor,
    guide_logits: torch.Tensor | None = None,
    *,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,  # the filters (all off by default)
    confidence: str | None = None,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    filter_order: str = "dream",
):
    """Sample one token per row from the self-guided, tempered, filtered distribution.

    ``g = guide + (1 + s) * (logits - guide)`` (``g = logits`` without a guide);
    ``tokens ~ Categorical(q)``, ``q = softmax(g / temperature)`` restricted to the tokens the
    filters keep and renormalised; argmax of ``g`` when ``temperature == 0``. The filters
    (:mod:`sgkernels.ops.filters`: semantics and tie rules) act on ``softmax(g / temperature)``
    (``softmax(g)`` at ``temperature == 0``). The kernels find the filter thresholds without
    sorting the vocabulary.

    A temperature below ``1 / FLT_MAX`` acts as argmax over the row's maxima (ties drawn uniformly),
    one above ``1 / FLT_MIN`` as uniform over the finite entries.

    Non-finite logits, the same rule on every backend (:data:`BLEND_RULE`): a term whose coefficient
    is 0 is dropped (``s = 0``: exactly the logits; ``s = -1``: exactly the guide); a token that is
    -inf in either remaining term is excluded; NaN or +inf in either makes the row bad.

    Args:
        logits: ``[..., V]`` float32/bfloat16/float16, any strides (a ``[..., :K]`` slice of a larger
            head output is read in place).
        guide_logits: ``[..., V]``, same shape and device, or None.
        guidance_scale: s; any finite float (s = 0 gives exactly the base logits, s = -1 the guide).
        temperature: >= 0 token temperature.
        top_k: int >= 0, 0 = off. top_p: float in (0, 1], 1 = off. min_p: float in [0, 1], 0 = off.
        confidence: None (two outputs), or ``"logp" | "prob" | "margin" | "entropy"``: also return
            that confidence of each row (:mod:`sgkernels.ops.filters`), computed in the same kernel.
        seed: int in [0, 2**63), a 0-dim int64 tensor on logits' device (read by the kernel: CUDA-graph
            and ``torch.compile`` safe), or None to draw one from torch's default generator.
        offset: stream offset (e.g. the step index), int or 0-dim int64 tensor like ``seed``; the same
            seed/offset reproduce exactly, and tensors give the same tokens as the ints they hold.
        filter_order: how top-k and top-p combine when both are set (:mod:`sgkernels.ops.filters`):
            ``"dream"`` (one distribution, intersected: Dream's order) or ``"hf"`` (top-k, then top-p on
            the renormalised top-k set: Hugging Face's, vLLM's and diffusers' order).
    Returns:
        ``tokens`` int64 ``[...]``, ``logp`` float32 ``[...]``: ``log_softmax(g)[token]`` under the
        untempered, *unfiltered* guided distribution (so it does not depend on temperature or the
        filters), and with ``confidence`` given, ``conf`` float32 ``[...]``.
    Autograd: ``logp`` is differentiable on every backend (the tokens and ``conf`` are not):
    ``d logp / d g = onehot(token) - softmax(g)``, times ``1 + s`` for ``logits`` and ``-s`` for
    ``guide_logits`` (a coefficient of 0 gives a zero gradient). ``temperature`` and the filters do
    not enter: ``logp`` is untempered and unfiltered.
    Raises:
        TypeError/ValueError on bad arguments. A row with NaN/+inf guided logits (or all -inf) raises
        ValueError at once on CPU; on CUDA it sets a device flag that
        :func:`sgkernels.check_errors` raises (the sampler calls it once at its end).
    """
    _validate.check_inputs("logits", logits, "guide_logits", guide_logits)
    guidance_scale, temperature, top_k, top_p, min_p = _validate.check_sampling(
        guidance_scale, temperature, top_k, top_p, min_p, confidence)
    check_filter_order(filter_order)
    seed, offset, seed_t, offset_t = _validate.check_rng(seed, offset, logits.device)
    if _logp_needs_grad(logits, guide_logits):  # autograd: see the end of this module
        return _guided_sample_with_grad(
            logits, guide_logits, guidance_scale, temperature, top_k, top_p, min_p, confidence,
            seed if seed_t is None else seed_t, offset if offset_t is None else offset_t, filter_order,
        )
    impl = choose_impl(logits.device)
    if impl == "torch":
        return guided_sample_reference(
            logits, guide_logits, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, confidence=confidence, seed=seed if seed_t is None else seed_t,
            offset=offset if offset_t is None else offset_t, filter_order=filter_order,
        )
    tokens, logp, conf = call_sampling_kernel(
        "guided_sample", "sampling.guided_sample_triton", impl, logits.device,
        logits, guide_logits, guidance_scale, temperature, seed, offset,
        top_k=top_k, top_p=top_p, min_p=min_p, confidence=confidence or "logp",
        seed_tensor=seed_t, offset_tensor=offset_t, filter_order=filter_order,
    )
    if confidence is None:
        return tokens, logp
    return tokens, logp, conf


@torch.library.register_fake("sgkernels::guided_sample")
def _guided_sample_fake(logits, guide_logits, guidance_scale, temperature, seed, offset, status, top_k=0, top_p=1.0,
                        min_p=0.0, confidence="logp", seed_tensor=None, offset_tensor=None, row_ids=None,
                        filter_order="dream"):
    lead = logits.shape[:-1]
    return (logits.new_empty(lead, dtype=torch.int64), logits.new_empty(lead, dtype=torch.float32),
            logits.new_empty(lead, dtype=torch.float32))


register_triton_cuda("guided_sample", "sampling", "guided_sample_triton")


# ----------------------------------------------------------------------------------------------
# Autograd of logp (policy-gradient fine-tuning needs d logp / d logits of the sampled tokens).
# The op mutates its status word, so it cannot carry a registered autograd formula; the wrapper
# samples without grad and attaches the gradient with this Function (traceable by torch.compile).
# ----------------------------------------------------------------------------------------------
def _logp_needs_grad(logits: torch.Tensor, guide_logits: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        logits.requires_grad or (guide_logits is not None and guide_logits.requires_grad)
    )


def _guided_sample_with_grad(logits, guide_logits, guidance_scale, temperature, top_k, top_p, min_p, confidence,
                             seed, offset, filter_order="dream"):
    """Samples without grad, then attaches the gradient of ``logp`` only (``conf``, if asked for,
    is returned without a gradient)."""
    guide = None if guide_logits is None else guide_logits.detach()
    with torch.no_grad():
        out = guided_sample(
            logits.detach(), guide, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
            top_p=top_p, min_p=min_p, confidence=confidence, seed=seed, offset=offset, filter_order=filter_order,
        )
    tokens, logp = out[0], out[1]
    if guide_logits is None:
        logp = _LogpGrad.apply(logp, tokens, guidance_scale, logits)
    else:
        logp = _LogpGrad.apply(logp, tokens, guidance_scale, logits, guide_logits)
    return (tokens, logp) + tuple(out[2:])


class _LogpGrad(torch.autograd.Function):
    """Identity on ``logp``; backward: ``d logp / d (logits, guide)`` at the sampled ``tokens``."""

    @staticmethod
    def forward(ctx, logp, tokens, guidance_scale, logits, guide_logits=None):
        ctx.guidance_scale = guidance_scale
        ctx.has_guide = guide_logits is not None
        ctx.save_for_backward(tokens, logits, guide_logits if ctx.has_guide else logits)
        return logp.clone()

    @staticmethod
    def backward(ctx, grad_logp):
        tokens, logits, guide = ctx.saved_tensors
        guide = guide if ctx.has_guide else None
        s = ctx.guidance_scale
        g = guided_logits(logits, guide, s).double()
        # d logp / d g = onehot(token) - softmax(g) (rows of -inf entries get 0 there).
        d = torch.softmax(g, dim=-1).neg_()
        d.scatter_add_(-1, tokens.unsqueeze(-1), torch.ones_like(d[..., :1]))
        d.mul_(grad_logp.double().unsqueeze(-1))
        grad_logits = grad_guide = None
        if ctx.needs_input_grad[3]:
            grad_logits = (d if guide is None else d * (1.0 + s)).to(logits.dtype)
        if ctx.has_guide and ctx.needs_input_grad[4]:
            grad_guide = (d * (-s)).to(guide.dtype)
        return None, None, None, grad_logits, grad_guide
