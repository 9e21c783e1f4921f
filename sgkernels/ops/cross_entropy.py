"""``fused_cross_entropy``: ``F.cross_entropy`` over ``[..., V]`` logits, loss and gradient in one pass.

Ops (schemas in csrc/schema.cpp, C++ CPU kernels in csrc/cpu/cross_entropy.cpp, Triton CUDA kernels in
sgkernels/kernels/cross_entropy.py, fake kernels here):

* ``torch.ops.sgkernels.cross_entropy_fwd(logits, target, ignore_index, label_smoothing, reduction)
  -> (loss, grad, flags)``: functional. ``grad = d loss / d logits`` is computed in the forward
  kernel; the autograd formula registered here (``torch.library.register_autograd``, so
  ``torch.compile`` sees one op in the forward graph and one multiply in the backward graph) is
  ``grad * grad_output`` (per row for ``reduction="none"``). ``flags`` (int32 [1]) carries
  :mod:`._status` bits of bad targets on CUDA, ORed into the device status word by the wrapper
  without a sync; the CPU kernel raises instead.
* ``torch.ops.sgkernels.cross_entropy_fwd_inplace(logits!, target, ..., status!) -> loss``: the
  same with the gradient written over the logits (``inplace_grad=True``): no gradient buffer at
  all, and the backward scales it in place. A mutating op cannot carry a registered autograd
  formula, so this path is a ``torch.autograd.Function`` (eager use; the logits are destroyed).

:func:`cross_entropy_reference` (``F.cross_entropy``) is the spec the kernels are tested against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _status, _validate
from ._dispatch import choose_impl, register_triton_cuda, triton_kernels

REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------
# Reference and argument checks
# ----------------------------------------------------------------------------------------------
def cross_entropy_reference(logits, target, *, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Plain-PyTorch spec of :func:`fused_cross_entropy` (same arguments but ``inplace_grad``, same output):
    ``F.cross_entropy`` on the flattened rows."""
    vocab = logits.shape[-1]
    loss = F.cross_entropy(
        logits.reshape(-1, vocab),
        target.reshape(-1).long(),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    return loss.reshape(target.shape) if reduction == "none" else loss


def _check(logits, target, ignore_index, label_smoothing, reduction) -> float:
    _validate.check_logits("logits", logits)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected an integer tensor of class indices, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target: expected an integer tensor of class indices, got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(
            f"target: expected shape {tuple(logits.shape[:-1])} (logits' shape {tuple(logits.shape)} without V), "
            f"got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target: expected device {logits.device} (same as logits), got {target.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing: expected a float, got {type(label_smoothing).__name__}")
    label_smoothing = float(label_smoothing)
    if not (0.0 <= label_smoothing <= 1.0) or math.isnan(label_smoothing):
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return label_smoothing


def _scale_grad(grad: torch.Tensor, grad_loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """``d loss / d logits`` times the incoming gradient (a scalar, or one per row for "none").

    The saved gradient is scaled in place (no second gradient-sized buffer) when nothing can read
    it again: eager autograd (not traced), graph not retained, no double backward. Otherwise a new
    tensor.
    """
    scale = grad_loss.unsqueeze(-1) if reduction == "none" else grad_loss
    if (
        type(grad) is torch.Tensor  # not traced (FakeTensor / FunctionalTensor in AOTAutograd)
        and not torch.compiler.is_compiling()
        and not grad_loss.requires_grad
        and not torch._C._autograd._get_current_graph_task_keep_graph()
    ):
        return grad.mul_(scale)
    return grad * scale


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def fused_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    inplace_grad: bool = False,
) -> torch.Tensor:
    """``F.cross_entropy(logits, target, ...)`` with the gradient computed in the forward kernel.

    One pass over each row: online log-sum-exp, the loss, and ``d loss / d logits`` written at once
    (never a ``log_softmax`` tensor); the backward only multiplies the stored gradient by
    ``grad_output``, in place when the graph is not retained. Peak memory on top of the logits,
    forward + backward: one gradient-sized buffer (the stored gradient, which becomes
    ``logits.grad``), two with ``retain_graph=True``/``create_graph=True`` or under
    ``torch.compile``, none with ``inplace_grad`` (F.cross_entropy: three, its log-softmax, the
    gradient of that and the logits' gradient). sgkernels/bench/ops/cross_entropy.py measures it.

    Args:
        logits: ``[..., V]`` float32/bfloat16/float16, any strides.
        target: ``[...]`` integer class indices in ``[0, V)``, or ``ignore_index``.
        ignore_index: rows with this target add nothing to the loss (and get a zero gradient);
            "mean" divides by the number of the other rows.
        label_smoothing: in [0, 1], as ``F.cross_entropy`` (the smoothing term is averaged over the
            non-ignored rows too).
        reduction: "mean" (0-d), "sum" (0-d) or "none" (``[...]``).
        inplace_grad: write the gradient over ``logits`` instead of a new buffer (saves one
            logits-sized buffer). ``logits`` then hold the gradient: use it only when nothing else
            needs them (autograd raises if an upstream op saved them for its backward). Needs
            logits whose leading dims can be flattened into a view; eager use, one backward.
            Ignored when no gradient is needed.
    Returns:
        The loss in ``logits``' dtype (accumulated in float32), as ``F.cross_entropy`` returns it.
    Raises:
        TypeError/ValueError on bad arguments. A target outside ``[0, V)`` that is not
        ``ignore_index`` raises ValueError at once on CPU; on CUDA its row's loss is NaN and a
        device flag is set that :func:`sgkernels.check_errors` raises.
    """
    label_smoothing = _check(logits, target, ignore_index, label_smoothing, reduction)
    impl = choose_impl(logits.device)
    if impl == "torch":
        return cross_entropy_reference(
            logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
        )
    args = (ignore_index, label_smoothing, reduction)
    wants_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace_grad and wants_grad:
        if logits.dim() > 1 and not _viewable(logits):
            raise ValueError(
                "logits: inplace_grad=True needs logits whose leading dims flatten into a view "
                f"(got shape {tuple(logits.shape)}, strides {logits.stride()})"
            )
        loss = _InplaceCrossEntropy.apply(logits, target, impl, *args)
        _status.check_now_if_cpu(logits.device)
        return loss
    if impl == "op":
        loss, _grad, flags = torch.ops.sgkernels.cross_entropy_fwd(logits, target, *args)
    else:
        loss, flags = _TritonCrossEntropy.apply(logits, target, *args)
    if impl != "op" or logits.device.type != "cpu":  # the C++ CPU kernel raises by itself
        _status.status_buffer(logits.device).bitwise_or_(flags)
        _status.check_now_if_cpu(logits.device)
    return loss


def _viewable(logits: torch.Tensor) -> bool:
    try:
        logits.view(-1, logits.shape[-1])
    except RuntimeError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Fake kernels, autograd
# ----------------------------------------------------------------------------------------------
def _loss_shape(target, reduction):
    return target.shape if reduction == "none" else ()


@torch.library.register_fake("sgkernels::cross_entropy_fwd")
def _cross_entropy_fwd_fake(logits, target, ignore_index, label_smoothing, reduction):
    loss = logits.new_empty(_loss_shape(target, reduction))
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return loss, grad, logits.new_empty((1,), dtype=torch.int32)


@torch.library.register_fake("sgkernels::cross_entropy_fwd_inplace")
def _cross_entropy_fwd_inplace_fake(logits, target, ignore_index, label_smoothing, reduction, status):
    return logits.new_empty(_loss_shape(target, reduction))


def _setup_context(ctx, inputs, output):
    _, grad, flags = output
    ctx.reduction = inputs[4]
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad, flags)
    ctx.set_materialize_grads(False)  # else autograd hands the backward a zero-filled grad-sized tensor


