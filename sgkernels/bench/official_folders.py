"""Random-weight checkpoint folders in the official open-muse / UnlockMGM layout.

What the tests and the real-size benchmark row (:mod:`sgkernels.bench.ops.paper_realsize`) write in place
of the published checkpoints: ``config.json`` as open-muse's ``ModelMixin.save_pretrained`` writes it
(``ConfigMixin.to_json_string``: every ``__init__`` argument of the class, the keys added by
``register_to_config`` (``mask_token_id``), ``_class_name`` and ``_version``, sorted, indented by 2;
an EMA folder (``EMAModel.save_pretrained``) also holds the EMA state), and the weights as
``torch.save(state_dict)`` (``pytorch_model.bin``) or safetensors. The state-dict names and shapes
are written out from the official code (``MaskGitTransformerTOAST`` with the MaskGIT configuration,
``MaskGitVQGAN``), not derived from sgkernels' converters, so the tests that load these folders check
the converters independently. Seeded: the same seed writes the same weights. Never written into the
repository (the real size is 1.1 GB).
"""
from __future__ import annotations

import json
import math
import os

import torch

EMA_STATE = {"decay": 0.9999, "min_decay": 0.0, "optimization_step": 50000, "update_after_step": 0,
             "use_ema_warmup": False, "inv_gamma": 1.0, "power": 0.6666666666666666}


def transformer_config(cfg, num_factors=4, toast=True, ema=True) -> dict:
    """config.json of MaskGitTransformerTOAST (``toast``) or MaskGitTransformer for our ``cfg``."""
    c = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_dropout": 0.1,
        "attention_dropout": 0.1,
        "max_position_embeddings": cfg.num_tokens + 1,
        "add_cross_attention": False,
        "encoder_hidden_size": 1024,
        "project_encoder_hidden_states": False,
        "initializer_range": 0.02,
        "norm_type": "layernorm",
        "layer_norm_eps": 1e-12,
        "use_normformer": False,
        "use_encoder_layernorm": False,
        "use_mlm_layer": True,
        "use_mlm_layernorm": True,
        "use_bias": True,
        "layer_norm_embeddings": True,
        "use_maskgit_mlp": True,
        "codebook_size": cfg.codebook_size,
        "num_vq_tokens": cfg.num_tokens,
        "num_classes": cfg.num_classes,
        "mask_token_id": cfg.vocab_size - 1,
        "_class_name": "MaskGitTransformerTOAST" if toast else "MaskGitTransformer",
        "_version": "0.0.1",
    }
    if toast:
        c.update(tg_factor=num_factors, use_toast=True, train_head=False, use_blank_second=True,
                 predict_all=False, lambda_var=0.1)
    if ema:
        c.update(EMA_STATE)
    return c


def vqgan_config(**overrides) -> dict:
    """config.json of a tiny MaskGitVQGAN (downsampling 2: a 3x3 token grid is a 6x6 image)."""
    c = {
        "resolution": 6,
        "num_channels": 3,
        "hidden_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 2,
        "attn_resolutions": [16],
        "z_channels": 8,
        "num_embeddings": 16,
        "quantized_embed_dim": 8,
        "dropout": 0.0,
        "resample_with_conv": True,
        "commitment_cost": 0.25,
        "_class_name": "MaskGitVQGAN",
        "_version": "0.0.1",
    }
    c.update(overrides)
    return c


def vqgan_shapes(c: dict) -> dict:
    """State-dict names and shapes of open-muse's MaskGitVQGAN for config ``c`` (written out from its code)."""
    h, mult, nb, ch = c["hidden_channels"], c["channel_mult"], c["num_res_blocks"], c["num_channels"]
    s = {}

    def resblock(p, cin, cout):
        s[p + "norm1.weight"] = s[p + "norm1.bias"] = (cin,)
        s[p + "conv1.weight"] = (cout, cin, 3, 3)
        s[p + "norm2.weight"] = s[p + "norm2.bias"] = (cout,)
        s[p + "conv2.weight"] = (cout, cout, 3, 3)
        if cin != cout:
            s[p + "nin_shortcut.weight"] = (cout, cout, 1, 1)

    s["encoder.conv_in.weight"] = (h, ch, 3, 3)
    ins = [1] + list(mult)
    for i in range(len(mult)):
        cin = h * ins[i]
        for b in range(nb):
            resblock(f"encoder.down.{i}.block.{b}.", cin, h * mult[i])
            cin = h * mult[i]
    top = h * mult[-1]
    for b in range(nb):
        resblock(f"encoder.mid.{b}.", top, top)
    s["encoder.norm_out.weight"] = s["encoder.norm_out.bias"] = (top,)
    s["encoder.conv_out.weight"] = (c["z_channels"], top, 1, 1)
    s["encoder.conv_out.bias"] = (c["z_channels"],)
    s["decoder.conv_in.weight"] = (top, c["z_channels"], 3, 3)
    s["decoder.conv_in.bias"] = (top,)
    for b in range(nb):
        resblock(f"decoder.mid.{b}.", top, top)
    for i in range(len(mult)):
        cin = h * mult[i + 1] if i + 1 < len(mult) else top
        for b in range(nb):
            resblock(f"decoder.up.{i}.block.{b}.", cin, h * mult[i])
            cin = h * mult[i]
        if i != 0:
            s[f"decoder.up.{i}.upsample_conv.weight"] = (h * mult[i], h * mult[i], 3, 3)
            s[f"decoder.up.{i}.upsample_conv.bias"] = (h * mult[i],)
    s["decoder.norm_out.weight"] = s["decoder.norm_out.bias"] = (h * mult[0],)
    s["decoder.conv_out.weight"] = (ch, h * mult[0], 3, 3)
    s["decoder.conv_out.bias"] = (ch,)
    s["quantize.embedding.weight"] = (c["num_embeddings"], c["quantized_embed_dim"])
    return s


