"""Dream's ``diffusion_generate`` with the sampling step done by sgkernels' ops.

:func:`diffusion_generate` mirrors ``model.diffusion_generate`` of Dream (``Dream-org/Dream-v0-*``
``generation_utils.py``, also shipped in ``NVlabs/Fast-dLLM`` ``dream/model``): same arguments, same
generation config resolution, same model call, same return value. :func:`patch` installs it on a
loaded Dream model::

    model = AutoModel.from_pretrained("Dream-org/Dream-v0-Instruct-7B", trust_remote_code=True)
    sgkernels.integrations.dream.patch(model)
    out = model.diffusion_generate(input_ids, attention_mask=mask, max_new_tokens=256, steps=256,
                                   temperature=0.2, top_p=0.95, alg="entropy", alg_temp=0.0)

Semantics, as Dream's ``_sample``:

* ``x`` = the inputs padded with ``mask_token_id`` to ``max_length`` (``max_new_tokens`` + input
  length when given; Dream's default-length rules otherwise); with an ``attention_mask`` that has
  zeros (left padding), the model gets the ``[B, 1, N, N]`` bool mask ``m_i & m_j`` and position ids
  ``cumsum(m) - 1`` (1 at padding); otherwise ``attention_mask="full"`` and no position ids. The
  model is called as ``model(x, attention_mask, position_ids)``;
* Dream's logits are shifted by one: position j is predicted by the output at j - 1 (position 0 by
  its own output). Here the shift is a view (no copy) unless position 0 is masked;
* ``steps`` steps on ``timesteps = linspace(1, eps, steps + 1)``; at step i, with ``t, s`` the
  timesteps i and i + 1, and ``k = int(mean masked count per row * (1 - s / t))`` (all of them at
  the last step), computed with the same float32 tensor arithmetic as Dream:
  - ``alg="origin"``: each masked position is revealed with probability ``1 - s / t`` (1 at the last
    step) with a token sampled from the filtered, tempered distribution;
  - ``"maskgit_plus" | "topk_margin" | "entropy"``: every masked position gets a token sampled
    (argmax when ``temperature == 0``) from ``softmax(filter(logits / temperature))``, with
    confidence ``"prob"``, ``"margin"`` or ``"entropy"`` (:mod:`sgkernels.ops.filters`); per row the
    ``k`` most confident are kept (``alg_temp`` in (None, 0)), or ``k`` drawn without replacement
    from ``softmax(confidence / alg_temp)`` (Gumbel top-k: the same distribution as Dream's
    ``torch.multinomial``);
* filters: ``top_p`` (None or 1 = off) and ``top_k`` (None or 0 = off) on the tempered
  distribution, intersected as Dream does (:mod:`sgkernels.ops.filters` states the tie rule);
* ``generation_tokens_hook_func(step, x, logits)`` / ``generation_logits_hook_func(step, x, logits)``
  are called as Dream calls them (the shifted logits are materialised only when a hook is given);
* returns ``x``, or with ``return_dict_in_generate`` a :class:`DreamModelOutput` with
  ``sequences`` and ``history`` (the ``x`` after each step, with ``output_history``).

Where it differs (deliberately): randomness comes from the sgkernels ops (one ``seed`` per call,
keyword-only, None = drawn from torch's default generator), so samples are identically distributed
but not bit-identical to Dream's ``torch.rand`` / ``Categorical`` / ``multinomial`` stream; greedy
decoding is token-for-token Dream's (confidence in float32, ties: the higher position index is
kept). Confidences are computed in float32 (Dream: in the logits' dtype, bfloat16 for the released
checkpoints, where many tie). A row with fewer masked positions than ``k`` (a prompt that contains
mask tokens) keeps all of them; Dream would write mask tokens over that row's prompt. Dream prints
nothing here. Fast-dLLM's ``alg="confidence_threshold"`` and its cached ``generation_utils_block``
variants are not supported.

What runs per step: for ``maskgit_plus``, ``topk_margin`` and ``entropy``, one
:func:`sgkernels.self_guided_step` on the shifted view of the logits (no copy): it samples the
masked positions from the tempered, filtered distribution, computes Dream's confidence in the same
pass (``confidence="prob" | "margin" | "entropy"``) and re-masks the least confident (with
``choice_temperature=alg_temp``). For ``origin``, one :func:`sgkernels.guided_sample` with the
filters on the masked rows.

Fused head (``fused_head=True``, the default, when the head is known: Dream's HF ``lm_head`` beside
its base model, or ``head=``; see sgkernels/integrations/_fused_head.py): the backbone runs without
its head and :func:`sgkernels.head_sample` projects only the rows that are sampled, so no
``[B, N, V]`` logits exist. The shift moves to the hidden states (position j reads hidden state
j - 1, position 0 its own), and the rows keep the logits path's Philox keys, so the tokens are the
logits path's (greedy: exactly, up to near-ties of the GEMM's rounding; sampled: the same for the
same seed, up to that rounding). Per step: ``origin`` projects the revealed masked rows only; the
other algs sample every masked row with the confidence (head_sample's row-chunk path: filters and
Dream's confidences need the whole row) and re-mask with :func:`sgkernels.remask_lowest_confidence`,
as self_guided_step does. With a ``generation_tokens_hook_func`` or ``generation_logits_hook_func``
(they receive the logits) the logits path is used.
"""
from __future__ import annotations

