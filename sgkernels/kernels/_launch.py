"""Launch helpers shared by the Triton kernel modules."""
from __future__ import annotations

import torch
from triton.runtime.jit import JITFunction


def launch(kernel):
    """``wrap_triton(kernel)`` for a compiled kernel (torch.compile traces it); the kernel itself
    under TRITON_INTERPRET, where ``triton.jit`` returns an interpreted function instead."""
    if isinstance(kernel, JITFunction):
        return torch.library.wrap_triton(kernel)
    return kernel


def interpreted(kernel) -> bool:
    """Whether ``kernel`` runs in the CPU interpreter (TRITON_INTERPRET was set when it was defined)."""
    return not isinstance(kernel, JITFunction)
