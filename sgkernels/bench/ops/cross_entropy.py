"""fused_cross_entropy forward + backward against F.cross_entropy (and Liger-Kernel when importable).

Each timed call is one training step of the loss: forward from the logits (a leaf requiring grad)
and ``backward()``; peak memory is what that step allocates on top of the logits, the gradient
it leaves in ``logits.grad`` included (sgkernels: the one gradient buffer of the forward, scaled in
place by the backward; F.cross_entropy: its log-softmax, the gradient, and its scaled copy).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import sgkernels  # noqa: F401  (loads the ops)
from sgkernels.ops.cross_entropy import fused_cross_entropy

from ..timing import measure_interleaved


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:  # noqa: BLE001  (not installed, or no GPU)
        return None
    return liger_cross_entropy


def _step(loss_fn, logits, target, *, copy=False):
    """One loss step from the leaf ``logits``. ``copy``: the loss gets ``logits * 1`` (a non-leaf, as
    a model head's output), for the kernels that overwrite their input; the copy is timed too."""

    def fn():
        x = logits * 1 if copy else logits
        loss_fn(x, target).backward()
        logits.grad = None  # after, not before: the peak then counts this step's gradient buffer

    return fn


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device == "cpu":
        shapes = [(8192, 1024, torch.float32), (4096, 8192, torch.float32)]
    else:
        shapes = [(8192, 1024, torch.bfloat16), (4096, 8192, torch.bfloat16), (16384, 32000, torch.bfloat16)]
    liger = _liger() if device != "cpu" else None
    rows = []
    for n_rows, vocab, dtype in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(n_rows, vocab, generator=gen, device=device).to(dtype).requires_grad_()
        target = torch.randint(0, vocab, (n_rows,), generator=gen, device=device)
        target[::10] = -100  # some padding rows
        common = dict(op="cross_entropy fwd+bwd", shape=f"R={n_rows} V={vocab}", dtype=str(dtype).replace("torch.", ""))
        # forward: read logits, write the gradient; backward: read it, write grad * grad_output
        # (single tile; the multi-tile path, V > 8192, reads the logits twice)
        nbytes = 4 * logits.numel() * logits.element_size()
        inplace = _step(lambda x, t: fused_cross_entropy(x, t, inplace_grad=True), logits, target, copy=True)
        impls = [(_step(fused_cross_entropy, logits, target), dict(impl="sgkernels", bytes=nbytes)),
                 (inplace, dict(impl="sgkernels inplace_grad (+copy)")),
                 (_step(F.cross_entropy, logits, target), dict(impl="F.cross_entropy"))]
        if liger is not None:
            impls.append((_step(liger, logits, target, copy=True), dict(impl="liger_cross_entropy (+copy)")))
        rows += measure_interleaved(impls, device, quick, **common)
    return rows
