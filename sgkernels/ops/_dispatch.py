"""Pick the implementation of an op call from the backend in force and the tensors' device."""
from __future__ import annotations

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
