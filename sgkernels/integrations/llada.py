"""LLaDA-style masked-diffusion decoding with one fused op per step.

:func:`generate` is a drop-in for ``generate()`` of the public LLaDA code (``ML-GSAI/LLaDA``,
``generate.py``), with its current signature, positional order and semantics, plus, keyword-only,
Fast-dLLM's parallel decoding rules (``threshold=``, ``factor=``; ``NVlabs/Fast-dLLM``,
``llada/generate.py``, without KV cache) and a ``seed``. Fast-dLLM's KV-cache variants are
:func:`generate_with_prefix_cache` and :func:`generate_with_dual_cache` (the model's own cache API):

* the answer (``gen_length`` masks after the prompt) is decoded in ``gen_length // block_length``
  blocks, left to right; each block gets ``steps // num_blocks`` steps, and the number of tokens
  fixed per step is LLaDA's ``get_num_transfer_tokens`` split (masked count // steps, the remainder
  spread over the first steps);
* ``attention_mask`` ``[B, l]`` (left-padded batches of prompts of different lengths): extended
  with ones over the answer and passed as ``model(x, attention_mask=...)``, doubled along the batch
  for CFG, as LLaDA passes it (LLaDA itself fails on CFG without a mask; here the mask is optional);
* CFG (``cfg_scale > 0``): the model sees ``[x; x with the prompt masked]`` in one batch and the
  step samples from ``un + (cfg_scale + 1) (cond - un)``, blended inside the fused op;
* ``remasking="low_confidence"`` keeps, per row, the ``k`` candidates whose sampled token has the
  highest untempered probability (softmax in float32, as LLaDA since "Remove float64 in softmax");
  ``"random"`` keeps a uniformly random ``k``-subset;
* candidates are the masked positions before the end of the current block (as LLaDA: its
  ``x0_p[:, block_end:] = -inf``); positions after the block are never chosen;
* ``logits_eos_inf``: the EOS logit (id 126081) is -inf, so EOS is never sampled;
* ``confidence_eos_eot_inf``: the confidence is the probability of the sampled token with EOS
  (126081) and EoT (126348) taken out of the softmax, and 0 where the sampled token is EOS or EoT
  (ranked after every other candidate). That is what LLaDA's code computes at ``temperature=0``;
  at ``temperature > 0`` its code leaves EOS in (its ``-inf`` is written to the noisy copy, after
  the sample); here both are always out, as its docstring and the paper's Appendix B.4 describe.
* ``threshold`` (Fast-dLLM): each step fixes every candidate whose confidence is >= threshold,
  and at least the most confident one; ``factor`` (Fast-dLLM's ``get_transfer_index_dynamic``):
  with the candidates' confidences sorted, c_1 >= c_2 >= ..., each step fixes the first ``n``,
  ``n`` the first index (1-based, n >= 2) with ``c_n < 1 - factor / (n + 1)`` minus one, all of them
  when that index is the last or there is none. In both modes a block is decoded until it has no
  mask left (``steps`` only has to pass the divisibility check).

What runs per step: :func:`sgkernels.self_guided_step` (low_confidence: sample the candidates, then
re-mask the ``#candidates - k`` least confident, which keeps exactly LLaDA's top-k), or
``self_guided_step`` with nothing re-masked followed by :func:`sgkernels.remask_lowest_confidence`
on zero log-probabilities with choice temperature 1 (random: the Gumbel noise alone orders the
candidates, so the kept set is a uniform random k-subset, exactly), or
:func:`sgkernels.guided_sample` on the window ``[:, :block_end]`` plus ``[B, L]`` elementwise work
(threshold, factor, EOS/EoT confidence: the EOS/EoT probabilities come from two gathered logits and
the log-normaliser ``g[token] - logp``). No ``[B, L, V]`` float64 tensor, no CFG blend tensor, no
per-row Python loop.

Temperature. LLaDA samples ``argmax(exp(l) / (-log u)^T)`` with ``u ~ U(0, 1)`` in float64.
Taking logs, that is ``argmax(l + T G)`` with ``G = -log(-log u)`` standard Gumbel, i.e.
``argmax(l / T + G)``: by the Gumbel-max trick exactly a sample of ``softmax(l / T)``. (Directly:
``E = -log u ~ Exp(1)``, and ``argmin E_i / exp(l_i / T)`` over independent exponentials picks i
with probability proportional to the rate ``exp(l_i / T)``.) So the published ``temperature`` *is*
the softmax temperature, and the fused op samples the same distribution, by exact inverse CDF.
The two differ only where LLaDA's float64 arithmetic departs from that ideal: ``exp(l)`` overflows
for logits > 709 (then the first such token always wins) and the 53-bit uniform bounds the noise
(tokens more than ~40 T below the top are never drawn by LLaDA; their probability is < 1e-17).
``temperature=0`` is the argmax in both, and greedy decoding is token-for-token identical, up to
ties: LLaDA orders confidence by a probability in the logits' dtype (bfloat16 for the released
bf16 checkpoints, where many confidences tie), we by a float32 log-probability (positions whose
confidences agree to ~1e-7 relative may be kept in another order; an exact tie keeps the higher
position index).

Randomness: one seed for the whole call (``seed=None`` draws it from torch's default generator,
so ``torch.manual_seed`` controls it), a distinct op offset per step. Samples are therefore not
bit-identical to LLaDA's ``torch.rand`` stream, only identically distributed. Steps in which no
row fixes any token (``steps_per_block`` larger than the block) are skipped without calling the
model: they change nothing.

Return value: the ``[B, l + gen_length]`` tensor, as LLaDA's ``generate``; Fast-dLLM's returns
``(x, nfe)``.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import _rng
from ..ops import guided_sample, head_sample, remask_lowest_confidence, self_guided_step
from . import _fused_head

REMASKING = ("low_confidence", "random")
EOS_ID, EOT_ID = 126081, 126348  # LLaDA's <|endoftext|> and <|eot_id|>, as its generate.py hard-codes them


def get_num_transfer_tokens(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's split of a block over its steps: int64 ``[B, steps]``, row sums = masked count.

    ``masked // steps`` per step, plus one on the first ``masked % steps`` steps (vectorised).
    """
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    extra = torch.arange(steps, device=block_mask_index.device)[None, :] < remainder
    return base + extra.to(torch.int64)