import copy
import math
import numbers
import types
import warnings
from dataclasses import dataclass

import torch

from .. import _rng
from ..ops import guided_sample, head_sample, remask_lowest_confidence, self_guided_step
from ..ops._validate import check_filters
from . import _fused_head

try:
    from transformers.utils import ModelOutput
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("sgkernels.integrations.dream needs transformers: pip install transformers") from e

__all__ = ["ALGS", "DreamModelOutput", "diffusion_generate", "dream_step", "fused_dream_step", "patch"]

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
_CONFIDENCE = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "entropy"}
# DreamGenerationConfig's fields and defaults
_DEFAULTS = dict(
    temperature=0.0, top_p=None, top_k=None, max_length=20, max_new_tokens=None, eps=1e-3, steps=512,
    alg="origin", alg_temp=None, num_return_sequences=1, return_dict_in_generate=False, output_history=False,
    mask_token_id=None, pad_token_id=None, bos_token_id=None, eos_token_id=None, generation_kwargs=None,
)
_SPECIAL = ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")


@dataclass
class DreamModelOutput(ModelOutput):
    """What Dream's ``diffusion_generate`` returns with ``return_dict_in_generate=True``."""

    sequences: torch.LongTensor = None
    history: tuple[torch.LongTensor] | None = None


def _resolve_config(model, generation_config, kwargs) -> types.SimpleNamespace:
    """Dream's ``_prepare_generation_config``: config (or the model config) updated by ``kwargs``."""
    unknown = sorted(set(kwargs) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"diffusion_generate: unexpected keyword argument(s) {unknown}")
    cfg = dict(_DEFAULTS)
    source = generation_config if generation_config is not None else getattr(model, "config", None)
    for key in cfg:
        value = getattr(source, key, None) if source is not None else None
        if value is not None or generation_config is not None:
            cfg[key] = value if value is not None else cfg[key]
    if generation_config is not None:  # Dream: special tokens fall back to the model's generation config
        fallback = getattr(model, "generation_config", None)
        for key in _SPECIAL:
            if cfg[key] is None and fallback is not None:
                cfg[key] = getattr(fallback, key, None)
    cfg.update(kwargs)
    return types.SimpleNamespace(**cfg)


def _check_config(c) -> None:
    if c.alg not in ALGS:
        hint = " (Fast-dLLM's confidence_threshold is not supported)" if c.alg == "confidence_threshold" else ""
        raise ValueError(f"alg: expected one of {ALGS}, got {c.alg!r}{hint}")
    # numbers.Integral / numbers.Real: numpy scalars too; normalised to int / float in place
    if isinstance(c.steps, bool) or not isinstance(c.steps, numbers.Integral) or c.steps < 1:
        raise ValueError(f"steps: expected a positive int, got {c.steps!r}")
    c.steps = int(c.steps)
    for name in ("temperature", "eps"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}: expected a finite float >= 0, got {v!r}")
        setattr(c, name, float(v))
    if c.eps >= 1:
        raise ValueError(f"eps: expected a float in [0, 1), got {c.eps!r}")
    if c.alg_temp is not None and (isinstance(c.alg_temp, bool) or not isinstance(c.alg_temp, numbers.Real)
                                   or not math.isfinite(c.alg_temp) or c.alg_temp < 0):
        raise ValueError(f"alg_temp: expected None or a finite float >= 0, got {c.alg_temp!r}")
    if c.alg_temp is not None:
        c.alg_temp = float(c.alg_temp)
    top_k, top_p, _ = check_filters(0 if c.top_k is None else c.top_k, 1.0 if c.top_p is None else c.top_p)
    c.top_k, c.top_p = (None if c.top_k is None else top_k), (None if c.top_p is None else top_p)
    n = c.num_return_sequences
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"num_return_sequences: expected a positive int, got {n!r}")
    c.num_return_sequences = int(n)
    if c.mask_token_id is None:
        raise ValueError("mask_token_id: not set (pass it, or load a model whose config has it)")
    if isinstance(c.mask_token_id, bool) or not isinstance(c.mask_token_id, numbers.Integral) or c.mask_token_id < 0:
        raise ValueError(f"mask_token_id: expected an id in the model's vocabulary, got {c.mask_token_id!r}")
    c.mask_token_id = int(c.mask_token_id)


