"""End to end: SelfGuidedSampler against an official-code-style loop, same model and weights.

The official self-guidance code runs, per step, the base pass, the guided (TOAST) pass and the eager
open-muse step (softmax, multinomial, gather, log, Gumbel, full sort). The anchor below does exactly
that with our modules (:func:`sgkernels.bench.anchors.official_sampling_loop`); ``SelfGuidedSampler`` runs the same two passes and one fused
``self_guided_step``. On CUDA the CUDA-graph option is timed too: the whole step (passes and sampling
op) replayed from one graph per step index, captured during the warm-up calls.
"""
from __future__ import annotations

import torch

import sgkernels as sgk

from .. import anchors
from ..timing import measure_interleaved


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    if device == "cpu":  # a small model: on 2 cores MaskGIT-256 takes seconds per pass
        cfg = sgk.MaskTransformerConfig(codebook_size=1024, num_classes=10, grid_size=16, width=128, depth=2,
                                        heads=4, mlp_dim=256)
        batch, steps = 8, 8
    else:
        cfg = sgk.MaskTransformerConfig.maskgit_256()
        batch, steps = 32, 18
    torch.manual_seed(0)
    model = sgk.MaskTransformer(cfg).to(device).eval()
    guide = sgk.TOAST(cfg).to(device).eval()
    labels = torch.arange(batch, device=device) % cfg.num_classes
    shape = f"{'MaskGIT-256' if device != 'cpu' else 'd=128 L=2'} B={batch} N={cfg.num_tokens} T={steps} guided"
    common = dict(op="SelfGuidedSampler", shape=shape, dtype="float32")
    sampler = sgk.SelfGuidedSampler(model, guide, steps=steps, guidance_scale=1.0, choice_temperature=25.0)
    impls = [(lambda: sampler(labels, seed=0), dict(impl="sgkernels")),
             (lambda: anchors.official_sampling_loop(sampler, labels), dict(impl="official-style loop (eager step)"))]
    if device != "cpu":
        graphed = sgk.SelfGuidedSampler(model, guide, steps=steps, guidance_scale=1.0, choice_temperature=25.0, cuda_graph=True)
        impls.append((lambda: graphed(labels, seed=0),
                      dict(impl="sgkernels + CUDA graph, whole step (< 1x: graph faster)")))
    return measure_interleaved(impls, device, quick, **common)