def factor_count(conf: torch.Tensor, candidates: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM's factor rule: how many of the most confident candidates to fix, int64 ``[B]``.

    With the candidates' confidences sorted, c_1 >= c_2 >= ... >= c_N, and thresholds
    ``t_n = 1 - factor / (n + 1)`` (``t_1 = -1``): ``f`` = the first n with ``c_n < t_n``, minus one
    (N if none); the count is ``f``, or N when ``f >= N - 1`` (Fast-dLLM's loop ends there).
    """
    n_cand = candidates.sum(-1)
    sorted_conf = torch.sort(torch.where(candidates, conf, -math.inf), dim=-1, descending=True).values
    idx = torch.arange(conf.shape[-1], device=conf.device)
    thresh = 1 - float(factor) / (idx + 2).to(torch.float64)
    thresh[0] = -1.0
    fail = (idx[None, :] < n_cand[:, None]) & (sorted_conf < thresh[None, :])
    first_fail = torch.where(fail.any(-1), fail.to(torch.int8).argmax(-1), n_cand)
    return torch.where(first_fail >= n_cand - 1, n_cand, first_fail)


def _guided_at(logits, uncond_logits, scale, index):
    """The op's float32 guided logits ``u + (1 + s)(l - u)`` at ``index`` ``[B, L, k]`` only."""
    c = logits.gather(-1, index).float()
    if uncond_logits is None:
        return c
    u = uncond_logits.gather(-1, index).float()
    return u + (1.0 + scale) * (c - u)


def _confidence(tokens, logp, logits, uncond_logits, scale, remasking, drop_ids, seed, offset):
    """float64 ``[B, L]`` confidence of the sampled tokens (probability, or a uniform number for random)."""
    if remasking == "random":  # Fast-dLLM's random confidence: a uniform number per position, keyed by (seed, offset)
        gen = torch.Generator(device=tokens.device).manual_seed((seed * _rng.SEED_STRIDE + offset) % (2**63 - 1))
        return torch.rand(tokens.shape, generator=gen, device=tokens.device, dtype=torch.float64)
    conf = logp.double().exp()
    if drop_ids:
        # softmax without the dropped ids: p / (1 - p(dropped)); p(id) = exp(g[id] - log Z), log Z = g[token] - logp
        log_z = _guided_at(logits, uncond_logits, scale, tokens[..., None])[..., 0].double() - logp.double()
        ids = torch.tensor(drop_ids, device=tokens.device).expand(*tokens.shape, len(drop_ids))
        p_drop = (_guided_at(logits, uncond_logits, scale, ids).double() - log_z[..., None]).exp().sum(-1)
        conf = conf / (1 - p_drop).clamp_min(1e-300)
        conf = torch.where((tokens[..., None] == ids).any(-1), 0.0, conf)
    return conf


def llada_step(
    x: torch.Tensor,
    candidates: torch.Tensor,
    logits: torch.Tensor,
    uncond_logits: torch.Tensor | None,
    num_transfer: torch.Tensor | None,
    *,
    cfg_scale: float = 0.0,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    threshold: float | None = None,
    factor: float | None = None,
    confidence_drop_ids: tuple[int, ...] = (),
    seed: int | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """One fused LLaDA step: returns ``x`` with the chosen candidates set to their sampled token.

    Args:
        x: int64 ``[B, L]`` current sequence (mask id at masked positions).
        candidates: bool ``[B, L]``: positions that may be fixed this step (masked, before the
            end of the current block).
        logits: ``[B, L, V]`` conditional logits; ``uncond_logits``: the unconditional half for
            CFG, or None (then ``cfg_scale`` is ignored). Any strides; float32/bf16/fp16.
        num_transfer: int64 ``[B]``: how many candidates to fix per row (ignored with ``threshold``
            or ``factor``).
        cfg_scale, temperature: as in LLaDA's ``generate``.
        remasking: ``"low_confidence"`` or ``"random"``.
        threshold: Fast-dLLM: fix every candidate whose confidence is >= threshold, and at least
            the most confident one per row that has candidates.
        factor: Fast-dLLM's factor rule (see :func:`factor_count`).
        confidence_drop_ids: token ids taken out of the confidence softmax (confidence 0 when
            sampled); LLaDA's ``confidence_eos_eot_inf`` passes ``(EOS_ID, EOT_ID)``.
        seed, offset: the op RNG stream.
    """
    scale = float(cfg_scale) if uncond_logits is not None else 0.0
    ranked = remasking == "low_confidence" and not confidence_drop_ids
    if threshold is None and factor is None and (ranked or remasking == "random"):
        n_remask = (candidates.sum(-1) - num_transfer).clamp_min(0)
        if ranked:
            new_x, _ = self_guided_step(x, candidates, logits, uncond_logits, n_remask, guidance_scale=scale,
                                        temperature=temperature, choice_temperature=0.0, seed=seed, offset=offset)
            return new_x
        # random: sample every candidate (nothing re-masked), then re-mask a uniform random subset.
        sampled, _ = self_guided_step(x, candidates, logits, uncond_logits, 0, guidance_scale=scale,
                                      temperature=temperature, choice_temperature=0.0, seed=seed, offset=offset)
        zeros = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        remask = remask_lowest_confidence(zeros, candidates, n_remask, choice_temperature=1.0, seed=seed, offset=offset)
        return torch.where(remask, x, sampled)
    # Fast-dLLM's threshold / factor rules: only the candidate rows are sampled (their logits gathered,
    # [K, V]); the decoded rows of the window are never read. (On CUDA, nonzero costs one host sync.)
    rows = candidates.nonzero(as_tuple=True)
    if rows[0].numel() == candidates.numel():  # every row: the same rows in the same order, without the copy
        cond_k = logits.reshape(-1, logits.shape[-1])
        uncond_k = None if uncond_logits is None else uncond_logits.reshape(-1, logits.shape[-1])
    else:
        cond_k = logits[rows]
        uncond_k = None if uncond_logits is None else uncond_logits[rows]
    tokens_k, logp_k = guided_sample(cond_k, uncond_k, guidance_scale=scale, temperature=temperature,
                                     seed=seed, offset=offset)
    conf_k = _confidence(tokens_k, logp_k, cond_k, uncond_k, scale, remasking,
                         tuple(confidence_drop_ids) if remasking == "low_confidence" else (), seed, offset)
    tokens = x.clone()
    tokens[rows] = tokens_k
    conf = torch.full(x.shape, -math.inf, dtype=torch.float64, device=x.device)
    conf[rows] = conf_k
    if threshold is not None:
        keep = candidates & (conf >= threshold)
        best = torch.zeros_like(candidates).scatter_(1, conf.argmax(-1, keepdim=True), True)
        keep |= best & candidates
        return torch.where(keep, tokens, x)
    k = factor_count(conf, candidates, factor) if factor is not None else num_transfer
    # keep the k most confident candidates = re-mask the others (ties: the higher index is kept)
    remask = remask_lowest_confidence(conf.float(), candidates, (candidates.sum(-1) - k).clamp_min(0),
                                      choice_temperature=0.0, seed=seed, offset=offset)
    return torch.where(candidates & ~remask, tokens, x)


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def _check_args(prompt, attention_mask, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id,
                logits_eos_inf, confidence_eos_eot_inf, threshold, factor):
    if not isinstance(prompt, torch.Tensor) or prompt.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prompt: expected an int64 tensor [B, l], got {getattr(prompt, 'dtype', type(prompt).__name__)}")
    if prompt.dim() != 2:
        raise ValueError(f"prompt: expected shape [B, l], got {tuple(prompt.shape)}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask: expected a tensor [B, l] or None, got {type(attention_mask).__name__}")
        if attention_mask.shape != prompt.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(prompt.shape)} (the prompt's), "
                             f"got {tuple(attention_mask.shape)}")
    for name, v in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:  # numpy integers too
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    steps, gen_length, block_length = int(steps), int(gen_length), int(block_length)
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks (gen_length // block_length = {num_blocks})")
    if isinstance(temperature, bool) or not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
                                             and temperature >= 0):
        raise ValueError(f"temperature: expected a finite float >= 0, got {temperature!r}")
    if isinstance(cfg_scale, bool) or not (isinstance(cfg_scale, numbers.Real) and math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale: expected a finite float, got {cfg_scale!r}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking: expected one of {REMASKING}, got {remasking!r}")
    if isinstance(mask_id, bool) or not isinstance(mask_id, numbers.Integral):
        raise TypeError(f"mask_id: expected an int, got {type(mask_id).__name__}")
    if mask_id < 0:
        raise ValueError(f"mask_id: expected an id in the model's vocabulary, got {mask_id}")
    _check_flag("logits_eos_inf", logits_eos_inf)
    _check_flag("confidence_eos_eot_inf", confidence_eos_eot_inf)
    if threshold is not None and not (isinstance(threshold, numbers.Real) and math.isfinite(threshold)):
        raise ValueError(f"threshold: expected a finite float or None, got {threshold!r}")
    if factor is not None and not (isinstance(factor, numbers.Real) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor: expected a finite float > 0 or None, got {factor!r}")
    if threshold is not None and factor is not None:
        raise ValueError("threshold, factor: pass one of them, not both")
    return num_blocks


def _check_vocab(vocab, mask_id, logits_eos_inf, confidence_eos_eot_inf):
    if mask_id >= vocab:
        raise ValueError(f"mask_id: {mask_id} is outside the model's vocabulary (V = {vocab})")
    for flag, on, ids in (("logits_eos_inf", logits_eos_inf, (EOS_ID,)),
                          ("confidence_eos_eot_inf", confidence_eos_eot_inf, (EOS_ID, EOT_ID))):
        if on and max(ids) >= vocab:
            raise ValueError(f"{flag}: LLaDA's token id {max(ids)} is outside the model's vocabulary (V = {vocab})")


def _model_logits(model, x, attention_mask, prompt_index, cfg_scale, mask_id):
    """(cond, uncond or None): views into the model's output, the CFG blend is left to the op.

    ``attention_mask`` is already extended over the answer (and doubled for CFG), or None.
    """
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    if cfg_scale > 0:
        un_x = torch.where(prompt_index, torch.full_like(x, mask_id), x)
        logits = model(torch.cat([x, un_x], dim=0), **kw).logits
        cond, uncond = logits.chunk(2, dim=0)
        return cond, uncond
    return model(x, **kw).logits, None


def _fused_llada_step(fh, x, attention_mask, prompt_index, end, num_transfer, bias, *, cfg_scale, temperature,
                      remasking, mask_id, seed, offset):
    """One step on the fused-head path: the backbone's hidden states, ``head_sample`` on the candidate
    rows of ``[:, :end]`` (CFG blended on the hidden states), then llada_step's re-masking. The same
    streams as :func:`llada_step` (rows ``b * end + j``, op offset), so the same tokens up to rounding."""
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    window = x[:, :end]
    candidates = window == mask_id
    if cfg_scale > 0:
        un_x = torch.where(prompt_index, torch.full_like(x, mask_id), x)
        cond, uncond = fh.hidden(torch.cat([x, un_x], dim=0), **kw).chunk(2, dim=0)
        uncond = uncond[:, :end]
    else:
        cond, uncond = fh.hidden(x, **kw), None
    scale = float(cfg_scale) if uncond is not None else 0.0
    tokens, logp = head_sample(cond[:, :end], fh.weight, bias, uncond, guidance_scale=scale, temperature=temperature,
                               seed=seed, offset=offset, rows=candidates)
    n_remask = (candidates.sum(-1) - num_transfer).clamp_min(0)
    if remasking == "random":
        logp = torch.zeros(window.shape, dtype=torch.float32, device=x.device)
    remask = remask_lowest_confidence(logp, candidates, n_remask, choice_temperature=1.0 if remasking == "random" else 0.0,
                                      seed=seed, offset=offset)
    return torch.cat([torch.where(candidates & ~remask, tokens, window), x[:, end:]], dim=1)


def _model_device(model, prompt):
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else prompt.device


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = 126336,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    *,
    seed: int | None = None,
    threshold: float | None = None,
    factor: float | None = None,
    head=None,
    fused_head: bool = True,
) -> torch.Tensor:
    """LLaDA's ``generate()`` with fused steps (see the module docstring for the exact semantics).

    Args:
        model: any callable ``model(x[, attention_mask=...])`` returning an object with ``.logits``
            ``[B, L, V]`` (a HF ``AutoModel`` of LLaDA, or anything shaped like it). It must accept a
            ``[2B, L]`` batch when ``cfg_scale > 0``. ``x`` is created on ``model.device`` when the
            model has one, else on ``prompt.device``.
        prompt: int64 ``[B, l]`` prompts, left-padded when of different lengths.
        attention_mask: ``[B, l]`` (1 = token, 0 = padding) or None; passed to the model extended
            with ones over the answer. The model is called without it when it is None.
        steps: total steps, a multiple of ``gen_length // block_length``.
        gen_length, block_length: answer length, and block length (a divisor of ``gen_length``).
        temperature: softmax temperature of the token sample; 0 = greedy.
        cfg_scale: classifier-free guidance: ``un + (cfg_scale + 1) (cond - un)`` when > 0.
        remasking: ``"low_confidence"`` or ``"random"``.
        mask_id: the [MASK] token id, inside the model's vocabulary.
        logits_eos_inf: never sample EOS (``EOS_ID``).
        confidence_eos_eot_inf: rank EOS/EoT last (see the module docstring).
        seed: RNG seed of the fused ops (None: drawn from torch's default generator).
        threshold: Fast-dLLM parallel decoding by confidence threshold (see the module docstring).
        factor: Fast-dLLM parallel decoding by the factor rule (see :func:`factor_count`).
        head: the LM head (``nn.Linear`` or ``(weight, bias)``) when ``model`` is a backbone returning
            hidden states; None: found on HF models (sgkernels/integrations/_fused_head.py).
        fused_head: with a known head, and top-k remasking (``low_confidence`` without
            ``confidence_eos_eot_inf``, or ``random``) without ``threshold``/``factor``: run the backbone
            without its head and project only the candidate rows of ``[:, :block_end]`` with
            :func:`sgkernels.head_sample` (CFG blended on the hidden states: one GEMM), so no
            ``[B, L, V]`` logits exist. Greedy decoding gives the logits path's tokens; sampling the
            same tokens up to float rounding. On CUDA a step costs one host sync (the candidates'
            count). False: always the logits path.
    Returns:
        int64 ``[B, l + gen_length]``: prompt followed by the answer.
    Raises:
        ValueError/TypeError on bad arguments, naming the argument (``gen_length % block_length != 0``,
        ``steps % num_blocks != 0``, unknown ``remasking``, ``attention_mask`` not ``[B, l]``,
        ``mask_id`` outside the vocabulary ...).
    """
    num_blocks = _check_args(prompt, attention_mask, steps, gen_length, block_length, temperature, cfg_scale,
                             remasking, mask_id, logits_eos_inf, confidence_eos_eot_inf, threshold, factor)
    # numpy scalars (accepted by the checks) as Python numbers from here on
    steps, gen_length, block_length, mask_id = int(steps), int(gen_length), int(block_length), int(mask_id)
    temperature, cfg_scale = float(temperature), float(cfg_scale)
    steps_per_block = steps // num_blocks
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and mask_id >= vocab:  # checked again on the logits: the config may lack it
        raise ValueError(f"mask_id: {mask_id} is outside the model's vocabulary (V = {vocab})")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    batch, plen = prompt.shape
    device = _model_device(model, prompt)
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.int64, device=device)
    x[:, :plen] = prompt
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, gen_length)], dim=-1)
        if cfg_scale > 0:
            attention_mask = torch.cat([attention_mask, attention_mask], dim=0)
    prompt_index = x != mask_id
    drop_ids = (EOS_ID, EOT_ID) if confidence_eos_eot_inf else ()
    step_kw = dict(cfg_scale=cfg_scale, temperature=temperature, remasking=remasking, threshold=threshold,
                   factor=factor, confidence_drop_ids=drop_ids, seed=seed)
    checked = False
    offset = 0
    top_k_rule = threshold is None and factor is None and (remasking == "random" or not drop_ids)
    fh = _fused_head.resolve(model, head, fused_head) if top_k_rule else None
    fused_bias = None
    if fh is not None:
        _check_vocab(fh.weight.shape[0], mask_id, logits_eos_inf, confidence_eos_eot_inf)
        fused_bias = fh.bias
        if logits_eos_inf:  # EOS never sampled: -inf in the head's bias
            fused_bias = (torch.zeros(fh.weight.shape[0], device=fh.weight.device, dtype=torch.float32)
                          if fh.bias is None else fh.bias.float().clone())
            fused_bias[EOS_ID] = -math.inf

    def step(end, num_transfer):
        nonlocal checked, offset, x
        if fh is not None:
            x = _fused_llada_step(fh, x, attention_mask, prompt_index, end, num_transfer, fused_bias,
                                  cfg_scale=cfg_scale, temperature=temperature, remasking=remasking, mask_id=mask_id,
                                  seed=seed, offset=offset)
            offset += 1
            return
        logits, uncond = _model_logits(model, x, attention_mask, prompt_index, cfg_scale, mask_id)
        if not checked:
            _check_vocab(logits.shape[-1], mask_id, logits_eos_inf, confidence_eos_eot_inf)
            checked = True
        if logits_eos_inf:
            logits[..., EOS_ID] = -math.inf  # on the conditional half: the CFG blend is then -inf too
        window = x[:, :end]  # LLaDA: confidence = -inf after the block; masks before it stay candidates
        new = llada_step(window, window == mask_id, logits[:, :end], None if uncond is None else uncond[:, :end],
                         num_transfer, offset=offset, **step_kw)
        x = torch.cat([new, x[:, end:]], dim=1)
        offset += 1

    for block in range(num_blocks):
        start = plen + block * block_length
        end = start + block_length
        if threshold is None and factor is None:
            num_transfer = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
            active = num_transfer.any(0).tolist()  # one host copy per block
            for i in range(steps_per_block):
                if active[i]:  # else no row fixes a token at this step: LLaDA's step would change nothing
                    step(end, num_transfer[:, i])
        else:
            # Each step fixes at least one candidate per row, so block_length steps suffice unless the
            # model samples mask_id itself; cap the loop instead of hanging on such a model.
            for _ in range(4 * block_length):
                if not bool((x[:, start:end] == mask_id).any()):
                    break
                step(end, None)
            if bool((x[:, start:end] == mask_id).any()):
                raise RuntimeError(
                    f"parallel decoding: block {block} still has masked positions after {4 * block_length} steps "
                    f"(the model keeps predicting mask_id={mask_id})"
                )
    return x


