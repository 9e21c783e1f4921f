"""The code users run today, written as the public code writes it: the baselines ("anchors").

* :func:`open_muse_step`: the open-muse / official self-guidance eager MaskGIT step (softmax,
  multinomial, gather, log, Gumbel noise, full sort).
* :func:`llada_step`: LLaDA's generate() step with classifier-free guidance: float64 Gumbel noise
  over ``[B, L, V]``, float64 softmax, and a Python loop of topk over the rows.
"""
from __future__ import annotations

import torch


def open_muse_step(tokens, is_masked, logits, guide, num_to_mask, *, guidance_scale, temperature, choice_temperature, mask_id, generator=None):
    """One eager MaskGIT step with self-guidance, as the official code does it. Returns new tokens, mask."""
    if guide is not None:
        logits = guide + (1 + guidance_scale) * (logits - guide)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    batch, n_tok, vocab = probs.shape
    sampled = torch.multinomial(probs.reshape(-1, vocab), 1, generator=generator).reshape(batch, n_tok)
    sampled = torch.where(is_masked, sampled, tokens)
    selected = torch.gather(probs, -1, sampled[..., None]).squeeze(-1)
    selected = torch.where(is_masked, selected, torch.finfo(selected.dtype).max)
    uniform = torch.rand(selected.shape, device=selected.device, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0)))
    confidence = torch.log(selected) + choice_temperature * gumbel
    sorted_conf = torch.sort(confidence, dim=-1).values
    cut_off = torch.gather(sorted_conf, 1, num_to_mask.clamp_min(1)[:, None] - 1)
    masking = (confidence <= cut_off) & (num_to_mask[:, None] > 0)
    return torch.where(masking, mask_id, sampled), masking


def _add_gumbel_noise(logits, temperature):
    """LLaDA's add_gumbel_noise: float64 exp(logits) / (-log u)^temperature."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def llada_step(x, mask_index, cond_logits, uncond_logits, num_transfer, *, cfg_scale, temperature):
    """One LLaDA generate() step with CFG and low-confidence remasking. ``num_transfer``: int64 [B]."""
    logits = uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)
    logits_with_noise = _add_gumbel_noise(logits, temperature)
    x0 = torch.argmax(logits_with_noise, dim=-1)
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, dim=-1, index=x0[..., None]).squeeze(-1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -torch.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=int(num_transfer[j]))
        transfer_index[j, select_index] = True
    x = x.clone()
    x[transfer_index] = x0[transfer_index]
    return x
