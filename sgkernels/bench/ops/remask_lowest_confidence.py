"""remask_lowest_confidence against the eager log + Gumbel + full sort + cut-off of the public code."""
from __future__ import annotations

import torch

import sgkernels as sgk

from ..timing import measure_interleaved


def eager_remask(logp, is_masked, n, tau):
    conf = logp - tau * torch.log(-torch.log(torch.rand_like(logp).clamp(1e-20, 1.0)))
    conf = torch.where(is_masked, conf, torch.finfo(conf.dtype).max)
    cut = torch.gather(torch.sort(conf, -1).values, 1, n.clamp_min(1)[:, None] - 1)
    return (conf <= cut) & (n[:, None] > 0)


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    shapes = [(8, 256), (8, 1024), (64, 4096)] if device == "cpu" else [(64, 256), (64, 1024), (64, 4096)]
    rows = []
    for batch, n_tok in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        logp = -torch.rand(batch, n_tok, generator=gen, device=device) * 5
        is_masked = torch.rand(batch, n_tok, generator=gen, device=device) < 0.8
        n = torch.full((batch,), n_tok // 3, device=device)
        common = dict(op="remask_lowest_confidence", shape=f"B={batch} N={n_tok}", dtype="float32")
        rows += measure_interleaved([
            (lambda: sgk.remask_lowest_confidence(logp, is_masked, n, choice_temperature=4.5, seed=0),
             dict(impl="sgkernels", bytes=logp.numel() * 5)),
            (lambda: eager_remask(logp, is_masked, n, 4.5), dict(impl="eager Gumbel+sort")),
        ], device, quick, **common)
    return rows