def _prepare_length(model, c, input_len: int, max_length_passed: bool) -> int:
    """Dream's ``_prepare_generated_length`` and ``_validate_generated_length``: the final ``max_length``."""
    has_default_max_length = not max_length_passed and c.max_length is not None
    max_length = c.max_length
    if c.max_new_tokens is not None:
        max_length = c.max_new_tokens + input_len
    elif has_default_max_length and max_length == _DEFAULTS["max_length"]:
        warnings.warn(
            f"Using the model-agnostic default `max_length` (={max_length}) to control the generation length. "
            "We recommend setting `max_new_tokens` to control the maximum length of the generation.", UserWarning)
        max_length = max_length + input_len
        max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if max_pos is not None:
            max_length = min(max_length, max_pos)
    if input_len >= max_length:
        raise ValueError(f"max_length: input length of input_ids is {input_len}, but `max_length` is set to "
                         f"{max_length}; increase `max_length` or set `max_new_tokens`.")
    return max_length


def _attention(attention_mask, x, max_length):
    """Dream's mask handling: ``("full", None)`` or (``[B, 1, N, N]`` bool mask, position ids)."""
    if attention_mask is None or not bool((attention_mask == 0).any()):
        return "full", None
    am = torch.nn.functional.pad(attention_mask, (0, max_length - attention_mask.shape[1]), value=1)
    tok_idx = am.long().cumsum(-1) - 1
    tok_idx.masked_fill_(am == 0, 1)
    am4 = torch.logical_and(am.unsqueeze(1).unsqueeze(-2), am.unsqueeze(1).unsqueeze(-1))
    return am4, tok_idx


def transfer_count(num_masked: torch.Tensor, batch: int, t: torch.Tensor, s: torch.Tensor, last: bool) -> int:
    """Dream's ``number_transfer_tokens``, with its float32 tensor arithmetic (one host read)."""
    mean = num_masked / batch
    return int(mean) if last else int(mean * (1 - s / t))


def _filters(top_k, top_p) -> dict:
    top_k_, top_p_, _ = check_filters(0 if top_k is None else top_k, 1.0 if top_p is None else top_p)
    return dict(top_k=top_k_, top_p=top_p_)


def _revealed(x, masked, p_transfer, seed, offset):
    """``origin``: the masked positions revealed this step, each with probability ``p_transfer``
    (uniforms from stream offset ``2 * offset + 1``, keyed by the position in ``x``)."""
    w = _rng.row_words(seed, 2 * offset + 1, torch.arange(x.numel(), device=x.device))
    u = _rng.token_uniform(w[2], w[3]).reshape(x.shape)
    return masked & (u < float(p_transfer))


def dream_step(
    x: torch.Tensor,
    masked: torch.Tensor,
    logits: torch.Tensor,
    k: int,
    *,
    alg: str, temperature: float, top_p: float | None, top_k: int | None, alg_temp: float | None,
    p_transfer: float | torch.Tensor, seed: int, offset: int,
) -> torch.Tensor:
    """One Dream step on ``x`` ``[B, N]`` with the (already shifted) ``logits`` ``[B, N, V]``; returns the new x."""
    filt = _filters(top_k, top_p)
    alg_temp = float(alg_temp or 0.0)
    if alg == "origin":
        masked = _revealed(x, masked, p_transfer, seed, offset)
        if not bool(masked.any()):
            return x
        tokens_m, _ = guided_sample(logits[masked], temperature=temperature, seed=seed, offset=2 * offset, **filt)
        tokens = x.clone()
        tokens[masked] = tokens_m
        return tokens
    # sample every masked position, keep the k most confident (alg_temp > 0: Gumbel top-k of conf / alg_temp)
    # = re-mask the others: one fused op on the (shifted view of the) logits
    n_remask = (masked.sum(-1) - k).clamp_min(0)
    new_x, _ = self_guided_step(x, masked, logits, None, n_remask, temperature=temperature, choice_temperature=alg_temp,
                                confidence=_CONFIDENCE[alg], seed=seed, offset=2 * offset, **filt)
    return new_x


