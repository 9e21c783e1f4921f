"""TOAST (top-down attention steering): the guide H of self-guided sampling.

See docs/METHOD.md, "The guide H: TOAST".

Given the last block's output ``x`` of the frozen backbone's ordinary pass (pass 1, class position
included) and the class labels:

1. class anchor ``a_c = proj(LayerNorm(sum_f w_f * (P_pos + C_class)_f))``, ``[B, 1, d]``, a
   factorised embedding with F = 16 factors;
2. token selection ``x = x * clamp(cos_sim(x, a_c), 0, 1)``, then ``x = x @ P`` (P identity-initialised);
3. top-down chain for ``l = L-1 .. 0``: ``x = A_l x; f_l = B_l x`` (bias-free ``d x d``; ``A_l`` is
   ``top_down[l]``, ``B_l`` is ``feedback[l]``, and ``f_l`` is layer ``l``'s value feedback);
4. pass 2 of the same frozen backbone on a blank canvas (every input id, the class token
   included, is [MASK]), each layer ``l`` adding ``f_l`` through its own value projection. Its logits
   are ``l_smooth``.

Only the anchor (embeddings, factor weights, its LayerNorm and projection), P, A_l and B_l are
parameters of this module (~24% of the MaskGIT-256 backbone: 41.8M of 174.1M). The backbone is
passed to :meth:`TOAST.forward` and never receives gradients: pass 2 runs it on detached
parameters when autograd is on, and pass 1's hidden states are detached.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import MaskTransformer, MaskTransformerConfig, TransformerOutput
from .. import _dataclass


@dataclasses.dataclass(frozen=True)
class TOASTConfig:
    """Shape of a :class:`TOAST` guide; the first four fields must match its backbone's config."""

    width: int
    depth: int
    num_classes: int
    codebook_size: int
    num_factors: int = 16
    anchor_norm_eps: float = 1e-5

    BACKBONE_FIELDS = ("width", "depth", "num_classes", "codebook_size")

    def __post_init__(self):
        bounds = dict(width=_dataclass.MAX_WIDTH, depth=_dataclass.MAX_DEPTH, num_classes=_dataclass.MAX_VOCAB,
                      codebook_size=_dataclass.MAX_VOCAB, num_factors=_dataclass.MAX_FACTORS)
        for name, maximum in bounds.items():  # sane bounds: checked before any module is built
            _dataclass.check_int(name, getattr(self, name), maximum)
        object.__setattr__(self, "anchor_norm_eps",
                           _dataclass.check_real("anchor_norm_eps", self.anchor_norm_eps, 0.0, 1.0, low_open=True))

    @classmethod
    def for_backbone(cls, config: MaskTransformerConfig, num_factors: int = 16, **kw) -> "TOASTConfig":
        return cls(config.width, config.depth, config.num_classes, config.codebook_size, num_factors, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TOASTConfig":
        return _dataclass.from_dict(cls, d)


class ClassAnchor(nn.Module):
    """``a_c = proj(LayerNorm(sum_f w_f (P_pos + C_class)_f))``: ``[B]`` labels -> ``[B, 1, d]``."""

    def __init__(self, width: int, num_classes: int, num_factors: int, eps: float = 1e-5):
        super().__init__()
        self.position = nn.Parameter(torch.empty(width, num_factors))
        self.classes = nn.Parameter(torch.empty(num_classes, width, num_factors))
        self.factor_weights = nn.Parameter(torch.empty(num_factors))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, width)

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        e = (self.position + self.classes[class_labels]) @ self.factor_weights  # [B, d]
        return self.proj(self.norm(e))[:, None, :]


