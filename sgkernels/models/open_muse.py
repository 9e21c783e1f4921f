"""Build our modules from the official self-guidance code's state dicts (open-muse layout).

:func:`transformer_from_open_muse` and :func:`toast_from_open_muse` are the entry points (also
exported by :mod:`sgkernels.models`). This module imports the models; the models never import it.

The official code (``MaskGitTransformerTOAST``, built on open-muse's ``MaskGitTransformer``) runs
MaskGIT with ``use_maskgit_mlp=True, use_bias=True, layer_norm_embeddings=True,
use_encoder_layernorm=False, use_mlm_layer=True, use_mlm_layernorm=True, use_normformer=False``.
Its parameters, and ours:

==========================================================  ==========================================
open-muse                                                   sgkernels
==========================================================  ==========================================
``embed.word_embeddings.weight`` [V, d]                     ``word_embeddings.weight``
``embed.position_embeddings.weight`` [N+1, d]               ``position_embeddings.weight``
``embed.embeddings_ln.{weight,bias}``                       ``embedding_norm.*``
``transformer_layers.{l}.attention.{query,key,value,out}.*``  ``blocks.{l}.attention.{...}.*``
``transformer_layers.{l}.attn_layer_norm.*``                ``blocks.{l}.attention_norm.*``
``transformer_layers.{l}.ffn.intermediate_output.*``        ``blocks.{l}.mlp_in.*``
``transformer_layers.{l}.ffn.layer_output.*``               ``blocks.{l}.mlp_out.*``
``transformer_layers.{l}.ffn.layer_norm.*``                 ``blocks.{l}.mlp_norm.*``
``mlm_layer.mlm_dense.*`` / ``mlm_ln.*`` / ``to_logits.*``   ``head_dense.*`` / ``head_norm.*`` / ``head.*``
``cls_anchor_gen.mlp_p.weight`` [1, d*F]                    ``anchor.position`` [d, F]
``cls_anchor_gen.mlp_c.weight`` [C, d*F]                    ``anchor.classes`` [C, d, F]
``cls_anchor_gen.mlp_f.weight`` [1, F]                      ``anchor.factor_weights`` [F]
``cls_anchor_gen.layer_norm.*`` / ``mlp_t.*``               ``anchor.norm.*`` / ``anchor.proj.*``
``top_down_transform`` [d, d] (used as ``x @ P``)            ``selection`` [d, d] (same use)
``decoders.{l}.linear.weight`` (A_l)                        ``top_down.{l}.weight``
``decoders.{l}.linear2.weight`` (B_l)                       ``feedback.{l}.weight``
==========================================================  ==========================================

(``.view(d, F)``: the official anchor generator reshapes each ``d*F`` row with the factor index
fastest.) The open-muse LayerNorm without ``use_bias`` has no bias; the MaskGIT configuration has
biases everywhere, so every ``.bias`` above is expected.
"""
from __future__ import annotations

from typing import Callable

import torch

from .._io import listed, listed_keys
from .toast import TOAST, TOASTConfig
from .transformer import MaskTransformer, MaskTransformerConfig

BACKBONE_PREFIXES = ("embed.", "transformer_layers.", "mlm_layer.", "encoder_layer_norm.")
TOAST_PREFIXES = ("cls_anchor_gen.", "top_down_transform", "decoders.")

_LINEAR = ("weight", "bias")


def backbone_key_map(config) -> dict[str, str]:
    """open-muse key -> our :class:`MaskTransformer` key, for ``config`` (post-LN only)."""
    if config.norm != "post":
        raise ValueError(
            "transformer_from_open_muse: the official checkpoints are post-LN MaskGIT (use_maskgit_mlp); "
            f"config.norm={config.norm!r} has no open-muse counterpart"
        )
    m = {
        "embed.word_embeddings.weight": "word_embeddings.weight",
        "embed.position_embeddings.weight": "position_embeddings.weight",
    }
    for p in _LINEAR:
        m[f"embed.embeddings_ln.{p}"] = f"embedding_norm.{p}"
        m[f"mlm_layer.mlm_dense.{p}"] = f"head_dense.{p}"
        m[f"mlm_layer.mlm_ln.{p}"] = f"head_norm.{p}"
        m[f"mlm_layer.to_logits.{p}"] = f"head.{p}"
    for layer in range(config.depth):
        src, dst = f"transformer_layers.{layer}.", f"blocks.{layer}."
        for p in _LINEAR:
            for proj in ("query", "key", "value", "out"):
                m[f"{src}attention.{proj}.{p}"] = f"{dst}attention.{proj}.{p}"
            m[f"{src}attn_layer_norm.{p}"] = f"{dst}attention_norm.{p}"
            m[f"{src}ffn.intermediate_output.{p}"] = f"{dst}mlp_in.{p}"
            m[f"{src}ffn.layer_output.{p}"] = f"{dst}mlp_out.{p}"
            m[f"{src}ffn.layer_norm.{p}"] = f"{dst}mlp_norm.{p}"
    return m


