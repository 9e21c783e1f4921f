"""Triton kernels of the sampling ops: ``guided_sample``, ``remask_lowest_confidence``, ``self_guided_step``.

Two kernels do all the work:

* :func:`_sample_rows_kernel`: one pass over each row's logits: self-guidance blend, online
  max / log-sum-exp, exact inverse-CDF token draw, log-probability of the token.
* :func:`_remask_kernel`: one program per batch row (any N: registers up to 4096 positions, tiles
  above): Gumbel confidence, k-th smallest by a bitwise binary search, exact-k (lowest index first
  on ties) or strict-below tie rule, decoded positions competing or not; in the fused step it also
  writes the new tokens.

``self_guided_step`` = sampler (only masked rows read their logits) + remask kernel, two launches,
no host sync. The random stream is :mod:`sgkernels._rng` bit for bit: ``tl.philox(seed, r_lo, r_hi,
off_lo, off_hi)`` per row/position ``r``, words w0, w1 -> token uniform, w2, w3 -> Gumbel noise.

Launchers go through ``torch.library.wrap_triton`` (so ``torch.compile`` traces the launches);
under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (bf16 inputs are upcast to fp32 there,
the interpreter cannot load bf16).

Why inverse CDF and not Gumbel-max for the token: Gumbel-max (``argmax(g / T + G_v)``) needs one
Philox draw and two logarithms per *vocabulary element* (V per row, V = 126464 for LLaDA), which
makes the kernel compute bound instead of memory bound, and the stream would depend on V. The
inverse CDF needs *one* Philox draw per row: ``r = uniform * Z`` against the float64 running sum of
``exp((g - M) / T)``; it is exact (the float64 sum keeps the tail of the distribution) and costs
one ``exp`` per element, which the log-sum-exp for ``logp`` needs anyway when T == 1
(``python -m benchmarks.sampling_method`` times the two).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .._status_bits import NEGATIVE_NUM_TO_MASK, NONFINITE_LOGITS
from ._device import row_words as _row_words
from ._device import token_uniform as _token_uniform
from ._launch import interpreted, row_tiles
from ._launch import launch as _launch

# V up to this: the whole row sits in registers (single-tile path). Above: tiles of _TILE_V.
# Tests shrink both (monkeypatch) to exercise the multi-tile path on small V.
# Register budget (ptxas, sm_90, no spills): ~8 elements per thread -> 64-74 registers; 8192 in one
# tile with 16 warps -> 128 registers; the multi-tile loop with 2048-wide tiles, 8 warps -> 64.
_MAX_SINGLE_TILE_V = 8192
_TILE_V = 2048
# remask: one program per batch row; up to this N the row's keys stay in registers, above it
# the row is read in tiles of _REMASK_TILE (keys in an int64 scratch buffer). Tests shrink both.
_MAX_SINGLE_TILE_N = 4096
_REMASK_TILE = 2048
# Status bits as constexpr globals (a Triton kernel may read a global only when it is a constexpr).
_NONFINITE_LOGITS = tl.constexpr(NONFINITE_LOGITS)
_NEGATIVE_NUM_TO_MASK = tl.constexpr(NEGATIVE_NUM_TO_MASK)


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gumbel(w2, w3):
    """float32 Gumbel(0, 1) noise from words w2, w3 (as ``_rng.gumbel``: fp32 v, fp64 logs)."""
    hi = (w2 & 0x7FFFFFFF).to(tl.float32) * 2.3283064365386963e-10
    lo = (w3.to(tl.float32) + 1.0) * 5.421010862427522e-20
    v = (hi + lo).to(tl.float64)
    # log1p(-v) accurate for tiny v (Goldberg's trick: log(y) * x / (y - 1), y = 1 + x rounded);
    # portable: libdevice.log1p does not exist in the interpreter.
    x = -v
    y = 1.0 + x
    log1p_x = tl.where(y == 1.0, x, tl.log(y) * (x / (y - 1.0)))
    e = tl.where((w2 >> 31) == 1, -tl.log(v), -log1p_x)
    return (-tl.log(e)).to(tl.float32)


@triton.jit
def _load_guided(l_ptrs, guide_ptrs, m, one_plus_s, HAS_GUIDE: tl.constexpr):
    """``guide + one_plus_s * (l - guide)`` in float32 (``l`` without guide); -inf where ``m`` is False.

    The blend rule of ``guided_sample`` (the launcher drops a term whose coefficient is 0): -inf in
    either term gives -inf, NaN or +inf in either gives NaN.
    """
    x = tl.load(l_ptrs, mask=m, other=0.0).to(tl.float32)
    if HAS_GUIDE:
        y = tl.load(guide_ptrs, mask=m, other=0.0).to(tl.float32)
        b = y + one_plus_s * (x - y)
        b = tl.where((x == float("-inf")) | (y == float("-inf")), float("-inf"), b)
        bad_term = (x != x) | (x == float("inf")) | (y != y) | (y == float("inf"))
        x = tl.where(bad_term, float("nan"), b)
    return tl.where(m, x, float("-inf"))


@triton.jit
def _order_key(g):
    """int64 order key of float32 ``g``: key(a) < key(b) iff a < b (-0 == +0); in [0, 2**32)."""
    g = tl.where(g == 0.0, 0.0, g)
    bits = g.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)


@triton.jit
def _rng_scalars(seed, offset, seed_ptr, offset_ptr, SEED_PTR: tl.constexpr, OFFSET_PTR: tl.constexpr):
    """The seed and offset: the int arguments, or the int64 values at ``seed_ptr`` / ``offset_ptr``."""
    if SEED_PTR:
        seed = tl.load(seed_ptr)
    if OFFSET_PTR:
        offset = tl.load(offset_ptr)
    return seed, offset


@triton.jit
def _at(x, idx, i):
    """Per row: ``x[r, c]`` at the column c with ``idx[c] == i[r]`` (0 where none); x [R, C], idx [C], i [R]."""
    return tl.sum(tl.where(idx[None, :] == i[:, None], x, 0.0), axis=1)


@triton.jit
def _cdf_pick(cdf, w, r, idx):
    """Per row: the inverse CDF at ``r`` [R]: the first column whose float64 ``cdf`` [R, C] exceeds r,
    clamped to the last column with weight ``w > 0``; returned as ``idx`` [C] of that column."""
    n = tl.sum((cdf <= r[:, None]).to(tl.int32), axis=1)
    last = tl.max(tl.where(w > 0.0, idx[None, :], 0), axis=1)
    return tl.minimum(n, last)


@triton.jit
def _load_cols(l_row, guide_row, c, live, V, stride_lv, stride_guide_v, one_plus_s, HAS_GUIDE: tl.constexpr):
    """The guided logits of the rows at columns ``c`` (int32 [1, C], or [R, C]: per row):
    (g float32 [R, C], -inf outside the ``live`` rows and past V; m2, where g was read)."""
    c64 = c.to(tl.int64)
    m2 = live[:, None] & (c < V)
    g = _load_guided(l_row[:, None] + c64 * stride_lv, guide_row[:, None] + c64 * stride_guide_v, m2, one_plus_s,
                     HAS_GUIDE)
    return g, m2


@triton.jit
def _tile_e(l_row, guide_row, c, live, V, stride_lv, stride_guide_v, one_plus_s, inv_t, Mz, HAS_GUIDE: tl.constexpr):
    """Columns ``c`` of the rows (:func:`_load_cols`): (g, valid, key, e = exp((g - Mz) * inv_t), 0 where not valid)."""
    g, m2 = _load_cols(l_row, guide_row, c, live, V, stride_lv, stride_guide_v, one_plus_s, HAS_GUIDE)
    e = tl.where(m2, tl.exp((g - Mz[:, None]) * inv_t), 0.0)
    key = tl.where(m2, _order_key(g), 0)
    return g, m2, key, e


@triton.jit
def _keep(e, key, thr_k, thr_p, min_p):
    """``e`` where the filters keep it (key >= both thresholds and e >= min_p), 0 elsewhere."""
    return tl.where((key >= thr_k[:, None]) & (key >= thr_p[:, None]) & (e >= min_p), e, 0.0)


@triton.jit
def _weights(e, m2, BY_MASS: tl.constexpr):
    """float64 weights of the threshold search: ``e`` (BY_MASS, top-p), else 1 where ``m2`` (top-k)."""
    if BY_MASS:
        w = e.to(tl.float64)
    else:
        w = tl.where(m2, 1.0, 0.0).to(tl.float64)
    return w


@triton.jit
def _threshold(target, key, e, m2, l_row, guide_row, cols, live, V, stride_lv, stride_guide_v, one_plus_s, inv_t, Mz,
               BY_MASS: tl.constexpr, IN_REGS: tl.constexpr, HAS_GUIDE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row: the largest key value t with sum_{key >= t} w >= target [R] (BY_MASS: > target, top-p's
    rule; 0 when none) by a 32-step bitwise search, w the :func:`_weights` of the row's entries.

    IN_REGS: the rows' ``key`` (int64 [R, C], 0 for lanes that never count), ``e`` and valid mask
    ``m2`` are given. Otherwise (key, e, m2 unused) every step reads the rows' tiles again
    (:func:`_tile_e`): 32 passes.
    """
    thr = tl.zeros_like(target).to(tl.int64)
    if IN_REGS:
        w = _weights(e, m2, BY_MASS)
    else:
        n_tiles = tl.cdiv(V, BLOCK_V)
        n_iter = tl.where(tl.max(live.to(tl.int32), axis=0) > 0, n_tiles, 0)
    for i in range(0, 32):
        trial = thr | (tl.full([], 1, tl.int64) << (31 - i))
        if IN_REGS:
            mass = tl.sum(tl.where(key >= trial[:, None], w, 0.0), axis=1)
        else:
            mass = tl.zeros_like(target)
            for t in range(0, n_iter):
                _g, m2_t, key_t, e_t = _tile_e(l_row, guide_row, (t * BLOCK_V + cols)[None, :], live, V, stride_lv,
                                               stride_guide_v, one_plus_s, inv_t, Mz, HAS_GUIDE)
                mass += tl.sum(tl.where(key_t >= trial[:, None], _weights(e_t, m2_t, BY_MASS), 0.0), axis=1)
        if BY_MASS:  # top-p: keep a token while the mass before it is <= target (filters.py)
            thr = tl.where(mass > target, trial, thr)
        else:  # top-k: at least target tokens
            thr = tl.where(mass >= target, trial, thr)
    return thr


