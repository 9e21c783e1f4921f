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

Filters and confidences (``top_k`` / ``top_p`` / ``min_p``, ``confidence="prob" | "margin" |
"entropy"``, guided_sample's semantics, :mod:`sgkernels.ops.filters`): a filter needs order statistics
of the whole row, which the fused kernels do not keep. So a call that needs them (a filter at
``temperature > 0``, or a Dream confidence) takes the *row-chunk path*: the selected rows are
projected ``_CHUNK_BYTES // (4 V)`` rows at a time (float32 logits of at most 8 MiB per chunk: 16 rows
at V = 126464), and each chunk is sampled by guided_sample's kernel of the same backend, each row's
Philox key its row id as above (the op's ``row_ids``). So the tokens equal
``guided_sample(hidden @ W.T + b, ..., same filters)``'s up to the logits' rounding. At
``temperature == 0`` without a Dream confidence the filters cannot change the argmax (the top token is
always kept) and ``logp`` is unfiltered, so such calls stay on the fused kernels.
"""
from __future__ import annotations

import torch

from .. import _rng
from . import _status, _validate
from ._dispatch import call_sampling_kernel, choose_impl, register_triton_cuda
from .filters import DREAM_CONFIDENCES, check_filter_order, filters_active
from .guided_sample import _sample_rows_reference, bad_rows

# The row-chunk path (filters, Dream confidences): float32 logits per projected chunk (tests shrink it).
_CHUNK_BYTES = 8 << 20
_W_TILE_BYTES = 16 << 20  # a 16-bit weight is upcast to float32 this many bytes at a time
_BAD_ROW = "logits: a sampled row had NaN or +inf logits (hidden @ weight.T + bias), or all -inf"


def blend_hidden(hidden: torch.Tensor, guide_hidden: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """``guide + (1 + s) * (hidden - guide)`` in float32 (``hidden`` as float32 without a guide).

    A term whose coefficient is 0 is dropped, as guided_sample's blend rule: ``s == 0`` gives
    exactly ``hidden`` and ``s == -1`` exactly ``guide`` (a NaN, inf or distant value in the dropped
    term has no effect, and no cancellation rounds the kept one). float64 inputs stay float64.
    """
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if guide_hidden is None or guidance_scale == 0.0:
        return hidden.to(dtype)
    u = guide_hidden.to(dtype)
    if 1.0 + guidance_scale == 0.0:
        return u
    return u + (1.0 + guidance_scale) * (hidden.to(dtype) - u)


def _row_ids(rows, lead: torch.Size, n: int, device: torch.device):
    """(kind, int64 row ids): kind "all" (ids None), "mask" or "index"; checked by _validate.check_rows."""
    if rows is None:
        return "all", None
    if rows.dtype == torch.bool:
        return "mask", rows.reshape(-1).nonzero().squeeze(1)
    return "index", rows.to(torch.int64)


def _expand(kind: str, lead: torch.Size, ids, tokens: torch.Tensor, logp: torch.Tensor, conf=None):
    """The outputs of the selected rows in the documented layout of ``rows``'s kind (``conf``: also
    the confidences, as a third output)."""
    outs = (tokens, logp) if conf is None else (tokens, logp, conf)
    if kind == "all":
        return tuple(o.reshape(lead) for o in outs)
    if kind == "index":
        return outs
    n = lead.numel()
    full = []
    for i, o in enumerate(outs):
        f = (torch.full((n,), -1, dtype=torch.int64, device=o.device) if i == 0
             else torch.zeros((n,), dtype=torch.float32, device=o.device))
        f[ids] = o
        full.append(f.reshape(lead))
    return tuple(full)


def _needs_chunks(temperature: float, top_k: int, top_p: float, min_p: float, confidence: str | None) -> bool:
    """Whether a call needs whole-row order statistics: the row-chunk path (module docstring)."""
    if confidence in DREAM_CONFIDENCES:
        return True
    return filters_active(top_k, top_p, min_p) and temperature != 0.0


def project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 ``h @ weight.T + bias`` [R, V] of float32 ``h`` [R, d], as the reference computes it
    (``weight`` upcast to float32; a 16-bit weight in vocabulary tiles of ``_W_TILE_BYTES``, so no
    float32 copy of the whole head is made)."""
    if weight.dtype == torch.float32:
        logits = h @ weight.T
    else:
        vocab, d = weight.shape
        logits = torch.empty((h.shape[0], vocab), dtype=torch.float32, device=h.device)
        tile = max(1, _W_TILE_BYTES // (4 * d))
        for t in range(0, vocab, tile):
            torch.matmul(h, weight[t:t + tile].float().T, out=logits[:, t:t + tile])
    if bias is not None:
        logits += bias.float()
    return logits


def _sample_chunked(h2, g2, ids, weight, bias, guidance_scale, temperature, top_k, top_p, min_p, confidence,
                    seed, offset, impl, filter_order="dream"):
    """The row-chunk path: ``(tokens [K], logp [K], conf [K])`` of the selected rows ``h2``/``g2``
    ``[K, d]`` with Philox row keys ``ids`` [K] (module docstring), on guided_sample's kernel ``impl``
    ("op" or "triton"). Bad rows: ValueError on CPU; on CUDA the status flag, as the kernels."""
    k, vocab = h2.shape[0], weight.shape[0]
    device = h2.device
    tokens = torch.empty(k, dtype=torch.int64, device=device)
    logp = torch.empty(k, dtype=torch.float32, device=device)
    conf = torch.empty(k, dtype=torch.float32, device=device)
    chunk = max(1, _CHUNK_BYTES // (4 * vocab))
    for s in range(0, k, chunk):
        e = min(k, s + chunk)
        logits = project(blend_hidden(h2[s:e], None if g2 is None else g2[s:e], guidance_scale), weight, bias)
        tokens[s:e], logp[s:e], conf[s:e] = call_sampling_kernel(
            "guided_sample", "sampling.guided_sample_triton", impl, device, logits, None, 0.0, temperature, seed,
            offset, top_k=top_k, top_p=top_p, min_p=min_p, confidence=confidence or "logp", row_ids=ids[s:e],
            filter_order=filter_order)
    return tokens, logp, conf


def head_sample_reference(
    hidden, weight, bias=None, guide_hidden=None, *, guidance_scale=0.0, temperature=1.0, top_k=0, top_p=1.0,
    min_p=0.0, confidence=None, seed, offset=0, rows=None, filter_order="dream",
):
    """Plain-PyTorch spec of :func:`head_sample`: float32 ``blend(hidden) @ weight.T + bias`` of the
    selected rows, then guided_sample's float64 inverse-CDF sampler (and its filters and confidence)
    with each row's Philox uniform. The arguments and outputs of :func:`head_sample`, except that
    ``seed`` is required.

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
    _status.raise_if(bad_rows(logits).any(), _BAD_ROW)
    w0, w1, _, _ = _rng.row_words(seed, offset, sel)
    tokens, logp, conf = _sample_rows_reference(logits, temperature, _rng.token_uniform(w0, w1), top_k, top_p, min_p,
                                                confidence or "logp", filter_order)
    return _expand(kind, lead, ids, tokens, logp, None if confidence is None else conf)


def head_sample(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    guide_hidden: torch.Tensor | None = None,
    *,
    guidance_scale: float = 0.0,
    temperature: float = 1.0,
    top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
    confidence: str | None = None,
    seed: int | None = None,
    offset: int = 0,
    rows: torch.Tensor | None = None,
    filter_order: str = "dream",
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
        guidance_scale: s, any finite float. A term whose coefficient is 0 is not read (guided_sample's
            blend rule): s = 0 ignores ``guide_hidden`` (NaN or inf there changes nothing), s = -1
            ignores ``hidden``.
        temperature: >= 0 (below ``1 / FLT_MAX``: argmax over the maxima; above ``1 / FLT_MIN``:
            uniform over the finite logits, as guided_sample).
        top_k: int >= 0, 0 = off. top_p: float in (0, 1], 1 = off. min_p: float in [0, 1], 0 = off.
            guided_sample's filters of ``softmax(logits / temperature)`` (:mod:`sgkernels.ops.filters`).
        confidence: None (two outputs), or ``"logp" | "prob" | "margin" | "entropy"``: also return
            that confidence of each row, as guided_sample does. Filters at ``temperature > 0`` and
            the Dream confidences run the row-chunk path (module docstring).
        seed: int in [0, 2**63), or None to draw one from torch's default generator.
        offset: stream offset. A row's uniform is keyed by its index in ``hidden``'s flattened
            leading dims, whatever ``rows`` selects.
        rows: which rows to decode; the others are never projected. None: all. A bool mask of
            ``hidden.shape[:-1]``: outputs keep that shape, with token -1 and logp 0 on the rows
            outside (on CUDA the mask costs one host sync, ``nonzero``). An integer index tensor
            ``[K]`` into the flattened leading dims (no sync): outputs are ``[K]``, in its order.
        filter_order: ``"dream"`` or ``"hf"``, how top-k and top-p combine, as :func:`guided_sample`.
    Returns:
        ``tokens`` int64 and ``logp`` float32 (untempered, unfiltered), and with ``confidence`` given
        ``conf`` float32, shaped as described under ``rows`` (conf 0 on the rows a mask leaves out).
    Autograd: ``logp`` is differentiable with respect to ``hidden``, ``guide_hidden``, ``weight`` and
        ``bias`` on every backend (tokens and ``conf`` are not): with ``D = onehot(token) -
        softmax(logits)`` per selected row, ``d blend = D @ W`` (times ``1 + s`` for ``hidden``, ``-s``
        for ``guide_hidden``; a coefficient of 0 gives a zero gradient), ``d W = D^T @ blend``,
        ``d b = sum D``. The backward recomputes the logits ``_CHUNK_BYTES`` worth of rows at a time
        (never all ``[R, V]`` at once); rows outside ``rows`` get a zero gradient.
    Raises:
        TypeError/ValueError on bad arguments. A selected row whose logits have NaN/+inf (non-finite
        hidden states or weights) or are all -inf raises ValueError at once on CPU; on CUDA it sets the
        device flag that :func:`sgkernels.check_errors` raises (token 0, logp NaN meanwhile).
    """
    _validate.check_inputs("hidden", hidden, "guide_hidden", guide_hidden)
    d = hidden.shape[-1]
    _validate.check_head(weight, bias, d, hidden.device)
    guidance_scale, temperature, top_k, top_p, min_p = _validate.check_sampling(
        guidance_scale, temperature, top_k, top_p, min_p, confidence)
    check_filter_order(filter_order)
    seed = _rng.resolve_seed(seed)
    offset = _rng.check_offset(offset)
    lead = hidden.shape[:-1]
    n = lead.numel()
    _validate.check_rows(rows, lead, hidden.device)
    if _logp_needs_grad(hidden, guide_hidden, weight, bias):  # autograd: see the end of this module
        return _head_sample_with_grad(hidden, weight, bias, guide_hidden, rows, guidance_scale=guidance_scale,
                                      temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                      confidence=confidence, seed=seed, offset=offset)
    impl = choose_impl(hidden.device)
    if impl == "torch":
        return head_sample_reference(
            hidden, weight, bias, guide_hidden, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
            top_p=top_p, min_p=min_p, confidence=confidence, seed=seed, offset=offset, rows=rows,
            filter_order=filter_order,
        )
    kind, ids = _row_ids(rows, lead, n, hidden.device)
    h2 = hidden.reshape(n, d)
    g2 = None if guide_hidden is None else guide_hidden.reshape(n, d)
    if ids is not None:
        h2 = h2.index_select(0, ids)
        g2 = None if g2 is None else g2.index_select(0, ids)
    if _needs_chunks(temperature, top_k, top_p, min_p, confidence):
        keys = torch.arange(n, device=hidden.device) if ids is None else ids
        tokens, logp, conf = _sample_chunked(h2, g2, keys, weight, bias, guidance_scale, temperature, top_k, top_p,
                                             min_p, confidence, seed, offset, impl, filter_order)
        return _expand(kind, lead, ids, tokens, logp, None if confidence is None else conf)
    tokens, logp = call_sampling_kernel(
        "head_sample", "head_sample.head_sample_triton", impl, hidden.device,
        h2, weight, bias, g2, ids, guidance_scale, temperature, seed, offset,
    )
    # here the confidence is "logp" (a Dream confidence takes the chunk path)
    return _expand(kind, lead, ids, tokens, logp, None if confidence is None else logp)


@torch.library.register_fake("sgkernels::head_sample")
def _head_sample_fake(hidden, weight, bias, guide_hidden, row_ids, guidance_scale, temperature, seed, offset, status):
    r = hidden.shape[0]
    return hidden.new_empty((r,), dtype=torch.int64), hidden.new_empty((r,), dtype=torch.float32)


register_triton_cuda("head_sample", "head_sample", "head_sample_triton")


# ----------------------------------------------------------------------------------------------
# Autograd of logp (as guided_sample's: the op mutates its status word, so the wrapper samples
# without grad and attaches the gradient with this Function). The backward recomputes the logits
# of the selected rows one row chunk at a time: at most _CHUNK_BYTES of float32 logits (and their
# float64 softmax) exist at once, and a 16-bit weight is upcast _W_TILE_BYTES at a time.
# ----------------------------------------------------------------------------------------------
def _logp_needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _head_sample_with_grad(hidden, weight, bias, guide_hidden, rows, **kw):
    """head_sample's outputs, sampled without grad; ``logp`` then carries :class:`_HeadLogpGrad`."""
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    with torch.no_grad():
        out = head_sample(hidden.detach(), weight.detach(), detach(bias), detach(guide_hidden), rows=rows, **kw)
    tokens, logp = out[0], out[1]
    n = hidden.shape[:-1].numel()
    if rows is None or rows.dtype == torch.bool:  # outputs shaped like hidden's leading dims
        sel = torch.arange(n, device=hidden.device)
    else:
        sel = rows.to(torch.int64)
    logp = _HeadLogpGrad.apply(logp, tokens, sel, kw["guidance_scale"], hidden, guide_hidden, weight, bias)
    return (tokens, logp) + tuple(out[2:])


def _blend_coefficients(has_guide: bool, s: float) -> tuple[float, float]:
    """``(c_h, c_u)``: the blend is ``c_h * hidden + c_u * guide`` (blend_hidden's dropped terms: 0)."""
    if not has_guide or s == 0.0:
        return 1.0, 0.0
    if 1.0 + s == 0.0:
        return 0.0, 1.0
    return 1.0 + s, -s


class _HeadLogpGrad(torch.autograd.Function):
    """Identity on ``logp``; backward: ``d logp`` w.r.t. ``hidden``, ``guide``, ``weight``, ``bias``.

    ``logp``, ``tokens`` and ``sel`` share one shape: ``sel`` the row of ``hidden``'s flattened
    leading dims of each output, ``tokens`` -1 where no row was decoded (no gradient there).
    float64 inputs are differentiated in float64 (gradcheck), the others in float32.
    """

    @staticmethod
    def forward(ctx, logp, tokens, sel, guidance_scale, hidden, guide, weight, bias):
        ctx.guidance_scale = guidance_scale
        ctx.has_guide, ctx.has_bias = guide is not None, bias is not None
        ctx.save_for_backward(tokens, sel, hidden, guide if ctx.has_guide else hidden, weight,
                              bias if ctx.has_bias else weight)
        return logp.clone()

    @staticmethod
    def backward(ctx, grad_logp):
        tokens, sel, hidden, guide, weight, bias = ctx.saved_tensors
        guide = guide if ctx.has_guide else None
        bias = bias if ctx.has_bias else None
        s = ctx.guidance_scale
        need_h, need_u, need_w, need_b = (ctx.needs_input_grad[i] for i in (4, 5, 6, 7))
        ct = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        vocab, d = weight.shape
        h2 = hidden.reshape(-1, d)
        u2 = None if guide is None else guide.reshape(-1, d)
        tok, rid, gl = tokens.reshape(-1), sel.reshape(-1), grad_logp.reshape(-1)
        keep = (tok >= 0).nonzero().squeeze(1)
        tok, rid, gl = tok[keep], rid[keep], gl[keep].to(torch.float64)
        c_h, c_u = _blend_coefficients(guide is not None, s)
        g_blend = torch.zeros(h2.shape, dtype=ct, device=h2.device) if (need_h or need_u) else None
        g_w = torch.zeros((vocab, d), dtype=ct, device=weight.device) if need_w else None
        g_b = torch.zeros((vocab,), dtype=ct, device=weight.device) if need_b else None
        w_tile = max(1, _W_TILE_BYTES // (4 * d))
        b_ct = None if bias is None else bias.to(ct)
        chunk = max(1, _CHUNK_BYTES // (4 * vocab))
        for start in range(0, tok.numel(), chunk):
            r = rid[start:start + chunk]
            x = blend_hidden(h2[r].to(ct), None if u2 is None else u2[r].to(ct), s)  # [c, d]
            logits = torch.empty((x.shape[0], vocab), dtype=ct, device=x.device)
            for t in range(0, vocab, w_tile):
                torch.matmul(x, weight[t:t + w_tile].to(ct).T, out=logits[:, t:t + w_tile])
            if b_ct is not None:
                logits += b_ct
            # D = (onehot(token) - softmax(logits)) * grad, in float64 (-inf logits get 0)
            dl = torch.softmax(logits.double(), dim=-1).neg_()
            dl.scatter_add_(-1, tok[start:start + chunk, None], torch.ones_like(dl[:, :1]))
            dl = dl.mul_(gl[start:start + chunk, None]).to(ct)
            del logits
            for t in range(0, vocab, w_tile):
                wt = weight[t:t + w_tile].to(ct)
                if g_blend is not None:
                    g_blend.index_add_(0, r, dl[:, t:t + w_tile] @ wt)
                if g_w is not None:
                    g_w[t:t + w_tile] += dl[:, t:t + w_tile].T @ x
            if g_b is not None:
                g_b += dl.sum(0)
        grad_h = grad_u = None
        if need_h:
            grad_h = (g_blend * c_h).to(hidden.dtype).reshape(hidden.shape)
        if need_u:
            grad_u = (g_blend * c_u).to(guide.dtype).reshape(guide.shape)
        return (None, None, None, None, grad_h, grad_u,
                None if g_w is None else g_w.to(weight.dtype), None if g_b is None else g_b.to(bias.dtype))