def vqgan_state_dict(c: dict, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in vqgan_shapes(c).items():
        if "norm" in k and k.endswith(".weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif k == "quantize.embedding.weight":
            t = torch.randn(shape, generator=g)
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            t = torch.randn(shape, generator=g) / fan_in ** 0.5
        sd[k] = t
    return sd


def write_folder(directory, config: dict, state: dict, weights: str = "pytorch_model.bin") -> str:
    """``config.json`` as ConfigMixin.to_json_string writes it, and the weights (torch.save or safetensors)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    path = os.path.join(directory, weights)
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return directory


def open_muse_shapes(cfg, num_factors=16, toast=True):
    """open-muse ``MaskGitTransformerTOAST`` (MaskGIT configuration) state-dict names and shapes for our ``cfg``."""
    d, m, v, L = cfg.width, cfg.mlp_dim, cfg.vocab_size, cfg.depth
    s = {
        "embed.word_embeddings.weight": (v, d),
        "embed.position_embeddings.weight": (cfg.num_tokens + 1, d),
        "embed.embeddings_ln.weight": (d,),
        "embed.embeddings_ln.bias": (d,),
        "mlm_layer.mlm_dense.weight": (d, d),
        "mlm_layer.mlm_dense.bias": (d,),
        "mlm_layer.mlm_ln.weight": (d,),
        "mlm_layer.mlm_ln.bias": (d,),
        "mlm_layer.to_logits.weight": (v, d),
        "mlm_layer.to_logits.bias": (v,),
    }
    for l in range(L):
        p = f"transformer_layers.{l}."
        for proj in ("query", "key", "value", "out"):
            s[p + f"attention.{proj}.weight"] = (d, d)
            s[p + f"attention.{proj}.bias"] = (d,)
        s[p + "attn_layer_norm.weight"] = (d,)
        s[p + "attn_layer_norm.bias"] = (d,)
        s[p + "ffn.intermediate_output.weight"] = (m, d)
        s[p + "ffn.intermediate_output.bias"] = (m,)
        s[p + "ffn.layer_output.weight"] = (d, m)
        s[p + "ffn.layer_output.bias"] = (d,)
        s[p + "ffn.layer_norm.weight"] = (d,)
        s[p + "ffn.layer_norm.bias"] = (d,)
    if toast:
        f = num_factors
        s["cls_anchor_gen.mlp_p.weight"] = (1, d * f)
        s["cls_anchor_gen.mlp_c.weight"] = (cfg.num_classes, d * f)
        s["cls_anchor_gen.mlp_f.weight"] = (1, f)
        s["cls_anchor_gen.mlp_t.weight"] = (d, d)
        s["cls_anchor_gen.mlp_t.bias"] = (d,)
        s["cls_anchor_gen.layer_norm.weight"] = (d,)
        s["cls_anchor_gen.layer_norm.bias"] = (d,)
        s["top_down_transform"] = (d, d)
        for l in range(L):
            s[f"decoders.{l}.linear.weight"] = (d, d)
            s[f"decoders.{l}.linear2.weight"] = (d, d)
    return s


def open_muse_state_dict(cfg, num_factors=16, toast=True, seed=0):
    """Seeded random weights in the open-muse layout (LayerNorm weights near 1, P near the identity)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in open_muse_shapes(cfg, num_factors, toast).items():
        if k.endswith("_ln.weight") or k.endswith("layer_norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k == "top_down_transform":
            t = torch.eye(shape[0]) + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) == 2 and "embeddings" not in k and "mlp_" not in k else 1
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in) * (0.5 if fan_in == 1 else 1.0)
        sd[k] = t
    return sd


# The paper's ImageNet 256 model: MaskGitTransformerTOAST (hidden 768, 24 layers, 16 heads, MLP 3072,
# vocabulary 2025, 257 positions, 16 TOAST factors) and open-muse's default MaskGitVQGAN.
PAPER_NUM_FACTORS = 16


def paper_vqgan_config() -> dict:
    """config.json of the default (ImageNet 256, f16) MaskGitVQGAN."""
    return vqgan_config(resolution=256, num_channels=3, hidden_channels=128, channel_mult=[1, 1, 2, 2, 4],
                        num_res_blocks=2, attn_resolutions=[16], z_channels=256, num_embeddings=1024,
                        quantized_embed_dim=256)


def write_paper_folders(root, seed: int = 0, weights: str = "pytorch_model.bin") -> tuple[str, str]:
    """``(transformer_dir, vae_dir)``: the paper's model at its real size with seeded random weights,
    written under ``root`` (``root/transformer``, ``root/vae``; ~1.1 GB, keep ``root`` temporary)."""
    from ..models.transformer import MaskTransformerConfig

    cfg = MaskTransformerConfig.maskgit_256()
    t = write_folder(os.path.join(os.fspath(root), "transformer"), transformer_config(cfg, PAPER_NUM_FACTORS),
                     open_muse_state_dict(cfg, PAPER_NUM_FACTORS, seed=seed), weights)
    c = paper_vqgan_config()
    v = write_folder(os.path.join(os.fspath(root), "vae"), c, vqgan_state_dict(c, seed=seed), weights)
    return t, v
