"""One LLaDA decoding step with CFG: sgkernels.integrations.llada.llada_step against LLaDA's step.

The anchor (:func:`benchmarks.anchors.llada_step`) is the published step: CFG blend tensor, float64
Gumbel noise and softmax over ``[B, L, V]``, a Python loop of top-k over the rows. Ours is one
fused op (:func:`sgkernels.self_guided_step`: blend, sample, keep the top-k by confidence).

Shapes: GPU B = 1 and 8, L = 1024, V = 126464 (LLaDA-8B's vocabulary), bfloat16 logits. CPU: B = 1,
L = 256 only: the anchor holds ~5 float64 copies of [B, L, V] (B = 8, L = 1024 would need ~40 GB).
"""
from __future__ import annotations

import torch

from sgkernels.integrations.llada import llada_step

from . import anchors
from ._timing import measure

VOCAB, MASK_ID, CFG = 126464, 126336, 1.0


def llada_rows(batch, length, device, quick, dtype=torch.float32, temperature=1.0):
    gen = torch.Generator(device=device).manual_seed(0)
    cond = torch.randn(batch, length, VOCAB, generator=gen, device=device).to(dtype)
    uncond = torch.randn(batch, length, VOCAB, generator=gen, device=device).to(dtype)
    x = torch.full((batch, length), MASK_ID, device=device)
    candidates = torch.ones(batch, length, dtype=torch.bool, device=device)
    k = torch.full((batch,), length // 8, device=device)
    common = dict(op="llada_step", shape=f"B={batch} L={length} V={VOCAB} cfg", dtype=str(dtype).replace("torch.", ""))
    return [
        measure(lambda: llada_step(x, candidates, cond, uncond, k, cfg_scale=CFG, temperature=temperature, seed=0),
                device, quick, impl="sgkernels", bytes=cond.numel() * cond.element_size() * 2, **common),
        measure(lambda: anchors.llada_step(x, candidates, cond, uncond, k, cfg_scale=CFG, temperature=temperature),
                device, quick, impl="LLaDA step (float64)", **common),
    ]


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device == "cpu":
        return llada_rows(1, 256, device, quick)  # B=8 L=1024: the float64 anchor does not fit in memory here
    rows = []
    for batch in (1, 8):
        rows += llada_rows(batch, 1024, device, quick, dtype=torch.bfloat16)
    return rows
