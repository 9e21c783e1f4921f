"""Counter-based RNG shared by every backend: the spec of the random stream.

Every random number in sgkernels comes from Philox4x32-10, bit-identical to Triton's
``tl.philox`` (and so to ``tl.randint4x(seed, i)`` when ``offset == 0``):

* key = (seed & 0xFFFFFFFF, seed >> 32), ``0 <= seed < 2**63``;
* counter = (r & 0xFFFFFFFF, r >> 32, offset & 0xFFFFFFFF, offset >> 32) where ``r`` is the
  flattened row (element) index. So ``offset`` advances the stream in blocks of 2**64 rows:
  ``offset = step`` already gives every step of a sampler a disjoint stream.

One Philox call per row gives four 32-bit words ``w0..w3``:

* ``w0, w1`` -> the token uniform ``u = (u52 + 0.5) * 2**-52`` with
  ``u52 = (w0 << 20) | (w1 >> 12)``, a float64 strictly inside (0, 1). It drives the exact
  one-uniform-per-row inverse-CDF token sampler.
* ``w2, w3`` -> the confidence Gumbel noise, in float32:
  ``v = f32(w2 & 0x7FFFFFFF) * 2**-32 + (f32(w3) + 1) * 2**-64`` (so ``0 < v <= 0.5``),
  ``E = -log(v)`` if the top bit of ``w2`` is set else ``-log1p(-v)``, ``G = -log(E)``.
  ``E`` is Exp(1) with full float resolution at both ends, so ``G`` is finite and its tails are
  kept out to about 44 (upper) and -3.8 (lower): no inf/NaN at u -> 0 or 1 and no truncation at
  2**-24 as the naive ``-log(-log(u))`` on a 24-bit uniform has.

The C++ CPU path (``csrc/common/philox.h``) and the Triton kernels (``sgkernels/kernels/``) implement
the same words; this module is the plain-PyTorch version the tests compare them against.
"""
from __future__ import annotations

import numbers

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10
MAX_SEED = 2**63
# Derived seeds ``seed * SEED_STRIDE + i`` (i: a batch or step index): distinct for every
# (seed, i) while i < SEED_STRIDE, so batches of one seed never share a stream with another seed's.
# 1_000_003 is the first prime above a million: larger than any batch or step count in practice.
SEED_STRIDE = 1_000_003


def derived_seed(seed: int, index: int) -> int:
    """``(seed * SEED_STRIDE + index) mod 2**63``: the seed of batch / step ``index`` of a run seeded ``seed``.

    Always a valid seed for every ``seed`` in [0, 2**63). SEED_STRIDE is odd, so ``seed -> seed * SEED_STRIDE``
    is a bijection mod 2**63: different seeds give different derived seeds at the same ``index``, and
    ``(seed, index)`` pairs are all distinct while ``seed < 2**63 / SEED_STRIDE`` and ``index < SEED_STRIDE``.
    """
    return (resolve_seed(seed) * SEED_STRIDE + index) % MAX_SEED


def resolve_seed(seed: int | None) -> int:
    """Return ``seed`` checked to lie in [0, 2**63), or draw one from torch's default CPU generator.

    Drawing uses ``torch.randint`` on the CPU generator, so ``torch.manual_seed`` controls every
    seedless call and no device sync happens.
    """
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # Integral: numpy integers too
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def check_offset(offset: int) -> int:
    """Validate a stream offset: an int in [0, 2**63)."""
    if isinstance(offset, torch.SymInt):  # a step index that torch.compile made dynamic
        return offset
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if not 0 <= offset < MAX_SEED:
        raise ValueError(f"offset must be in [0, 2**63), got {offset}")
    return offset


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a uint32 tensor (held in int64) and a uint32 constant."""
    p_lo = a * (b & 0xFFFF)
    p_hi = a * (b >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(seed: int, c0: torch.Tensor, c1, c2, c3, n_rounds: int = N_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; same as Triton's ``tl.philox``.

    Args:
        seed: int in [0, 2**63).
        c0..c3: int64 tensors (or ints) in [0, 2**32), broadcastable.
    Returns:
        four int64 tensors in [0, 2**32).
    """
    c0 = torch.as_tensor(c0, dtype=torch.int64)
    c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=c0.device).expand_as(c0) for c in (c1, c2, c3))
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul32(c2, _ROUND_B)
        hi_a, lo_a = _mul32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def row_words(seed: int, offset: int, rows: torch.Tensor):
    """The four Philox words of each row index in ``rows`` (int64 tensor), for ``seed``/``offset``.

    Under ``torch.compile`` they come from :func:`_philox_rows_op`, the same code behind an opaque
    op: inductor would otherwise inline the ten rounds' integer arithmetic into one expression
    whose size grows exponentially with the rounds (each word is read several times per round),
    and the compile would not finish.
    """
    if torch.compiler.is_compiling():
        return tuple(_philox_rows_op(rows, seed, offset).unbind(0))
    return _row_words(seed, offset, rows)


def _row_words(seed: int, offset: int, rows: torch.Tensor):
    rows = rows.to(torch.int64)
    return philox4x32(seed, rows & _MASK32, rows >> 32, offset & _MASK32, (offset >> 32) & _MASK32)


@torch.library.custom_op("sgkernels::philox_rows", mutates_args=())
def _philox_rows_op(rows: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """int64 ``[4, *rows.shape]``: :func:`row_words` stacked (``seed``/``offset`` may be SymInts)."""
    return torch.stack(_row_words(int(seed), int(offset), rows))


@_philox_rows_op.register_fake
def _philox_rows_fake(rows, seed, offset):
    return rows.new_empty((4, *rows.shape), dtype=torch.int64)


def token_uniform(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """float64 uniform strictly inside (0, 1) with 52 random bits, from words w0, w1."""
    u52 = (w0 << 20) | (w1 >> 12)
    return (u52.to(torch.float64) + 0.5) * 2.0**-52


def gumbel(w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """float32 Gumbel(0, 1) noise from words w2, w3 (see the module docstring)."""
    hi = (w2 & 0x7FFFFFFF).to(torch.float32) * 2.0**-32
    lo = (w3.to(torch.float32) + 1.0) * 2.0**-64
    v = (hi + lo).to(torch.float64)
    e = torch.where((w2 >> 31) == 1, -torch.log(v), -torch.log1p(-v))
    return (-torch.log(e)).to(torch.float32)
