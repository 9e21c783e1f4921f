"""Pick the implementation of an op call from the backend in force and the tensors' device."""
from __future__ import annotations

import importlib

import torch

from .._backend import get_backend, triton_available, triton_interpret


def choose_impl(device: torch.device, *, has_cpp_cuda: bool = False) -> str:
    """Return "op" (the registered torch.ops kernel), "triton" or "torch" (the reference).

    Args:
        device: device of the op's inputs.
        has_cpp_cuda: the op has a C++/CUDA kernel (so ``cpp`` works on CUDA tensors too).
    """
    backend = get_backend()
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("SGKERNELS_BACKEND=triton but triton is not installed")
        if device.type == "cpu" and not triton_interpret():
            raise RuntimeError(
                "SGKERNELS_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before sgkernels is imported"
            )
        return "triton"
    if backend == "cpp":
        if device.type != "cpu" and not has_cpp_cuda:
            raise RuntimeError(f"SGKERNELS_BACKEND=cpp has no kernel for {device.type} tensors for this op")
        return "op"
    if device.type == "cpu" or (device.type == "cuda" and (has_cpp_cuda or triton_available())):
        return "op"
    return "torch"


def call_sampling_kernel(op: str, triton_fn: str, impl: str, device: torch.device, *args, **kwargs):
    """Run a sampling op's kernel (``impl`` "op" or "triton") with its bad-input report.

    ``triton_fn``: ``"<module>.<function>"`` in ``sgkernels.kernels``, imported only when
    ``impl == "triton"`` (so a compiled graph of the "op" path never traces an import).
    ``args``: the op's arguments before the status word, ``kwargs`` those after it.

    * C++ CPU kernels (``impl == "op"`` on CPU) raise ``ValueError`` themselves, per call: the status
      word they are handed is never written, and nothing is read on the host;
    * Triton in the interpreter (CPU tensors): a fresh status word for this call, read right after;
    * CUDA: the device's status word, raised later by :func:`sgkernels.check_errors` (no sync per step).

    Per call on CPU, so threads calling at once get their own errors only.
    """
    from . import _status

    if impl != "op":
        module, name = triton_fn.split(".")
        triton_fn = getattr(triton_kernels(module), name)
    if device.type == "cpu" and impl != "op":
        status = torch.zeros(1, dtype=torch.int32)
        out = triton_fn(*args, status, **kwargs)
        flags = int(status.item())
        if flags:
            msgs = [m for bit, m in _status._MESSAGES.items() if flags & bit]
            raise ValueError(f"sgkernels ({device}): " + "; ".join(msgs))
        return out
    fn = getattr(torch.ops.sgkernels, op) if impl == "op" else triton_fn
    return fn(*args, _status.status_buffer(device), **kwargs)


def triton_kernels(module: str):
    """The Triton kernel module ``sgkernels.kernels.<module>`` (imported on first use: it imports triton)."""
    return importlib.import_module(f"..kernels.{module}", __package__)


def register_triton_cuda(op: str, module: str, fn: str) -> None:
    """With triton installed, ``sgkernels.kernels.<module>.<fn>`` becomes the CUDA kernel of
    ``sgkernels::<op>`` (the module is imported at the first CUDA call, not here)."""
    if not triton_available():
        return

    def kernel(*args, **kwargs):
        return getattr(triton_kernels(module), fn)(*args, **kwargs)

    torch.library.register_kernel(f"sgkernels::{op}", "cuda", kernel)
