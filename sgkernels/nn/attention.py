"""Bidirectional multi-head self-attention with an optional additive ``value_feedback`` (TOAST).

One function, :func:`attention`, picks the kernel: ``xformers.ops.memory_efficient_attention`` when
xformers is importable and the tensors are on CUDA, ``torch.nn.functional.scaled_dot_product_attention``
otherwise. :func:`attention_backend` says which one a device gets (``python -m sgkernels.info``
prints it).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=None)
def _xformers_ops():
    try:
        import xformers.ops as xops
    except Exception:  # pragma: no cover - depends on the install
        return None
    return xops


def attention_backend(device: torch.device | str | None = None) -> str:
    """``"xformers"`` or ``"sdpa"``: the kernel :func:`attention` uses for tensors on ``device``.

    ``device=None`` answers for CUDA when a GPU is present, else for the CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and _xformers_ops() is not None:
        return "xformers"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention without a mask, scale 1/sqrt(head_dim).

    Args:
        q, k, v: ``[B, T, H, D]`` (the layout a ``Linear`` output reshapes to without a copy).
        dropout_p: dropout on the attention probabilities (pass 0 in eval mode).
    Returns:
        ``[B, T, H, D]``.
    """
    if attention_backend(q.device) == "xformers":
        q, k, v = (x.contiguous() if x.stride(0) == 0 else x for x in (q, k, v))  # a broadcast batch
        return _xformers_ops().memory_efficient_attention(q, k, v, p=dropout_p)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p)
    return out.transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention (query/key/value/out projections with biases).

    ``forward(h, value_feedback=None, *, dropout=True)``: with ``value_feedback`` ``f`` (same shape as
    ``h``) the values are ``value(h) + value(f)`` (the bias enters twice, as in the official TOAST
    code), computed as one GEMM ``W_v (h + f) + 2 b``; ``None`` is the ordinary layer. ``dropout=False``: no attention dropout even in training
    mode (as in eval mode, without changing the module's mode: what a sampler sharing the module
    with other threads needs).
    """

    def __init__(self, width: int, heads: int, attention_dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.width = width
        self.heads = heads
        self.attention_dropout = float(attention_dropout)
        self.query = nn.Linear(width, width, bias=bias)
        self.key = nn.Linear(width, width, bias=bias)
        self.value = nn.Linear(width, width, bias=bias)
        self.out = nn.Linear(width, width, bias=bias)

    def forward(self, h: torch.Tensor, value_feedback: torch.Tensor | None = None, *, dropout: bool = True) -> torch.Tensor:
        """``h`` ``[B, T, d]``; ``value_feedback`` None or ``[B, T, d]``. ``h`` may have batch 1 against a
        ``value_feedback`` of batch B (TOAST's blank canvas, the same for every image): its queries and
        keys are then computed once and broadcast. Returns ``[B, T, d]``."""
        t = h.shape[1]
        if value_feedback is None:
            v = self.value(h)
        else:
            # W_v h + b + W_v f + b as one GEMM: W_v (h + f) + 2b (the same sum, one d x d GEMM less)
            bias = None if self.value.bias is None else self.value.bias * 2
            v = F.linear(h + value_feedback, self.value.weight, bias)
        b = v.shape[0]
        shape = (b, t, self.heads, self.width // self.heads)
        q = self.query(h).view(h.shape[0], *shape[1:]).expand(shape)
        k = self.key(h).view(h.shape[0], *shape[1:]).expand(shape)
        p = self.attention_dropout if (self.training and dropout) else 0.0
        out = attention(q, k, v.view(shape), dropout_p=p)
        return self.out(out.reshape(b, t, self.width))