@triton.jit
def _filter_thresholds(top_k, top_p, z_all, key, e, m2, l_row, guide_row, cols, live, V, stride_lv, stride_guide_v,
                       one_plus_s, inv_t, Mz, IN_REGS: tl.constexpr, HAS_GUIDE: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_V: tl.constexpr, HF_ORDER: tl.constexpr = False):
    """(thr_k, thr_p) int64 [R]: the order keys that top-k and top-p keep (key >= thr; 0, all, for a
    filter that is off). top-p: the entries kept while the mass before them is <= ``top_p * z_all``; with
    HF_ORDER (filter_order "hf") ``top_p`` times the mass of the top-k set (one more pass in tiles).
    The rows in registers or in tiles: see :func:`_threshold`."""
    thr_k = tl.zeros([BLOCK_R], tl.int64)
    thr_p = tl.zeros([BLOCK_R], tl.int64)
    if top_k > 0:
        thr_k = _threshold(tl.zeros([BLOCK_R], tl.float64) + top_k, key, e, m2, l_row, guide_row, cols, live, V,
                           stride_lv, stride_guide_v, one_plus_s, inv_t, Mz, False, IN_REGS, HAS_GUIDE, BLOCK_V)
    if top_p < 1.0:
        if IN_REGS:
            if HF_ORDER:
                if top_k > 0:
                    z_all = tl.sum(tl.where(key >= thr_k[:, None], e.to(tl.float64), 0.0), axis=1)
        else:
            # the mass as the threshold search weighs it, the float32 e of every tile summed in float64
            # (the caller's rescaled tile sums round differently: a prefix mass of exactly top_p would
            # miss), over the top-k set with HF_ORDER (thr_k is 0, every token, when top-k is off)
            thr_z = thr_k if HF_ORDER else tl.zeros([BLOCK_R], tl.int64)
            z_all = tl.zeros([BLOCK_R], tl.float64)
            n_iter = tl.where(tl.max(live.to(tl.int32), axis=0) > 0, tl.cdiv(V, BLOCK_V), 0)
            for t in range(0, n_iter):
                _g, m2_t, key_t, e_t = _tile_e(l_row, guide_row, (t * BLOCK_V + cols)[None, :], live, V,
                                               stride_lv, stride_guide_v, one_plus_s, inv_t, Mz, HAS_GUIDE)
                z_all += tl.sum(tl.where(m2_t & (key_t >= thr_z[:, None]), e_t.to(tl.float64), 0.0), axis=1)
        thr_p = _threshold(z_all * top_p, key, e, m2, l_row, guide_row, cols, live, V, stride_lv, stride_guide_v,
                           one_plus_s, inv_t, Mz, True, IN_REGS, HAS_GUIDE, BLOCK_V)
    return thr_k, thr_p


