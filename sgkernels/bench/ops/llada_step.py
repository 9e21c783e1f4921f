"""One dLLM decoding step: sgkernels' integrations against LLaDA's, Fast-dLLM's and Dream's steps.

* ``llada_step`` (CFG): the anchor "LLaDA step" is the published step today (CFG blend tensor,
  float64 Gumbel noise, confidence softmax in the logits' dtype, a Python loop of top-k over the
  rows); "LLaDA step (float64 softmax, before 2025-06-02)" is the older one. Ours is one fused op
  (:func:`sgkernels.self_guided_step`: blend, sample, keep the top-k by confidence).
* ``fast_dllm_threshold_step``: Fast-dLLM's ``get_transfer_index`` with ``threshold=0.9`` against
  :func:`sgkernels.integrations.llada.llada_step` with ``threshold`` (guided_sample + [B, L] work).
* ``dream_step`` (``maskgit_plus``, temperature 0.2, top_p 0.95): Dream's ``sample_tokens`` + topk
  against :func:`sgkernels.integrations.dream.dream_step` (top_p still through the sort-based
  reference filter until the fused ops take it).

Each op's implementations are timed interleaved (one call of each per round), so load from other
processes hits them alike.

Shapes: GPU B = 1 and 8, L = 1024, V = 126464 (LLaDA-8B's vocabulary), bfloat16 logits. CPU: B = 1,
L = 256 only: the anchor holds ~5 float64 copies of [B, L, V] (B = 8, L = 1024 would need ~40 GB).
"""
from __future__ import annotations

import torch

from sgkernels.integrations.dream import dream_step
from sgkernels.integrations.llada import llada_step

from .. import anchors
from ..timing import measure_interleaved

VOCAB, MASK_ID, CFG = 126464, 126336, 1.0


def llada_rows(batch, length, device, quick, dtype=torch.float32, temperature=1.0):
    gen = torch.Generator(device=device).manual_seed(0)
    cond = torch.randn(batch, length, VOCAB, generator=gen, device=device).to(dtype)
    uncond = torch.randn(batch, length, VOCAB, generator=gen, device=device).to(dtype)
    x = torch.full((batch, length), MASK_ID, device=device)
    candidates = torch.ones(batch, length, dtype=torch.bool, device=device)
    k = torch.full((batch,), length // 8, device=device)
    common = dict(op="llada_step", shape=f"B={batch} L={length} V={VOCAB} cfg", dtype=str(dtype).replace("torch.", ""))
    return measure_interleaved([
        (lambda: llada_step(x, candidates, cond, uncond, k, cfg_scale=CFG, temperature=temperature, seed=0),
         dict(impl="sgkernels", bytes=cond.numel() * cond.element_size() * 2)),
        (lambda: anchors.llada_step(x, candidates, cond, uncond, k, cfg_scale=CFG, temperature=temperature),
         dict(impl="LLaDA step")),
        (lambda: anchors.llada_step(x, candidates, cond, uncond, k, cfg_scale=CFG, temperature=temperature,
                                    softmax_dtype=torch.float64),
         dict(impl="LLaDA step (float64 softmax, before 2025-06-02)")),
    ], device, quick, **common)


def fast_dllm_rows(batch, length, device, quick, dtype=torch.float32, temperature=0.0):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(batch, length, VOCAB, generator=gen, device=device) * 4).to(dtype)
    x = torch.full((batch, length), MASK_ID, device=device)
    candidates = torch.ones(batch, length, dtype=torch.bool, device=device)
    common = dict(op="fast_dllm_threshold_step", shape=f"B={batch} L={length} V={VOCAB} thr=0.9",
                  dtype=str(dtype).replace("torch.", ""))
    return measure_interleaved([
        (lambda: llada_step(x, candidates, logits, None, None, temperature=temperature, threshold=0.9, seed=0),
         dict(impl="sgkernels", bytes=logits.numel() * logits.element_size())),
        (lambda: anchors.fast_dllm_threshold_step(x, candidates, logits, threshold=0.9, temperature=temperature),
         dict(impl="Fast-dLLM threshold step")),
    ], device, quick, **common)


def dream_rows(batch, length, device, quick, dtype=torch.float32):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, length, VOCAB, generator=gen, device=device).to(dtype)
    x = torch.full((batch, length), MASK_ID, device=device)
    masked = torch.ones(batch, length, dtype=torch.bool, device=device)
    k = length // 8
    common = dict(op="dream_step", shape=f"B={batch} L={length} V={VOCAB} top_p=0.95", dtype=str(dtype).replace("torch.", ""))
    kw = dict(temperature=0.2, top_p=0.95)
    return measure_interleaved([
        (lambda: dream_step(x, masked, logits, k, alg="maskgit_plus", top_k=None, alg_temp=None, p_transfer=1.0,
                            seed=0, offset=0, **kw),
         dict(impl="sgkernels", bytes=logits.numel() * logits.element_size())),
        (lambda: anchors.dream_step(x, masked, logits, k, mask_id=MASK_ID, **kw), dict(impl="Dream sampler step")),
    ], device, quick, **common)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device == "cpu":  # B=8 L=1024: the float64 anchors do not fit in memory here
        return llada_rows(1, 256, device, quick) + fast_dllm_rows(1, 256, device, quick) + dream_rows(1, 256, device, quick)
    rows = []
    for batch in (1, 8):
        rows += llada_rows(batch, 1024, device, quick, dtype=torch.bfloat16)
        rows += fast_dllm_rows(batch, 1024, device, quick, dtype=torch.bfloat16)
        rows += dream_rows(batch, 1024, device, quick, dtype=torch.bfloat16)
    return rows
