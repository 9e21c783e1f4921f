"""Tiny language-model folders for ``sgkernels bench dllm`` (written with ``save_pretrained``).

* :func:`save_tiny_mlm`: a random-weight ``BertForMaskedLM`` (bidirectional, ``model(x).logits``: LLaDA's
  calling convention), no custom code; mask id :data:`MLM_MASK` (the last id).
* :func:`save_tiny_dream`: a Dream-shaped model with its own modeling code in the folder (``auto_map``,
  loaded with ``trust_remote_code``): ``model(x, attention_mask, position_ids)``, an ``lm_head`` beside
  the base model, logits predicting the next position, ``mask_token_id`` in its config.
* :func:`save_tiny_block_lm`: the tests' tiny block-causal LM (tests/tiny_block_lm.py, LLaDA2's attention)
  as a transformers model with its code in the folder (``auto_map``): ``model(x, attention_mask,
  position_ids, past_key_values, use_cache)`` with a ``DynamicCache``, ``lm_head`` beside the base model.
"""
from __future__ import annotations

import importlib.util
import json
import os

import torch

MLM_VOCAB, MLM_MASK = 64, 63
DREAM_VOCAB, DREAM_MASK = 48, 47

DREAM_SOURCE = '''
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput


class TinyDreamConfig(PretrainedConfig):
    model_type = "sgk_tiny_dream"

    def __init__(self, vocab_size=48, hidden_size=32, mask_token_id=47, max_position_embeddings=128, **kwargs):
        self.vocab_size, self.hidden_size, self.mask_token_id = vocab_size, hidden_size, mask_token_id
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


class TinyDreamBase(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.emb = torch.nn.Embedding(config.vocab_size, d)
        self.pos = torch.nn.Embedding(config.max_position_embeddings, d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device) if position_ids is None else position_ids
        h = self.emb(input_ids) + self.pos(pos)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
        if isinstance(attention_mask, torch.Tensor):
            scores = scores.masked_fill(~attention_mask[:, 0], -1e9)
        return BaseModelOutput(last_hidden_state=self.norm(h + torch.softmax(scores, -1) @ v))


class TinyDreamModel(PreTrainedModel):
    config_class = TinyDreamConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = TinyDreamBase(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        hidden = self.model(input_ids, attention_mask, position_ids).last_hidden_state
        return MaskedLMOutput(logits=self.lm_head(hidden))
'''


def save_tiny_mlm(path, seed: int = 0, vocab_size: int = MLM_VOCAB, hidden_size: int = 32) -> str:
    """A random ``BertForMaskedLM`` (1 layer; default vocabulary 64, width 32) saved in ``path``."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=2 * hidden_size, max_position_embeddings=512)
    BertForMaskedLM(cfg).save_pretrained(str(path))
    return str(path)


def save_tiny_dream(path, seed: int = 0) -> str:
    """The Dream-shaped model above, its code and ``auto_map`` in ``path`` (needs ``trust_remote_code``)."""
    os.makedirs(path, exist_ok=True)
    src = os.path.join(str(path), "modeling_sgk_tiny_dream.py")
    with open(src, "w") as f:
        f.write(DREAM_SOURCE)
    spec = importlib.util.spec_from_file_location("modeling_sgk_tiny_dream_fixture", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(seed)
    mod.TinyDreamModel(mod.TinyDreamConfig(vocab_size=DREAM_VOCAB, mask_token_id=DREAM_MASK)).save_pretrained(str(path))
    cfg_path = os.path.join(str(path), "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["auto_map"] = {"AutoConfig": "modeling_sgk_tiny_dream.TinyDreamConfig",
                       "AutoModel": "modeling_sgk_tiny_dream.TinyDreamModel"}
    cfg["architectures"] = ["TinyDreamModel"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    return str(path)


# --- the tests' tiny block-causal LM (LLaDA2's attention) as a transformers folder ----------------

BLOCK_VOCAB, BLOCK_MASK = 64, 63

# Appended to the text of tests/tiny_block_lm.py: the transformers wrapper (config + PreTrainedModel).
BLOCK_LM_WRAPPER = '''

from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class TinyLLaDA2Config(PretrainedConfig):
    model_type = "sgk_tiny_llada2"

    def __init__(self, vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, block_length=8,
                 max_position_embeddings=512, mask_token_id=63, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.block_length = num_attention_heads, block_length
        self.max_position_embeddings, self.mask_token_id = max_position_embeddings, mask_token_id
        super().__init__(**kwargs)


class TinyLLaDA2Model(PreTrainedModel):
    """The base model alone (no LM head), as LLaDA2's auto_map names under AutoModel."""
    config_class = TinyLLaDA2Config

    def __init__(self, config):
        super().__init__(config)
        self.model = TinyBlockBackbone(config)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return self.model(input_ids, **kwargs)


class TinyLLaDA2ForCausalLM(PreTrainedModel):
    config_class = TinyLLaDA2Config
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = TinyBlockBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                **kwargs):
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state))
'''


def save_tiny_block_lm(path, *, vocab_size: int = BLOCK_VOCAB, mask_token_id: int = BLOCK_MASK, block_length: int = 8,
                       hidden_size: int = 32, num_hidden_layers: int = 1, seed: int = 0) -> str:
    """The tests' ``TinyBlockLM`` (same weights for the same arguments) as a transformers model whose code is
    in ``path`` (``modeling_sgk_tiny_llada2.py``: tests/tiny_block_lm.py and ``PreTrainedModel`` wrappers;
    ``auto_map``: ``AutoModelForCausalLM`` the LM, ``AutoModel`` the base model without its head, as in
    LLaDA2's folders), written with ``save_pretrained``; loading it needs ``trust_remote_code``."""
    from tiny_block_lm import TinyBlockLM

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_block_lm.py")) as f:
        source = f.read() + BLOCK_LM_WRAPPER
    src = os.path.join(str(path), "modeling_sgk_tiny_llada2.py")
    with open(src, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("modeling_sgk_tiny_llada2_fixture", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.TinyLLaDA2Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                               block_length=block_length, mask_token_id=mask_token_id)
    model = mod.TinyLLaDA2ForCausalLM(cfg)
    ref = TinyBlockLM(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                      block_length=block_length, seed=seed)
    model.load_state_dict(ref.state_dict())
    model.save_pretrained(str(path))
    cfg_path = os.path.join(str(path), "config.json")
    with open(cfg_path) as f:
        data = json.load(f)
    data["auto_map"] = {"AutoConfig": "modeling_sgk_tiny_llada2.TinyLLaDA2Config",
                        "AutoModel": "modeling_sgk_tiny_llada2.TinyLLaDA2Model",
                        "AutoModelForCausalLM": "modeling_sgk_tiny_llada2.TinyLLaDA2ForCausalLM"}
    data["architectures"] = ["TinyLLaDA2ForCausalLM"]
    with open(cfg_path, "w") as f:
        json.dump(data, f, indent=2)
    return str(path)
