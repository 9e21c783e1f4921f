"""Triton kernels of ``linear_cross_entropy_fwd`` / ``linear_cross_entropy_bwd``: the cross-entropy of
``input @ W^T + b`` without the logits (scheme: csrc/cpu/linear_cross_entropy.cpp, the same here).

The rows whose target is ``ignore_index`` are gathered out first (``nonzero``: one host sync, which
also reads the value checks: a bad target, token weight or suppressed id raises ValueError naming the
argument before any GEMM). The kept rows are projected in chunks of ``C`` rows whose float32 logits
live in one buffer (``_CHUNK_BYTES``). Per chunk, three kernels:

* :func:`_lce_mm_kernel` (``tl.dot``): ``logits = x_c @ W^T + b`` into the buffer;
* :func:`_lce_rows_kernel`: per row the label-smoothed class-weighted loss ``l``, and with ``CONF``
  the entropy ``H`` of ``softmax(z / T)`` and the argmax test, then (``GRAD``) ``d (a l + c H) / d z``
  over the buffer (the same formulas as csrc/cpu/linear_cross_entropy_rows.h);
* :func:`_lce_mm_kernel` again for ``dx_c = G @ W`` and ``dW += G^T @ x_c`` (float32 accumulators;
  the tiles of G are rounded to the weight's dtype for the tensor cores, as the unfused loss's
  gradient is), and ``db += G.sum(0)``.

Launchers go through ``torch.library.wrap_triton``; under ``TRITON_INTERPRET=1`` the kernels run on
CPU tensors (16-bit inputs upcast to float32 there: the interpreter cannot load bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreted
from ._launch import launch as _launch

_CHUNK_BYTES = 32 << 20  # float32 logits of one chunk
_TILE_V = 2048  # the rows kernel's vocabulary tile (tests shrink it)
FLOAT32_MIN = torch.finfo(torch.float32).min


@triton.jit
def _lce_mm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``C[M, N] (+)= A[M, K] @ B[K, N] (+ bias[N])``, any strides, float32 accumulation.

    Reads A (float32 or the weight dtype; its tiles are cast to B's dtype before ``tl.dot``), B, bias
    (``HAS_BIAS``), C (``ACC``: added to); writes C (float32). ``IEEE``: float32 ``tl.dot`` without
    TF32 (float32 inputs are exact to float32 rounding). Compute bound: 2 M N K flops; bytes:
    (M K / BLOCK_N + K N / BLOCK_M) itemsize read, M N 4 written (and read with ACC).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + rk).to(tl.int64)
        a = tl.load(a_ptr + rm64[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn64[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        a = a.to(b.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn64, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACC:
        acc += tl.load(c_ptrs, mask=cmask, other=0.0)
    tl.store(c_ptrs, acc, mask=cmask)


@triton.jit
def _lce_rows_kernel(
    z_ptr, y_ptr, a_ptr, c_ptr, cw_ptr, stats_ptr, V, stride_z, cw_sum, eps, inv_t,
    CONF: tl.constexpr, TEMP_ONE: tl.constexpr, SMOOTH: tl.constexpr, GRAD: tl.constexpr, HAS_C: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row of the chunk's float32 logits ``z [C, V]`` (bias added, suppressed ids at -FLT_MAX).

    ``l = (1 - eps) cw_y (log S + M - z_y) + (eps / V) (sum(cw) log S - sum cw_i (z_i - M))``,
    ``H = log S_T - sum q_i t_i`` with ``t = (z - M) / T`` floored at -1e30, ``q = softmax(t)``,
    ``correct = (first argmax == y)``; with ``GRAD`` the row becomes
    ``a dl/dz + c dH/dz`` (formulas: csrc/cpu/linear_cross_entropy_rows.h).

    Reads ``z`` (3 passes over tiles of BLOCK_V: max/argmax, sums, gradient; 12 bytes per logit,
    from L2 for rows up to a few MB), ``y`` int64, ``a``/``c`` float32 (GRAD / HAS_C), ``cw`` float32
    [V] (class weights, ones when none; SMOOTH or at y). Writes ``stats`` float32 [C, 3] and, with
    GRAD, ``z`` in place (4 bytes per logit). 2 to 3 exp per logit.
    """
    row = tl.program_id(0)
    zr = z_ptr + row.to(tl.int64) * stride_z
    y = tl.load(y_ptr + row + tl.zeros([1], tl.int32)).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")

    # pass 1: per-lane running max and the first index of it (lanes reduced after the loop: the
    # first argmax is the smallest index among the lanes that hold the row's max)
    m_v = tl.full([1, BLOCK_V], NEG_INF, tl.float32)
    arg_v = tl.zeros([1, BLOCK_V], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        c = (v0 + cols)[None, :]
        x = tl.load(zr + c, mask=c < V, other=NEG_INF)
        if CONF:
            arg_v = tl.where(x > m_v, c, arg_v)
        m_v = tl.maximum(m_v, x)
    m = tl.max(m_v, axis=1)
    if CONF:
        arg = tl.min(tl.where(m_v == m[:, None], arg_v, V), axis=1).to(tl.int64)
    ms = tl.where(m == NEG_INF, 0.0, m)

    # pass 2: the sums, per lane
    s_v = tl.zeros([1, BLOCK_V], tl.float32)
    aw_v = tl.zeros([1, BLOCK_V], tl.float32)
    st_v = tl.zeros([1, BLOCK_V], tl.float32)
    bt_v = tl.zeros([1, BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = (v0 + cols)[None, :]
        msk = c < V
        x = tl.load(zr + c, mask=msk, other=0.0)
        xs = x - ms[:, None]
        e = tl.where(msk, tl.exp(xs), 0.0)
        s_v += e
        if SMOOTH:
            cwv = tl.load(cw_ptr + c, mask=msk, other=0.0)
            aw_v += tl.where(msk, cwv * xs, 0.0)
        if CONF:
            if TEMP_ONE:
                bt_v += tl.where(msk, e * xs, 0.0)
            else:
                t = tl.maximum(xs * inv_t, -1e30)
                et = tl.where(msk, tl.exp(t), 0.0)
                st_v += et
                bt_v += tl.where(msk, et * t, 0.0)
    s_sum = tl.sum(s_v, axis=1)
    aw = tl.sum(aw_v, axis=1)
    st = tl.sum(st_v, axis=1)
    bt = tl.sum(bt_v, axis=1)
    if TEMP_ONE:
        st = s_sum
    ls = tl.log(s_sum)
    lst = tl.log(st)
    z_y = tl.load(zr + y)
    cw_y = tl.load(cw_ptr + y)
    keep = 1.0 - eps
    sm = eps / V
    loss = keep * cw_y * (ls + ms - z_y) + sm * (cw_sum * ls - aw)
    srow = stats_ptr + row.to(tl.int64) * 3 + tl.zeros([1], tl.int64)
    tl.store(srow, loss)
    if CONF:
        h = lst - bt / st
        tl.store(srow + 1, h)
        tl.store(srow + 2, tl.where(arg == y, 1.0, 0.0))
    else:
        h = tl.zeros([1], tl.float32)
        tl.store(srow + 1, h)
        tl.store(srow + 2, h)

    if GRAD:
        a = tl.load(a_ptr + row + tl.zeros([1], tl.int32))
        pa = a * (keep * cw_y + sm * cw_sum) / s_sum
        sa = a * sm
        hit = a * keep * cw_y
        if HAS_C:
            qa = tl.load(c_ptr + row + tl.zeros([1], tl.int32)) * inv_t / st
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            msk = (c < V)[None, :]
            x = tl.load(zr + c[None, :], mask=msk, other=0.0)
            xs = x - ms[:, None]
            g = pa[:, None] * tl.exp(xs)
            if SMOOTH:
                cwv = tl.load(cw_ptr + c[None, :], mask=msk, other=0.0)
                g -= sa[:, None] * cwv
            if HAS_C:
                t = tl.maximum(xs * inv_t, -1e30)
                g += qa[:, None] * tl.exp(t) * (lst[:, None] - t - h[:, None])
            g = g - tl.where(c[None, :] == y[:, None], hit[:, None], 0.0)
            tl.store(zr + c[None, :], g, mask=msk)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _interp() -> bool:
    return interpreted(_lce_rows_kernel)


def _mm(a, b, out, *, bias=None, acc=False):
    """``out (+)= a @ b (+ bias)`` (2-D views, any strides) with :func:`_lce_mm_kernel`."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    if _interp():
        bm, bn, bk, warps = 32, 64, 32, 4
    else:
        bm, bn, bk, warps = 64, 128, 32, 4
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _launch(_lce_mm_kernel)[grid](
        a, b, out, out if bias is None else bias, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), HAS_BIAS=bias is not None, ACC=acc, IEEE=b.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )


def _rows(z, y, a, c, cw, cw_sum, stats, eps, temperature, conf, grad):
    rows, vocab = z.shape
    if rows == 0:
        return
    block_v = min(triton.next_power_of_2(vocab), triton.next_power_of_2(_TILE_V))
    _launch(_lce_rows_kernel)[(rows,)](
        z, y, z if a is None else a, z if c is None else c, cw, stats, vocab, z.stride(0), float(cw_sum), float(eps),
        1.0 / float(temperature), CONF=conf, TEMP_ONE=float(temperature) == 1.0, SMOOTH=float(eps) != 0.0, GRAD=grad,
        HAS_C=c is not None, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )


def _prepare(x, w, b, t, cw, sup, ignore_index):
    """Value checks (ValueError naming the argument; one host sync) -> (t int64, keep int64 [n], cw f32 [V])."""
    vocab = w.shape[0]
    t = t.reshape(-1).to(torch.int64)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= vocab))
    checks = [bad.any()]
    if sup is not None:
        checks.append(((sup < 0) | (sup >= vocab)).any())
    flags = torch.stack(checks).tolist()  # the one sync of the checks
    if flags[0]:
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: target: expected class indices in [0, {vocab}) or ignore_index "
                         f"({ignore_index}), got {int(t[r])} at row {r}")
    if len(flags) > 1 and flags[1]:
        raise ValueError(f"linear_cross_entropy: suppress_ids: expected token ids in [0, {vocab})")
    keep = valid.nonzero().squeeze(1)
    cwf = torch.ones(vocab, dtype=torch.float32, device=x.device) if cw is None else cw.float().contiguous()
    return t, keep, cwf


def _interp_f32(x):
    if x is not None and x.dtype != torch.float32 and x.device.type == "cpu" and _interp():
        return x.float()
    return x


def _sweep(x, w, b, keep, y, a, c, cwf, sup, eps, temperature, conf, grad, chunk_rows, rows, gx, gw, gb):
    """The chunk loop (module docstring): statistics into ``rows`` [N, 3], and with ``grad`` the
    gradients of ``sum a l + c H`` into those of float32 ``gx`` [N, d] (kept rows), ``gw`` [V, d],
    ``gb`` [V] that are not None."""
    n = keep.numel()
    if n == 0:
        return
    vocab, d = w.shape
    x, w, b = _interp_f32(x), _interp_f32(w), _interp_f32(b)
    xc = x.index_select(0, keep).contiguous()
    size = chunk_rows if chunk_rows > 0 else max(1, _CHUNK_BYTES // (4 * vocab))
    size = min(size, n)
    buf = torch.empty((size, vocab), dtype=torch.float32, device=x.device)
    stats = torch.empty((n, 3), dtype=torch.float32, device=x.device)
    gxc = torch.empty((n, d), dtype=torch.float32, device=x.device) if gx is not None else None
    cw_sum = float(cwf.double().sum())
    for s in range(0, n, size):
        e = min(n, s + size)
        z = buf[: e - s]
        _mm(xc[s:e], w.t(), z, bias=b)
        if sup is not None:
            z.index_fill_(1, sup, FLOAT32_MIN)
        _rows(z, y[s:e], None if a is None else a[s:e], None if c is None else c[s:e], cwf, cw_sum, stats[s:e], eps,
              temperature, conf, grad)
        if grad:
            if sup is not None:
                z.index_fill_(1, sup, 0.0)
            if gxc is not None:
                _mm(z, w, gxc[s:e])
            if gw is not None:
                _mm(z.t(), xc[s:e], gw, acc=True)
            if gb is not None:
                gb += z.sum(0)
    rows.index_copy_(0, keep, stats)
    if gxc is not None:
        gx.index_copy_(0, keep, gxc)


def _grad_buffers(x, w, b, bits):
    """float32 accumulators of the gradients ``bits`` asks for (1: input, 2: weight, 4: bias), else None."""
    f32 = dict(dtype=torch.float32, device=x.device)
    return (torch.zeros(x.shape, **f32) if bits & 1 else None, torch.zeros(w.shape, **f32) if bits & 2 else None,
            torch.zeros(b.shape, **f32) if b is not None and bits & 4 else None)


def _cast_grads(gx, gw, gb, x, w, b):
    return (x.new_empty((0,)) if gx is None else gx.to(x.dtype), w.new_empty((0,)) if gw is None else gw.to(w.dtype),
            w.new_empty((0,)) if gb is None else gb.to(b.dtype))


def linear_cross_entropy_fwd_triton(x, w, b, t, cw, tw, sup, ignore_index, eps, temperature, reduction, denom_min,
                                    conf, grad, chunk_rows):
    """CUDA kernel of ``torch.ops.sgkernels.linear_cross_entropy_fwd`` (schema: csrc/schema.cpp)."""
    if tw is not None:
        twf = tw.reshape(-1).float()
        if bool(((twf < 0) | ~torch.isfinite(twf)).any()):
            raise ValueError("linear_cross_entropy: token_weight: expected finite values >= 0")
    t, keep, cwf = _prepare(x, w, b, t, cw, sup, ignore_index)
    y = t[keep]
    rho = torch.ones(keep.shape, dtype=torch.float32, device=x.device) if tw is None else twf[keep]
    if reduction == "mean":
        denom = (rho * cwf[y]).sum(dtype=torch.float64).clamp_min(denom_min).float()
    else:
        denom = torch.ones((), dtype=torch.float32, device=x.device)
    a = rho * torch.where(denom > 0, 1.0 / denom, torch.zeros_like(denom))
    rows = torch.zeros((x.shape[0], 3), dtype=torch.float32, device=x.device)
    gx, gw, gb = _grad_buffers(x, w, b, grad)
    _sweep(x, w, b, keep, y, a, None, cwf, sup, eps, temperature, conf, grad != 0, chunk_rows, rows, gx, gw, gb)
    loss = (rho.double() * rows[keep, 0].double()).sum()
    if reduction == "mean":
        loss = loss / denom.double()  # 0 / 0 = NaN when no row is kept, as torch
    loss = loss.float()
    return (loss, denom, rows) + _cast_grads(gx, gw, gb, x, w, b)


def linear_cross_entropy_bwd_triton(x, w, b, t, cw, nll_coef, ent_coef, sup, ignore_index, eps, temperature, needs,
                                    chunk_rows):
    """CUDA kernel of ``torch.ops.sgkernels.linear_cross_entropy_bwd``."""
    t, keep, cwf = _prepare(x, w, b, t, cw, sup, ignore_index)
    a_all = nll_coef.reshape(-1).float()
    c_all = None if ent_coef is None else ent_coef.reshape(-1).float()
    nz = a_all[keep] != 0
    if c_all is not None:
        nz = nz | (c_all[keep] != 0)
    keep = keep[nz]
    gx, gw, gb = _grad_buffers(x, w, b, needs)
    rows = torch.empty((x.shape[0], 3), dtype=torch.float32, device=x.device)
    if needs:
        _sweep(x, w, b, keep, t[keep], a_all[keep].contiguous(), None if c_all is None else c_all[keep].contiguous(),
               cwf, sup, eps, temperature, c_all is not None, True, chunk_rows, rows, gx, gw, gb)
    return _cast_grads(gx, gw, gb, x, w, b)
