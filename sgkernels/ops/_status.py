"""Error flags of the sampling ops (and cross_entropy) that the kernels set on the device.

Checking a CUDA tensor for NaN, or a device-resident ``num_to_mask`` for negatives, would need a
host sync every step. Instead the kernels OR bits (``sgkernels/_status_bits.py``) into an int32
status word, and :func:`check_errors` reads it once (the sampler calls it at its end).

Whose word: one per (Python thread, device), created on the thread's first call on that device.
A call's error is therefore seen only by the thread that made the call, whatever stream it ran
on and whichever other threads share that stream (a serving process whose request threads all
use the default stream gets its own errors, never another request's). The C++ CPU kernels raise
``ValueError`` themselves and never touch the word; the Triton kernels run in the interpreter on
CPU tensors, and those wrappers read the word right after the kernel (:func:`check_now_if_cpu`),
so on CPU every error is raised by the call that caused it.
"""
from __future__ import annotations

import threading

import torch

from .._status_bits import BAD_TARGET, NEGATIVE_NUM_TO_MASK, NONFINITE_LOGITS

_MESSAGES = {
    NONFINITE_LOGITS: "logits: a sampled row had NaN or +inf guided logits (or all -inf); "
    "its token is meaningless",
    NEGATIVE_NUM_TO_MASK: "num_to_mask: expected values >= 0, got a negative entry",
    BAD_TARGET: "cross_entropy: target: a class index outside [0, V) that is not ignore_index; "
    "its row's loss is NaN and its gradient 0",
}
_local = threading.local()  # .words: dict[torch.device, int32 [1] tensor], this thread's words


def _canonical(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _words() -> dict:
    words = getattr(_local, "words", None)
    if words is None:
        words = _local.words = {}
    return words


def status_buffer(device: torch.device) -> torch.Tensor:
    """This thread's int32 [1] status word on ``device`` (created zeroed on first use).

    The kernels OR bits into it; pass it to the op of this call only.
    """
    device = _canonical(device)
    words = _words()
    buf = words.get(device)
    if buf is None:
        buf = words[device] = torch.zeros(1, dtype=torch.int32, device=device)
        if not torch.compiler.is_compiling():
            # A fixed address: torch.compile(mode="reduce-overhead") then keeps the op in its CUDA
            # graph (inductor skips the graph when a graph input that is not static is mutated).
            torch._dynamo.mark_static_address(buf, guard=False)
    return buf


def _raise_flags(device: torch.device, flags: int) -> None:
    msgs = [m for bit, m in _MESSAGES.items() if flags & bit]
    raise ValueError(f"sgkernels ({device}): " + "; ".join(msgs))


def check_errors(device: torch.device | str | None = None) -> None:
    """Raise ``ValueError`` if an op called from this thread flagged bad input; reset the flag.

    Reads the status words of the calling thread only: on ``device``, or on every device this
    thread has used if None. Errors of calls made by other threads are theirs to check (they are
    kept until then). On CUDA this synchronizes the device first, so the calls of this thread on
    every stream have finished writing: call it once after a sampling loop, not per step.
    """
    words = _words()
    devices = [_canonical(device)] if device is not None else list(words)
    for dev in devices:
        buf = words.get(dev)
        if buf is None:
            continue
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        flags = int(buf.item())
        if flags:
            buf.zero_()
            _raise_flags(dev, flags)


def check_now_if_cpu(device: torch.device) -> None:
    """Raise at once for CPU tensors (this thread's word); CUDA errors wait for :func:`check_errors`."""
    if device.type == "cpu":
        check_errors(device)


def raise_if(cond: torch.Tensor, message: str) -> None:
    """The plain-PyTorch references' data-dependent check: ``ValueError(message)`` if the 0-d bool
    tensor ``cond`` is True.

    Under ``torch.compile`` a Python ``if`` on a tensor cannot be traced (``fullgraph=True`` fails),
    so there it becomes a runtime assert in the graph (``torch._assert_async``): the call still
    fails, with a ``RuntimeError`` carrying ``message``.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(~cond, message)
    elif bool(cond):
        raise ValueError(message)
