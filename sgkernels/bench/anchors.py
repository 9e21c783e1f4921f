"""The code users run today, written as the public code writes it: the baselines ("anchors").

* :func:`official_sampling_loop`: the official self-guidance loop (base pass, guide pass, eager step).
* :func:`llada_generate`: LLaDA's generate() loop (blocks, LLaDA's split of each block over its
  steps) around :func:`llada_step`, or with ``threshold`` Fast-dLLM's (no cache) around
  :func:`fast_dllm_threshold_step`.
* :func:`dream_generate`: Dream's ``_sample`` loop (pad with masks, logits shifted by one,
  ``linspace(1, eps, steps + 1)`` schedule, ``sample_tokens``, per-row top-k of the confidence).
* :func:`open_muse_step`: the open-muse / official self-guidance eager MaskGIT step (softmax,
  multinomial, gather, log, Gumbel noise, full sort).
* :func:`llada_step`: LLaDA's generate() step with classifier-free guidance: float64 Gumbel noise
  over ``[B, L, V]``, the confidence softmax in the logits' dtype (LLaDA today) or in float64
  (``softmax_dtype=torch.float64``: LLaDA before its commit "Remove float64 in softmax", 2025-06-02),
  and a Python loop of topk over the rows.
* :func:`fast_dllm_threshold_step`: Fast-dLLM's ``get_transfer_index`` with a confidence threshold
  (float64 softmax, per-row topk and threshold loop).
* :func:`dream_step`: one step of Dream's ``_sample`` with ``alg="maskgit_plus"`` and ``top_p``:
  gather the masked rows, temper, sort-based top-p, softmax, ``Categorical`` sample, topk.
"""
from __future__ import annotations

import torch

from ..schedule import choice_temperature, mask_len


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


def llada_step(x, mask_index, cond_logits, uncond_logits, num_transfer, *, cfg_scale, temperature, softmax_dtype=None):
    """One LLaDA generate() step with CFG (``uncond_logits`` None: no CFG) and low-confidence remasking.
    ``num_transfer``: int64 [B].

    ``softmax_dtype=None``: the confidence softmax in the logits' dtype, as LLaDA today; ``torch.float64``:
    as LLaDA before 2025-06-02."""
    if uncond_logits is None:
        logits = cond_logits
    else:
        logits = uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)
    logits_with_noise = _add_gumbel_noise(logits, temperature)
    x0 = torch.argmax(logits_with_noise, dim=-1)
    p = torch.softmax(logits if softmax_dtype is None else logits.to(softmax_dtype), dim=-1)
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


def fast_dllm_threshold_step(x, mask_index, logits, *, threshold, temperature):
    """Fast-dLLM's get_transfer_index with ``threshold`` (no cache): fix every candidate >= threshold, at least one."""
    logits_with_noise = _add_gumbel_noise(logits, temperature)
    x0 = torch.argmax(logits_with_noise, dim=-1)
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, dim=-1, index=x0[..., None]).squeeze(-1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, -torch.inf)
    transfer_index = torch.zeros_like(x0, dtype=torch.bool)
    num_transfer = mask_index.sum(dim=1)
    for j in range(confidence.shape[0]):
        _, select_index = torch.topk(confidence[j], k=int(num_transfer[j]))
        transfer_index[j, select_index] = True
        for k in range(1, int(num_transfer[j])):
            if confidence[j, select_index[k]] < threshold:
                transfer_index[j, select_index[k]] = False
    x = x.clone()
    x[transfer_index] = x0[transfer_index]
    return x


