"""Device-side error flags for the sampling ops (and cross_entropy).

Checking a CUDA tensor for NaN, or a device-resident ``num_to_mask`` for negatives, would need a
host sync every step. Instead the kernels OR bits into a per-device int32 status word, and
:func:`check_errors` reads it once (the sampler calls it at its end). On CPU the wrappers call it
right after each op, so CPU errors are raised at once.
"""
from __future__ import annotations

import torch

from .._status_bits import BAD_TARGET, NEGATIVE_NUM_TO_MASK, NONFINITE_LOGITS

_MESSAGES = {
    NONFINITE_LOGITS: "logits: a sampled row had NaN or +inf guided logits (or all -inf); "
    "its token is meaningless",
    NEGATIVE_NUM_TO_MASK: "num_to_mask: expected values >= 0, got a negative entry",
    BAD_TARGET: "cross_entropy: target: a class index outside [0, V) that is not ignore_index; "
    "its row's loss is NaN and its gradient 0",
}
_buffers: dict[torch.device, torch.Tensor] = {}


def status_buffer(device: torch.device) -> torch.Tensor:
    """The int32 [1] status word of ``device`` (created zeroed on first use)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _buffers.get(device)
    if buf is None:
        buf = _buffers[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return buf


def check_errors(device: torch.device | str | None = None) -> None:
    """Raise ``ValueError`` if an op flagged bad input on ``device`` (all devices if None); reset it.

    On CUDA this syncs: call it once after a sampling loop, not per step.
    """
    devices = [torch.device(device)] if device is not None else list(_buffers)
    for dev in devices:
        buf = _buffers.get(dev) if dev.type != "cuda" or dev.index is not None else status_buffer(dev)
        if buf is None:
            continue
        flags = int(buf.item())
        if flags:
            buf.zero_()
            msgs = [m for bit, m in _MESSAGES.items() if flags & bit]
            raise ValueError(f"sgkernels ({dev}): " + "; ".join(msgs))


def check_now_if_cpu(device: torch.device) -> None:
    """Raise at once for CPU tensors; CUDA errors wait for :func:`check_errors`."""
    if device.type == "cpu":
        check_errors(device)
