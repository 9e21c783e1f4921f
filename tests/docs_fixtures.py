"""Tiny stand-ins for what the documented snippets download (tests/test_docs.py).

A fixture ``NAME(tmp_path, ns)`` is named by ``<!-- run with: NAME -->`` above a fenced block. It
writes what the block reads into ``tmp_path`` (folders at the paths the block names) or into the
block's namespace ``ns``, and may return a directory to run the block in. Nothing here is a real
checkpoint: random weights of the published layouts, at toy sizes.
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def repo_root(tmp_path, ns):
    """Run the block in the repository root (``make`` targets)."""
    return ROOT


def paper_checkpoints(tmp_path, ns):
    """Tiny official-layout folders where the docs' commands look for the paper's checkpoints:
    ``UnlockMGM_imagenet_256/ema_model`` (MaskGitTransformerTOAST, 1000 classes) and ``vqgan256``
    (MaskGitVQGAN)."""
    from official_folders import transformer_config, vqgan_config, vqgan_state_dict, write_folder
    from test_models import NF, open_muse_state_dict, tiny

    model = tmp_path / "UnlockMGM_imagenet_256" / "ema_model"
    if not (model / "config.json").exists():
        cfg = tiny(num_classes=1000)
        write_folder(model, transformer_config(cfg, NF), open_muse_state_dict(cfg, NF))
        c = vqgan_config(num_embeddings=cfg.codebook_size)
        write_folder(tmp_path / "vqgan256", c, vqgan_state_dict(c))


def llada_model(tmp_path, ns):
    """``model``, ``input_ids``, ``attention_mask`` for the LLaDA / Fast-dLLM snippets: a tiny random
    HF-shaped model (the base model of tests/test_integrations_llada.py + an ``lm_head`` beside it, so
    the fused head applies) with LLaDA's vocabulary (126464 ids, [MASK] 126336: the snippets' default
    ``mask_id`` holds), a sharp head (confident enough that Fast-dLLM's threshold fixes several tokens
    per step), and a left-padded batch of two prompts."""
    from types import SimpleNamespace

    import torch
    from test_integrations_llada import _TinyBase

    vocab, mask_id, dim = 126464, 126336, 32

    class TinyLLaDAHF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = _TinyBase(vocab=vocab, dim=dim, max_len=8 + 256)
            self.lm_head = torch.nn.Linear(dim, vocab)
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                self.lm_head.weight.copy_(torch.randn(vocab, dim, generator=gen) * 30.0 / dim**0.5)
                self.lm_head.bias.zero_()
                self.lm_head.bias[mask_id] = -1e4  # like a trained LLaDA, never predicts [MASK]
            self.config = SimpleNamespace(vocab_size=vocab)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids, attention_mask=None):
            hidden = self.model(input_ids, attention_mask).last_hidden_state
            return SimpleNamespace(logits=self.lm_head(hidden))

    ns["model"] = TinyLLaDAHF().eval()
    gen = torch.Generator().manual_seed(0)
    ns["input_ids"] = torch.randint(0, 126000, (2, 8), generator=gen)
    ns["attention_mask"] = torch.ones(2, 8, dtype=torch.int64)
    ns["attention_mask"][1, :3] = 0  # the second prompt is 3 tokens shorter (left padding)


def dream_model(tmp_path, ns):
    """``model``, ``input_ids``, ``attention_mask`` for the Dream snippets: a tiny random Dream-shaped HF
    model (tests/test_integrations_dream.py: ``forward(input_ids, attention_mask, position_ids)``,
    next-token logits) and a left-padded batch of two prompts."""
    import torch
    from test_integrations_dream import PAD, TinyDream, TinyDreamConfig

    ns["model"] = TinyDream(TinyDreamConfig(max_position_embeddings=8 + 256)).eval()
    gen = torch.Generator().manual_seed(0)
    ns["input_ids"] = torch.randint(0, PAD, (2, 8), generator=gen)
    ns["attention_mask"] = torch.ones(2, 8, dtype=torch.int64)
    ns["input_ids"][1, :3], ns["attention_mask"][1, :3] = PAD, 0


def amused_folder(tmp_path, ns):
    """A tiny aMUSEd pipeline folder at ``amused/amused-256`` (the components of
    tests/test_integrations_diffusers.py, saved with ``save_pretrained``): ``from_pretrained`` reads it
    instead of downloading."""
    folder = tmp_path / "amused" / "amused-256"
    if not (folder / "model_index.json").exists():
        from diffusers import AmusedPipeline
        from test_integrations_diffusers import components

        (tmp_path / "tokenizer_files").mkdir(exist_ok=True)
        parts = components._get_wrapped_function()(tmp_path / "tokenizer_files")
        AmusedPipeline(**parts).save_pretrained(folder)


def guide_training_data(tmp_path, ns):
    """For guide fine-tuning: ``my_maskgit_checkpoint`` (a tiny MaskTransformer written by
    ``sgkernels.save_checkpoint``, no guide yet) and ``tokens.npz`` (64 random token grids + labels)."""
    import numpy as np
    import torch
    from test_models import tiny

    import sgkernels as sgk

    if not (tmp_path / "my_maskgit_checkpoint").exists():
        torch.manual_seed(0)
        cfg = tiny()
        sgk.save_checkpoint(tmp_path / "my_maskgit_checkpoint", sgk.MaskTransformer(cfg))
        gen = np.random.default_rng(0)
        h, w = cfg.grid_hw
        np.savez(tmp_path / "tokens.npz", tokens=gen.integers(0, cfg.codebook_size, (64, h, w)),
                 labels=gen.integers(0, cfg.num_classes, 64))


def diffusers_vq_model(tmp_path, ns):
    """``vq_model``: the tiny diffusers ``VQModel`` of tests/test_integrations_diffusers.py."""
    from test_integrations_diffusers import components

    (tmp_path / "tokenizer_files").mkdir(exist_ok=True)
    ns["vq_model"] = components._get_wrapped_function()(tmp_path / "tokenizer_files")["vqvae"]


def dllm_folders(tmp_path, ns):
    """Tiny stand-ins of the diffusion LMs docs/benchmarking.md benchmarks, at the paths it names:
    ``LLaDA-8B-Instruct`` (a random ``BertForMaskedLM`` with LLaDA's vocabulary size, 126464, so that
    LLaDA's mask id 126336 is in it) and ``Dream-v0-Instruct-7B`` (a Dream-shaped model whose modeling
    code ships in the folder, ``auto_map``, with its ``mask_token_id`` in the config)."""
    from lm_folders import save_tiny_dream, save_tiny_mlm

    if not (tmp_path / "LLaDA-8B-Instruct" / "config.json").exists():
        save_tiny_mlm(tmp_path / "LLaDA-8B-Instruct", vocab_size=126464, hidden_size=16)
    if not (tmp_path / "Dream-v0-Instruct-7B" / "config.json").exists():
        save_tiny_dream(tmp_path / "Dream-v0-Instruct-7B")


def llada2_pipe(tmp_path, ns):
    """``pipe``, ``input_ids``, ``mask_id`` for the diffusers LLaDA2 snippet: a stock ``LLaDA2Pipeline``
    on the tests' tiny block-causal LM (tests/tiny_block_lm.py) with LLaDA2's vocabulary (157184 ids),
    d = 32, one layer, and a prompt of 40 tokens (so the first active block starts inside the prompt)."""
    import torch
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline
    from tiny_block_lm import TinyBlockLM

    vocab = 157184
    model = TinyBlockLM(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, block_length=32).eval()
    ns["pipe"] = LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(block_length=32))
    ns["pipe"].set_progress_bar_config(disable=True)
    ns["mask_id"] = 156895
    ns["input_ids"] = torch.randint(0, 150000, (1, 40), generator=torch.Generator().manual_seed(0))


def llada2_folder(tmp_path, ns):
    """A stand-in for ``LLaDA2.0-mini`` in docs/benchmarking.md: the tests' tiny block-causal LM (blocks of
    32, d = 32, one layer, 4096 ids, ``mask_token_id`` 4095 in its config) as a remote-code transformers
    folder (tests/lm_folders.py: ``save_tiny_block_lm``)."""
    from lm_folders import save_tiny_block_lm

    if not (tmp_path / "LLaDA2.0-mini" / "config.json").exists():
        save_tiny_block_lm(tmp_path / "LLaDA2.0-mini", vocab_size=4096, mask_token_id=4095, block_length=32)
