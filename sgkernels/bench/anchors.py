"""The code users run today, written as the public code writes it: the baselines ("anchors").

* :func:`official_generate_sg` / :func:`official_sampling_loop`: the official UnlockMGM ``generate_sg``
  (base pass and TOAST pass with the head on every position and the full vocabulary, eager step), on
  our modules' weights (:func:`official_forward`, :func:`official_toast_forward`);
  :func:`official_decode_code`: open-muse's ``MaskGitVQGAN.decode_code`` (``Conv2dSame``: a pad copy
  before every 3x3 convolution).
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

import math

import torch
import torch.nn.functional as F


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


def _official_layer(block, h, top_down_feat=None):
    """One open-muse ``TransformerLayer`` with ``use_maskgit_mlp`` (post-LN), on ``block``'s weights:
    q/k/v projections, the value feedback through the value projection, (B, H, T, D) contiguous copies,
    SDPA, a contiguous copy back, the out projection; residual + LayerNorm; GELU MLP, residual + LayerNorm."""
    att = block.attention
    b, t, d = h.shape
    heads = att.heads
    query, key, value = att.query(h), att.key(h), att.value(h)
    if top_down_feat is not None:
        value = value + att.value(top_down_feat)
    query, key, value = (x.view(b, t, heads, d // heads).transpose(1, 2).contiguous() for x in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value)
    out = att.out(out.transpose(1, 2).contiguous().view(b, t, d))
    h = block.attention_norm(h + out)
    mlp = block.mlp_out(F.gelu(block.mlp_in(h), approximate=block.gelu_approximate))
    return block.mlp_norm(mlp + h)


def _as_forward(module, fn):
    """``fn()`` seen by ``module``'s forward hooks as one of its forwards (the official passes call its
    submodules, not the module: :class:`sgkernels.bench.parts.PartTimer` times them as ours)."""
    for hook in list(module._forward_pre_hooks.values()):
        hook(module, ())
    out = fn()
    for hook in list(module._forward_hooks.values()):
        hook(module, (), out)
    return out


def official_forward(model, input_ids, top_down_feats=None):
    """open-muse ``MaskGitTransformer(TOAST).forward`` (MaskGIT configuration) on ``model``'s weights:
    ``(logits [B, N+1, V], last hidden states [B, N+1, d])``. The MLM head runs on every position,
    the class position included, over the full vocabulary (codebook, classes and [MASK]), as the
    official code does before slicing to the codebook."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    h = model.embedding_norm(model.word_embeddings(input_ids) + model.position_embeddings(positions))
    for layer, block in enumerate(model.blocks):
        h = _official_layer(block, h, None if top_down_feats is None else top_down_feats[layer])
    x = model.head_norm(F.gelu(model.head_dense(h)))
    return model.head(x), h


def official_toast_forward(model, guide, input_ids, hidden_states):
    """The official ``forward_with_hidden_toast`` on ``model`` / ``guide``'s weights: the class anchor
    (factor embeddings multiplied and summed, LayerNorm, projection), the token selection, the
    top-down chain, then the backbone on a blank canvas with the value feedbacks; its logits ``[B, N+1, V]``."""
    a = guide.anchor
    cls = input_ids[:, 0] - model.config.codebook_size
    d, f = a.position.shape
    embed = (a.factor_weights.view(1, 1, 1, f) * (a.position.view(1, 1, d, f) + a.classes[cls].view(-1, 1, d, f))).sum(-1)
    anchor = a.proj(a.norm(embed))
    x = hidden_states
    cos_sim = F.normalize(x, dim=-1) @ F.normalize(anchor, dim=-1).transpose(1, 2)
    x = (x * cos_sim.clamp(0, 1)) @ guide.selection
    td = []
    for layer in range(len(guide.top_down) - 1, -1, -1):
        x = guide.top_down[layer](x)
        td = [guide.feedback[layer](x)] + td
    blank = input_ids.clone().fill_(model.config.mask_token_id)
    return official_forward(model, blank, td)[0]


def _official_mask_by_random_topk(mask_len, probs, temperature):
    """open-muse ``mask_by_random_topk``: log-confidence + tempered Gumbel noise, a full sort, strict cut."""
    noise = torch.zeros_like(probs).uniform_(0, 1)
    gumbel = -torch.log((-torch.log(noise.clamp(min=1e-20))).clamp(min=1e-20))
    confidence = torch.log(probs.clamp(min=1e-20)) + temperature * gumbel
    cut_off = torch.gather(torch.sort(confidence, dim=-1).values, 1, mask_len.long())
    return confidence < cut_off