def fused_dream_step(
    x: torch.Tensor,
    masked: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    *,
    alg: str, temperature: float, top_p: float | None, top_k: int | None, alg_temp: float | None,
    p_transfer: float | torch.Tensor, seed: int, offset: int,
) -> torch.Tensor:
    """:func:`dream_step` with ``logits = hidden @ weight.T + bias`` never formed: ``hidden`` ``[B, N, d]``
    (already shifted like the logits), only the sampled rows projected, with the same row keys."""
    filt = _filters(top_k, top_p)
    if alg == "origin":
        masked = _revealed(x, masked, p_transfer, seed, offset)
        if not bool(masked.any()):
            return x
        tokens_m, _ = head_sample(hidden[masked], weight, bias, temperature=temperature, seed=seed, offset=2 * offset,
                                  **filt)
        tokens = x.clone()
        tokens[masked] = tokens_m
        return tokens
    tokens, _, conf = head_sample(hidden, weight, bias, temperature=temperature, confidence=_CONFIDENCE[alg],
                                  seed=seed, offset=2 * offset, rows=masked, **filt)
    n_remask = (masked.sum(-1) - k).clamp_min(0)
    remask = remask_lowest_confidence(conf, masked, n_remask, choice_temperature=float(alg_temp or 0.0), seed=seed,
                                      offset=2 * offset)
    return torch.where(masked & ~remask, tokens, x)


