"""Backend selection: ``SGKERNELS_BACKEND=auto|triton|cpp|torch`` and :func:`use_backend`.

* ``auto``: the registered op; CPU tensors run the fused C++ kernels, CUDA tensors the Triton
  kernels (the plain PyTorch reference when Triton is missing).
* ``triton``: the Triton kernels, on any device. With ``TRITON_INTERPRET=1`` they run on CPU
  tensors: that is how CI tests the GPU kernels without a GPU.
* ``cpp``: the C++ kernels (CPU tensors only for the sampling ops).
* ``torch``: the plain PyTorch reference, the spec the kernels are tested against.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

BACKENDS = ("auto", "triton", "cpp", "torch")
_state = threading.local()


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force: the innermost :func:`use_backend`, else ``$SGKERNELS_BACKEND``, else auto."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return _check(os.environ.get("SGKERNELS_BACKEND", "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager selecting the backend for the ops called inside it (per thread)."""
    _check(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def triton_interpret() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``import triton`` works."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True