# ------------------------------------------------------------------------------------------------
# Fast-dLLM v1's KV-cache variants (NVlabs/Fast-dLLM, llada/generate.py)


def _forward_takes(model, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


@torch.no_grad()
def _generate_cached(model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id, threshold,
                     factor, seed, dual):
    num_blocks = _check_args(prompt, None, steps, gen_length, block_length, temperature, 0.0, remasking, mask_id,
                             False, False, threshold, factor)
    if not _forward_takes(model, "past_key_values"):
        raise ValueError("model: its forward takes no `past_key_values` (Fast-dLLM's KV-cache API, as its "
                         "modeling_llada.py provides it); use generate()")
    if dual and not _forward_takes(model, "replace_position"):
        raise ValueError("model: its forward takes no `replace_position` (Fast-dLLM's dual-cache API); "
                         "use generate_with_prefix_cache()")
    steps_per_block = steps // num_blocks
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    batch, plen = prompt.shape
    device = _model_device(model, prompt)
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.int64, device=device)
    x[:, :plen] = prompt
    kw = dict(temperature=temperature, remasking=remasking, threshold=threshold, factor=factor, seed=seed)
    by_count = threshold is None and factor is None
    nfe = offset = 0
    for block in range(num_blocks):
        start, end = plen + block * block_length, plen + (block + 1) * block_length
        num_transfer = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block) if by_count else None
        # the first step of the block: the whole sequence, which also fills the cache
        out = model(x, use_cache=True)
        nfe += 1
        if offset == 0:
            _check_vocab(out.logits.shape[-1], mask_id, False, False)
        candidates = x == mask_id
        candidates[:, end:] = False
        x = llada_step(x, candidates, out.logits, None, None if num_transfer is None else num_transfer[:, 0],
                       offset=offset, **kw)
        offset += 1
        past = out.past_key_values
        if dual:  # the block's own entries are replaced in place by the model at every step
            replace = torch.zeros_like(x, dtype=torch.bool)
            replace[:, start:end] = True
        else:  # the prefix only: the block and everything after it are recomputed at every step
            past = [tuple(t[:, :, :start] for t in layer) for layer in past]
        i = 1
        while True:  # Fast-dLLM runs at least one cached step per block, then stops when the block is done
            if dual:
                logits = model(x[:, start:end], past_key_values=past, use_cache=True, replace_position=replace).logits
            else:
                logits = model(x[:, start:], past_key_values=past, use_cache=True).logits
            nfe += 1
            block_x = x[:, start:end]
            n = None
            if by_count:
                n = num_transfer[:, i] if i < steps_per_block else torch.zeros_like(num_transfer[:, 0])
            x[:, start:end] = llada_step(block_x, block_x == mask_id, logits[:, :block_length], None, n, offset=offset,
                                         **kw)
            offset += 1
            if not bool((x[:, start:end] == mask_id).any()):
                break
            i += 1
            if i > 4 * block_length + steps_per_block:
                raise RuntimeError(f"block {block} still has masked positions after {i} cached steps "
                                   f"(the model keeps predicting mask_id={mask_id})")
    return x, nfe