@torch.no_grad()
def diffusion_generate(model, inputs: torch.Tensor | None = None, generation_config=None, *, seed: int | None = None,
                       head=None, fused_head: bool = True, **kwargs):
    """Dream's ``model.diffusion_generate(inputs, generation_config=None, **kwargs)`` (see the module docstring).

    Keyword arguments: ``attention_mask``, ``generation_tokens_hook_func``,
    ``generation_logits_hook_func``, and any field of Dream's generation config (``max_new_tokens``,
    ``max_length``, ``steps``, ``eps``, ``temperature``, ``top_p``, ``top_k``, ``alg``, ``alg_temp``,
    ``output_history``, ``return_dict_in_generate``, ``num_return_sequences``, ``mask_token_id`` ...);
    ``seed``: the sgkernels RNG seed. ``head``: the LM head (``nn.Linear`` or ``(weight, bias)``) when
    ``model`` is a backbone returning hidden states (called ``model(x, attention_mask, position_ids)``);
    None: found on HF models (Dream's ``lm_head``). ``fused_head``: with a known head and no hooks, run
    the backbone without its head and sample with :func:`sgkernels.head_sample` on the sampled rows only
    (module docstring); False: always the logits path. Raises ValueError naming the argument on bad input (``top_p``
    outside (0, 1], ``top_k`` < 0, unknown ``alg``, ``attention_mask`` not shaped like ``inputs``,
    ``mask_token_id`` outside the vocabulary ...), TypeError on unknown keywords.
    """
    kwargs = dict(kwargs)
    attention_mask = kwargs.pop("attention_mask", None)
    tokens_hook = kwargs.pop("generation_tokens_hook_func", None)
    logits_hook = kwargs.pop("generation_logits_hook_func", None)
    max_length_passed = kwargs.get("max_length") is not None
    c = _resolve_config(model, copy.deepcopy(generation_config), kwargs)
    _check_config(c)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"inputs: expected an int64 tensor [B, l], got {getattr(inputs, 'shape', type(inputs).__name__)}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != inputs.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(inputs.shape)} (the inputs'), "
                             f"got {tuple(getattr(attention_mask, 'shape', ()))}")
        attention_mask = attention_mask.to(inputs.device)
    elif c.pad_token_id is not None and bool((inputs == c.pad_token_id).any()):
        warnings.warn("Padding was detected but no attention mask is passed here. For correct generation results, "
                      "please set `attention_mask` when batch-padding inputs.", UserWarning)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    input_ids = inputs.to(torch.int64)
    if c.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(c.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(c.num_return_sequences, dim=0)
    max_length = _prepare_length(model, c, input_ids.shape[1], max_length_passed)
    mask_id = c.mask_token_id
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and mask_id >= vocab:  # checked again on the logits: the config may lack it
        raise ValueError(f"mask_token_id: {mask_id} is outside the model's vocabulary (V = {vocab})")
    x = torch.nn.functional.pad(input_ids, (0, max_length - input_ids.shape[1]), value=mask_id)
    attn, tok_idx = _attention(attention_mask, x, max_length)
    timesteps = torch.linspace(1, c.eps, c.steps + 1, device=x.device)
    histories = [] if (c.return_dict_in_generate and c.output_history) else None
    if tokens_hook is not None:
        x = tokens_hook(None, x, None)
    step_kw = dict(alg=c.alg, temperature=float(c.temperature), top_p=c.top_p, top_k=c.top_k, alg_temp=c.alg_temp,
                   seed=seed)
    hooked = tokens_hook is not None or logits_hook is not None
    fh = None if hooked else _fused_head.resolve(model, head, fused_head)
    if fh is not None and mask_id >= fh.weight.shape[0]:
        raise ValueError(f"mask_token_id: {mask_id} is outside the model's vocabulary (V = {fh.weight.shape[0]})")
    for i in range(c.steps):
        masked = x == mask_id
        if fh is not None:
            x = _fused_step(fh, x, masked, attn, tok_idx, c, timesteps, i, step_kw)
            if histories is not None:
                histories.append(x.clone())
            continue
        out = model(x, attn, tok_idx).logits
        if i == 0 and mask_id >= out.shape[-1]:
            raise ValueError(f"mask_token_id: {mask_id} is outside the model's vocabulary (V = {out.shape[-1]})")
        t, s = timesteps[i], timesteps[i + 1]
        last = i == c.steps - 1
        k = None if c.alg == "origin" else transfer_count(masked.sum(), x.shape[0], t, s, last)
        p_transfer = 1.0 if last else 1 - s / t
        if hooked or bool(masked[:, 0].any()):
            logits = torch.cat([out[:, :1], out[:, :-1]], dim=1)
            if logits_hook is not None:
                logits = logits_hook(i, x, logits)
            if k != 0:
                x = dream_step(x, masked, logits, k, p_transfer=p_transfer, offset=i, **step_kw)
        elif k != 0:  # the shift as a view: positions 1.. are predicted by outputs 0..
            tail = dream_step(x[:, 1:], masked[:, 1:], out[:, :-1], k, p_transfer=p_transfer, offset=i, **step_kw)
            x = torch.cat([x[:, :1], tail], dim=1)
        if tokens_hook is not None:
            x = tokens_hook(i, x, logits)
        if histories is not None:
            histories.append(x.clone())
    if c.return_dict_in_generate:
        return DreamModelOutput(sequences=x, history=histories)
    return x


def _fused_step(fh, x, masked, attn, tok_idx, c, timesteps, i, step_kw):
    """One step of :func:`diffusion_generate` on the fused-head path: the same shift, row keys and
    schedule as the logits path, with the shift applied to the hidden states."""
    t, s = timesteps[i], timesteps[i + 1]
    last = i == c.steps - 1
    k = None if c.alg == "origin" else transfer_count(masked.sum(), x.shape[0], t, s, last)
    if k == 0:  # the step changes nothing (no hook to call): skip the model
        return x
    hid = fh.hidden(x, attn, tok_idx)
    p_transfer = 1.0 if last else 1 - s / t
    kw = dict(p_transfer=p_transfer, offset=i, **step_kw)
    if bool(masked[:, 0].any()):  # the logits path's materialised shift: rows keyed over all N positions
        shifted = torch.cat([hid[:, :1], hid[:, :-1]], dim=1)
        return fused_dream_step(x, masked, shifted, fh.weight, fh.bias, k, **kw)
    # the logits path's view: positions 1.. are predicted by hidden states 0..
    tail = fused_dream_step(x[:, 1:], masked[:, 1:], hid[:, :-1], fh.weight, fh.bias, k, **kw)
    return torch.cat([x[:, :1], tail], dim=1)


def patch(model):
    """Replace ``model.diffusion_generate`` with :func:`diffusion_generate` (the original is kept as
    ``model._sgkernels_original_diffusion_generate``). Returns the model."""
    if not hasattr(model, "_sgkernels_original_diffusion_generate"):
        model._sgkernels_original_diffusion_generate = getattr(model, "diffusion_generate", None)

    def fused_diffusion_generate(self, inputs=None, generation_config=None, **kwargs):
        return diffusion_generate(self, inputs, generation_config, **kwargs)

    model.diffusion_generate = types.MethodType(fused_diffusion_generate, model)
    return model
