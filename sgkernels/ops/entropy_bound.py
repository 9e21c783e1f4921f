"""``entropy_bound_step``: one step of diffusers' ``EntropyBoundScheduler``, fused.

On the temperature-scaled logits ``x`` ``[B, L, V]`` (the scheduler divides by its annealed
temperature first, and returns ``x`` as ``pred_logits``):

* ``tokens ~ softmax(x)`` per position (guided_sample's exact inverse CDF, Philox uniforms keyed by
  ``seed`` / ``offset`` / flat position) and ``probs = softmax(x)[token]``;
* ``entropy = -sum softmax(x) log softmax(x)``, exact (the row kernel's ``sum e d / z - log z`` with
  ``d = x - max x = log e``: no logarithm per element);
* per batch row, positions ordered by increasing entropy (ties to the lower position) are accepted
  while the float64 sum of the entropies *before* them is ``<= entropy_bound`` (rounded to float32,
  as torch compares a float32 tensor with a Python float); this is diffusers'
  ``cumsum(sorted) - sorted <= entropy_bound``;
* ``prev_sample = where(accepted, tokens, noise)`` (``noise``: the caller's random tokens).

One op, ``torch.ops.sgkernels.entropy_bound_step``: C++ CPU kernel (csrc/cpu/sampling.cpp),
Triton on CUDA (sgkernels/kernels/block_refine.py: the row kernel with the exact entropy, then the
accept kernel; two launches, no host sync, no ``[B, L, V]`` probability tensor), the reference here.
"""
from __future__ import annotations

import torch

from .. import _rng
from . import _status, _validate
from ._dispatch import call_sampling_kernel, choose_impl, register_triton_cuda
from .block_refine import check_threshold
from .guided_sample import _sample_rows_reference, bad_rows

_BAD_ROW = "logits: a sampled row had NaN or +inf logits (or all -inf)"


def _check(logits, noise, entropy_bound) -> float:
    _validate.check_logits("logits", logits, min_dim=3)
    if logits.dim() != 3:
        raise ValueError(f"logits: expected shape [B, L, V], got {tuple(logits.shape)}")
    if not isinstance(noise, torch.Tensor) or noise.dtype != torch.int64:
        raise TypeError(f"noise: expected an int64 tensor [B, L], got {getattr(noise, 'dtype', type(noise).__name__)}")
    if tuple(noise.shape) != tuple(logits.shape[:2]) or noise.device != logits.device:
        raise ValueError(f"noise: expected shape {tuple(logits.shape[:2])} on {logits.device} (logits' [B, L]), got "
                         f"{tuple(noise.shape)} on {noise.device}")
    return check_threshold("entropy_bound", entropy_bound)


def entropy_accept_reference(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """bool ``[B, L]``: the accept set of float32 ``entropy`` ``[B, L]`` (module docstring)."""
    order = torch.argsort(entropy, dim=-1, stable=True)
    h = entropy.gather(-1, order).double()
    before = torch.cumsum(h, -1) - h
    bound = float(torch.tensor(entropy_bound, dtype=torch.float32))
    return torch.zeros_like(order, dtype=torch.bool).scatter_(-1, order, before <= bound)


def entropy_bound_step_reference(logits, noise, *, entropy_bound, seed, offset=0):
    """Plain-PyTorch spec of :func:`entropy_bound_step`: ``(prev_sample, accepted, tokens, probs, entropy)``."""
    entropy_bound = _check(logits, noise, entropy_bound)
    seed, offset = _validate.reference_rng(seed, offset, logits.device)
    g = logits.float().reshape(-1, logits.shape[-1])
    _status.raise_if(bad_rows(g).any(), _BAD_ROW)
    w0, w1, _, _ = _rng.row_words(seed, offset, torch.arange(g.shape[0], device=g.device))
    tokens, logp, _ = _sample_rows_reference(g, 1.0, _rng.token_uniform(w0, w1))
    logq = torch.log_softmax(g.double(), -1)
    shape = logits.shape[:2]
    entropy = (-(logq.exp() * logq.clamp_min(-1e300)).sum(-1)).float().reshape(shape)
    tokens, probs = tokens.reshape(shape), logp.exp().reshape(shape)
    accepted = entropy_accept_reference(entropy, entropy_bound)
    return torch.where(accepted, tokens, noise), accepted, tokens, probs, entropy


def entropy_bound_step(logits: torch.Tensor, noise: torch.Tensor, *, entropy_bound: float,
                       seed: int | torch.Tensor | None = None, offset: int = 0):
    """One entropy-bound step (module docstring), sampling, entropies and the accept set fused.

    Args:
        logits: ``[B, L, V]`` float32/bfloat16/float16, the temperature-scaled logits (any strides).
        noise: int64 ``[B, L]`` tokens for the positions not accepted.
        entropy_bound: the bound on the sum of the earlier entropies (any float but NaN).
        seed: int in [0, 2**63), a 0-dim int64 tensor on the logits' device (no host sync), or None
            (drawn from torch's default generator). offset: stream offset.
    Returns:
        ``prev_sample`` int64, ``accepted`` bool, ``tokens`` int64, ``probs`` float32 and ``entropy``
        float32, each ``[B, L]``.
    """
    entropy_bound = _check(logits, noise, entropy_bound)
    seed, offset, seed_t, _ = _validate.check_rng(seed, offset, logits.device)
    impl = choose_impl(logits.device)
    if impl == "torch":
        return entropy_bound_step_reference(logits, noise, entropy_bound=entropy_bound,
                                            seed=seed if seed_t is None else seed_t, offset=offset)
    return call_sampling_kernel("entropy_bound_step", "block_refine.entropy_bound_step_triton", impl, logits.device,
                                logits, noise, entropy_bound, seed, offset, seed_tensor=seed_t)


@torch.library.register_fake("sgkernels::entropy_bound_step")
def _entropy_bound_step_fake(logits, noise, entropy_bound, seed, offset, status, seed_tensor=None):
    shape = noise.shape
    return (noise.new_empty(shape), noise.new_empty(shape, dtype=torch.bool), noise.new_empty(shape),
            noise.new_empty(shape, dtype=torch.float32), noise.new_empty(shape, dtype=torch.float32))


register_triton_cuda("entropy_bound_step", "block_refine", "entropy_bound_step_triton")