@triton.jit
def _multi_tile_filtered(l_row, guide_row, live, V, stride_lv, stride_guide_v, one_plus_s, inv_t, Mz, M, t_usum, t_sum,
                         dm, best_idx, uniform, top_k, top_p, min_p, HAS_GUIDE: tl.constexpr, GREEDY: tl.constexpr,
                         TEMP_ONE: tl.constexpr, FILTER: tl.constexpr, CONF: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_V: tl.constexpr, NUM_TILES: tl.constexpr, HF_ORDER: tl.constexpr):
    """Multi-tile rows with filters / a Dream confidence: thresholds (32 passes per filter), one pass for
    the kept tile sums (and the margin's second largest), one for the entropy, then the chosen tile."""
    cols = tl.arange(0, BLOCK_V)
    tids = tl.arange(0, NUM_TILES)
    n_tiles = tl.cdiv(V, BLOCK_V)
    n_iter = tl.where(tl.max(live.to(tl.int32), axis=0) > 0, n_tiles, 0)
    thr_k = tl.zeros([BLOCK_R], tl.int64)
    thr_p = tl.zeros([BLOCK_R], tl.int64)
    if FILTER:
        if GREEDY or TEMP_ONE:
            z_all = tl.sum(t_usum * tl.exp(dm), axis=1)
        else:
            z_all = tl.sum(t_sum * tl.exp(dm * inv_t), axis=1)
        # key, e, m2: not used when the rows are read in tiles
        thr_k, thr_p = _filter_thresholds(top_k, top_p, z_all, Mz, Mz, Mz, l_row, guide_row, cols, live, V, stride_lv,
                                          stride_guide_v, one_plus_s, inv_t, Mz, False, HAS_GUIDE, BLOCK_R, BLOCK_V,
                                          HF_ORDER)
    # kept tile sums (and the margin's e_2 / tie count at the max)
    t_w = tl.zeros([BLOCK_R, NUM_TILES], tl.float64)
    e2 = tl.zeros([BLOCK_R], tl.float32)
    n_top = tl.zeros([BLOCK_R], tl.int32)
    for t in range(0, n_iter):
        g, m2, key, e = _tile_e(l_row, guide_row, (t * BLOCK_V + cols)[None, :], live, V, stride_lv, stride_guide_v,
                                one_plus_s, inv_t, Mz, HAS_GUIDE)
        e = _keep(e, key, thr_k, thr_p, min_p)
        t_w = tl.where(tids[None, :] == t, tl.sum(e.to(tl.float64), axis=1)[:, None], t_w)
        if CONF == 2:
            n_top += tl.sum((m2 & (g == M[:, None])).to(tl.int32), axis=1)
            e2 = tl.maximum(e2, tl.max(tl.where(g < M[:, None], e, 0.0), axis=1))
    cdf_t = tl.cumsum(t_w, axis=1)
    z = tl.max(cdf_t, axis=1)
    zs = tl.where(z > 0.0, z, 1.0)
    conf = tl.zeros([BLOCK_R], tl.float32)
    if CONF == 3:
        inv_z = (1.0 / zs).to(tl.float32)
        acc = tl.zeros([BLOCK_R], tl.float64)
        for t in range(0, n_iter):
            g, m2, key, e = _tile_e(l_row, guide_row, (t * BLOCK_V + cols)[None, :], live, V, stride_lv,
                                    stride_guide_v, one_plus_s, inv_t, Mz, HAS_GUIDE)
            q = _keep(e, key, thr_k, thr_p, min_p) * inv_z[:, None]
            acc += tl.sum(tl.where(q > 0.0, q * tl.log(q + 1e-10), 0.0).to(tl.float64), axis=1)
        conf = acc.to(tl.float32)
    if CONF == 4:  # exact sum q log q = sum e d / z - log z, d = (g - M) / T = log e
        acc = tl.zeros([BLOCK_R], tl.float64)
        for t in range(0, n_iter):
            g, m2, key, e = _tile_e(l_row, guide_row, (t * BLOCK_V + cols)[None, :], live, V, stride_lv,
                                    stride_guide_v, one_plus_s, inv_t, Mz, HAS_GUIDE)
            e = _keep(e, key, thr_k, thr_p, min_p)
            acc += tl.sum(tl.where(e > 0.0, e.to(tl.float64) * ((g - Mz[:, None]) * inv_t).to(tl.float64), 0.0),
                          axis=1)
        conf = (acc / zs - tl.log(zs)).to(tl.float32)
    if CONF == 2:
        e2 = tl.where(n_top > 1, 1.0, e2)
        conf = ((1.0 - e2.to(tl.float64)) / zs).to(tl.float32)
    if GREEDY:
        tok = best_idx
        gk = M
        e_tok = tl.zeros([BLOCK_R], tl.float32) + 1.0
    else:
        r = uniform * z
        j = _cdf_pick(cdf_t, t_w, r, tids)
        before = _at(cdf_t, tids, j - 1)
        g, m2, key, e = _tile_e(l_row, guide_row, j[:, None] * BLOCK_V + cols[None, :], live, V, stride_lv,
                                stride_guide_v, one_plus_s, inv_t, Mz, HAS_GUIDE)
        e = _keep(e, key, thr_k, thr_p, min_p)
        k = _cdf_pick(tl.cumsum(e.to(tl.float64), axis=1), e, r - before, cols)
        tok = j * BLOCK_V + k
        gk = _at(g, cols, k)
        e_tok = _at(e, cols, k)
    if CONF == 1:
        conf = (e_tok.to(tl.float64) / zs).to(tl.float32)
    return tok, gk, conf


