"""MaskGIT's bidirectional transformer (the backbone of self-guided sampling).

Architecture (docs/METHOD.md, "Backbone architecture", and the official code's MaskGIT configuration in
the open-muse layout):

* input sequence ``[class token] + N image tokens``; the class token id is ``codebook_size + class``;
  vocabulary = codebook + classes + [MASK] (``mask_token_id = codebook_size + num_classes``, the last
  id); a class label of ``-1`` puts [MASK] in the class slot (the blank canvas of TOAST's pass 2, and
  the unconditional input of classifier-free guidance);
* word + learned position embedding (positions ``0..N``), LayerNorm (eps 1e-12), dropout;
* ``depth`` BERT-style blocks with biases. ``norm="post"`` (default, MaskGIT):
  ``h = LN(h + Attn(h)); h = LN(h + W2 GELU(W1 h))``. ``norm="pre"``:
  ``h = h + Attn(LN(h)); h = h + W2 GELU(W1 LN(h))`` and a final LayerNorm before the head;
* MLM head: dense d->d, GELU, LayerNorm, linear over the full vocabulary (+bias). Only the image
  positions and the codebook rows of the last linear are computed: ``forward`` returns logits
  ``[B, N, K]`` (class position dropped, sliced to the codebook).

Each attention layer accepts an additive ``value_feedback`` ``f_l`` (``v = W_v h + W_v f_l``); the
per-layer list ``value_feedbacks = [f_0 .. f_{L-1}]`` is what :class:`sgkernels.models.toast.TOAST`
passes to its second pass.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.attention import SelfAttention
from .. import _dataclass

NORMS = ("post", "pre")
GELUS = ("exact", "tanh")


@dataclasses.dataclass(frozen=True)
class MaskTransformerConfig:
    """Shape and hyper-parameters of :class:`MaskTransformer`.

    Attributes:
        codebook_size: K, VQ codebook size.
        num_classes: C, number of class labels (class token ids ``K .. K+C-1``).
        grid_size: tokens per side (N = grid_size**2), or ``(height, width)``.
        width, depth, heads, mlp_dim: d, L, attention heads, MLP hidden size.
        dropout: embedding / residual-branch dropout; attention_dropout: on attention probabilities.
        norm: ``"post"`` (MaskGIT, BERT) or ``"pre"``.
        layer_norm_eps: eps of every LayerNorm (1e-12 in MaskGIT).
        gelu: ``"exact"`` (erf, as the PyTorch port) or ``"tanh"`` (jax.nn.gelu's default, the
            original Flax MaskGIT).
    """

    codebook_size: int = 1024
    num_classes: int = 1000
    grid_size: int | tuple[int, int] = 16
    width: int = 768
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    norm: str = "post"
    layer_norm_eps: float = 1e-12
    gelu: str = "exact"

    def __post_init__(self):
        grid = self.grid_size
        if isinstance(grid, (list, tuple)):
            grid = tuple(int(g) for g in grid)
            if len(grid) != 2:
                raise ValueError(f"grid_size: expected an int or (height, width), got {self.grid_size!r}")
            object.__setattr__(self, "grid_size", grid)
        # sizes within sane bounds (sgkernels._dataclass): a config.json is checked before any module is built
        bounds = dict(codebook_size=_dataclass.MAX_VOCAB, num_classes=_dataclass.MAX_VOCAB, width=_dataclass.MAX_WIDTH,
                      depth=_dataclass.MAX_DEPTH, heads=_dataclass.MAX_WIDTH, mlp_dim=_dataclass.MAX_MLP)
        for name, maximum in bounds.items():
            _dataclass.check_int(name, getattr(self, name), maximum)
        for g in self.grid_hw:
            _dataclass.check_int("grid_size", g, _dataclass.MAX_TOKENS)
        if self.num_tokens > _dataclass.MAX_TOKENS:
            raise ValueError(f"grid_size: expected at most {_dataclass.MAX_TOKENS} tokens, got {self.grid_size!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.gelu not in GELUS:
            raise ValueError(f"gelu must be one of {GELUS}, got {self.gelu!r}")
        for name in ("dropout", "attention_dropout"):
            object.__setattr__(self, name, _dataclass.check_real(name, getattr(self, name), 0.0, 1.0, high_open=True))
        # eps > 0: a negative eps loads and then gives NaN logits at sampling (issue 22)
        object.__setattr__(self, "layer_norm_eps",
                           _dataclass.check_real("layer_norm_eps", self.layer_norm_eps, 0.0, 1.0, low_open=True))

    @property
    def grid_hw(self) -> tuple[int, int]:
        g = self.grid_size
        return (g, g) if isinstance(g, int) else tuple(g)

    @property
    def num_tokens(self) -> int:
        """N, image tokens per sample."""
        h, w = self.grid_hw
        return h * w

    @property
    def seq_len(self) -> int:
        """N + 1 (the class token)."""
        return self.num_tokens + 1

    @property
    def mask_token_id(self) -> int:
        return self.codebook_size + self.num_classes

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 1

    @classmethod
    def maskgit_256(cls, **overrides) -> "MaskTransformerConfig":
        """MaskGIT ImageNet 256x256: 24 layers, width 768, 16 heads, MLP 3072, 16x16 grid, K=1024, 1000 classes."""
        return cls(**{**dict(codebook_size=1024, num_classes=1000, grid_size=16, width=768, depth=24, heads=16,
                             mlp_dim=3072), **overrides})

    @classmethod
    def maskgit_512(cls, **overrides) -> "MaskTransformerConfig":
        """MaskGIT ImageNet 512x512: as :meth:`maskgit_256` on a 32x32 grid."""
        return cls.maskgit_256(grid_size=32, **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["grid_size"], tuple):
            d["grid_size"] = list(d["grid_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MaskTransformerConfig":
        return _dataclass.from_dict(cls, d)


class TransformerOutput(NamedTuple):
    """What :meth:`MaskTransformer.forward` returns when extras are asked for.

    logits: ``[B, N, K]``. hidden_states: the last block's output ``[B, N+1, d]`` (class position
    first; before the pre-LN final norm), or None. layer_inputs / layer_outputs: per block, its
    input and output ``[B, N+1, d]`` (TOAST's reconstruction loss), or None.
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None
    layer_inputs: list[torch.Tensor] | None = None
    layer_outputs: list[torch.Tensor] | None = None


class TransformerBlock(nn.Module):
    """One BERT-style block: self-attention and a GELU MLP, post- or pre-LN, biases on."""

    def __init__(self, config: MaskTransformerConfig):
        super().__init__()
        d, eps = config.width, config.layer_norm_eps
        self.norm = config.norm
        self.gelu_approximate = "none" if config.gelu == "exact" else "tanh"
        self.attention = SelfAttention(d, config.heads, config.attention_dropout)
        self.attention_norm = nn.LayerNorm(d, eps=eps)
        self.mlp_in = nn.Linear(d, config.mlp_dim)
        self.mlp_out = nn.Linear(config.mlp_dim, d)
        self.mlp_norm = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(config.dropout)

    def _drop(self, x: torch.Tensor, dropout: bool) -> torch.Tensor:
        return self.dropout(x) if dropout else x

    def _mlp(self, h: torch.Tensor, dropout: bool) -> torch.Tensor:
        return self._drop(self.mlp_out(F.gelu(self.mlp_in(h), approximate=self.gelu_approximate)), dropout)

    def forward(self, h: torch.Tensor, value_feedback: torch.Tensor | None = None, *, dropout: bool = True) -> torch.Tensor:
        """``dropout=False``: no dropout even in training mode (the module's mode is left alone)."""
        if self.norm == "post":
            h = self.attention_norm(h + self._drop(self.attention(h, value_feedback, dropout=dropout), dropout))
            return self.mlp_norm(h + self._mlp(h, dropout))
        # Pre-LN: the value feedback is added un-normalised through the value projection.
        x = self.attention_norm(h)
        h = h + self._drop(self.attention(x, value_feedback, dropout=dropout), dropout)
        return h + self._mlp(self.mlp_norm(h), dropout)


class MaskTransformer(nn.Module):
    """MaskGIT's bidirectional transformer; see the module docstring.

    ``forward(tokens, class_labels=None, *, value_feedbacks=None, return_hidden=False, return_layers=False)``:

    * ``tokens``: int64 ``[B, N]`` image tokens (``config.mask_token_id`` where masked);
    * ``class_labels``: int64 ``[B]`` in ``[0, num_classes)``, ``-1`` for "no class" ([MASK] in the
      class slot); ``None`` = all ``-1``;
    * ``value_feedbacks``: None, or a sequence of ``depth`` tensors ``[B, N+1, d]`` (or None entries), added
      to each layer's values through its own value projection;
    * returns logits ``[B, N, K]``, or a :class:`TransformerOutput` when ``return_hidden`` or
      ``return_layers`` is set;
    * ``dropout=False``: no dropout even in training mode, without changing the module's mode (the
      sampler passes it: several threads may share one model, whatever mode it is in).
    """

    def __init__(self, config: MaskTransformerConfig):
        super().__init__()
        if not isinstance(config, MaskTransformerConfig):
            raise TypeError(f"config: expected a MaskTransformerConfig, got {type(config).__name__}")
        self.config = config
        d = config.width
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.seq_len, d)
        self.embedding_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.norm == "pre" else None
        self.head_dense = nn.Linear(d, d)
        self.head_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.head = nn.Linear(d, config.vocab_size)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """MaskGIT's init: truncated normal (std 0.02) weights and embeddings, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- inputs -------------------------------------------------------------------------------
    def input_ids(self, tokens: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N+1]`` ids: the class token (``K + c``, or [MASK] for ``c < 0`` / None) then ``tokens``."""
        cfg = self.config
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError("tokens: expected an int64 tensor [B, N]")
        if tokens.dim() != 2 or tokens.shape[1] != cfg.num_tokens:
            raise ValueError(
                f"tokens: expected shape [B, {cfg.num_tokens}] (grid {cfg.grid_hw[0]}x{cfg.grid_hw[1]}), "
                f"got {tuple(tokens.shape)}"
            )
        tokens = tokens.long()
        b = tokens.shape[0]
        if class_labels is None:
            cls_ids = torch.full((b, 1), cfg.mask_token_id, dtype=torch.int64, device=tokens.device)
        else:
            if not isinstance(class_labels, torch.Tensor) or class_labels.dtype not in (torch.int64, torch.int32):
                raise TypeError("class_labels: expected an int64 tensor [B]")
            if class_labels.shape != (b,) or class_labels.device != tokens.device:
                raise ValueError(
                    f"class_labels: expected shape ({b},) on {tokens.device}, got {tuple(class_labels.shape)} "
                    f"on {class_labels.device}"
                )
            labels = class_labels.long()
            if torch.compiler.is_compiling():  # no data-dependent `if` in a graph: a runtime assert
                torch._assert_async(~(labels >= cfg.num_classes).any(), "class_labels: out of range")
            elif labels.device.type == "cpu" and labels.numel() and bool((labels >= cfg.num_classes).any()):
                raise ValueError(f"class_labels: expected values in [-1, {cfg.num_classes}), got {labels.tolist()}")
            cls_ids = torch.where(labels < 0, cfg.mask_token_id, labels + cfg.codebook_size)[:, None]
        if tokens.device.type == "cpu" and tokens.numel():  # (on CUDA this check would sync every pass)
            bad = (tokens < 0) | ((tokens >= cfg.codebook_size) & (tokens != cfg.mask_token_id))
            if torch.compiler.is_compiling():
                torch._assert_async(~bad.any(), "tokens: expected codebook ids or the mask id")
            elif bool(bad.any()):
                raise ValueError(
                    f"tokens: expected codebook ids in [0, {cfg.codebook_size}) or the mask id {cfg.mask_token_id}"
                )
        return torch.cat([cls_ids, tokens], dim=1)

    # -- forward ------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, *, dropout: bool = True) -> torch.Tensor:
        pos = self.position_embeddings.weight[: input_ids.shape[1]]
        h = self.embedding_norm(self.word_embeddings(input_ids) + pos)
        return self.embedding_dropout(h) if dropout else h

    def forward_ids(
        self,
        input_ids: torch.Tensor,
        *,
        value_feedbacks: Sequence[torch.Tensor | None] | None = None,
        return_hidden: bool = False,
        return_layers: bool = False,
        with_head: bool = True,
        dropout: bool = True,
    ):
        """As :meth:`forward` on prepared ids ``[B, N+1]`` (see :meth:`input_ids`).

        ``with_head=False``: skip the MLM head and return a :class:`TransformerOutput` with ``logits``
        None and the hidden states (the sampler's fused head path).
        """
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.shape[1] != cfg.seq_len:
            raise ValueError(f"input_ids: expected shape [B, {cfg.seq_len}], got {tuple(input_ids.shape)}")
        if value_feedbacks is not None and len(value_feedbacks) != cfg.depth:
            raise ValueError(f"value_feedbacks: expected {cfg.depth} entries (one per layer), "
                             f"got {len(value_feedbacks)}")
        h = self.embed(input_ids, dropout=dropout)
        ins: list[torch.Tensor] | None = [] if return_layers else None
        outs: list[torch.Tensor] | None = [] if return_layers else None
        for i, block in enumerate(self.blocks):
            if ins is not None:
                ins.append(h)
            h = block(h, None if value_feedbacks is None else value_feedbacks[i], dropout=dropout)
            if outs is not None:
                outs.append(h)
        if not with_head:  # the caller projects (sgkernels.head_sample): no logits
            return TransformerOutput(None, h, ins, outs)
        logits = self.logits_from_hidden(h)
        if not (return_hidden or return_layers):
            return logits
        return TransformerOutput(logits, h if return_hidden else None, ins, outs)

    def logits_from_hidden(self, hidden: torch.Tensor, *, full_vocab: bool = False) -> torch.Tensor:
        """MLM head on the image positions of the last block's output: ``[B, N+1, d]`` -> ``[B, N, K]``
        (``full_vocab``: every id of the head, codebook, [MASK] and classes, ``[B, N, vocab_size]``)."""
        h = self.head_features(hidden)
        if full_vocab:
            return self.head(h)
        weight, bias = self.head_projection()
        return F.linear(h, weight, bias)

    def head_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The MLM head up to its last linear: ``[B, N+1, d]`` -> ``[B, N, d]`` (image positions).

        The last linear (:meth:`head_projection`) is the only linear map after any guidance blend, so
        blending these features and projecting once equals blending the logits (``sgkernels.head_sample``).
        """
        h = hidden[:, 1:]
        if self.final_norm is not None:
            h = self.final_norm(h)
        return self.head_norm(F.gelu(self.head_dense(h), approximate="none" if self.config.gelu == "exact" else "tanh"))

    def head_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The output projection's codebook rows: weight ``[K, d]``, bias ``[K]`` (views)."""
        k = self.config.codebook_size
        return self.head.weight[:k], self.head.bias[:k]

    def forward(
        self,
        tokens: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        *,
        value_feedbacks: Sequence[torch.Tensor | None] | None = None,
        return_hidden: bool = False,
        return_layers: bool = False,
        with_head: bool = True,
        dropout: bool = True,
    ):
        return self.forward_ids(
            self.input_ids(tokens, class_labels), value_feedbacks=value_feedbacks, return_hidden=return_hidden,
            return_layers=return_layers, with_head=with_head, dropout=dropout,
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def param_count(config: MaskTransformerConfig) -> int:
    """Parameters of a :class:`MaskTransformer` with ``config``, computed without allocating them."""
    d, m, v, L = config.width, config.mlp_dim, config.vocab_size, config.depth
    block = 4 * (d * d + d) + 2 * 2 * d + (d * m + m) + (m * d + d)
    total = v * d + config.seq_len * d + 2 * d + L * block + (d * d + d) + 2 * d + (v * d + v)
    if config.norm == "pre":
        total += 2 * d
    return total

