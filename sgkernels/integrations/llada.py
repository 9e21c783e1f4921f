"""LLaDA-style masked-diffusion decoding with one fused op per step.

:func:`generate` is a drop-in for ``generate()`` of the public LLaDA code (``ML-GSAI/LLaDA``,
``generate.py``), with the same arguments and semantics, plus Fast-dLLM's confidence-threshold
parallel decoding (``threshold=``) and a ``seed``:

* the answer (``gen_length`` masks after the prompt) is decoded in ``gen_length // block_length``
  blocks, left to right; each block gets ``steps // num_blocks`` steps, and the number of tokens
  fixed per step is LLaDA's ``get_num_transfer_tokens`` split (masked count // steps, the remainder
  spread over the first steps);
* CFG (``cfg_scale > 0``): the model sees ``[x; x with the prompt masked]`` in one batch and the
  step samples from ``un + (cfg_scale + 1) (cond - un)``, blended inside the fused op;
* ``remasking="low_confidence"`` keeps, per row, the ``k`` candidates whose sampled token has the
  highest untempered probability; ``"random"`` keeps a uniformly random ``k``-subset;
* candidates are the masked positions before the end of the current block (as LLaDA: its
  ``x0_p[:, block_end:] = -inf``); positions after the block are never chosen.

What runs per step: :func:`sgkernels.self_guided_step` (low_confidence: sample the candidates, then
re-mask the ``#candidates - k`` least confident, which keeps exactly LLaDA's top-k), or
``self_guided_step`` with nothing re-masked followed by :func:`sgkernels.remask_lowest_confidence`
on zero log-probabilities with choice temperature 1 (random: the Gumbel noise alone orders the
candidates, so the kept set is a uniform random k-subset, exactly), or
:func:`sgkernels.guided_sample` plus ``[B, L]`` elementwise work (threshold). No ``[B, L, V]``
float64 tensor, no CFG blend tensor, no per-row Python loop.

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
ties: LLaDA orders confidence by a float64 probability, we by a float32 log-probability (positions
whose confidences agree to ~1e-7 relative may be kept in another order; an exact tie keeps the
higher position index).

Randomness: one seed for the whole call (``seed=None`` draws it from torch's default generator,
so ``torch.manual_seed`` controls it), a distinct op offset per step. Samples are therefore not
bit-identical to LLaDA's ``torch.rand`` stream, only identically distributed. Steps in which no
row fixes any token (``steps_per_block`` larger than the block) are skipped without calling the
model: they change nothing.
"""
from __future__ import annotations

import math

import torch

from .. import _rng
from ..ops import guided_sample, remask_lowest_confidence, self_guided_step

REMASKING = ("low_confidence", "random")


def get_num_transfer_tokens(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's split of a block over its steps: int64 ``[B, steps]``, row sums = masked count.

    ``masked // steps`` per step, plus one on the first ``masked % steps`` steps (vectorised).
    """
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    extra = torch.arange(steps, device=block_mask_index.device)[None, :] < remainder
    return base + extra.to(torch.int64)


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
        num_transfer: int64 ``[B]``: how many candidates to fix per row (ignored with ``threshold``).
        cfg_scale, temperature: as in LLaDA's ``generate``.
        remasking: ``"low_confidence"`` or ``"random"``.
        threshold: Fast-dLLM: fix every candidate whose confidence is >= threshold, and at least
            the most confident one per row that has candidates.
        seed, offset: the op RNG stream.
    """
    scale = float(cfg_scale) if uncond_logits is not None else 0.0
    if threshold is None:
        n_remask = (candidates.sum(-1) - num_transfer).clamp_min(0)
        if remasking == "low_confidence":
            new_x, _ = self_guided_step(x, candidates, logits, uncond_logits, n_remask, guidance_scale=scale,
                                        temperature=temperature, choice_temperature=0.0, seed=seed, offset=offset)
            return new_x
        # random: sample every candidate (nothing re-masked), then re-mask a uniform random subset.
        sampled, _ = self_guided_step(x, candidates, logits, uncond_logits, 0, guidance_scale=scale,
                                      temperature=temperature, choice_temperature=0.0, seed=seed, offset=offset)
        zeros = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        remask = remask_lowest_confidence(zeros, candidates, n_remask, choice_temperature=1.0, seed=seed, offset=offset)
        return torch.where(remask, x, sampled)
    tokens, logp = guided_sample(logits, uncond_logits, guidance_scale=scale, temperature=temperature,
                                 seed=seed, offset=offset)
    if remasking == "low_confidence":
        conf = logp.double().exp()
    else:  # Fast-dLLM's random confidence: a uniform number per position, from a stream keyed by (seed, offset)
        gen = torch.Generator(device=x.device).manual_seed((seed * _rng.SEED_STRIDE + offset) % (2**63 - 1))
        conf = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float64)
    conf = torch.where(candidates, conf, -math.inf)
    keep = candidates & (conf >= threshold)
    best = torch.zeros_like(candidates).scatter_(1, conf.argmax(-1, keepdim=True), True)
    keep |= best & candidates
    return torch.where(keep, tokens, x)


