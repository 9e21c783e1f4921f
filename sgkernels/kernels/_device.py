"""Triton device functions shared by the kernel modules (inlined into the kernels that call them).

The random stream is :mod:`sgkernels._rng` bit for bit: ``tl.philox(seed, r_lo, r_hi, off_lo,
off_hi)`` per row/position ``r``; words w0, w1 -> the row's token uniform, w2, w3 -> Gumbel noise.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_words(seed, offset, r):
    """The four Philox4x32-10 words (uint32) of row/position indices ``r`` (int64 tensor), as
    ``sgkernels._rng.row_words``."""
    off = offset.to(tl.uint64)
    c0 = (r & 0xFFFFFFFF).to(tl.uint32)
    c1 = (r >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    c2 = zero + (off & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + (off >> 32).to(tl.uint32)
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def token_uniform(w0, w1):
    """float64 uniform strictly inside (0, 1) from words w0, w1 (as ``_rng.token_uniform``)."""
    u52 = (w0.to(tl.uint64) << 20) | (w1 >> 12).to(tl.uint64)
    return (u52.to(tl.float64) + 0.5) * 2.220446049250313e-16
