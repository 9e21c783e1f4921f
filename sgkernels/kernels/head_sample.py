"""Triton kernels of ``head_sample``: the LM head ``h @ W^T + b`` fused with guided_sample's sampler.

Two launches, no host sync, and never an ``[R, V]`` logits tensor:

* :func:`_head_stats_kernel`, grid (row blocks, vocabulary tiles): one ``tl.dot`` tile
  ``[BLOCK_R, BLOCK_V]`` of logits over the whole hidden size, reduced at once to per-(row, tile)
  statistics: the tile max, the float64 sums of ``exp(g - m_t)`` and ``exp((g - m_t) / T)``, the
  first argmax, a NaN/+inf flag (32 B per row and tile; ``R x V / BLOCK_V x 32`` B in all).
* :func:`_head_pick_kernel`, one program per row: the row's tile statistics -> the tile where the
  float64 running sum of the rescaled tile sums crosses ``uniform * Z`` (the row's Philox uniform,
  words w0, w1 of its row id), then only that tile's logits again (a GEMV of ``BLOCK_V x d``) and the
  token inside it, at the same fraction of the recomputed tile's weight (weighed relative to its own
  max, so the GEMV's rounding cannot underflow the tile at a tiny T); ``logp`` untempered. Greedy (T == 0): the first argmax from the statistics alone.

This is the two-level inverse CDF of the C++ kernel (csrc/cpu/head_sample.cpp) and of
guided_sample's multi-tile path, with the same uniform: one seed gives the same tokens on every
backend and as guided_sample on the materialised logits, except where the logits' rounding (the
GEMM's summation order, and on CUDA the 16-bit operands) moves a CDF step across the uniform.

Precision: the blended hidden ``h = g + (1 + s) (c - g)`` is formed in float32 by the launcher
(``R x d``, negligible next to the GEMM). With bfloat16/float16 weights ``h`` is rounded to the
weight dtype for the tensor-core ``tl.dot`` (float32 accumulate), as the model's own head would;
float32 weights use an IEEE float32 dot (no TF32). Under ``TRITON_INTERPRET=1`` every input is
upcast to float32 (the interpreter cannot load bfloat16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._status_bits import NONFINITE_LOGITS
from ._device import row_words, token_uniform
from ._launch import interpreted
from ._launch import launch as _launch

# Vocabulary tile of both kernels (tests shrink it, monkeypatch, to exercise many tiles on small V).
_TILE_V = 128
_NONFINITE_LOGITS = tl.constexpr(NONFINITE_LOGITS)


@triton.jit
def _head_stats_kernel(
    h_ptr, w_ptr, b_ptr,  # hidden [R, d], weight [V, d], bias [V]
    tmax_ptr, usum_ptr, tsum_ptr, targ_ptr, tbad_ptr,  # tile statistics [R, n_tiles]
    R, V, D, stride_hr, stride_wv, n_tiles, inv_temperature,
    HAS_BIAS: tl.constexpr, GREEDY: tl.constexpr, TEMP_ONE: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Logits tile ``h[rows] @ W[cols]^T + b[cols]`` -> per-(row, tile) statistics.

    Reads ``h`` [R, d] and ``W`` [V, d] (same dtype: bf16/fp16, or fp32 with an IEEE dot; unit
    stride along d), ``b`` [V] fp32. Writes, at ``[row, tile]`` of ``[R, n_tiles]`` buffers: max
    (fp32), sum exp(g - max) and sum exp((g - max) / T) (fp64; the latter not when GREEDY, the same
    as the former when TEMP_ONE), first argmax inside the tile (int32), NaN/+inf flag (int32).
    Bytes: W is read once per row block (``ceil(R / BLOCK_R) x V x d x itemsize``), h once per
    tile (``R x d x itemsize x n_tiles``, from L2); 32 B per (row, tile) written. Compute: 2 R V d
    flops on the tensor cores (fp32: CUDA cores).
    """
    pid_r = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    col_ok = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_V], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < D
        hk = tl.load(h_ptr + rows64[:, None] * stride_hr + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wk = tl.load(w_ptr + cols64[None, :] * stride_wv + kk[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if F32_DOT:
            acc = tl.dot(hk, wk, acc, input_precision="ieee")
        else:
            acc = tl.dot(hk, wk, acc)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + cols64, mask=col_ok, other=0.0)[None, :]
    NEG_INF: tl.constexpr = float("-inf")
    POS_INF: tl.constexpr = float("inf")
    g = tl.where(col_ok[None, :], acc, NEG_INF)
    m_t = tl.max(g, axis=1)
    n_bad = tl.sum(((g != g) | (g == POS_INF)).to(tl.int32), axis=1)
    m_s = tl.where((m_t == NEG_INF) | (m_t != m_t), 0.0, m_t)
    d = g - m_s[:, None]
    usum = tl.sum(tl.exp(d).to(tl.float64), axis=1)
    out = rows64 * n_tiles + pid_v
    tl.store(tmax_ptr + out, m_t, mask=row_ok)
    tl.store(usum_ptr + out, usum, mask=row_ok)
    tl.store(tbad_ptr + out, n_bad, mask=row_ok)
    if GREEDY:
        arg = tl.argmax(tl.where(g != g, NEG_INF, g), axis=1).to(tl.int32)
        tl.store(targ_ptr + out, arg, mask=row_ok)
    elif not TEMP_ONE:
        tsum = tl.sum(tl.exp(d * inv_temperature).to(tl.float64), axis=1)
        tl.store(tsum_ptr + out, tsum, mask=row_ok)


@triton.jit(do_not_specialize=["seed", "offset"])
def _head_pick_kernel(
    h_ptr, w_ptr, b_ptr,  # hidden [R, d], weight [V, d], bias [V]
    tmax_ptr, usum_ptr, tsum_ptr, targ_ptr, tbad_ptr,  # tile statistics [R, n_tiles]
    ids_ptr, tokens_ptr, logp_ptr, status_ptr,
    V, D, stride_hr, stride_wv, n_tiles, inv_temperature, seed, offset,
    HAS_BIAS: tl.constexpr, HAS_IDS: tl.constexpr, GREEDY: tl.constexpr, TEMP_ONE: tl.constexpr,
    NUM_TILES: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One row: tile statistics -> tile (inverse CDF) -> that tile's logits again -> token, logp.

    Reads the row's ``[n_tiles]`` statistics (32 B each), its row id (int64, HAS_IDS), and (not
    GREEDY) ``h[row]`` and one ``[BLOCK_V, d]`` tile of ``W`` (+ ``b``). Writes ``tokens`` int64,
    ``logp`` float32 (untempered guided log-softmax at the token) and ORs NONFINITE_LOGITS into
    ``status[0]`` for a row with NaN/+inf logits or all -inf (token 0, logp NaN).
    NUM_TILES: the next power of two >= n_tiles (the statistics sit in registers).
    """
    r = tl.program_id(0)
    r64 = r.to(tl.int64)
    NEG_INF: tl.constexpr = float("-inf")
    tids = tl.arange(0, NUM_TILES)
    t_ok = tids < n_tiles
    base = r64 * n_tiles
    tm = tl.load(tmax_ptr + base + tids, mask=t_ok, other=NEG_INF)
    tu = tl.load(usum_ptr + base + tids, mask=t_ok, other=0.0)
    n_bad = tl.max(tl.load(tbad_ptr + base + tids, mask=t_ok, other=0), axis=0)
    M = tl.max(tm, axis=0)
    bad = (n_bad > 0) | (M == NEG_INF) | (M != M)
    Mz = tl.where(bad, 0.0, M)
    dm = tm.to(tl.float64) - Mz.to(tl.float64)
    live = tm != NEG_INF
    scale_u = tl.where(live, tl.exp(dm), 0.0)
    z_u = tl.sum(tu * scale_u, axis=0)
    if GREEDY:
        j = tl.min(tl.where(tm == M, tids, NUM_TILES), axis=0)
        j = tl.minimum(j, n_tiles - 1)
        a_j = tl.load(targ_ptr + base + j)
        tok = j * BLOCK_V + a_j
        gk = M
    else:
        if HAS_IDS:
            row_id = tl.load(ids_ptr + r64)
        else:
            row_id = r64
        w0, w1, _w2, _w3 = row_words(seed, offset, row_id)
        uniform = token_uniform(w0, w1)
        if TEMP_ONE:
            w = tu * scale_u
        else:
            t_scale = tl.where(live, tl.exp(dm * inv_temperature), 0.0)
            w = tl.load(tsum_ptr + base + tids, mask=t_ok, other=0.0) * t_scale
        cdf_t = tl.cumsum(w, axis=0)
        z = tl.max(cdf_t, axis=0)
        thr = uniform * z
        j = tl.sum((cdf_t <= thr).to(tl.int32), axis=0)
        last_t = tl.max(tl.where(w > 0.0, tids, 0), axis=0)
        j = tl.minimum(j, last_t)
        before = tl.sum(tl.where(tids == j - 1, cdf_t, 0.0), axis=0)
        w_j = tl.sum(tl.where(tids == j, w, 0.0), axis=0)
        # the fraction of tile j's weight below the threshold: the recomputed tile is weighed relative
        # to its own max (the GEMV may round it an ulp off pass 1's, which at 1/T >= 1e8 would
        # underflow every weight of the tile)
        frac = tl.where(w_j > 0.0, (thr - before) / tl.where(w_j > 0.0, w_j, 1.0), 0.0)
        frac = tl.minimum(tl.maximum(frac, 0.0), 1.0)
        # tile j of this row again: a GEMV
        cols = j * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = (cols < V) & (~bad)
        cols64 = cols.to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_V], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + ks
            k_ok = kk < D
            hk = tl.load(h_ptr + r64 * stride_hr + kk, mask=k_ok, other=0.0).to(tl.float32)
            wk = tl.load(w_ptr + cols64[:, None] * stride_wv + kk[None, :], mask=col_ok[:, None] & k_ok[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(wk * hk[None, :], axis=1)
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + cols64, mask=col_ok, other=0.0)
        g = tl.where(col_ok, acc, NEG_INF)
        m_re = tl.max(g, axis=0)
        m_re = tl.where(bad | (m_re == NEG_INF) | (m_re != m_re), 0.0, m_re)
        d = g - m_re
        if TEMP_ONE:
            e = tl.exp(d)
        else:
            e = tl.exp(d * inv_temperature)
        cdf = tl.cumsum(e.to(tl.float64), axis=0)
        lanes = tl.arange(0, BLOCK_V)
        k = tl.sum((cdf <= frac * tl.max(cdf, axis=0)).to(tl.int32), axis=0)
        last_nz = tl.max(tl.where(e > 0.0, lanes, 0), axis=0)
        k = tl.minimum(k, last_nz)
        tok = j * BLOCK_V + k
        gk = tl.sum(tl.where(lanes == k, g, 0.0), axis=0)
    logz = tl.log(tl.where(bad, 1.0, z_u))
    logp = ((gk.to(tl.float64) - Mz.to(tl.float64)) - logz).to(tl.float32)
    logp = tl.where(bad, float("nan"), logp)
    tok = tl.where(bad, 0, tok)
    tl.store(tokens_ptr + r64, tok.to(tl.int64))
    tl.store(logp_ptr + r64, logp)
    tl.atomic_or(status_ptr, _NONFINITE_LOGITS, mask=bad)


def _block_r(rows: int) -> int:
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def head_sample_triton(hidden, weight, bias, guide_hidden, row_ids, guidance_scale, temperature, seed, offset, status):
    """Launcher, same arguments and outputs as ``torch.ops.sgkernels.head_sample`` (checked by the wrapper).

    hidden, guide_hidden [R, d]; weight [V, d]; bias [V] or None; row_ids int64 [R] or None.
    -> tokens int64 [R], logp float32 [R].
    """
    R, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    tokens = torch.empty(R, dtype=torch.int64, device=dev)
    logp = torch.empty(R, dtype=torch.float32, device=dev)
    if R == 0:
        return tokens, logp
    h = hidden.float()
    if guide_hidden is not None and guidance_scale != 0.0:  # a 0 coefficient drops its term (the blend rule)
        u = guide_hidden.float()
        h = u if 1.0 + guidance_scale == 0.0 else u + (1.0 + guidance_scale) * (h - u)
    interp = interpreted(_head_stats_kernel)
    w = weight
    if interp or w.dtype == torch.float32:
        w = w.float()
        f32 = True
    else:
        h = h.to(w.dtype)
        f32 = False
    h = h.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    b = bias.float().contiguous() if bias is not None else h
    tile = _TILE_V
    n_tiles = triton.cdiv(V, tile)
    block_k = 32 if f32 else 64
    if interp:
        block_k = 16
    greedy = temperature == 0.0
    # clamped to [FLT_MIN, FLT_MAX] as guided_sample's kernels (a tiny T: argmax over the maxima;
    # a huge T: uniform over the finite entries, never 0 * -inf)
    inv_t = 1.0 if greedy else min(max(1.0 / temperature, 1.1754943508222875e-38), 3.4028234663852886e38)
    temp_one = (not greedy) and inv_t == 1.0
    tmax = torch.empty(R, n_tiles, dtype=torch.float32, device=dev)
    usum = torch.empty(R, n_tiles, dtype=torch.float64, device=dev)
    tsum = usum if (greedy or temp_one) else torch.empty(R, n_tiles, dtype=torch.float64, device=dev)
    targ = torch.empty(R, n_tiles, dtype=torch.int32, device=dev)
    tbad = torch.empty(R, n_tiles, dtype=torch.int32, device=dev)
    block_r = 16 if interp else _block_r(R)
    _launch(_head_stats_kernel)[(triton.cdiv(R, block_r), n_tiles)](
        h, w, b, tmax, usum, tsum, targ, tbad, R, V, D, h.stride(0), w.stride(0), n_tiles, inv_t,
        HAS_BIAS=bias is not None, GREEDY=greedy, TEMP_ONE=temp_one, F32_DOT=f32,
        BLOCK_R=block_r, BLOCK_V=tile, BLOCK_K=block_k, num_warps=4, num_stages=3,
    )
    ids = row_ids if row_ids is not None else tokens
    _launch(_head_pick_kernel)[(R,)](
        h, w, b, tmax, usum, tsum, targ, tbad, ids, tokens, logp, status, V, D, h.stride(0), w.stride(0),
        n_tiles, inv_t, seed, offset,
        HAS_BIAS=bias is not None, HAS_IDS=row_ids is not None, GREEDY=greedy, TEMP_ONE=temp_one,
        NUM_TILES=triton.next_power_of_2(n_tiles), BLOCK_V=tile, BLOCK_K=block_k, num_warps=4,
    )
    return tokens, logp
