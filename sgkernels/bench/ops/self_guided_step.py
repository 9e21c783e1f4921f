"""self_guided_step against the open-muse eager step and its torch.compile (LLaDA's step: llada_step.py)."""
from __future__ import annotations

import torch

import sgkernels as sgk

from .. import anchors
from ..timing import measure_interleaved

CPU_SHAPES = [(8, 256, 1024, torch.float32), (8, 1024, 1024, torch.float32), (2, 1024, 8192, torch.float32)]
GPU_SHAPES = [(32, 1024, 1024, torch.bfloat16), (64, 256, 1024, torch.bfloat16), (64, 1024, 1024, torch.bfloat16)]
S, T, TAU = 1.0, 1.0, 25.0


def _inputs(batch, n_tok, vocab, dtype, device, masked_fraction=1.0):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, n_tok, vocab, generator=gen, device=device).to(dtype)
    guide = torch.randn(batch, n_tok, vocab, generator=gen, device=device).to(dtype)
    is_masked = torch.rand(batch, n_tok, generator=gen, device=device) < masked_fraction
    tokens = torch.where(is_masked, vocab, torch.zeros_like(is_masked, dtype=torch.int64))
    n = sgk.mask_len(0, 18, n_tok, is_masked.sum(-1))
    return tokens, is_masked, logits, guide, n


def step_rows(batch, n_tok, vocab, dtype, device, quick, *, masked_fraction=1.0, compile_anchor=True):
    tokens, is_masked, logits, guide, n = _inputs(batch, n_tok, vocab, dtype, device, masked_fraction)
    shape = f"B={batch} N={n_tok} V={vocab}" + ("" if masked_fraction == 1.0 else f" masked={masked_fraction:.0%}")
    common = dict(op="self_guided_step", shape=shape, dtype=str(dtype).replace("torch.", ""))
    read = int(is_masked.sum()) * vocab * logits.element_size() * 2

    def ours():
        return sgk.self_guided_step(tokens, is_masked, logits, guide, n, guidance_scale=S, temperature=T,
                                    choice_temperature=TAU, seed=0, offset=1)

    def eager():
        return anchors.open_muse_step(tokens, is_masked, logits, guide, n, guidance_scale=S, temperature=T,
                                      choice_temperature=TAU, mask_id=vocab)

    impls = [(ours, dict(impl="sgkernels", bytes=read)), (eager, dict(impl="open-muse eager step"))]
    if compile_anchor:
        compiled = torch.compile(anchors.open_muse_step, dynamic=False)

        def eager_compiled():
            return compiled(tokens, is_masked, logits, guide, n, guidance_scale=S, temperature=T,
                            choice_temperature=TAU, mask_id=vocab)

        impls.append((eager_compiled, dict(impl="torch.compile(open-muse step)")))
    return measure_interleaved(impls, device, quick, **common)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    rows = []
    shapes = CPU_SHAPES if device == "cpu" else GPU_SHAPES
    for i, (batch, n_tok, vocab, dtype) in enumerate(shapes):
        # torch.compile on this 2-core CPU takes minutes per shape: compile the first shape only there.
        rows += step_rows(batch, n_tok, vocab, dtype, device, quick, compile_anchor=(device != "cpu" or i == 0))
    batch, n_tok, vocab, dtype = shapes[1]
    rows += step_rows(batch, n_tok, vocab, dtype, device, quick, masked_fraction=0.1, compile_anchor=False)
    return rows  # LLaDA's step: sgkernels/bench/ops/llada_step.py