class TOAST(nn.Module):
    """The guide H; see the module docstring.

    ``TOAST(config)`` with a :class:`TOASTConfig` or the backbone's :class:`MaskTransformerConfig`.

    ``forward(backbone, hidden_states, class_labels, *, return_layers=False)``:
    ``hidden_states`` ``[B, N+1, d]`` is pass 1's last block output (``backbone(...,
    return_hidden=True).hidden_states``), ``class_labels`` int64 ``[B]`` in ``[0, num_classes)``.
    Returns ``l_smooth`` ``[B, N, K]``, or with ``return_layers`` a
    :class:`~sgkernels.models.transformer.TransformerOutput` whose ``layer_inputs`` /
    ``layer_outputs`` are pass 2's per-layer inputs and outputs (see :meth:`reconstruction_loss`).
    """

    def __init__(self, config: TOASTConfig | MaskTransformerConfig, num_factors: int = 16):
        super().__init__()
        if isinstance(config, MaskTransformerConfig):
            config = TOASTConfig.for_backbone(config, num_factors)
        if not isinstance(config, TOASTConfig):
            raise TypeError(f"config: expected a TOASTConfig or MaskTransformerConfig, got {type(config).__name__}")
        self.config = config
        d = config.width
        self.anchor = ClassAnchor(d, config.num_classes, config.num_factors, config.anchor_norm_eps)
        self.selection = nn.Parameter(torch.empty(d, d))
        self.top_down = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(config.depth))  # A_l
        # B_l, the value-feedback projections (the name is the state-dict key ``feedback.{l}.weight``)
        self.feedback = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(config.depth))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """The official init: truncated normal (std 0.02) embeddings and weights, P = identity."""
        for p in (self.anchor.position, self.anchor.classes, self.anchor.factor_weights, self.anchor.proj.weight,
                  *(m.weight for m in self.top_down), *(m.weight for m in self.feedback)):
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.anchor.proj.bias)
        nn.init.ones_(self.anchor.norm.weight)
        nn.init.zeros_(self.anchor.norm.bias)
        with torch.no_grad():
            self.selection.copy_(torch.eye(self.config.width))

    def check_backbone(self, backbone: MaskTransformer | MaskTransformerConfig) -> None:
        """Raise ``ValueError`` naming the fields where ``backbone`` differs from what this guide was built for."""
        cfg = backbone.config if isinstance(backbone, nn.Module) else backbone
        if not isinstance(cfg, MaskTransformerConfig):
            raise TypeError(f"backbone: expected a MaskTransformer, got {type(backbone).__name__}")
        diff = [
            f"{name} {getattr(self.config, name)} (guide) vs {getattr(cfg, name)} (backbone)"
            for name in TOASTConfig.BACKBONE_FIELDS
            if getattr(self.config, name) != getattr(cfg, name)
        ]
        if diff:
            raise ValueError("TOAST guide was built for another backbone: " + "; ".join(diff))

    def value_feedbacks(self, hidden_states: torch.Tensor, class_labels: torch.Tensor) -> list[torch.Tensor]:
        """Steps 2-3: the per-layer value feedbacks ``f_l = B_l x`` (``self.feedback[l]``), each ``[B, N+1, d]``."""
        x = hidden_states
        anchor = self.anchor(class_labels)  # [B, 1, d]
        sim = F.normalize(x, dim=-1) @ F.normalize(anchor, dim=-1).transpose(1, 2)  # [B, N+1, 1]
        x = (x * sim.clamp(0, 1)) @ self.selection
        out: list[torch.Tensor] = [None] * self.config.depth  # type: ignore[list-item]
        for layer in range(self.config.depth - 1, -1, -1):
            x = self.top_down[layer](x)
            out[layer] = self.feedback[layer](x)
        return out

    def forward(
        self,
        backbone: MaskTransformer,
        hidden_states: torch.Tensor,
        class_labels: torch.Tensor,
        *,
        return_layers: bool = False,
        with_head: bool = True,
        dropout: bool = True,
    ):
        """``with_head=False``: pass 2's last hidden states ``[B, N+1, d]`` instead of the logits (on
        every path, grad-enabled included); ``dropout=False``: the backbone's pass 2 without dropout
        even in training mode (its mode is left alone)."""
        self.check_backbone(backbone)
        cfg = backbone.config
        if hidden_states.dim() != 3 or hidden_states.shape[1:] != (cfg.seq_len, cfg.width):
            raise ValueError(
                f"hidden_states: expected [B, {cfg.seq_len}, {cfg.width}] (pass 1's last block output), "
                f"got {tuple(hidden_states.shape)}"
            )
        b = hidden_states.shape[0]
        if not isinstance(class_labels, torch.Tensor) or class_labels.shape != (b,):
            raise ValueError(f"class_labels: expected an int64 tensor of shape ({b},)")
        out_of_range = (class_labels < 0) | (class_labels >= cfg.num_classes)
        if torch.compiler.is_compiling():  # no data-dependent `if` in a graph: a runtime assert
            torch._assert_async(~out_of_range.any(), "class_labels: out of range")
        elif class_labels.device.type == "cpu" and b and bool(out_of_range.any()):
            raise ValueError(f"class_labels: expected values in [0, {cfg.num_classes}), got {class_labels.tolist()}")
        value_feedbacks = self.value_feedbacks(hidden_states.detach(), class_labels.long())
        blank = torch.full((b, cfg.seq_len), cfg.mask_token_id, dtype=torch.int64, device=hidden_states.device)
        if torch.is_grad_enabled() and any(p.requires_grad for p in backbone.parameters()):
            # Frozen backbone without touching the caller's requires_grad flags.
            out = _forward_ids_detached(backbone, blank, value_feedbacks, return_layers, with_head, dropout)
        else:
            out = backbone.forward_ids(blank, value_feedbacks=value_feedbacks, return_layers=return_layers,
                                       with_head=with_head, dropout=dropout)
        if not with_head:  # the guide's last hidden states only (the sampler's fused head path)
            return out.hidden_states
        return out

    def reconstruction_loss(self, output: TransformerOutput, weight: float = 0.1) -> torch.Tensor:
        """TOAST's term ``weight * sum_l MSE(A_l(out_l.detach()), in_l.detach())`` over pass 2's layers."""
        if output.layer_inputs is None or output.layer_outputs is None:
            raise ValueError("reconstruction_loss needs forward(..., return_layers=True)")
        terms = [
            F.mse_loss(self.top_down[layer](output.layer_outputs[layer].detach()), output.layer_inputs[layer].detach())
            for layer in range(self.config.depth)
        ]
        return weight * torch.stack(terms).sum()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def toast_param_count(config: TOASTConfig) -> int:
    """Parameters of a :class:`TOAST` with ``config``, computed without allocating them."""
    d, f, c, L = config.width, config.num_factors, config.num_classes, config.depth
    return d * f + c * d * f + f + 2 * d + d * d + d + d * d + 2 * L * d * d