# ----------------------------------------------------------------------------------------------
# Row sampler
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed", "offset"])
def _sample_rows_kernel(
    logits_ptr,
    guide_ptr,
    rowmask_ptr,
    tokens_ptr,
    logp_ptr,
    status_ptr,
    n_rows,
    V,
    stride_lr,
    stride_lv,
    stride_guide_r,
    stride_guide_v,
    one_plus_s,
    inv_temperature,
    seed,
    offset,
    seed_ptr,
    offset_ptr,
    conf_ptr,
    top_k,
    top_p,
    min_p,
    HAS_GUIDE: tl.constexpr,
    HAS_ROWMASK: tl.constexpr,
    GREEDY: tl.constexpr,
    TEMP_ONE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    NUM_TILES: tl.constexpr,
    FILTER: tl.constexpr = False,
    CONF: tl.constexpr = 0,
    SEED_PTR: tl.constexpr = False,
    OFFSET_PTR: tl.constexpr = False,
    ids_ptr=None,
    HAS_IDS: tl.constexpr = False,
    HF_ORDER: tl.constexpr = False,
):
    """Sample one token per row of ``g = guide + one_plus_s * (l - guide)`` by inverse CDF; write token and logp.

    Reads: ``logits`` (and ``guide_logits``) ``[R, V]`` (any dtype, any strides) once, plus
    ``rowmask`` (bool [R], step only: rows with False are skipped without reading their logits) and,
    with HAS_IDS, ``row_ids`` (int64 [R]: each row's Philox key instead of its index; head_sample's
    row-chunk path).
    Writes: ``tokens`` int64 [R], ``logp`` float32 [R], and ORs NONFINITE_LOGITS into ``status[0]``
    for a bad row (NaN/+inf in g, or all -inf; its token is 0 and logp NaN).

    Roofline: memory bound, bytes per vocabulary element = itemsize(logits) (+ itemsize(guide)):
    2 B (bf16) / 4 B (fp32), doubled with a guide; the multi-tile path reads one tile again
    (x (1 + 1/num_tiles)). Per element: ~1 fma, 1-2 exp (fp32), a float64 add (the CDF).

    Single tile (NUM_TILES == 1, V <= BLOCK_V): BLOCK_R whole rows in registers: M = max g,
    e = exp((g - M) / T), float64 cumsum, token = #(cdf <= uniform * Z) clamped to the last e > 0.
    Multi-tile (NUM_TILES = next pow2 of the tile count, BLOCK_R == 1): one loop over the tiles
    keeps each tile's max and float64 sums of exp((g - m_t) / T) (and of exp(g - m_t)) in a small
    register vector [NUM_TILES]; afterwards the tile is chosen by a float64 cumsum of the rescaled
    tile sums against uniform * Z, and only that tile is read again to find the index inside it.
    (Registers instead of a global scratch buffer: no extra traffic, no block barrier.)
    logp = g_k - M - log(sum exp(g - M)) (untempered), float64 at the end. GREEDY (T == 0): the
    first argmax. TEMP_ONE: the tempered and untempered sums are the same and computed once.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    if HAS_ROWMASK:
        active = row_ok & (tl.load(rowmask_ptr + rows64, mask=row_ok, other=0) != 0)
    else:
        active = row_ok
    cols = tl.arange(0, BLOCK_V)
    l_row = logits_ptr + rows64 * stride_lr
    guide_row = guide_ptr + rows64 * stride_guide_r
    NEG_INF: tl.constexpr = float("-inf")
    POS_INF: tl.constexpr = float("inf")

    seed, offset = _rng_scalars(seed, offset, seed_ptr, offset_ptr, SEED_PTR, OFFSET_PTR)
    if not GREEDY:
        if HAS_IDS:  # ``row_ids`` int64 [R]: each row's Philox key (8 B per row)
            key = tl.load(ids_ptr + rows64, mask=row_ok, other=0)
        else:
            key = rows64
        w0, w1, _w2, _w3 = _row_words(seed, offset, key)
        uniform = _token_uniform(w0, w1)
    FILT_OR_CONF: tl.constexpr = FILTER or (CONF != 0)
    if GREEDY:
        inv_t = 1.0
    else:
        inv_t = inv_temperature
    conf = tl.zeros([BLOCK_R], tl.float32)

    if NUM_TILES == 1:
        # ---------------- single tile: whole rows in registers ----------------
        g, m2 = _load_cols(l_row, guide_row, cols[None, :], active, V, stride_lv, stride_guide_v, one_plus_s, HAS_GUIDE)
        M = tl.max(g, axis=1)
        n_bad = tl.sum(((g != g) | (g == POS_INF)).to(tl.int32), axis=1)
        bad = active & ((n_bad > 0) | (M == NEG_INF) | (M != M))
        Mz = tl.where(bad | (M == NEG_INF), 0.0, M)
        d = g - Mz[:, None]
        eu = tl.exp(d)
        z_u = tl.sum(eu.to(tl.float64), axis=1)
        NEEDS_CDF: tl.constexpr = FILT_OR_CONF or not GREEDY
        if NEEDS_CDF:
            if TEMP_ONE or GREEDY:
                e = eu
            else:
                e = tl.exp(d * inv_t)
            if FILT_OR_CONF:
                e = tl.where(m2, e, 0.0)
            if FILTER:
                key = tl.where(m2, _order_key(g), 0)
                thr_k, thr_p = _filter_thresholds(top_k, top_p, tl.sum(e.to(tl.float64), axis=1), key, e, m2, l_row,
                                                  guide_row, cols, active, V, stride_lv, stride_guide_v, one_plus_s,
                                                  inv_t, Mz, True, HAS_GUIDE, BLOCK_R, BLOCK_V, HF_ORDER)
                e = _keep(e, key, thr_k, thr_p, min_p)
            cdf = tl.cumsum(e.to(tl.float64), axis=1)
            z = tl.max(cdf, axis=1)
        if GREEDY:
            # NaN rows are flagged bad; keep them out of argmax (the interpreter rejects all-NaN)
            tok = tl.argmax(tl.where(g != g, NEG_INF, g), axis=1).to(tl.int32)
            gk = M
        else:
            tok = _cdf_pick(cdf, e, uniform * z, cols)
            gk = _at(g, cols, tok)
        if FILT_OR_CONF:
            zs = tl.where(z > 0.0, z, 1.0)
            if CONF == 1:
                conf = (_at(e, cols, tok).to(tl.float64) / zs).to(tl.float32)
            if CONF == 2:
                n_top = tl.sum((g == M[:, None]).to(tl.int32), axis=1)
                e2 = tl.max(tl.where(g < M[:, None], e, 0.0), axis=1)
                e2 = tl.where(n_top > 1, 1.0, e2)
                conf = ((1.0 - e2.to(tl.float64)) / zs).to(tl.float32)
            if CONF == 3:
                q = e * (1.0 / zs).to(tl.float32)[:, None]
                conf = tl.sum(tl.where(q > 0.0, q * tl.log(q + 1e-10), 0.0).to(tl.float64), axis=1).to(tl.float32)
            if CONF == 4:  # exact sum q log q (entropy_bound_step): sum e d / z - log z, d = log e
                ed = tl.where(e > 0.0, e.to(tl.float64) * (d * inv_t).to(tl.float64), 0.0)
                conf = (tl.sum(ed, axis=1) / zs - tl.log(zs)).to(tl.float32)
    else:
        # ---------------- multi-tile: one pass over the tiles, then one tile again ----------------
        tids = tl.arange(0, NUM_TILES)
        t_max = tl.full([BLOCK_R, NUM_TILES], NEG_INF, tl.float32)
        t_usum = tl.zeros([BLOCK_R, NUM_TILES], tl.float64)
        t_sum = tl.zeros([BLOCK_R, NUM_TILES], tl.float64)
        bad_acc = tl.zeros([BLOCK_R, BLOCK_V], tl.int32)  # reduced once, after the loop
        best = tl.full([BLOCK_R], NEG_INF, tl.float32)
        best_idx = tl.zeros([BLOCK_R], tl.int32)
        n_tiles = tl.cdiv(V, BLOCK_V)
        # programs whose rows are all known (step) do not loop at all
        n_iter = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, n_tiles, 0)
        for t in range(0, n_iter):
            g, _m2 = _load_cols(l_row, guide_row, (t * BLOCK_V + cols)[None, :], active, V, stride_lv, stride_guide_v,
                                one_plus_s, HAS_GUIDE)
            m_t = tl.max(g, axis=1)
            bad_acc = bad_acc | ((g != g) | (g == POS_INF)).to(tl.int32)
            m_s = tl.where((m_t == NEG_INF) | (m_t != m_t), 0.0, m_t)
            d = g - m_s[:, None]
            eu = tl.exp(d)
            sel = tids[None, :] == t
            t_max = tl.where(sel, m_t[:, None], t_max)
            t_usum = tl.where(sel, tl.sum(eu.to(tl.float64), axis=1)[:, None], t_usum)
            if GREEDY:
                a_t = tl.argmax(tl.where(g != g, NEG_INF, g), axis=1).to(tl.int32)
                upd = m_t > best
                best_idx = tl.where(upd, t * BLOCK_V + a_t, best_idx)
                best = tl.where(upd, m_t, best)
            elif not TEMP_ONE:
                e = tl.exp(d * inv_temperature)
                t_sum = tl.where(sel, tl.sum(e.to(tl.float64), axis=1)[:, None], t_sum)
        M = tl.max(t_max, axis=1)
        n_bad = tl.max(bad_acc, axis=1)
        bad = active & ((n_bad > 0) | (M == NEG_INF) | (M != M))
        Mz = tl.where(bad | (M == NEG_INF), 0.0, M)
        dm = t_max.to(tl.float64) - Mz.to(tl.float64)[:, None]
        scale_u = tl.exp(dm)
        z_u = tl.sum(t_usum * scale_u, axis=1)
        if FILT_OR_CONF:
            tok, gk, conf = _multi_tile_filtered(
                l_row, guide_row, active & ~bad, V, stride_lv, stride_guide_v, one_plus_s, inv_t, Mz, M, t_usum,
                t_sum, dm, best_idx, uniform if not GREEDY else Mz.to(tl.float64), top_k, top_p, min_p, HAS_GUIDE,
                GREEDY, TEMP_ONE, FILTER, CONF, BLOCK_R, BLOCK_V, NUM_TILES, HF_ORDER,
            )
        elif GREEDY:
            tok = best_idx
            gk = M
        else:
            if TEMP_ONE:
                t_scale = scale_u
                w = t_usum * scale_u
            else:
                t_scale = tl.exp(dm * inv_temperature)
                w = t_sum * t_scale
            cdf_t = tl.cumsum(w, axis=1)
            z = tl.max(cdf_t, axis=1)
            r = uniform * z
            j = _cdf_pick(cdf_t, w, r, tids)
            before = _at(cdf_t, tids, j - 1)
            sc_j = _at(t_scale, tids, j)
            m_j = _at(t_max, tids, j)
            m_j = tl.where((m_j == NEG_INF) | (m_j != m_j), 0.0, m_j)
            sc_j = tl.where(sc_j > 0.0, sc_j, 1.0)
            r_loc = (r - before) / sc_j
            g, _m2 = _load_cols(l_row, guide_row, j[:, None] * BLOCK_V + cols[None, :], active & ~bad, V, stride_lv,
                                stride_guide_v, one_plus_s, HAS_GUIDE)
            d = g - m_j[:, None]
            if TEMP_ONE:
                e = tl.exp(d)
            else:
                e = tl.exp(d * inv_temperature)
            k = _cdf_pick(tl.cumsum(e.to(tl.float64), axis=1), e, r_loc, cols)
            tok = j * BLOCK_V + k
            gk = _at(g, cols, k)

    ok = active & ~bad
    if CONF != 0:
        tl.store(conf_ptr + rows64, tl.where(ok, conf, float("nan")), mask=row_ok)
    logz = tl.log(tl.where(ok, z_u, 1.0))
    logp = ((gk.to(tl.float64) - Mz.to(tl.float64)) - logz).to(tl.float32)
    logp = tl.where(bad, float("nan"), tl.where(active, logp, 0.0))
    tok = tl.where(bad | ~active, 0, tok)
    tl.store(tokens_ptr + rows64, tok.to(tl.int64), mask=row_ok)
    tl.store(logp_ptr + rows64, logp, mask=row_ok)
    any_bad = tl.max(bad.to(tl.int32), axis=0)
    tl.atomic_or(status_ptr, _NONFINITE_LOGITS, mask=any_bad > 0)


# ----------------------------------------------------------------------------------------------
# Remask / select (and the token update of the fused step)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _remask_keys(logp_ptr, mask_ptr, pos, inb, tau, dec_conf, seed, offset, HAS_DECODED: tl.constexpr):
    """(key int64, candidate, masked) of positions ``pos`` (int64, in the row where ``inb``).

    ``conf = base + tau * G`` in float32, ``base = logp`` at masked positions and (HAS_DECODED)
    ``dec_conf`` at the others, ``G`` the Gumbel noise of the position (words w2, w3; computed
    here, never stored). key: the order-preserving uint32 of conf (NaN largest, -0 == +0) as
    int64; non-candidates get 2**32, above every key.
    """
    masked = inb & (tl.load(mask_ptr + pos, mask=inb, other=0) != 0)
    lp = tl.load(logp_ptr + pos, mask=masked, other=0.0).to(tl.float32)
    if HAS_DECODED:
        lp = tl.where(masked, lp, dec_conf)
        cand = inb
    else:
        cand = masked
    _w0, _w1, w2, w3 = _row_words(seed, offset, pos)
    gum = _gumbel(w2, w3)
    # the float32 product tau * G, exact-then-rounded in float64 (never fused into an fma with the add)
    noise = (gum.to(tl.float64) * tau).to(tl.float32)
    conf = lp + noise
    key = tl.where(conf != conf, 0xFFFFFFFF, _order_key(conf))
    key = tl.where(cand, key, 0x100000000)
    return key, cand, masked


@triton.jit
def _remask_write(out_mask_ptr, tokens_ptr, sampled_ptr, out_tokens_ptr, pos, inb, masked, chosen, mask_id,
                  FUSED: tl.constexpr, HAS_MASK_ID: tl.constexpr):
    """Store the chosen positions and (FUSED) ``new_tokens``: sampled where masked and not chosen,
    ``mask_id`` where chosen (HAS_MASK_ID), the old token elsewhere."""
    tl.store(out_mask_ptr + pos, chosen, mask=inb)
    if FUSED:
        old = tl.load(tokens_ptr + pos, mask=inb, other=0)
        smp = tl.load(sampled_ptr + pos, mask=masked, other=0)
        new = tl.where(masked & ~chosen, smp, old)
        if HAS_MASK_ID:
            new = tl.where(chosen, mask_id, new)
        tl.store(out_tokens_ptr + pos, new, mask=inb)


@triton.jit
def _scratch_tile(row_keys, N, t, cols, BLOCK_N: tl.constexpr):
    """Tile ``t`` of a row's keys in the int64 scratch (``row_keys``: the row's first): (key, 2**32
    past N; columns c; c < N)."""
    c = t * BLOCK_N + cols
    inb = c < N
    return tl.load(row_keys + c.to(tl.int64), mask=inb, other=0x100000000), c, inb


@triton.jit
def _count_below(row_keys, N, cols, thr, MULTI_TILE: tl.constexpr, BLOCK_N: tl.constexpr):
    """int64 #(key < thr) of a row: ``row_keys`` its keys (int64 [BLOCK_N], in registers), or
    (MULTI_TILE) a pointer to them in the scratch, read tile by tile."""
    if MULTI_TILE:
        cnt = tl.zeros([], tl.int64)
        for t in range(0, tl.cdiv(N, BLOCK_N)):
            key, _c, _inb = _scratch_tile(row_keys, N, t, cols, BLOCK_N)
            cnt += tl.sum((key < thr).to(tl.int32), axis=0).to(tl.int64)
    else:
        cnt = tl.sum((row_keys < thr).to(tl.int32), axis=0).to(tl.int64)
    return cnt


@triton.jit
def _remask_choose(key, cand, thr, k, n_cand, n_less, carry, STRICT: tl.constexpr):
    """The chosen positions among a tile's keys: ``key < thr``, plus (STRICT) every candidate when
    ``k >= n_cand``, or (exact-k) the ties ``key == thr`` of rank <= ``k - n_less`` in index order
    (``carry``: the ties in the row's earlier tiles)."""
    less = key < thr
    if STRICT:
        chosen = less | (cand & (k >= n_cand))
    else:
        eq = key == thr
        rank = tl.cumsum(eq.to(tl.int32), axis=0).to(tl.int64) + carry
        chosen = less | (eq & (rank <= k - n_less))
    return chosen


@triton.jit(do_not_specialize=["seed", "offset"])
def _remask_kernel(
    logp_ptr,
    mask_ptr,
    num_ptr,
    out_mask_ptr,
    tokens_ptr,
    sampled_ptr,
    out_tokens_ptr,
    keys_ptr,
    status_ptr,
    N,
    tau,
    dec_conf,
    mask_id,
    seed,
    offset,
    seed_ptr,
    offset_ptr,
    FUSED: tl.constexpr,
    HAS_DECODED: tl.constexpr,
    STRICT: tl.constexpr,
    HAS_MASK_ID: tl.constexpr,
    MULTI_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SEED_PTR: tl.constexpr = False,
    OFFSET_PTR: tl.constexpr = False,
):
    """Per batch row b: choose the re-masked positions among the candidates (ops/remask.py's rules).

    Candidates: masked positions, and (HAS_DECODED) the decoded ones with confidence ``dec_conf``
    (:func:`_remask_keys`). ``k = min(n_b, #candidates)``; exact-k: the ``k`` smallest (conf, index);
    STRICT: the candidates whose conf is strictly below the one of rank ``k`` (0-based; all when
    ``k >= #candidates``). Reads ``logp`` f32, ``is_masked`` bool, ``num_to_mask[b]`` int64 (and,
    FUSED, ``tokens`` int64 and ``sampled`` int64); writes ``new_is_masked`` bool (and, FUSED,
    ``new_tokens``, see :func:`_remask_write`). Bytes per position: 5 read + 1 written (remask),
    21 read + 9 written (fused step); MULTI_TILE adds an int64 key per position written once and
    read 33 times (L2-resident): a negligible kernel next to the sampler (N positions vs N * V logits).

    Selection without a sort: the rank-q key (q = k, or k + 1 for STRICT) by a 32-step bitwise
    binary search (each step one count: the largest thr with #(key < thr) < q), then ``key < thr``
    plus (exact-k) the first ``k - #(key < thr)`` positions with ``key == thr`` (cumsum), so ties
    go to the lower index. Single tile (N <= BLOCK_N): the row's keys stay in registers. MULTI_TILE:
    tiles of BLOCK_N, keys written to ``keys`` (int64 [B, N] scratch) in a first pass, counted from
    there, and the tie ranks carried across tiles in index order. ``n_b < 0`` ORs
    NEGATIVE_NUM_TO_MASK into ``status[0]`` and counts as 0. SEED_PTR / OFFSET_PTR: the seed / offset
    are read from ``seed_ptr`` / ``offset_ptr`` (0-dim int64) instead of the scalars.
    """
    seed, offset = _rng_scalars(seed, offset, seed_ptr, offset_ptr, SEED_PTR, OFFSET_PTR)
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    n_b = tl.load(num_ptr + b).to(tl.int64)
    tl.atomic_or(status_ptr, _NEGATIVE_NUM_TO_MASK, mask=n_b < 0)
    n_b = tl.maximum(n_b, 0)
    if MULTI_TILE:
        n_cand = tl.zeros([], tl.int64)
        for t in range(0, tl.cdiv(N, BLOCK_N)):
            c = t * BLOCK_N + cols
            inb = c < N
            pos = b * N + c.to(tl.int64)
            key, cand, _m = _remask_keys(logp_ptr, mask_ptr, pos, inb, tau, dec_conf, seed, offset, HAS_DECODED)
            tl.store(keys_ptr + pos, key, mask=inb)
            n_cand += tl.sum(cand.to(tl.int32), axis=0).to(tl.int64)
        tl.debug_barrier()  # the keys written above are read by any thread of the program below
        row_keys = keys_ptr + b * N
    else:
        inb = cols < N
        pos = b * N + cols.to(tl.int64)
        row_keys, cand, masked = _remask_keys(logp_ptr, mask_ptr, pos, inb, tau, dec_conf, seed, offset, HAS_DECODED)
        n_cand = tl.sum(cand.to(tl.int32), axis=0).to(tl.int64)
    k = tl.minimum(n_b, n_cand)
    q = k
    if STRICT:
        q = k + 1
    thr = tl.zeros([], tl.int64)
    for i in range(0, 32):
        trial = thr | (tl.full([], 1, tl.int64) << (31 - i))
        thr = tl.where(_count_below(row_keys, N, cols, trial, MULTI_TILE, BLOCK_N) < q, trial, thr)
    n_less = tl.zeros([], tl.int64)
    if not STRICT:
        n_less = _count_below(row_keys, N, cols, thr, MULTI_TILE, BLOCK_N)
    if MULTI_TILE:
        carry = tl.zeros([], tl.int64)  # ties (key == thr) in the tiles before this one
        for t in range(0, tl.cdiv(N, BLOCK_N)):
            key, c, inb = _scratch_tile(row_keys, N, t, cols, BLOCK_N)
            pos = b * N + c.to(tl.int64)
            masked = inb & (tl.load(mask_ptr + pos, mask=inb, other=0) != 0)
            chosen = _remask_choose(key, key < 0x100000000, thr, k, n_cand, n_less, carry, STRICT)
            carry += tl.sum((key == thr).to(tl.int32), axis=0).to(tl.int64)
            _remask_write(out_mask_ptr, tokens_ptr, sampled_ptr, out_tokens_ptr, pos, inb, masked, chosen, mask_id,
                          FUSED, HAS_MASK_ID)
    else:
        chosen = _remask_choose(row_keys, cand, thr, k, n_cand, n_less, 0, STRICT)
        _remask_write(out_mask_ptr, tokens_ptr, sampled_ptr, out_tokens_ptr, pos, inb, masked, chosen, mask_id,
                      FUSED, HAS_MASK_ID)


@triton.jit(do_not_specialize=["seed", "offset"])
def _philox_words_kernel(rows_ptr, out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    """Test helper: the four Philox words of each int64 row index (out int64 [4, n])."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    r = tl.load(rows_ptr + i, mask=m, other=0)
    w0, w1, w2, w3 = _row_words(seed, offset, r)
    tl.store(out_ptr + i, w0.to(tl.int64), mask=m)
    tl.store(out_ptr + n + i, w1.to(tl.int64), mask=m)
    tl.store(out_ptr + 2 * n + i, w2.to(tl.int64), mask=m)
    tl.store(out_ptr + 3 * n + i, w3.to(tl.int64), mask=m)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _f32(x: float) -> float:
    """``x`` rounded to float32 (the kernels take float32 scalars; round once, on the host)."""
    return struct.unpack("f", struct.pack("f", float(x)))[0]


def _interpreted() -> bool:
    return interpreted(_sample_rows_kernel)


def _prep_logits(x: torch.Tensor, vocab: int) -> torch.Tensor:
    """``x`` as [R, V] (a view when possible); bf16 upcast for the CPU interpreter."""
    x = x.reshape(-1, vocab)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _interpreted():
        x = x.float()
    return x


def _sampler_config(n_rows: int, vocab: int):
    """(BLOCK_R, BLOCK_V, NUM_TILES, num_warps) for the row sampler."""
    return row_tiles(n_rows, vocab, _MAX_SINGLE_TILE_V, _TILE_V)


_FLT_MIN = 1.1754943508222875e-38
_FLT_MAX = 3.4028234663852886e38
_CONF_CODES = {"logp": 0, "prob": 1, "margin": 2, "entropy": 3, "neg_entropy": 4}


def _launch_sampler(x, guide, rowmask, tokens, logp, status, guidance_scale, temperature, seed, offset, *, conf=None,
                    confidence="logp", top_k=0, top_p=1.0, min_p=0.0, seed_t=None, offset_t=None, row_ids=None,
                    filter_order="dream"):
    n_rows, vocab = x.shape
    block_r, block_v, num_tiles, num_warps = _sampler_config(n_rows, vocab)
    greedy = temperature == 0.0
    temp_one = temperature == 1.0
    # clamped to [FLT_MIN, FLT_MAX] as the C++ kernels: a tiny T is argmax over the maxima, a huge
    # one uniform over the finite entries (never inf * 0 or -inf * 0)
    inv_temperature = 1.0 if (greedy or temp_one) else min(max(1.0 / temperature, _FLT_MIN), _FLT_MAX)
    # the blend's terms of coefficient 0 are dropped: s == 0 reads the logits, 1 + s == 0 the guide
    if guide is not None and guidance_scale == 0.0:
        guide = None
    elif guide is not None and 1.0 + guidance_scale == 0.0:
        x, guide = guide, None
    filtered = (0 < top_k < vocab) or top_p < 1.0 or min_p > 0.0
    has_guide = guide is not None
    if guide is None:
        guide = x  # never read
    has_rowmask = rowmask is not None
    if rowmask is None:
        rowmask = status  # never read
    code = _CONF_CODES[confidence]
    if conf is None:
        conf = logp  # never written (code 0)
    grid = (triton.cdiv(n_rows, block_r),)
    _launch(_sample_rows_kernel)[grid](
        x, guide, rowmask, tokens, logp, status, n_rows, vocab, x.stride(0), x.stride(1), guide.stride(0),
        guide.stride(1), _f32(1.0 + guidance_scale), _f32(inv_temperature), seed, offset,
        status if seed_t is None else seed_t, status if offset_t is None else offset_t,  # never read when None
        conf, top_k if 0 < top_k < vocab else 0, float(top_p), _f32(min_p),
        HAS_GUIDE=has_guide, HAS_ROWMASK=has_rowmask, GREEDY=greedy, TEMP_ONE=temp_one, BLOCK_R=block_r,
        BLOCK_V=block_v, NUM_TILES=num_tiles, FILTER=filtered, CONF=code, SEED_PTR=seed_t is not None,
        OFFSET_PTR=offset_t is not None, ids_ptr=status if row_ids is None else row_ids,
        HAS_IDS=row_ids is not None, HF_ORDER=filter_order == "hf" and 0 < top_k < vocab and top_p < 1.0,
        num_warps=num_warps,
    )


def _launch_remask(logp, is_masked, num_to_mask, out_mask, status, tau, seed, offset, tokens=None, sampled=None,
                   out_tokens=None, decoded_confidence=None, strict_below=False, mask_token_id=None, seed_t=None,
                   offset_t=None):
    batch, n_pos = is_masked.shape
    multi = n_pos > _MAX_SINGLE_TILE_N
    block_n = triton.next_power_of_2(_REMASK_TILE if multi else n_pos)
    keys = torch.empty(batch * n_pos if multi else 1, dtype=torch.int64, device=is_masked.device)
    fused = tokens is not None
    if not fused:
        tokens = sampled = out_tokens = num_to_mask  # never read
    _launch(_remask_kernel)[(batch,)](
        logp, is_masked, num_to_mask, out_mask, tokens, sampled, out_tokens, keys, status, n_pos, _f32(tau),
        _f32(0.0 if decoded_confidence is None else decoded_confidence),
        0 if mask_token_id is None else int(mask_token_id), seed, offset,
        status if seed_t is None else seed_t, status if offset_t is None else offset_t,  # never read when None
        FUSED=fused, HAS_DECODED=decoded_confidence is not None, STRICT=bool(strict_below),
        HAS_MASK_ID=mask_token_id is not None, MULTI_TILE=multi, BLOCK_N=block_n, SEED_PTR=seed_t is not None,
        OFFSET_PTR=offset_t is not None,
        num_warps=max(1, min(8, block_n // 256)),  # 16 warps spill (f64 logs) at N = 4096
    )


def guided_sample_triton(logits, guide_logits, guidance_scale, temperature, seed, offset, status, top_k=0, top_p=1.0,
                         min_p=0.0, confidence="logp", seed_tensor=None, offset_tensor=None, row_ids=None,
                         filter_order="dream"):
    """CUDA kernel of ``torch.ops.sgkernels.guided_sample`` (see the op for the arguments)."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    x = _prep_logits(logits, vocab)
    guide = None if guide_logits is None else _prep_logits(guide_logits, vocab)
    n_rows = x.shape[0]
    tokens = torch.empty(n_rows, dtype=torch.int64, device=logits.device)
    logp = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    conf = logp if confidence == "logp" else torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows > 0:
        _launch_sampler(x, guide, None, tokens, logp, status, float(guidance_scale), float(temperature), int(seed),
                        int(offset), conf=conf, confidence=confidence, top_k=int(top_k), top_p=float(top_p),
                        min_p=float(min_p), seed_t=seed_tensor, offset_t=offset_tensor,
                        row_ids=None if row_ids is None else row_ids.contiguous(), filter_order=filter_order)
    if confidence == "logp":
        conf = logp.clone()
    return tokens.reshape(lead), logp.reshape(lead), conf.reshape(lead)


def remask_triton(logp, is_masked, num_to_mask, choice_temperature, seed, offset, status, decoded_confidence=None,
                  strict_below=False, seed_tensor=None, offset_tensor=None):
    """CUDA kernel of ``torch.ops.sgkernels.remask_lowest_confidence``."""
    batch, n_pos = logp.shape
    out = torch.empty((batch, n_pos), dtype=torch.bool, device=logp.device)
    if batch > 0 and n_pos > 0:
        _launch_remask(logp.float().contiguous(), is_masked.contiguous(), num_to_mask.to(torch.int64).contiguous(), out,
                       status, float(choice_temperature), int(seed), int(offset), decoded_confidence=decoded_confidence,
                       strict_below=strict_below, seed_t=seed_tensor, offset_t=offset_tensor)
    return out


def self_guided_step_triton(
    tokens, is_masked, logits, guide_logits, num_to_mask, guidance_scale, temperature, choice_temperature, seed, offset,
    status, decoded_confidence=None, strict_below=False, mask_token_id=None, top_k=0, top_p=1.0, min_p=0.0,
    confidence="logp", seed_tensor=None, offset_tensor=None,
):
    """CUDA kernels of ``torch.ops.sgkernels.self_guided_step``: sampler (masked rows only) + remask.

    The sampler writes each masked row's confidence score (``logp`` or Dream's prob / margin /
    entropy) into the buffer the remask kernel ranks.
    """
    batch, n_pos, vocab = logits.shape
    device = logits.device
    new_tokens = torch.empty((batch, n_pos), dtype=torch.int64, device=device)
    new_mask = torch.empty((batch, n_pos), dtype=torch.bool, device=device)
    if batch == 0 or n_pos == 0:
        return new_tokens, new_mask
    x = _prep_logits(logits, vocab)
    guide = None if guide_logits is None else _prep_logits(guide_logits, vocab)
    mask = is_masked.contiguous()
    sampled = torch.empty(batch * n_pos, dtype=torch.int64, device=device)
    logp = torch.empty(batch * n_pos, dtype=torch.float32, device=device)
    score = logp if confidence == "logp" else torch.empty(batch * n_pos, dtype=torch.float32, device=device)
    seed, offset = int(seed), int(offset)
    _launch_sampler(x, guide, mask.reshape(-1), sampled, logp, status, float(guidance_scale), float(temperature), seed,
                    offset, conf=score, confidence=confidence, top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
                    seed_t=seed_tensor, offset_t=offset_tensor)
    _launch_remask(score, mask, num_to_mask.to(torch.int64).contiguous(), new_mask, status, float(choice_temperature),
                   seed, offset, tokens=tokens.to(torch.int64).contiguous(), sampled=sampled, out_tokens=new_tokens,
                   decoded_confidence=decoded_confidence, strict_below=strict_below, mask_token_id=mask_token_id,
                   seed_t=seed_tensor, offset_t=offset_tensor)
    return new_tokens, new_mask
