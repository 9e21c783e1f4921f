"""guided_sample against the eager softmax -> multinomial -> gather -> log of the public code."""
from __future__ import annotations

import torch

import sgkernels as sgk

from ..timing import measure_interleaved


def eager_guided_sample(logits, guide, s, temperature):
    g = guide + (1 + s) * (logits - guide)
    probs = torch.softmax(g.float() / temperature, -1)
    vocab = probs.shape[-1]
    tokens = torch.multinomial(probs.reshape(-1, vocab), 1).reshape(probs.shape[:-1])
    logp = torch.log_softmax(g.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    return tokens, logp


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device == "cpu":
        shapes = [(8, 256, 1024, torch.float32), (2, 1024, 8192, torch.float32), (1, 64, 126464, torch.float32)]
    else:
        shapes = [(32, 1024, 1024, torch.bfloat16), (4, 1024, 126464, torch.bfloat16)]
    rows = []
    for batch, n_tok, vocab, dtype in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(batch, n_tok, vocab, generator=gen, device=device).to(dtype)
        guide = torch.randn(batch, n_tok, vocab, generator=gen, device=device).to(dtype)
        common = dict(op="guided_sample", shape=f"B={batch} N={n_tok} V={vocab}", dtype=str(dtype).replace("torch.", ""))
        rows += measure_interleaved([
            (lambda: sgk.guided_sample(logits, guide, guidance_scale=1.0, seed=0),
             dict(impl="sgkernels", bytes=2 * logits.numel() * logits.element_size())),
            (lambda: eager_guided_sample(logits, guide, 1.0, 1.0), dict(impl="eager softmax+multinomial")),
        ], device, quick, **common)
    return rows