def _forward_ids_detached(backbone: MaskTransformer, ids, value_feedbacks, return_layers, with_head=True,
                          dropout=True):
    """``backbone.forward_ids`` on detached parameters (no gradient reaches the backbone)."""
    state = {f"m.{k}": v.detach() for k, v in backbone.named_parameters()}
    state.update({f"m.{k}": v for k, v in backbone.named_buffers()})
    return torch.func.functional_call(_ForwardIds(backbone), state, (ids,),
                                      {"value_feedbacks": value_feedbacks, "return_layers": return_layers,
                                       "with_head": with_head, "dropout": dropout})


class _ForwardIds(nn.Module):
    def __init__(self, m: MaskTransformer):
        super().__init__()
        self.m = m

    def forward(self, ids, *, value_feedbacks, return_layers, with_head, dropout):
        return self.m.forward_ids(ids, value_feedbacks=value_feedbacks, return_layers=return_layers,
                                  with_head=with_head, dropout=dropout)


def compiled_inner(module):
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) wraps, or ``module`` itself."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(module, nn.Module) and isinstance(inner, nn.Module) else module


def check_model_and_guide(model, guide) -> None:
    """TypeError unless ``model`` is a MaskTransformer and ``guide`` a TOAST built for it (or None);
    either may be wrapped by ``torch.compile`` (``pipe.transformer = torch.compile(pipe.transformer)``)."""
    model, guide = compiled_inner(model), compiled_inner(guide)
    if not isinstance(model, MaskTransformer):
        raise TypeError(f"model: expected a MaskTransformer, got {type(model).__name__}")
    if guide is not None:
        if not isinstance(guide, TOAST):
            raise TypeError(f"guide: expected a TOAST guide or None, got {type(guide).__name__}")
        guide.check_backbone(model)
