"""linear_cross_entropy forward + backward against ``F.cross_entropy(F.linear(...))`` (what diffusers'
train_llada2 and LLaDA's SFT recipe run) and torch's chunked ``F.linear_cross_entropy``.

Each timed call is one loss step from leaves ``input`` [N, d], ``linear_weight`` [V, d] and
``linear_bias`` [V] that require grad: forward, ``backward()``, and the gradients dropped after (so
the peak counts this step's gradient buffers: ``V d`` + ``N d`` + ``V`` elements). Rows with
"half ignored" have target ``-100`` on every other row, as the masked positions of a dLLM batch.
The implementations of one shape are timed interleaved (sgkernels/bench/timing.py).

The ``confidence_aware_loss`` row is a ``train_llada2``-shaped step (V = 157,184, the mask id
suppressed, per-token weights ``1 / p_mask``, lambda_conf = 0.1) against diffusers'
``compute_confidence_aware_loss`` on ``F.linear`` logits with the mask id's column set to
``finfo.min`` on a clone, as the script does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import sgkernels  # noqa: F401  (loads the ops)
from sgkernels.ops.linear_cross_entropy import linear_cross_entropy

from ..timing import measure_interleaved


def _leaves(n, d, vocab, dtype, device, *, ignore_every=0, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=gen, device=device).to(dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=gen, device=device) / d**0.5).to(dtype).requires_grad_()
    b = torch.zeros(vocab, device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=gen, device=device)
    if ignore_every:
        t[::ignore_every] = -100
    return x, w, b, t


def _step(loss_fn, x, w, b, *args, **kw):
    def fn():
        loss_fn(x, w, b, *args, **kw).backward()
        x.grad = w.grad = b.grad = None  # after, not before: the peak counts this step's gradients

    return fn


def _fused(x, w, b, t):
    return linear_cross_entropy(x, w, t, linear_bias=b)


def _unfused(x, w, b, t):
    return F.cross_entropy(F.linear(x, w, b), t)


def _torch_chunked(x, w, b, t):
    return F.linear_cross_entropy(x, w, t, linear_bias=b, options=torch.nn.LinearCrossEntropyOptions())


def _conf_fused(x, w, b, t, pw, mask_id):
    from sgkernels.training import confidence_aware_loss

    return confidence_aware_loss(x, w, t, linear_bias=b, lambda_conf=0.1, per_token_weights=pw,
                                 suppress_ids=mask_id)[0]


def _conf_diffusers(x, w, b, t, pw, mask_id):
    from diffusers.training_utils import compute_confidence_aware_loss

    logits = F.linear(x, w, b).clone()
    logits[..., mask_id] = torch.finfo(logits.dtype).min
    return compute_confidence_aware_loss(logits, t, lambda_conf=0.1, per_token_weights=pw)[0]


def _has_diffusers() -> bool:
    try:
        import diffusers.training_utils  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device == "cpu":
        dtype = torch.float32
        shapes = [(2048, 512, 32768, 0), (2048, 512, 32768, 2), (4096, 256, 65536, 2)]
        conf_shape = (1024, 256)
    else:
        dtype = torch.bfloat16
        shapes = [(8192, 2048, 131072, 0), (8192, 2048, 131072, 2), (16384, 4096, 65536, 2)]
        conf_shape = (8192, 2048)
    dname = str(dtype).replace("torch.", "")
    rows = []
    for n, d, vocab, every in shapes:
        x, w, b, t = _leaves(n, d, vocab, dtype, device, ignore_every=every)
        impls = [(_step(_fused, x, w, b, t), dict(impl="sgkernels")),
                 (_step(_unfused, x, w, b, t), dict(impl="F.cross_entropy(F.linear)")),
                 (_step(_torch_chunked, x, w, b, t), dict(impl="F.linear_cross_entropy chunked"))]
        tag = "half ignored" if every == 2 else "none ignored"
        rows += measure_interleaved(impls, device, quick, op="linear_cross_entropy fwd+bwd",
                                    shape=f"N={n} d={d} V={vocab} {tag}", dtype=dname)
        del x, w, b, t
    if _has_diffusers():
        n, d = conf_shape
        vocab, mask_id = 157184, 156895
        x, w, b, t = _leaves(n, d, vocab, dtype, device, ignore_every=2, seed=1)
        pw = torch.rand(n, device=device, dtype=dtype) * 4 + 1  # 1 / p_mask
        impls = [(_step(_conf_fused, x, w, b, t, pw, mask_id), dict(impl="sgkernels")),
                 (_step(_conf_diffusers, x, w, b, t, pw, mask_id),
                  dict(impl="diffusers compute_confidence_aware_loss"))]
        rows += measure_interleaved(impls, device, quick, op="confidence_aware_loss fwd+bwd",
                                    shape=f"N={n} d={d} V={vocab} half masked", dtype=dname)
    return rows
