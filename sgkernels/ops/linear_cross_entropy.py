"""``linear_cross_entropy``: ``F.cross_entropy(F.linear(input, W, b), target)`` without the logits.

Ops (schemas in csrc/schema.cpp, C++ CPU kernels in csrc/cpu/linear_cross_entropy.cpp, Triton CUDA
kernels in sgkernels/kernels/linear_cross_entropy.py, fake kernels and autograd here):

* ``torch.ops.sgkernels.linear_cross_entropy_fwd(input [N, d], linear_weight [V, d], linear_bias,
  target [N], weight, token_weight, suppress_ids, ignore_index, label_smoothing, temperature,
  reduction, denom_min, conf, grad, chunk_rows) -> (loss, denom, rows, grad_input, grad_weight,
  grad_bias)``. The rows whose target is ``ignore_index`` are gathered out first and never projected;
  the others are projected in row chunks whose float32 logits live in one small buffer
  (``kChunkBytes``, 32 MiB); per row the kernel keeps only ``rows[r] = (l_r, H_r, correct_r)``: the
  label-smoothed, class-weighted loss, and with ``conf`` the entropy of ``softmax(z / T)`` and whether
  the argmax is the target. With ``grad`` the gradients of ``loss`` are made in the same sweep from
  each chunk's buffer (``dx = G W``, ``dW += G^T x``, ``db += sum G``: the unfused loss's three
  GEMMs, on the kept rows only), and the autograd formula only scales them by ``grad_output``.
* ``torch.ops.sgkernels.linear_cross_entropy_bwd(...)``: the gradients of ``sum_r a_r l_r + c_r H_r``
  for per-row coefficients (the chunks' logits recomputed; rows with ``a_r = c_r = 0`` skipped). The
  autograd formula uses it for gradients that reach ``rows`` (``reduction="none"``, the entropy term
  of :func:`sgkernels.training.confidence_aware_loss`), and for ``loss`` when the forward made none.

:func:`linear_cross_entropy_reference` is the spec of :func:`linear_cross_entropy`: float32
``F.cross_entropy(F.linear(...))`` on the non-ignored rows, then the token weights.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from . import _validate
from ._dispatch import choose_impl, register_triton_cuda, triton_kernels
from .cross_entropy import _scale_grad

REDUCTIONS = ("mean", "sum", "none")
FLOAT32_MIN = torch.finfo(torch.float32).min  # the logit of a suppressed id
_CHUNK_ROWS = 0  # rows per chunk; 0: the kernels' own choice (tests set it small to run many chunks)
GRAD_INPUT, GRAD_WEIGHT, GRAD_BIAS = 1, 2, 4  # the ops' `grad` / `needs` bits


# ----------------------------------------------------------------------------------------------
# Reference and argument checks
# ----------------------------------------------------------------------------------------------
def _suppress_tensor(suppress_ids, vocab: int, device) -> torch.Tensor | None:
    if suppress_ids is None:
        return None
    if isinstance(suppress_ids, torch.Tensor):
        if suppress_ids.dtype.is_floating_point or suppress_ids.dtype.is_complex or suppress_ids.dtype == torch.bool:
            raise TypeError(f"suppress_ids: expected integer token ids, got {suppress_ids.dtype}")
        if suppress_ids.device != device:
            raise ValueError(f"suppress_ids: expected device {device} (same as input), got {suppress_ids.device}")
        ids = suppress_ids.reshape(-1).to(torch.int64)
    else:
        vals = [suppress_ids] if isinstance(suppress_ids, numbers.Integral) else list(suppress_ids)
        for v in vals:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"suppress_ids: expected int token ids, got {type(v).__name__}")
            if not 0 <= v < vocab:
                raise ValueError(f"suppress_ids: expected token ids in [0, {vocab}), got {v}")
        ids = torch.tensor([int(v) for v in vals], dtype=torch.int64, device=device)
    return ids if ids.numel() else None


def _check(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing, token_weight,
           suppress_ids):
    """Argument checks that read no tensor values (the kernels check targets, weights and ids)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor [..., d], got {type(input).__name__}")
    if input.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"input: expected float32, bfloat16 or float16, got {input.dtype}")
    if input.dim() < 1 or input.shape[-1] == 0:
        raise ValueError(f"input: expected shape [..., d] with d >= 1, got {tuple(input.shape)}")
    d = input.shape[-1]
    if not isinstance(linear_weight, torch.Tensor):
        raise TypeError(f"linear_weight: expected a torch.Tensor [V, d], got {type(linear_weight).__name__}")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight: expected dtype {input.dtype} (same as input), got {linear_weight.dtype}")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != d or linear_weight.shape[0] == 0:
        raise ValueError(
            f"linear_weight: expected shape [V, {d}] with V >= 1 (d = input's last dim), "
            f"got {tuple(linear_weight.shape)}"
        )
    if linear_weight.device != input.device:
        raise ValueError(f"linear_weight: expected device {input.device} (same as input), got {linear_weight.device}")
    vocab = linear_weight.shape[0]
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor) or linear_bias.dtype != input.dtype:
            got = linear_bias.dtype if isinstance(linear_bias, torch.Tensor) else type(linear_bias).__name__
            raise TypeError(f"linear_bias: expected a {input.dtype} tensor [V] (same dtype as input), got {got}")
        if linear_bias.shape != (vocab,) or linear_bias.device != input.device:
            raise ValueError(f"linear_bias: expected shape ({vocab},) on {input.device}, got "
                             f"{tuple(linear_bias.shape)} on {linear_bias.device}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected an integer tensor of class indices, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target: expected an integer tensor of class indices, got {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise ValueError(f"target: expected shape {tuple(input.shape[:-1])} (input's shape without d), "
                         f"got {tuple(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"target: expected device {input.device} (same as input), got {target.device}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dtype not in _validate.FLOAT_DTYPES:
            raise TypeError("weight: expected a float tensor [V] of class weights")
        if weight.shape != (vocab,) or weight.device != input.device:
            raise ValueError(f"weight: expected shape ({vocab},) on {input.device}, got {tuple(weight.shape)} "
                             f"on {weight.device}")
        if weight.requires_grad:
            raise ValueError("weight: gradients with respect to the class weights are not supported (detach it)")
    if token_weight is not None:
        if not isinstance(token_weight, torch.Tensor) or not token_weight.dtype.is_floating_point:
            got = token_weight.dtype if isinstance(token_weight, torch.Tensor) else type(token_weight).__name__
            raise TypeError(f"token_weight: expected a float tensor shaped like target, got {got}")
        _validate.check_same("token_weight", token_weight, "target", target)
        if token_weight.requires_grad:
            raise ValueError("token_weight: gradients with respect to token_weight are not supported (detach it)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    label_smoothing = _validate.check_float("label_smoothing", label_smoothing)
    if label_smoothing > 1.0:
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing}")
    return label_smoothing, int(ignore_index), _suppress_tensor(suppress_ids, vocab, input.device)


def check_temperature(temperature) -> float:
    """``temperature`` as a finite float > 0."""
    t = _validate.check_float("temperature", temperature)
    if t <= 0.0:
        raise ValueError(f"temperature: expected a finite float > 0, got {t}")
    return t


def linear_cross_entropy_reference(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                                   ignore_index=-100, label_smoothing=0.0, token_weight=None, suppress_ids=None):
    """Plain-PyTorch spec of :func:`linear_cross_entropy` (same arguments, same output).

    float32 ``F.cross_entropy(F.linear(x, W, b), target, weight=weight, label_smoothing=...,
    reduction="none")`` on the non-ignored rows ``x`` (the others are never projected), with the
    suppressed ids' logits set to ``finfo(float32).min``; then per row times ``token_weight``, and
    "sum", "mean" (divided by the sum over the non-ignored rows of ``token_weight * weight[target]``)
    or "none" (0 on the ignored rows). Cast to ``input``'s dtype.
    """
    d, vocab = input.shape[-1], linear_weight.shape[0]
    t = target.reshape(-1).long()
    keep = (t != ignore_index).nonzero().squeeze(1)
    x = input.reshape(-1, d).index_select(0, keep).float()
    z = F.linear(x, linear_weight.float(), None if linear_bias is None else linear_bias.float())
    sup = _suppress_tensor(suppress_ids, vocab, input.device)
    if sup is not None:
        z = z.index_fill(1, sup, FLOAT32_MIN)
    y = t[keep]
    cw = None if weight is None else weight.float()
    rows = F.cross_entropy(z, y, weight=cw, label_smoothing=label_smoothing, reduction="none")
    rho = torch.ones_like(rows) if token_weight is None else token_weight.reshape(-1)[keep].float()
    if reduction == "none":
        out = torch.zeros(t.shape, dtype=torch.float32, device=input.device).index_put((keep,), rho * rows)
        return out.to(input.dtype).reshape(target.shape)
    total = (rho * rows).sum()
    if reduction == "mean":
        total = total / (rho * (1.0 if cw is None else cw[y])).sum()
    return total.to(input.dtype)


# ----------------------------------------------------------------------------------------------
# The op call (every backend) and its autograd
# ----------------------------------------------------------------------------------------------
def _fwd_torch(x, w, b, t, cw, tw, sup, ignore_index, eps, temperature, reduction, denom_min, conf):
    """The fwd op's ``(loss, denom, rows)`` in plain PyTorch (the ``torch`` backend), differentiable."""
    n = x.shape[0]
    t = t.long()
    keep = (t != ignore_index).nonzero().squeeze(1)
    z = F.linear(x.index_select(0, keep).float(), w.float(), None if b is None else b.float())
    if sup is not None:
        z = z.index_fill(1, sup, FLOAT32_MIN)
    y = t[keep]
    cwf = None if cw is None else cw.float()
    nll = F.cross_entropy(z, y, weight=cwf, label_smoothing=eps, reduction="none")
    cols = [nll]
    if conf:
        q = torch.softmax(z / temperature, dim=-1)
        ent = -(q * torch.log(q.clamp_min(torch.finfo(torch.float32).tiny))).sum(-1)
        cols += [ent, (z.detach().argmax(-1) == y).float()]
    else:
        cols += [torch.zeros_like(nll), torch.zeros_like(nll)]
    rows = torch.zeros((n, 3), dtype=torch.float32, device=x.device).index_put((keep,), torch.stack(cols, 1))
    rho = torch.ones_like(nll) if tw is None else tw.reshape(-1)[keep].float()
    total = (rho * nll).sum()
    denom = torch.ones((), device=x.device)
    if reduction == "mean":
        denom = (rho * (1.0 if cwf is None else cwf[y])).sum().clamp_min(denom_min)
        total = total / denom
    return total, denom, rows


def _call_fwd(impl, x, w, b, t, cw, tw, sup, ignore_index, eps, temperature, reduction, denom_min, conf, grad):
    """``(loss float32 [], denom float32 [], rows float32 [N, 3])`` of the fwd op on ``impl``, differentiable.

    ``grad``: the gradients the forward makes (``GRAD_*`` bits; those of the inputs that require grad).
    """
    args = (x, w, b, t, cw, tw, sup, ignore_index, eps, temperature, reduction, denom_min, conf, grad, _CHUNK_ROWS)
    if impl == "torch":
        return _fwd_torch(*args[:13])
    if impl == "op":
        out = torch.ops.sgkernels.linear_cross_entropy_fwd(*args)
    else:
        out = _TritonLinearCrossEntropy.apply(*args)
    return out[0], out[1], out[2]


_N_ARGS = 15  # the fwd op's arguments


def _setup_context(ctx, inputs, output):
    x, w, b, t, cw, tw, sup, ignore_index, eps, temperature, reduction, denom_min, conf, grad, chunk = inputs
    _loss, denom, _rows, gx, gw, gb = output
    ctx.consts = (ignore_index, eps, temperature, chunk, conf, grad, b is not None)
    ctx.save_for_backward(x, w, b, t, cw, tw, sup, denom, gx, gw, gb)
    ctx.mark_non_differentiable(denom, gx, gw, gb)
    ctx.set_materialize_grads(False)


def _grads(ctx, g_loss, g_rows, bwd):
    """d / d (input, linear_weight, linear_bias) from the saved tensors and the outputs' gradients.

    The forward's own gradients (``grad``) are scaled by ``g_loss``; gradients that reach ``rows``
    (and ``loss`` when the forward made none) go through ``bwd``, the recomputing backward op.
    """
    x, w, b, t, cw, tw, sup, denom, gx, gw, gb = ctx.saved_tensors
    ignore_index, eps, temperature, chunk, conf, grad, has_bias = ctx.consts
    needs = sum(bit for bit, need in zip((GRAD_INPUT, GRAD_WEIGHT, GRAD_BIAS), ctx.needs_input_grad[:3]) if need)
    if not has_bias:
        needs &= ~GRAD_BIAS
    out = [None, None, None]
    nll_coef = None
    if g_loss is not None:
        if grad:
            out = [_scale_grad(g, g_loss, "sum") if grad & bit else None
                   for g, bit in zip((gx, gw, gb), (GRAD_INPUT, GRAD_WEIGHT, GRAD_BIAS))]
        else:
            rho = torch.ones(t.shape, dtype=torch.float32, device=t.device) if tw is None else tw.reshape(-1).float()
            inv = torch.where(denom > 0, 1.0 / denom, torch.zeros_like(denom))
            nll_coef = rho * (g_loss.float() * inv)
    ent_coef = None
    if g_rows is not None:
        g_rows = g_rows.float()
        nll_coef = g_rows[:, 0] if nll_coef is None else nll_coef + g_rows[:, 0]
        ent_coef = g_rows[:, 1].contiguous() if conf else None
    if nll_coef is not None and needs:
        more = bwd(x, w, b, t, cw, nll_coef.contiguous(), ent_coef, sup, ignore_index, eps, temperature, needs, chunk)
        # r is the backward op's fresh output: sum into it (two weight-sized buffers at the peak, not three)
        out = [o if not needs & bit else (r if o is None else r.add_(o))
               for o, r, bit in zip(out, more, (GRAD_INPUT, GRAD_WEIGHT, GRAD_BIAS))]
    return out


def _backward(ctx, g_loss, _g_denom, g_rows, _gx, _gw, _gb):
    gx, gw, gb = _grads(ctx, g_loss, g_rows, torch.ops.sgkernels.linear_cross_entropy_bwd)
    return (gx, gw, gb) + (None,) * (_N_ARGS - 3)


torch.library.register_autograd("sgkernels::linear_cross_entropy_fwd", _backward, setup_context=_setup_context)


class _TritonLinearCrossEntropy(torch.autograd.Function):
    """The Triton kernels called directly (``SGKERNELS_BACKEND=triton``, e.g. in the interpreter)."""

    @staticmethod
    def forward(ctx, *args):
        out = triton_kernels("linear_cross_entropy").linear_cross_entropy_fwd_triton(*args)
        _setup_context(ctx, args, out)
        return out

    @staticmethod
    def backward(ctx, g_loss, _g_denom, g_rows, _gx, _gw, _gb):
        bwd = triton_kernels("linear_cross_entropy").linear_cross_entropy_bwd_triton
        gx, gw, gb = _grads(ctx, g_loss, g_rows, bwd)
        return (gx, gw, gb) + (None,) * (_N_ARGS - 3)


@torch.library.register_fake("sgkernels::linear_cross_entropy_fwd")
def _fwd_fake(x, w, b, t, cw, tw, sup, ignore_index, eps, temperature, reduction, denom_min, conf, grad, chunk):
    f32 = dict(dtype=torch.float32, device=x.device)
    loss, denom, rows = x.new_empty((), **f32), x.new_empty((), **f32), x.new_empty((x.shape[0], 3), **f32)
    return (loss, denom, rows) + _grads_fake(x, w, b, grad)


def _grads_fake(x, w, b, bits):
    return (torch.empty_like(x) if bits & GRAD_INPUT else x.new_empty((0,)),
            torch.empty_like(w) if bits & GRAD_WEIGHT else w.new_empty((0,)),
            torch.empty_like(b) if b is not None and bits & GRAD_BIAS else w.new_empty((0,)))


@torch.library.register_fake("sgkernels::linear_cross_entropy_bwd")
def _bwd_fake(x, w, b, t, cw, nll_coef, ent_coef, sup, ignore_index, eps, temperature, needs, chunk):
    return _grads_fake(x, w, b, needs)


register_triton_cuda("linear_cross_entropy_fwd", "linear_cross_entropy", "linear_cross_entropy_fwd_triton")
register_triton_cuda("linear_cross_entropy_bwd", "linear_cross_entropy", "linear_cross_entropy_bwd_triton")


def _grad_bits(x, w, b) -> int:
    """The ``GRAD_*`` bits of the inputs that require grad (0 under ``no_grad``)."""
    if not torch.is_grad_enabled():
        return 0
    return sum(bit for t, bit in ((x, GRAD_INPUT), (w, GRAD_WEIGHT), (b, GRAD_BIAS))
               if t is not None and t.requires_grad)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    token_weight: torch.Tensor | None = None,
    suppress_ids=None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the logits.

    The rows whose target is ``ignore_index`` are never projected (they cost nothing, and a NaN in
    them reaches no output or gradient); the others are projected in row chunks whose float32 logits
    live in one buffer of at most 32 MiB, and for "mean"/"sum" the gradients for ``input``,
    ``linear_weight`` and ``linear_bias`` are made in the same sweep (the backward scales them by
    ``grad_output``): the FLOPs of the unfused loss on the kept rows, and no ``[rows, V]`` tensor in the
    forward or the backward. "none" keeps per-row statistics and recomputes the chunks' logits in the
    backward (one more GEMM). float32 accumulation for every dtype.

    Args:
        input: ``[..., d]`` float32/bfloat16/float16 (the head's input, e.g. hidden states).
        linear_weight: ``[V, d]``, same dtype and device (``nn.Linear(d, V).weight``).
        target: ``[...]`` integer class indices in ``[0, V)``, or ``ignore_index``.
        linear_bias: ``[V]`` or None.
        weight: ``[V]`` class weights, as ``F.cross_entropy``'s ``weight`` (no gradient).
        reduction: "mean" (0-d), "sum" (0-d) or "none" (``[...]``).
        ignore_index: the target of rows that are left out.
        label_smoothing: in [0, 1], as ``F.cross_entropy``.
        token_weight: ``[...]`` finite weights >= 0 (e.g. ``1 / p_mask``; no gradient): "sum" is
            ``sum w * l``, "mean" is ``sum w * l / sum w`` (times ``weight[target]`` in the
            denominator with class weights) over the non-ignored rows, "none" is ``w * l``.
        suppress_ids: token ids (an int, a sequence of ints, or an integer tensor) whose logits count
            as ``finfo(float32).min`` (and get no gradient), as ``train_llada2`` does with the mask id.
    Returns:
        The loss in ``input``'s dtype. "mean" with every row ignored (or every weight 0) is NaN with
        zero gradients, as ``F.cross_entropy``.
    Raises:
        TypeError/ValueError naming the argument, before anything is computed: a target outside
        ``[0, V)`` that is not ``ignore_index``, float targets, a feature size mismatch, an unknown
        reduction, ``token_weight`` of the wrong shape or with a negative entry, ``suppress_ids`` out
        of range. (On CUDA the kernels' value checks cost one host sync, which the row gathering
        needs anyway.)
    """
    eps, ignore_index, sup = _check(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                    label_smoothing, token_weight, suppress_ids)
    impl = choose_impl(input.device)
    if impl == "torch":
        return linear_cross_entropy_reference(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=eps, token_weight=token_weight, suppress_ids=sup)
    d = input.shape[-1]
    x, t = input.reshape(-1, d), target.reshape(-1)
    tw = None if token_weight is None else token_weight.reshape(-1)
    if reduction == "none":
        _loss, _denom, rows = _call_fwd(impl, x, linear_weight, linear_bias, t, weight, tw, sup, ignore_index, eps,
                                        1.0, "sum", 0.0, False, 0)
        per_row = rows[:, 0] if tw is None else rows[:, 0] * tw.float()
        return per_row.to(input.dtype).reshape(target.shape)
    loss, _denom, _rows = _call_fwd(impl, x, linear_weight, linear_bias, t, weight, tw, sup, ignore_index, eps, 1.0,
                                    reduction, 0.0, False, _grad_bits(input, linear_weight, linear_bias))
    return loss.to(input.dtype)


def linear_cross_entropy_terms(input, linear_weight, target, *, linear_bias=None, token_weight=None,
                               suppress_ids=None, ignore_index=-100, temperature=1.0, entropy=False,
                               denom_min=1.0):
    """The fused sweep's terms for losses built on the cross-entropy (e.g. diffusers' confidence-aware loss).

    Returns ``(loss, rows)``: ``loss`` float32 0-d, ``sum w * nll / max(sum w, denom_min)`` over the
    non-ignored rows (``w = token_weight``, or 1), its gradients made in the forward sweep; ``rows``
    float32 ``[..., 3]``: each row's ``nll``, with ``entropy=True`` the entropy of
    ``softmax(logits / temperature)``, and 1.0 where the logits' first argmax is the target (0 on
    ignored rows). Gradients flow through ``rows[..., 0]`` and ``rows[..., 1]`` too (the backward then
    recomputes the logits of the rows they reach). Arguments as :func:`linear_cross_entropy`.
    """
    eps, ignore_index, sup = _check(input, linear_weight, target, linear_bias, None, "mean", ignore_index, 0.0,
                                    token_weight, suppress_ids)
    temperature = check_temperature(temperature)
    denom_min = _validate.check_float("denom_min", denom_min)
    impl = choose_impl(input.device)
    d = input.shape[-1]
    tw = None if token_weight is None else token_weight.reshape(-1)
    loss, _denom, rows = _call_fwd(impl, input.reshape(-1, d), linear_weight, linear_bias, target.reshape(-1), None,
                                   tw, sup, ignore_index, eps, temperature, "mean", denom_min, bool(entropy),
                                   _grad_bits(input, linear_weight, linear_bias))
    return loss, rows.reshape(*target.shape, 3)
