"""The self-guidance auxiliary task (docs/METHOD.md, "Auxiliary task").

Per training step, for a batch of token grids ``x`` ``[B, N]`` and class labels ``c`` ``[B]``:

1. **mask**: ``u ~ U(0, 1)`` per sample, ``r = cos(pi/2 u)``; ``max(1, round(N r))`` positions chosen
   uniformly at random get the [MASK] id;
2. **error tokens**: each still-visible position is replaced, with probability ``error_ratio``
   (0.3), by an error token drawn from the **frozen base model on an all-mask input** (class token
   kept, ``error_token_conditional``): ``token ~ softmax(l_base)`` with :func:`sgkernels.guided_sample`
   (``error_token_mode="sample"``, the paper). ``error_token_mode="official"`` keeps the official
   code's behaviour, ``token ~ softmax(softmax(l_base))``: nearly uniform error tokens;
3. **targets**: the original token at the error positions, ``ignore_index`` everywhere else;
4. **loss**: pass 1 of the frozen backbone on the corrupted grid, then the guide's pass 2 (``l_smooth``);
   ``L = CE(l_smooth, targets, label_smoothing=0.1) + 0.1 * sum_l MSE(A_l(out_l), in_l)``
   (:meth:`TOAST.reconstruction_loss`). Only the guide's parameters train; the backbone stays in
   eval mode and gets no gradients.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..models.transformer import MaskTransformer
from ..ops import fused_cross_entropy, guided_sample, linear_cross_entropy
from .config import CE_VOCABS, ERROR_TOKEN_MODES


class Corruption(NamedTuple):
    """A corrupted batch (all ``[B, N]`` unless noted).

    inputs: int64 grid fed to the backbone (mask id at masked positions, error tokens at error
    positions, the original token elsewhere); targets: int64, the original token at the error
    positions, ``ignore_index`` elsewhere; is_masked / is_error: bool; mask_ratio: float32 ``[B]``,
    r = cos(pi/2 u); error_tokens: int64, the tokens drawn from the base model at every position
    (None when ``error_ratio == 0``).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    is_masked: torch.Tensor
    is_error: torch.Tensor
    mask_ratio: torch.Tensor
    error_tokens: torch.Tensor | None


@torch.no_grad()
def sample_error_tokens(backbone: MaskTransformer, class_labels: torch.Tensor | None, *, mode: str = "sample",
                        seed: int | None = None) -> torch.Tensor:
    """One token per position ``[B, N]`` from the frozen ``backbone`` on an all-mask grid.

    ``mode="sample"``: ``~ softmax(logits)`` (:func:`sgkernels.guided_sample`, exact). ``"official"``:
    ``~ softmax(softmax(logits))``, the official code (it applies softmax to probabilities).
    ``class_labels=None`` (or entries -1) puts [MASK] in the class slot. ``seed``: guided_sample's seed.
    """
    if mode not in ERROR_TOKEN_MODES:
        raise ValueError(f"mode: expected one of {ERROR_TOKEN_MODES}, got {mode!r}")
    cfg = backbone.config
    b = class_labels.shape[0] if class_labels is not None else 1
    device = class_labels.device if class_labels is not None else next(backbone.parameters()).device
    blank = torch.full((b, cfg.num_tokens), cfg.mask_token_id, dtype=torch.int64, device=device)
    logits = backbone(blank, class_labels)
    if mode == "official":
        logits = torch.softmax(logits.float(), dim=-1)
    tokens, _ = guided_sample(logits, seed=seed)
    return tokens


