"""Triton kernel of ``cross_entropy_fwd``: softmax cross-entropy loss AND its gradient in one kernel.

One kernel, :func:`_xent_rows_kernel`, one program per row (or per ``BLOCK_R`` rows of a small
vocabulary): log-sum-exp of the row, the row's loss, and ``d loss / d logits`` written in the same
launch (the backward then only scales the stored gradient by ``grad_output``), as Liger-Kernel
does. The gradient goes into a fresh buffer, or over the logits themselves (``inplace``: same
storage, same strides; only the logits' own row is read before it is overwritten).

Launchers go through ``torch.library.wrap_triton`` (``torch.compile`` traces the launches); under
``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (bf16 inputs are upcast to fp32 there, the
interpreter cannot load bf16, and the gradient is cast back).

Reductions: the kernel writes the float32 loss of every row; "sum"/"mean" add them up with
``torch.sum`` (deterministic, no atomics). "mean" divides by the number of non-ignored rows, a
device tensor computed before the launch (no host sync); the kernel reads it to scale the gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreted, row_tiles
from ._launch import launch as _launch

from .._status_bits import BAD_TARGET

# V up to this: whole rows in registers (one read of the logits, one write of the gradient).
# Above: two passes over tiles of _TILE_V (online log-sum-exp, then the gradient): two reads, one write.
# Tests shrink both (monkeypatch) to exercise the multi-tile path on small V.
_MAX_SINGLE_TILE_V = 8192
_TILE_V = 4096


@triton.jit
def _xent_rows_kernel(
    logits_ptr,
    target_ptr,
    nvalid_ptr,
    loss_ptr,
    grad_ptr,
    flags_ptr,
    n_rows,
    V,
    stride_lr,
    stride_lv,
    stride_gr,
    stride_gv,
    ignore_index,
    eps,
    MEAN: tl.constexpr,
    SMOOTH: tl.constexpr,
    BAD_BIT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    """Loss and gradient of ``BLOCK_R`` rows of ``logits [R, V]`` against ``target [R]``.

    Per non-ignored row, with ``eps`` the label smoothing, ``M = max(x)``:
    ``loss = log sum exp(x - M) + (1 - eps) (M - x_y) - (eps / V) sum(x - M)``
    (``= lse - (1 - eps) x_y - (eps / V) sum(x)``) and
    ``grad = scale * (softmax(x) - eps / V - (1 - eps) onehot(y))``, ``scale = 1 / nvalid[0]``
    (MEAN) or 1. Ignored rows (``y == ignore_index``): loss 0, gradient 0, logits not read. A
    target outside [0, V) that is not ignore_index: loss NaN, gradient 0, ``BAD_BIT`` ORed into
    ``flags[0]``. float32 arithmetic throughout; the gradient is stored in ``grad``'s dtype.

    Reads ``logits`` (any float dtype, any strides), ``target`` (int32/int64 [R]), ``nvalid``
    (int64 [1], MEAN only). Writes ``loss`` (float32 [R]) and ``grad`` ([R, V], any strides; may be
    the logits' own storage).

    Roofline: memory bound. Bytes per logit: single tile (V <= BLOCK_V): itemsize read + itemsize
    written (4 + 4 fp32, 2 + 2 bf16); multi-tile: 2 x itemsize read + itemsize written (the second
    pass re-reads the row, from L2 for rows up to a few MB). Per element: 1 exp (2 in multi-tile,
    the second pass recomputes it instead of storing it), ~3 fma.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    NEG_INF: tl.constexpr = float("-inf")

    y = tl.load(target_ptr + rows64, mask=row_ok, other=0).to(tl.int64)
    ignored = y == ignore_index
    bad = row_ok & ~ignored & ((y < 0) | (y >= V))
    valid = row_ok & ~ignored & ~bad
    y = tl.where(valid, y, 0)
    if MEAN:
        scale = 1.0 / tl.maximum(tl.load(nvalid_ptr).to(tl.float32), 1.0)
    else:
        scale = 1.0
    l_row = logits_ptr + rows64 * stride_lr
    g_row = grad_ptr + rows64 * stride_gr
    # the target logit first: in place, the row is overwritten below
    x_y = tl.load(l_row + y * stride_lv, mask=valid, other=0.0).to(tl.float32)
    cols = tl.arange(0, BLOCK_V)

    if SINGLE_TILE:
        c64 = cols.to(tl.int64)
        m2 = valid[:, None] & (cols[None, :] < V)
        x = tl.load(l_row[:, None] + c64[None, :] * stride_lv, mask=m2, other=NEG_INF).to(tl.float32)
        m = tl.max(x, axis=1)
        ms = tl.where(m == NEG_INF, 0.0, m)
        e = tl.exp(x - ms[:, None])
        d = tl.sum(e, axis=1)
        if SMOOTH:
            sx = tl.sum(tl.where(m2, x - ms[:, None], 0.0), axis=1)
    else:
        # pass 1: online max / sum of exp over the tiles (rows with nothing to read skip the loop)
        m = tl.full([BLOCK_R], NEG_INF, tl.float32)
        d = tl.zeros([BLOCK_R], tl.float32)
        n_tiles = tl.cdiv(V, BLOCK_V)
        n_iter = tl.where(tl.max(valid.to(tl.int32), axis=0) > 0, n_tiles, 0)
        for t in range(0, n_iter):
            c = t * BLOCK_V + cols
            m2 = valid[:, None] & (c[None, :] < V)
            x = tl.load(l_row[:, None] + c.to(tl.int64)[None, :] * stride_lv, mask=m2, other=NEG_INF).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            ms_new = tl.where(m_new == NEG_INF, 0.0, m_new)
            d = d * tl.exp(m - ms_new) + tl.sum(tl.exp(x - ms_new[:, None]), axis=1)
            m = m_new
        ms = tl.where(m == NEG_INF, 0.0, m)

    mul = scale / d
    sub = scale * eps / V
    hit = scale * (1.0 - eps)
    if SINGLE_TILE:
        g = e * mul[:, None] - sub - tl.where(cols[None, :] == y[:, None], hit, 0.0)
        g = tl.where(valid[:, None], g, 0.0)
        st = row_ok[:, None] & (cols[None, :] < V)
        tl.store(g_row[:, None] + c64[None, :] * stride_gv, g.to(grad_ptr.dtype.element_ty), mask=st)
    else:
        # pass 2: the gradient, tile by tile (exp recomputed: cheaper than a stored copy); the
        # smoothing sum of x - max here, where the final max is known
        if SMOOTH:
            sx = tl.zeros([BLOCK_R], tl.float32)
        for t in range(0, tl.cdiv(V, BLOCK_V)):
            c = t * BLOCK_V + cols
            c64 = c.to(tl.int64)
            inb = c[None, :] < V
            x = tl.load(l_row[:, None] + c64[None, :] * stride_lv, mask=valid[:, None] & inb, other=NEG_INF)
            xs = x.to(tl.float32) - ms[:, None]
            if SMOOTH:
                sx += tl.sum(tl.where(valid[:, None] & inb, xs, 0.0), axis=1)
            g = tl.exp(xs) * mul[:, None] - sub
            g = g - tl.where(c[None, :] == y[:, None], hit, 0.0)
            g = tl.where(valid[:, None], g, 0.0)
            tl.store(g_row[:, None] + c64[None, :] * stride_gv, g.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & inb)

    # relative to the max, as log_softmax: x_y - max is exact for nearby values however large
    loss = tl.log(d) + (1.0 - eps) * (ms - x_y)
    if SMOOTH:
        loss = loss - (eps / V) * sx
    loss = tl.where(bad, float("nan"), tl.where(valid, loss, 0.0))
    tl.store(loss_ptr + rows64, loss, mask=row_ok)

    any_bad = tl.max(bad.to(tl.int32), axis=0)
    tl.atomic_or(flags_ptr, BAD_BIT, mask=any_bad > 0)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    return interpreted(_xent_rows_kernel)


def _config(n_rows: int, vocab: int):
    """(BLOCK_R, BLOCK_V, SINGLE_TILE, num_warps)."""
    block_r, block_v, _num_tiles, num_warps = row_tiles(n_rows, vocab, _MAX_SINGLE_TILE_V, _TILE_V)
    return block_r, block_v, vocab <= _MAX_SINGLE_TILE_V, num_warps


def _target_rows(target: torch.Tensor) -> torch.Tensor:
    t = target.reshape(-1)
    if t.dtype not in (torch.int32, torch.int64):
        t = t.to(torch.int64)
    return t.contiguous()


def _run(x, t, grad, flags, ignore_index, label_smoothing, reduction):
    """Launch over ``x`` [R, V] (gradient into ``grad`` [R, V]); return the float32 row losses and n_valid."""
    n_rows, vocab = x.shape
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    nvalid = (t != ignore_index).sum().reshape(1)
    if n_rows == 0:
        return loss_rows, nvalid
    block_r, block_v, single, num_warps = _config(n_rows, vocab)
    eps = float(label_smoothing)
    _launch(_xent_rows_kernel)[(triton.cdiv(n_rows, block_r),)](
        x, t, nvalid, loss_rows, grad, flags, n_rows, vocab, x.stride(0), x.stride(1), grad.stride(0), grad.stride(1),
        int(ignore_index), eps, MEAN=reduction == "mean", SMOOTH=eps != 0.0, BAD_BIT=BAD_TARGET, BLOCK_R=block_r,
        BLOCK_V=block_v, SINGLE_TILE=single, num_warps=num_warps,
    )
    return loss_rows, nvalid


def _reduce(loss_rows, nvalid, reduction, dtype, shape):
    if reduction == "none":
        return loss_rows.to(dtype).reshape(shape)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / nvalid[0]  # 0 / 0 = NaN when every row is ignored, as torch
    return total.to(dtype)


def _interp_f32(x: torch.Tensor) -> torch.Tensor:
    """bf16 upcast for the CPU interpreter (it cannot load bf16)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _interpreted():
        return x.float()
    return x


def cross_entropy_fwd_triton(logits, target, ignore_index, label_smoothing, reduction):
    """CUDA kernel of ``torch.ops.sgkernels.cross_entropy_fwd`` -> (loss, grad, flags)."""
    vocab = logits.shape[-1]
    x = _interp_f32(logits.reshape(-1, vocab))  # a view when the strides allow it
    t = _target_rows(target)
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    flags = torch.zeros(1, dtype=torch.int32, device=x.device)
    loss_rows, nvalid = _run(x, t, grad, flags, ignore_index, label_smoothing, reduction)
    loss = _reduce(loss_rows, nvalid, reduction, logits.dtype, target.shape)
    return loss, grad.to(logits.dtype).reshape(logits.shape), flags


def cross_entropy_fwd_inplace_triton(logits, target, ignore_index, label_smoothing, reduction, status):
    """CUDA kernel of ``torch.ops.sgkernels.cross_entropy_fwd_inplace``: the gradient over ``logits``."""
    vocab = logits.shape[-1]
    x2 = logits.view(-1, vocab)  # in place: needs a [R, V] view of the logits' storage
    x = _interp_f32(x2)
    t = _target_rows(target)
    loss_rows, nvalid = _run(x, t, x, status, ignore_index, label_smoothing, reduction)
    if x is not x2:
        x2.copy_(x)
    return _reduce(loss_rows, nvalid, reduction, logits.dtype, target.shape)