def toast_key_map(depth: int) -> dict[str, str]:
    """open-muse key -> our :class:`TOAST` key."""
    m = {
        "cls_anchor_gen.mlp_p.weight": "anchor.position",
        "cls_anchor_gen.mlp_c.weight": "anchor.classes",
        "cls_anchor_gen.mlp_f.weight": "anchor.factor_weights",
        "top_down_transform": "selection",
    }
    for p in _LINEAR:
        m[f"cls_anchor_gen.layer_norm.{p}"] = f"anchor.norm.{p}"
        m[f"cls_anchor_gen.mlp_t.{p}"] = f"anchor.proj.{p}"
    for layer in range(depth):
        m[f"decoders.{layer}.linear.weight"] = f"top_down.{layer}.weight"
        m[f"decoders.{layer}.linear2.weight"] = f"feedback.{layer}.weight"
    return m


def _convert(
    state_dict: dict,
    key_map: dict[str, str],
    own_prefixes: tuple[str, ...],
    other_prefixes: tuple[str, ...],
    expected_shapes: dict[str, tuple[int, ...]],
    reshape: Callable[[str, torch.Tensor], torch.Tensor],
    what: str,
    strict: bool,
) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, dict):
        raise TypeError(f"{what}: expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    missing = sorted(k for k in key_map if k not in state_dict)
    unknown = sorted(
        k for k in state_dict
        if k not in key_map and not (k.startswith(other_prefixes) and not k.startswith(own_prefixes))
    )
    problems = []
    if missing:
        problems.append(f"missing keys {listed_keys(missing)}")
    if unknown and strict:
        problems.append(f"unknown keys {listed_keys(unknown)}")
    if problems:
        raise KeyError(f"{what}: " + "; ".join(problems))
    out, bad = {}, []
    for src, dst in key_map.items():
        t = state_dict[src]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {src} is a {type(t).__name__}, not a tensor")
        try:
            t = reshape(dst, t)
        except RuntimeError:
            pass
        if tuple(t.shape) != expected_shapes[dst]:
            bad.append(f"{src}: expected {tuple(expected_shapes[dst])} for {dst}, got {tuple(state_dict[src].shape)}")
            continue
        out[dst] = t
    if bad:
        raise ValueError(f"{what}: shape mismatch: " + listed(bad))
    return out


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def convert_backbone(state_dict: dict, config: MaskTransformerConfig, *,
                     strict: bool = True) -> dict[str, torch.Tensor]:
    """An open-muse MaskGIT state dict as a :class:`MaskTransformer` state dict (see the module doc)."""
    with torch.device("meta"):
        shapes = _shapes(MaskTransformer(config))
    return _convert(state_dict, backbone_key_map(config), BACKBONE_PREFIXES, TOAST_PREFIXES, shapes,
                    lambda dst, t: t, "transformer_from_open_muse", strict)


def convert_toast(state_dict: dict, toast_config: TOASTConfig, *, strict: bool = True) -> dict[str, torch.Tensor]:
    """The TOAST part of an open-muse ``MaskGitTransformerTOAST`` state dict as a :class:`TOAST` state dict."""
    with torch.device("meta"):
        shapes = _shapes(TOAST(toast_config))
    d, f = toast_config.width, toast_config.num_factors

    def reshape(dst: str, t: torch.Tensor) -> torch.Tensor:
        if dst == "anchor.position":
            return t.reshape(d, f)
        if dst == "anchor.classes":
            return t.reshape(t.shape[0], d, f)
        if dst == "anchor.factor_weights":
            return t.reshape(f)
        return t

    return _convert(state_dict, toast_key_map(toast_config.depth), TOAST_PREFIXES, BACKBONE_PREFIXES, shapes,
                    reshape, "toast_from_open_muse", strict)


def transformer_from_open_muse(state_dict: dict, config: MaskTransformerConfig, *,
                               strict: bool = True) -> MaskTransformer:
    """Build a model from an open-muse ``MaskGitTransformer`` / ``MaskGitTransformerTOAST`` state dict.

    The layout is the official self-guidance code's MaskGIT configuration (``use_maskgit_mlp``,
    ``use_bias``, ``layer_norm_embeddings``, no encoder LayerNorm, MLM layer with LayerNorm);
    see :func:`backbone_key_map`. TOAST keys (``cls_anchor_gen.*``, ``top_down_transform``,
    ``decoders.*``) are ignored here (load them with :func:`toast_from_open_muse`). Unknown or
    missing keys, and shape mismatches, raise ``KeyError``/``ValueError`` naming them
    (``strict=False`` skips unknown keys).
    """
    model = MaskTransformer(config)
    model.load_state_dict(convert_backbone(state_dict, config, strict=strict), strict=True)
    return model


def toast_from_open_muse(state_dict: dict, backbone_config: MaskTransformerConfig, *, num_factors: int | None = None,
                         strict: bool = True) -> TOAST:
    """The guide of an open-muse ``MaskGitTransformerTOAST`` state dict (its backbone keys are ignored).

    ``num_factors`` defaults to what ``cls_anchor_gen.mlp_f.weight`` holds (16 in the paper).
    Missing / unknown keys and shape mismatches raise, naming them.
    """
    if num_factors is None:
        f = state_dict.get("cls_anchor_gen.mlp_f.weight") if isinstance(state_dict, dict) else None
        num_factors = int(f.shape[-1]) if isinstance(f, torch.Tensor) and f.dim() >= 1 else 16
    guide = TOAST(TOASTConfig.for_backbone(backbone_config, num_factors))
    guide.load_state_dict(convert_toast(state_dict, guide.config, strict=strict), strict=True)
    return guide