@torch.no_grad()
def corrupt(backbone: MaskTransformer, tokens: torch.Tensor, class_labels: torch.Tensor, *,
            error_ratio: float = 0.3, error_token_mode: str = "sample", error_token_conditional: bool = True,
            ignore_index: int = -100, generator: torch.Generator | None = None,
            sample_seed: int | None = None) -> Corruption:
    """The auxiliary task's corruption of ``tokens`` ``[B, N]`` (codebook ids) with labels ``[B]``.

    ``generator`` (on ``tokens``' device) drives the mask ratios and the positions (None: torch's
    default generator); ``sample_seed`` is :func:`sgkernels.guided_sample`'s seed for the error
    tokens (None: drawn from torch's default CPU generator).
    """
    cfg = backbone.config
    b, n = tokens.shape
    device = tokens.device
    u = torch.rand(b, device=device, generator=generator)
    ratio = torch.cos(0.5 * math.pi * u)
    num_masked = torch.round(n * ratio.double()).long().clamp(1, n)
    ranks = torch.rand(b, n, device=device, generator=generator).argsort(dim=1).argsort(dim=1)
    is_masked = ranks < num_masked[:, None]
    pick = torch.rand(b, n, device=device, generator=generator) < error_ratio
    is_error = pick & ~is_masked
    error_tokens = None
    inputs = tokens.masked_fill(is_masked, cfg.mask_token_id)
    if error_ratio > 0:
        labels = class_labels if error_token_conditional else torch.full_like(class_labels, -1)
        error_tokens = sample_error_tokens(backbone, labels, mode=error_token_mode, seed=sample_seed)
        inputs = torch.where(is_error, error_tokens, inputs)
    targets = torch.where(is_error, tokens, torch.full_like(tokens, ignore_index))
    return Corruption(inputs, targets, is_masked, is_error, ratio, error_tokens)


def aux_loss(backbone: MaskTransformer, guide: nn.Module, inputs: torch.Tensor, class_labels: torch.Tensor,
             targets: torch.Tensor, *, label_smoothing: float = 0.1, recon_weight: float = 0.1,
             ignore_index: int = -100, ce_vocab: str = "full") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, recon)`` of the guide on a corrupted batch (see :func:`corrupt`).

    ``ce`` is the label-smoothed cross-entropy of pass 2's logits averaged over the labelled
    (error) positions, 0 when there are none; ``recon`` is TOAST's weighted reconstruction term.
    ``guide`` may be a :class:`TOAST` or a DDP wrapper around one.

    ``ce_vocab``: the softmax (and label smoothing) of ``ce`` runs over ``"full"``, every id of the
    backbone's head (codebook, [MASK] and class ids: the official code), or ``"codebook"`` only.
    ``"full"`` recomputes the head over pass 2's last block output (the backbone's parameters
    detached: it still gets no gradient), with the last linear fused into the loss
    (:func:`sgkernels.linear_cross_entropy`: only the labelled positions are projected).
    """
    if ce_vocab not in CE_VOCABS:
        raise ValueError(f"ce_vocab: expected one of {CE_VOCABS}, got {ce_vocab!r}")
    with torch.no_grad():
        hidden = backbone(inputs, class_labels, return_hidden=True).hidden_states
    out = guide(backbone, hidden, class_labels, return_layers=True)
    toast = guide.module if hasattr(guide, "module") else guide
    flat_t = targets.reshape(-1)
    if ce_vocab == "codebook":
        k = out.logits.shape[-1]
        ce_sum = fused_cross_entropy(out.logits.reshape(-1, k), flat_t, ignore_index=ignore_index,
                                     label_smoothing=label_smoothing, reduction="sum")
    else:
        # the full head fused with the loss: only the labelled (error) positions are projected, and
        # their [rows, vocab_size] logits never exist
        h = _head_features(backbone, out.layer_outputs[-1])
        weight = backbone.head.weight.detach().to(h.dtype)  # autocast's cast of the head, done by hand
        bias = backbone.head.bias.detach().to(h.dtype)
        ce_sum = linear_cross_entropy(h.reshape(-1, h.shape[-1]), weight, flat_t, linear_bias=bias,
                                      ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")
    count = (flat_t != ignore_index).sum().clamp_min(1)  # stays on the device: no sync
    ce = ce_sum.float() / count
    recon = toast.reconstruction_loss(out, weight=recon_weight).float()
    return ce + recon, ce, recon


class _HeadFeatures(nn.Module):
    def __init__(self, backbone: MaskTransformer):
        super().__init__()
        self.m = backbone

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.m.head_features(hidden)


def _head_features(backbone: MaskTransformer, hidden: torch.Tensor) -> torch.Tensor:
    """The head's input (its features before the last linear) from the last block output ``hidden``,
    with the backbone's parameters detached (gradients reach ``hidden`` only)."""
    state = {f"m.{k}": v.detach() for k, v in backbone.named_parameters()}
    state.update({f"m.{k}": v for k, v in backbone.named_buffers()})
    return torch.func.functional_call(_HeadFeatures(backbone), state, (hidden,))