def _backward(ctx, grad_loss, _grad_grad, _grad_flags):
    (grad,) = ctx.saved_tensors
    return _scale_grad(grad, grad_loss, ctx.reduction), None, None, None, None


torch.library.register_autograd("sgkernels::cross_entropy_fwd", _backward, setup_context=_setup_context)


class _TritonCrossEntropy(torch.autograd.Function):
    """The Triton kernel called directly (``SGKERNELS_BACKEND=triton``, e.g. in the interpreter)."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, reduction):
        loss, grad, flags = triton_kernels("cross_entropy").cross_entropy_fwd_triton(
            logits, target, ignore_index, label_smoothing, reduction
        )
        ctx.reduction = reduction
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(flags)
        ctx.set_materialize_grads(False)
        return loss, flags

    @staticmethod
    def backward(ctx, grad_loss, _grad_flags):
        (grad,) = ctx.saved_tensors
        return _scale_grad(grad, grad_loss, ctx.reduction), None, None, None, None


class _InplaceCrossEntropy(torch.autograd.Function):
    """``inplace_grad=True``: the forward writes the gradient over the logits, the backward scales it
    in place and hands that storage back as the logits' gradient (Liger-Kernel's memory trick)."""

    @staticmethod
    def forward(ctx, logits, target, impl, ignore_index, label_smoothing, reduction):
        status = _status.status_buffer(logits.device)
        if impl == "op":
            loss = torch.ops.sgkernels.cross_entropy_fwd_inplace(
                logits, target, ignore_index, label_smoothing, reduction, status
            )
        else:
            loss = triton_kernels("cross_entropy").cross_entropy_fwd_inplace_triton(
                logits, target, ignore_index, label_smoothing, reduction, status
            )
        ctx.reduction = reduction
        ctx.used = False
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("fused_cross_entropy(inplace_grad=True): the backward can run only once")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        scale = grad_loss.unsqueeze(-1) if ctx.reduction == "none" else grad_loss
        return grad.mul_(scale), None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# CUDA kernels
# ----------------------------------------------------------------------------------------------
register_triton_cuda("cross_entropy_fwd", "cross_entropy", "cross_entropy_fwd_triton")
register_triton_cuda("cross_entropy_fwd_inplace", "cross_entropy", "cross_entropy_fwd_inplace_triton")