def dream_step(x, mask_index, logits, num_transfer: int, *, temperature, top_p, mask_id):
    """One step of Dream's _sample, alg="maskgit_plus": sample_tokens with temperature and top_p, then topk."""
    mask_logits = logits[mask_index] / temperature
    sorted_logits, sorted_indices = torch.sort(mask_logits, descending=True)
    cumulative_probs = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative_probs > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = 0
    mask = torch.zeros_like(mask_logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
    mask_logits = mask_logits.masked_fill(mask, torch.finfo(mask_logits.dtype).min)
    probs = torch.softmax(mask_logits, dim=-1)
    x0 = torch.distributions.Categorical(probs=probs).sample()
    confidence = torch.gather(probs, -1, x0[:, None]).squeeze(-1)
    full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
    full_confidence[mask_index] = confidence
    _, transfer_index = torch.topk(full_confidence, num_transfer)
    x_ = torch.full_like(x, mask_id)
    x_[mask_index] = x0
    rows = torch.arange(x.size(0), device=x.device)[:, None].expand_as(transfer_index)
    x = x.clone()
    x[rows, transfer_index] = x_[rows, transfer_index]
    return x


def official_sampling_loop(sampler, labels: torch.Tensor) -> torch.Tensor:
    """The official self-guidance sampling loop with ``sampler``'s model, guide and settings: per step the
    base pass, the guide pass (``sampler._logits``) and :func:`open_muse_step`. Returns the tokens ``[B, N]``."""
    cfg = sampler.model.config
    b, n = labels.shape[0], cfg.num_tokens
    tokens = torch.full((b, n), cfg.mask_token_id, dtype=torch.int64, device=labels.device)
    is_masked = torch.ones(b, n, dtype=torch.bool, device=labels.device)
    with torch.no_grad():
        for step in range(sampler.steps):
            logits, guide_logits = sampler._logits(tokens, labels)
            num = mask_len(step, sampler.steps, n, is_masked.sum(-1))
            tau = choice_temperature(step, sampler.steps, sampler.choice_temperature, sampler.temperature_decay)
            tokens, is_masked = open_muse_step(
                tokens, is_masked, logits, guide_logits, num, guidance_scale=sampler.guidance_scale,
                temperature=sampler.temperature, choice_temperature=tau, mask_id=cfg.mask_token_id)
    return tokens


def _num_transfer_tokens(block_mask_index, steps):
    """LLaDA's get_num_transfer_tokens: masked count // steps per step, the remainder on the first steps."""
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, device=block_mask_index.device, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, :remainder[i]] += 1
    return num_transfer_tokens


@torch.no_grad()
def llada_generate(model, prompt, *, steps, gen_length, block_length, temperature=0.0, mask_id=126336,
                   threshold=None):
    """LLaDA's generate() (no CFG), or with ``threshold`` Fast-dLLM's threshold decoding (no cache):
    ``model(x).logits`` over the whole sequence per step. Returns ``[B, l + gen_length]``."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt.shape[1]] = prompt.clone()
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        end = start + block_length
        num_transfer_tokens = _num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
        i = 0
        while True:
            if threshold is None and i == steps_per_block:
                break
            if threshold is not None and not bool((x[:, start:end] == mask_id).any()):
                break
            mask_index = x == mask_id
            mask_index[:, end:] = False  # LLaDA: x0_p[:, block_end:] = -inf
            logits = model(x).logits
            if threshold is None:
                x = llada_step(x, mask_index, logits, None, num_transfer_tokens[:, i], cfg_scale=0.0,
                               temperature=temperature)
            else:
                x = fast_dllm_threshold_step(x, mask_index, logits, threshold=threshold, temperature=temperature)
            i += 1
    return x


def _dream_sample_tokens(logits, temperature, top_p, alg):
    """Dream's sample_tokens (top_p, then the confidence of ``alg``): ``(confidence, x0)`` of each row."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative_probs > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = 0
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.distributions.Categorical(probs=probs).sample()
        confidence = torch.gather(probs, -1, x0[:, None]).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        top2 = torch.sort(probs, dim=-1, descending=True).values
        confidence = top2[:, 0] - top2[:, 1]
    elif alg == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@torch.no_grad()
def dream_generate(model, input_ids, *, max_new_tokens, steps, mask_id, eps=1e-3, temperature=0.0, top_p=None,
                   alg="maskgit_plus"):
    """Dream's ``diffusion_generate`` / ``_sample`` without attention mask (``"full"``), for
    ``alg`` in maskgit_plus, topk_margin, entropy: ``model(x, "full", None).logits`` per step."""
    x = torch.nn.functional.pad(input_ids, (0, max_new_tokens), value=mask_id)
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(x, "full", None).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        confidence, x0 = _dream_sample_tokens(mask_logits, temperature, top_p, alg)
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        k = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_confidence[mask_index] = confidence.to(logits.dtype)
        if k > 0:
            _, transfer_index = torch.topk(full_confidence, k)
            x_ = torch.zeros_like(x) + mask_id
            x_[mask_index] = x0.clone()
            row_indices = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(transfer_index)
            x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    return x
