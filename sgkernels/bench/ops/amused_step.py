"""diffusers' AmusedScheduler.step (with the pipeline's CFG blend) against FusedAmusedScheduler.step.

Skipped when diffusers is not installed. Both schedulers get the same logits layout the aMUSEd
pipeline produces, ``[B, codebook, H, W]``, with classifier-free guidance scale 10.
"""
from __future__ import annotations

import torch

from ..timing import measure_interleaved


def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    try:
        from diffusers import AmusedScheduler

        from sgkernels.integrations.diffusers import FusedAmusedScheduler
    except ImportError:
        return []
    shapes = [(4, 16, 8192)] if device == "cpu" else [(8, 16, 8192), (8, 32, 8192)]
    rows = []
    for batch, side, codebook in shapes:
        config = dict(mask_token_id=codebook, masking_schedule="cosine")
        ref, fused = AmusedScheduler(**config), FusedAmusedScheduler(**config)
        ref.set_timesteps(12, device=device)
        fused.set_timesteps(12, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        cond = torch.randn(batch, codebook, side, side, generator=gen, device=device)
        uncond = torch.randn(batch, codebook, side, side, generator=gen, device=device)
        sample = torch.full((batch, side, side), codebook, dtype=torch.int64, device=device)
        t = ref.timesteps[0]
        w = 10.0
        common = dict(op="AmusedScheduler.step", shape=f"B={batch} {side}x{side} codebook={codebook} CFG", dtype="float32")

        def reference():
            return ref.step(uncond + w * (cond - uncond), t, sample, generator=torch.Generator(device=device).manual_seed(1))

        def ours():
            return fused.step(cond, t, sample, uncond_logits=uncond, guidance_scale=w,
                              generator=torch.Generator(device=device).manual_seed(1))

        rows += measure_interleaved([(ours, dict(impl="sgkernels", bytes=2 * cond.numel() * 4)),
                                     (reference, dict(impl="diffusers blend + AmusedScheduler.step"))],
                                    device, quick, **common)
    return rows