def official_generate_sg(model, guide, labels: torch.Tensor, *, steps: int, guidance_scale: float,
                         choice_temperature: float) -> torch.Tensor:
    """The official ``generate_sg`` (UnlockMGM) on ``model`` / ``guide``'s weights, fp32 eager as users
    run it: per step the base pass and the TOAST pass (both with the head on every position and the
    full vocabulary), the blend on ``[B, N+1, K]``, a per-image multinomial of the softmax, a second
    softmax for the confidences, the float32 cosine schedule and ``mask_by_random_topk`` with the
    compounded choice temperature. Returns the tokens ``[B, N]``."""
    cfg = model.config
    k, n, mask_id = cfg.codebook_size, cfg.num_tokens, cfg.mask_token_id
    class_ids = labels + k
    input_ids = torch.full((labels.shape[0], n), mask_id, dtype=torch.long, device=labels.device)
    temperature = choice_temperature
    with torch.no_grad():
        for step in range(steps):
            input_ids = torch.cat([class_ids[:, None], input_ids], dim=1)
            logits, hidden_states = _as_forward(model, lambda: official_forward(model, input_ids))
            logits = logits[..., :k]
            if guidance_scale != 0:
                toast_logits = _as_forward(guide, lambda: official_toast_forward(model, guide, input_ids,
                                                                                 hidden_states))[..., :k]
                logits = toast_logits + (1 + guidance_scale) * (logits - toast_logits)
            input_ids, logits = input_ids[:, 1:], logits[:, 1:]
            sampled_ids = torch.stack([torch.multinomial(row.softmax(dim=-1), 1).squeeze(1) for row in logits])
            unknown_map = input_ids == mask_id
            sampled_ids = torch.where(unknown_map, sampled_ids, input_ids)
            ratio = 1.0 * (step + 1) / steps
            mask_ratio = torch.cos(torch.tensor(ratio) * math.pi * 0.5)
            probs = logits.softmax(dim=-1)
            selected = torch.gather(probs, -1, sampled_ids.long()[..., None]).squeeze(-1)
            selected = torch.where(unknown_map, selected, torch.finfo(selected.dtype).max)
            mask_len = (n * mask_ratio).floor().unsqueeze(0).to(logits.device)
            mask_len = torch.max(torch.tensor([1], device=logits.device),
                                 torch.min(unknown_map.sum(dim=-1, keepdim=True) - 1, mask_len))
            temperature = temperature * (1.0 - ratio)
            masking = _official_mask_by_random_topk(mask_len, selected, temperature)
            input_ids = torch.where(masking, mask_id, sampled_ids)
    return sampled_ids


def official_decode_code(vqgan, tokens: torch.Tensor) -> torch.Tensor:
    """open-muse ``MaskGitVQGAN.decode_code`` on ``vqgan``'s weights: the codebook lookup reshaped and
    permuted to ``[B, C, h, w]`` (channels-last strides, as ``get_codebook_entry`` leaves it), then the
    decoder with ``Conv2dSame`` (an explicit ``F.pad`` before every 3x3 convolution, which runs
    unpadded). No clamp (the official pipeline clips when converting to 8 bits)."""
    def conv(m, x):
        k = m.kernel_size[0]
        if k > 1:
            x = F.pad(x, [(k - 1) // 2, k // 2, (k - 1) // 2, k // 2])
        return F.conv2d(x, m.weight, m.bias)

    def resblock(blk, x):
        y = conv(blk.conv1, F.silu(blk.norm1(x)))
        y = conv(blk.conv2, F.silu(blk.norm2(y)))
        return y + (x if blk.nin_shortcut is None else conv(blk.nin_shortcut, y))

    b, num = tokens.shape
    side = math.isqrt(num)
    z = vqgan.quantize.embedding(tokens).reshape(b, side, side, -1).permute(0, 3, 1, 2)
    dec = vqgan.decoder
    with torch.no_grad():
        x = conv(dec.conv_in, z)
        for blk in dec.mid:
            x = resblock(blk, x)
        for level in reversed(dec.up):
            for blk in level.block:
                x = resblock(blk, x)
            if level.upsample_conv is not None:
                x = conv(level.upsample_conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return conv(dec.conv_out, F.silu(dec.norm_out(x)))


def official_sampling_loop(sampler, labels: torch.Tensor) -> torch.Tensor:
    """The official self-guidance sampling loop (:func:`official_generate_sg`) with ``sampler``'s model,
    guide, steps, guidance scale and choice temperature. Returns the tokens ``[B, N]``."""
    return official_generate_sg(sampler.model, sampler.guide, labels, steps=sampler.steps,
                                guidance_scale=sampler.guidance_scale if sampler.guided else 0.0,
                                choice_temperature=sampler.choice_temperature)


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