def _check_args(prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id, threshold):
    if not isinstance(prompt, torch.Tensor) or prompt.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prompt: expected an int64 tensor [B, l], got {getattr(prompt, 'dtype', type(prompt).__name__)}")
    if prompt.dim() != 2:
        raise ValueError(f"prompt: expected shape [B, l], got {tuple(prompt.shape)}")
    for name, v in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks (gen_length // block_length = {num_blocks})")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature: expected a finite float >= 0, got {temperature!r}")
    if not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale: expected a finite float, got {cfg_scale!r}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking: expected one of {REMASKING}, got {remasking!r}")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise TypeError(f"mask_id: expected an int, got {type(mask_id).__name__}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise ValueError(f"threshold: expected a finite float or None, got {threshold!r}")
    return num_blocks


def _model_logits(model, x, prompt_index, cfg_scale, mask_id):
    """(cond, uncond or None): views into the model's output, the CFG blend is left to the op."""
    if cfg_scale > 0:
        un_x = torch.where(prompt_index, torch.full_like(x, mask_id), x)
        logits = model(torch.cat([x, un_x], dim=0)).logits
        cond, uncond = logits.chunk(2, dim=0)
        return cond, uncond
    return model(x).logits, None


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = 126336,
    *,
    seed: int | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """LLaDA's ``generate()`` with fused steps (see the module docstring for the exact semantics).

    Args:
        model: any callable ``model(x)`` returning an object with ``.logits`` ``[B, L, V]``
            (a HF ``AutoModel`` of LLaDA, or anything shaped like it). It must accept a ``[2B, L]``
            batch when ``cfg_scale > 0``.
        prompt: int64 ``[B, l]`` prompts (a batch of equal-length prompts); ``x`` is created on
            ``prompt.device``.
        steps: total steps, a multiple of ``gen_length // block_length``.
        gen_length, block_length: answer length, and block length (a divisor of ``gen_length``).
        temperature: softmax temperature of the token sample; 0 = greedy.
        cfg_scale: classifier-free guidance: ``un + (cfg_scale + 1) (cond - un)`` when > 0.
        remasking: ``"low_confidence"`` or ``"random"``.
        mask_id: the [MASK] token id.
        seed: RNG seed of the fused ops (None: drawn from torch's default generator).
        threshold: Fast-dLLM parallel decoding: each step fixes every candidate of the current
            block whose confidence (probability of its sampled token; a uniform number with
            ``"random"``) is >= ``threshold``, and at least the most confident one; a block is
            decoded until it has no mask left, so ``steps`` only has to pass the divisibility check.
    Returns:
        int64 ``[B, l + gen_length]``: prompt followed by the answer.
    Raises:
        ValueError/TypeError on bad arguments (``gen_length % block_length != 0``,
        ``steps % num_blocks != 0``, unknown ``remasking`` ...).
    """
    num_blocks = _check_args(prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking,
                             mask_id, threshold)
    steps_per_block = steps // num_blocks
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    batch, plen = prompt.shape
    device = prompt.device
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.int64, device=device)
    x[:, :plen] = prompt
    prompt_index = x != mask_id
    position = torch.arange(x.shape[1], device=device)
    offset = 0
    for block in range(num_blocks):
        start = plen + block * block_length
        end = start + block_length
        in_window = position < end  # LLaDA: confidence = -inf after the block; masks before it stay candidates
        if threshold is None:
            num_transfer = get_num_transfer_tokens(x[:, start:end] == mask_id, steps_per_block)
            active = num_transfer.any(0).tolist()  # one host copy per block
            for i in range(steps_per_block):
                if not active[i]:
                    continue  # no row fixes a token at this step: LLaDA's step would change nothing
                logits, uncond = _model_logits(model, x, prompt_index, cfg_scale, mask_id)
                candidates = (x == mask_id) & in_window
                x = llada_step(x, candidates, logits, uncond, num_transfer[:, i], cfg_scale=cfg_scale,
                               temperature=temperature, remasking=remasking, seed=seed, offset=offset)
                offset += 1
        else:
            # Each step fixes at least one candidate per row, so block_length steps suffice unless the
            # model samples mask_id itself; cap the loop instead of hanging on such a model.
            for _ in range(4 * block_length):
                if not bool((x[:, start:end] == mask_id).any()):
                    break
                logits, uncond = _model_logits(model, x, prompt_index, cfg_scale, mask_id)
                candidates = (x == mask_id) & in_window
                x = llada_step(x, candidates, logits, uncond, None, cfg_scale=cfg_scale, temperature=temperature,
                               remasking=remasking, threshold=threshold, seed=seed, offset=offset)
                offset += 1
            if bool((x[:, start:end] == mask_id).any()):
                raise RuntimeError(
                    f"threshold decoding: block {block} still has masked positions after {4 * block_length} steps "
                    f"(the model keeps predicting mask_id={mask_id})"
                )
    return x
