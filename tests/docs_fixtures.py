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