def generate_with_prefix_cache(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0.0,
                               remasking="low_confidence", mask_id=126336, threshold=None, factor=None, *,
                               seed=None):
    """Fast-dLLM's ``generate_with_prefix_cache`` with fused steps: returns ``(x, nfe)``.

    Per block: one forward of the whole sequence with ``use_cache=True`` (its logits make the block's
    first step, its ``past_key_values`` cut to the prefix before the block), then steps on
    ``x[:, block_start:]`` against that prefix cache (``model(x[:, start:], past_key_values=...,
    use_cache=True)``), until the block has no mask (at least one cached step, as Fast-dLLM). Each
    step is :func:`llada_step` on the block (``threshold``, ``factor`` or the ``steps`` split, as
    :func:`generate`). ``nfe``: the model calls. The model must take Fast-dLLM's KV-cache API (its
    ``modeling_llada.py``): ``past_key_values`` a list of ``(key, value)`` per layer, ``[B, heads, L, d]``.
    The cache is exact only for models whose prefix keys do not depend on later tokens; for LLaDA
    (bidirectional) it is Fast-dLLM's approximation.
    """
    return _generate_cached(model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id,
                            threshold, factor, seed, dual=False)


def generate_with_dual_cache(model, prompt, steps=128, gen_length=128, block_length=128, temperature=0.0,
                             remasking="low_confidence", mask_id=126336, threshold=None, factor=None, *, seed=None):
    """Fast-dLLM's ``generate_with_dual_cache`` with fused steps: returns ``(x, nfe)``.

    As :func:`generate_with_prefix_cache`, but the cache of the whole sequence (prefix and suffix) is
    kept, and each step runs only the block: ``model(x[:, start:end], past_key_values=...,
    use_cache=True, replace_position=...)`` (the model replaces the block's cache entries in place,
    as Fast-dLLM's modeling code does). Needs ``replace_position`` in the model's forward.
    """
    return _generate_cached(model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id,
                            threshold, factor, seed, dual=True)
