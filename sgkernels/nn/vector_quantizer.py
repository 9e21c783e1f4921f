"""Vector quantisation layer (VQ-VAE / VQGAN, taming/diffusers style) built on :func:`vq_lookup`.

The nearest-code search runs in the fused kernel (no N x K distance matrix); the rest (gather,
losses, straight-through estimator, EMA statistics) is plain PyTorch, so autograd works as usual.

Using it in a diffusers ``VQModel``
-----------------------------------
diffusers' ``VQModel`` calls ``quant, commit_loss, _ = self.quantize(h)`` in ``decode`` and
``self.quantize.get_codebook_entry(indices, shape)`` (``shape`` = ``(B, H, W, C)``) when it decodes
from indices. Its ``VectorQuantizer.forward`` returns the tuple
``(z_q, loss, (perplexity, min_encodings, min_encoding_indices))`` where ``perplexity`` and
``min_encodings`` are ``None`` and the indices are flat ``[B*H*W]`` (``[B, H, W]`` with
``sane_index_shape=True``); its loss, with the default ``legacy=True``, puts ``beta`` on the codebook
term: ``mean((z_q.detach() - z)^2) + beta * mean((z_q - z.detach())^2)``.
:class:`DiffusersVectorQuantizer` returns exactly that tuple and loss, and keeps the
``embedding.weight`` parameter name, so a trained diffusers quantizer can be swapped in::

    from sgkernels.nn import DiffusersVectorQuantizer
    vq_model.quantize = DiffusersVectorQuantizer.from_diffusers(vq_model.quantize)

:class:`VectorQuantizer` itself returns the simpler ``(z_q, loss, indices)`` with
``loss = codebook + beta * commitment`` (the ``legacy=False`` placement of ``beta``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.vq_lookup import vq_lookup


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with a straight-through estimator.

    Args:
        num_codes: K, the codebook size.
        dim: D, the channel count of the inputs and the code dimension.
        beta: weight of the commitment loss ``mean((z - sg[z_q])^2)``.
        l2_normalize: normalise the inputs and the codes to unit length before the lookup (cosine
            similarity lookup, as in ViT-VQGAN); ``z_q`` is then a unit-length code and the losses are
            taken between the normalised vectors.
        ema: update the codebook by exponential moving averages of the assigned inputs (in training
            mode only) instead of by gradients; the codebook loss is then dropped (loss = beta * commitment)
            and ``embedding.weight`` does not require grad.
        decay: EMA decay.
        eps: Laplace smoothing of the EMA cluster sizes.

    ``forward(z)`` with ``z`` ``[B, D, H, W]`` returns ``(z_q [B, D, H, W], loss (scalar), indices int64
    [B, H, W])``. Gradients reach ``z`` through ``z_q`` (straight-through) and the commitment term,
    and the codebook through the codebook term (non-EMA).
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        l2_normalize: bool = False,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
    ):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be >= 1, got {num_codes}, {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a value in [0, 1), got {decay}")
        self.num_codes = int(num_codes)
        self.dim = int(dim)
        self.beta = float(beta)
        self.l2_normalize = bool(l2_normalize)
        self.ema = bool(ema)
        self.decay = float(decay)
        self.eps = float(eps)
        self.embedding = nn.Embedding(self.num_codes, self.dim)
        self.embedding.weight.data.uniform_(-1.0 / self.num_codes, 1.0 / self.num_codes)
        if self.ema:
            self.embedding.weight.requires_grad_(False)
            # As if every code had been assigned once, at its initial value: unused codes stay put.
            self.register_buffer("ema_cluster_size", torch.ones(self.num_codes))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())

    # -- helpers
    def codebook(self) -> torch.Tensor:
        """The codes used for the lookup: ``embedding.weight``, unit-normalised if ``l2_normalize``."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_normalize else w

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        flat = flat.float()
        counts = torch.bincount(indices, minlength=self.num_codes).to(flat.dtype)
        sums = torch.zeros(self.num_codes, self.dim, dtype=flat.dtype, device=flat.device)
        sums.index_add_(0, indices, flat)
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.embedding.weight.copy_((self.ema_embed_sum / size[:, None]).to(self.embedding.weight.dtype))

    def _quantize(self, z: torch.Tensor):
        """Shared body: ``z`` [B, D, H, W] -> (z_q_st [B, H, W, D], z_e, z_q, indices [B, H, W])."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != self.dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z: expected shape [B, {self.dim}, H, W], got {shape}")
        z_e = z.permute(0, 2, 3, 1)  # [B, H, W, D] view; vq_lookup takes any strides
        if self.l2_normalize:
            z_e = F.normalize(z_e, dim=-1)
        codes = self.codebook()
        indices = vq_lookup(z_e.detach(), codes.detach())
        z_q = F.embedding(indices, codes).to(z_e.dtype)
        if self.ema and self.training:
            self._ema_update(z_e.detach().reshape(-1, self.dim), indices.reshape(-1))
        z_q_st = z_e + (z_q - z_e).detach()
        return z_q_st, z_e, z_q, indices

    def forward(self, z: torch.Tensor):
        z_q_st, z_e, z_q, indices = self._quantize(z)
        commitment = F.mse_loss(z_e, z_q.detach())
        if self.ema:
            loss = self.beta * commitment
        else:
            loss = F.mse_loss(z_q, z_e.detach()) + self.beta * commitment
        return z_q_st.permute(0, 3, 1, 2).contiguous(), loss, indices

    def get_codebook_entry(self, indices: torch.Tensor, shape=None) -> torch.Tensor:
        """Codes of ``indices``: ``[..., D]``, or ``[B, D, H, W]`` when ``shape = (B, H, W, D)`` is given."""
        z_q = F.embedding(indices, self.codebook())
        if shape is not None:
            z_q = z_q.reshape(shape).permute(0, 3, 1, 2).contiguous()
        return z_q

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, l2_normalize={self.l2_normalize}, "
            f"ema={self.ema}"
        )


class DiffusersVectorQuantizer(VectorQuantizer):
    """:class:`VectorQuantizer` with diffusers' ``VectorQuantizer`` interface (drop-in for ``VQModel.quantize``).

    ``forward(z)`` returns ``(z_q, loss, (None, None, indices))``: ``perplexity`` and
    ``min_encodings`` are ``None`` like in diffusers, ``indices`` is flat ``[B*H*W]`` or ``[B, H, W]``
    with ``sane_index_shape``. ``legacy=True`` (diffusers' default) puts ``beta`` on the codebook
    term; ``legacy=False`` on the commitment term. Index remapping (diffusers' ``remap``) is not
    supported.
    """

    def __init__(self, n_e: int, vq_embed_dim: int, beta: float = 0.25, *, legacy: bool = True,
                 sane_index_shape: bool = False, **kwargs):
        super().__init__(n_e, vq_embed_dim, beta, **kwargs)
        self.legacy = bool(legacy)
        self.sane_index_shape = bool(sane_index_shape)

    @property
    def n_e(self) -> int:
        return self.num_codes

    @property
    def vq_embed_dim(self) -> int:
        return self.dim

    @classmethod
    def from_diffusers(cls, quantize: nn.Module) -> "DiffusersVectorQuantizer":
        """Build from a diffusers ``VectorQuantizer`` (copies codebook, beta, legacy, sane_index_shape)."""
        if getattr(quantize, "remap", None) is not None:
            raise ValueError("quantize: index remapping (remap=...) is not supported")
        weight = quantize.embedding.weight
        new = cls(
            weight.shape[0],
            weight.shape[1],
            float(quantize.beta),
            legacy=bool(getattr(quantize, "legacy", True)),
            sane_index_shape=bool(getattr(quantize, "sane_index_shape", False)),
        )
        new.embedding.weight.data.copy_(weight.detach())
        return new.to(device=weight.device, dtype=weight.dtype)

    def forward(self, z: torch.Tensor):
        z_q_st, z_e, z_q, indices = self._quantize(z)
        commitment = F.mse_loss(z_e, z_q.detach())
        if self.ema:
            loss = self.beta * commitment
        elif self.legacy:
            loss = commitment + self.beta * F.mse_loss(z_q, z_e.detach())
        else:
            loss = self.beta * commitment + F.mse_loss(z_q, z_e.detach())
        if not self.sane_index_shape:
            indices = indices.reshape(-1)
        return z_q_st.permute(0, 3, 1, 2).contiguous(), loss, (None, None, indices)
