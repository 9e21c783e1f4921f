"""``vq_lookup``: index of the nearest codebook entry (squared L2) of every row of ``z``.

One op, ``torch.ops.sgkernels.vq_lookup(z, codebook, return_distance) -> (indices, sq_distance)``:
schema in csrc/schema.cpp, C++ CPU kernel in csrc/cpu/vq.cpp, CUDA kernel in csrc/cuda/vq.cu,
fake kernel and the plain-PyTorch reference :func:`vq_lookup_reference` here.

Neither kernel materialises the N x K distance matrix: they minimise ``||e_k||^2 - 2 z.e_k`` over
tiles of codes with a running (value, index) minimum per row, accumulating in float32, and add
``||z||^2`` back only when the distance is asked for. Ties go to the lowest index (like
``torch.argmin``); rows whose best and second-best distances differ by less than float32 rounding
may pick either of them (any float32 implementation can, including the reference).
"""
from __future__ import annotations

import torch

from . import _status, _validate
from ._dispatch import choose_impl


def _has_cuda_kernel() -> bool:
    from .. import _C

    return bool(getattr(_C, "WITH_CUDA", 0))


def _check(z, codebook) -> None:
    for name, t in (("z", z), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a float32, bfloat16 or float16 tensor, got {t.dtype}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook: expected shape [K, D], got {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError(f"codebook: expected at least one code (K >= 1), got shape {tuple(codebook.shape)}")
    if codebook.shape[1] == 0:
        raise ValueError(f"codebook: expected D >= 1, got shape {tuple(codebook.shape)}")
    if z.dim() < 1 or z.shape[-1] != codebook.shape[1]:
        raise ValueError(
            f"z: expected shape [..., {codebook.shape[1]}] (D of codebook {tuple(codebook.shape)}), "
            f"got {tuple(z.shape)}"
        )
    if z.device != codebook.device:
        raise ValueError(f"codebook: expected device {z.device} (same as z), got {codebook.device}")


def _check_finite(z: torch.Tensor, codebook: torch.Tensor) -> None:
    # Used for non-CPU tensors only (the CPU kernel checks while converting, at no extra pass).
    # On CUDA this is a host sync per call (two reductions + .item()).
    _status.raise_if(~torch.isfinite(codebook).all(), "codebook: contains NaN or inf")
    _status.raise_if(~torch.isfinite(z).all(), "z: contains NaN or inf")


def vq_lookup_reference(z: torch.Tensor, codebook: torch.Tensor, *, return_distance: bool = False):
    """Plain-PyTorch spec of :func:`vq_lookup`: float32 ``||z||^2 - 2 z e^T + ||e||^2``, argmin.

    Materialises the distances (in chunks of rows); ties go to the lowest index.
    """
    _check(z, codebook)
    _status.raise_if(~(torch.isfinite(codebook).all() & torch.isfinite(z).all()), "z/codebook: contains NaN or inf")
    d = codebook.shape[1]
    zf = z.reshape(-1, d).float()
    e = codebook.float()
    e2 = (e * e).sum(1)
    idx, dist = [], []
    for rows in torch.split(zf, 4096):
        z2 = (rows * rows).sum(1, keepdim=True)
        dd = (e2 - 2.0 * (rows @ e.t())) + z2
        v, i = dd.min(dim=1)  # first index of the minimum
        idx.append(i)
        dist.append(v.clamp_min(0.0))
    lead = z.shape[:-1]
    indices = torch.cat(idx).reshape(lead) if idx else torch.empty(lead, dtype=torch.int64, device=z.device)
    if not return_distance:
        return indices
    dists = torch.cat(dist).reshape(lead) if dist else torch.empty(lead, dtype=torch.float32, device=z.device)
    return indices, dists


def vq_lookup(z: torch.Tensor, codebook: torch.Tensor, *, return_distance: bool = False):
    """Nearest codebook entry of every vector of ``z`` (squared Euclidean distance).

    Args:
        z: ``[..., D]`` float32/bfloat16/float16, any strides (not copied when fp32 on CPU).
        codebook: ``[K, D]`` float32/bfloat16/float16 on the same device (K >= 1).
        return_distance: also return the squared distance to the chosen code.
    Returns:
        ``indices`` int64 ``[...]``, or ``(indices, sq_distance)`` with ``sq_distance`` float32 ``[...]``.
        Distances are accumulated in float32; ties go to the lowest index.
    Autograd: ``sq_distance`` is differentiable on every backend, with respect to ``z``
    (``2 (z - e_idx)``) and ``codebook`` (``-2 (z - e_idx)`` summed into the chosen rows); the
    index itself is piecewise constant (no gradient).
    Raises:
        TypeError for non-tensors / integer or float64 inputs; ValueError for a codebook that is not
        2-D or empty, mismatched D, different devices, or NaN/inf in z or codebook. On CPU the
        finiteness check is fused into the kernel; on CUDA it is done here with torch ops, which costs a
        host sync per call.
    """
    _check(z, codebook)
    impl = choose_impl(z.device, has_cpp_cuda=_has_cuda_kernel())
    if impl == "op" and z.device.type != "cpu" and not (z.device.type == "cuda" and _has_cuda_kernel()):
        impl = "torch"  # no compiled kernel for this device
    if impl == "torch":
        return vq_lookup_reference(z, codebook, return_distance=return_distance)
    # "triton" has no separate vq kernel: it runs the registered op as well.
    if z.device.type != "cpu":
        _check_finite(z, codebook)
    indices, dist = torch.ops.sgkernels.vq_lookup(z, codebook, bool(return_distance))
    return (indices, dist) if return_distance else indices


@torch.library.register_fake("sgkernels::vq_lookup")
def _vq_lookup_fake(z, codebook, return_distance):
    lead = z.shape[:-1]
    indices = z.new_empty(lead, dtype=torch.int64)
    dist = z.new_empty(lead if return_distance else (0,), dtype=torch.float32)
    return indices, dist


# ----------------------------------------------------------------------------------------------
# Autograd: d sq_distance / d z = 2 (z - e_idx), d / d codebook[k] = -sum over rows choosing k.
# The reference is differentiable as plain torch ops; this formula is the registered op's.
# ----------------------------------------------------------------------------------------------
def _vq_setup_context(ctx, inputs, output):
    z, codebook, _return_distance = inputs
    indices, _dist = output
    ctx.save_for_backward(z, codebook, indices)
    ctx.mark_non_differentiable(indices)


def _vq_backward(ctx, _grad_indices, grad_dist):
    z, codebook, indices = ctx.saved_tensors
    if grad_dist is None or grad_dist.numel() != indices.numel():  # return_distance=False
        return None, None, None
    d = codebook.shape[1]
    idx = indices.reshape(-1)
    diff = z.reshape(-1, d).float() - codebook.float().index_select(0, idx)
    scaled = 2.0 * diff * grad_dist.reshape(-1, 1).float()
    grad_z = grad_cb = None
    if ctx.needs_input_grad[0]:
        grad_z = scaled.reshape(z.shape).to(z.dtype)
    if ctx.needs_input_grad[1]:
        grad_cb = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device)
        grad_cb = grad_cb.index_add(0, idx, -scaled).to(codebook.dtype)
    return grad_z, grad_cb, None


torch.library.register_autograd("sgkernels::vq_lookup", _vq_backward, setup_context=_vq_setup_context)
