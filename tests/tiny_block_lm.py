"""A tiny block-causal LM, HF style, for the LLaDA2 pipeline tests, the docs and the benchmark.

``TinyBlockLM``: ``model`` (the backbone, returning ``last_hidden_state`` and ``past_key_values``)
plus ``lm_head`` (``get_output_embeddings()``), a ``forward(input_ids, attention_mask, position_ids,
past_key_values, use_cache)`` like a transformers causal LM, and a transformers ``DynamicCache``.
Attention is block-causal (LLaDA2's): a query at position p sees the keys at positions k with
``k // block_length <= p // block_length`` whose ``attention_mask`` is 1 (and itself). Learned
absolute position embeddings read ``position_ids``; cached keys sit at positions ``0 .. cached - 1``.

``TinyNoCacheLM``: the same without ``past_key_values`` (the pipeline must refuse ``prefix_cache``).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class _Layer(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, allowed, cache, idx):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(k, v, idx)
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        x = x + self.out(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class TinyBlockBackbone(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Embedding(config.max_position_embeddings, d)
        self.layers = nn.ModuleList(_Layer(d, config.num_attention_heads) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        b, n = input_ids.shape
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(cached, cached + n, device=input_ids.device).expand(b, -1)
        n_keys = cached + n
        if attention_mask is None:
            attention_mask = torch.ones(b, n_keys, dtype=torch.long, device=input_ids.device)
        bl = self.config.block_length
        kpos = torch.arange(n_keys, device=input_ids.device)
        allowed = (kpos[None, None, :] // bl <= position_ids[:, :, None] // bl) & (attention_mask[:, None, :n_keys] != 0)
        allowed |= kpos[None, None, :] == position_ids[:, :, None]
        x = self.embed(input_ids) + self.pos(position_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, allowed, past_key_values, i)
        return SimpleNamespace(last_hidden_state=self.norm(x), past_key_values=past_key_values)


class TinyBlockLM(nn.Module):
    """``model`` + ``lm_head``; ``config``: vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
    block_length, max_position_embeddings."""

    def __init__(self, vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, block_length=8,
                 max_position_embeddings=512, seed=0):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, hidden_size=hidden_size,
                                      num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                                      block_length=block_length, max_position_embeddings=max_position_embeddings)
        torch.manual_seed(seed)
        self.model = TinyBlockBackbone(self.config)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        with torch.no_grad():  # peaked rows, so that greedy decoding has no near-ties
            self.lm_head.weight.mul_(4.0)

    @property
    def device(self) -> torch.device:  # diffusers' pipelines read it, as on a transformers model
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache)
        return SimpleNamespace(logits=self.lm_head(out.last_hidden_state), past_key_values=out.past_key_values)


class TinyNoCacheLM(TinyBlockLM):
    """The same model, with a forward that takes no ``past_key_values``."""

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return super().forward(input_ids, attention_mask=attention_mask, position_ids=position_ids)
