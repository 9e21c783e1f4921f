"""Block diffusion through diffusers (LLaDA2 / DiffusionGemma): the fused schedulers and pipeline.

Imported by :mod:`sgkernels.integrations.diffusers`, which documents them; needs diffusers >= 0.39
(``BlockRefinementScheduler``, ``EntropyBoundScheduler``, ``LLaDA2Pipeline``); ``FusedDiffusionGemmaPipeline``
needs diffusers >= 0.42 (``DiffusionGemmaPipeline``) and is None before.
"""
from __future__ import annotations

import inspect
import numbers

import torch
from tqdm.auto import tqdm
from diffusers import BlockRefinementScheduler, EntropyBoundScheduler, LLaDA2Pipeline
from diffusers.pipelines.llada2.pipeline_llada2 import LLaDA2PipelineOutput
from transformers import DynamicCache
from diffusers.schedulers.scheduling_block_refinement import BlockRefinementSchedulerOutput
from diffusers.schedulers.scheduling_entropy_bound import EntropyBoundSchedulerOutput

try:  # diffusers >= 0.42
    from diffusers import DiffusionGemmaPipeline
except ImportError:  # pragma: no cover - depends on the install
    DiffusionGemmaPipeline = None

from ..ops import _validate, head_sample
from ..ops.block_refine import block_commit, block_refine_step, check_threshold
from ..ops.entropy_bound import entropy_bound_step
from ..ops.filters import check_filter_order
from ._fused_head import resolve as resolve_head

SAMPLING_METHODS = ("auto", "greedy", "multinomial")


def _seed_tensor(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A 0-dim int64 seed on ``device`` drawn from ``generator`` (torch's default CPU one when None):
    the op reads it from memory, so no host sync."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2**62, (), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def check_sampling_args(temperature, top_p, top_k, sampling_method) -> tuple[float, float, int, bool]:
    """diffusers' sampling arguments -> ``(temperature, top_p, top_k, greedy)`` in the ops' terms
    (``top_p`` None -> 1, ``top_k`` None or <= 0 -> 0); bad values raise naming the argument."""
    if sampling_method not in SAMPLING_METHODS:
        raise ValueError(f"sampling_method: expected one of {SAMPLING_METHODS}, got {sampling_method!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"temperature: expected a float >= 0, got {temperature!r}")
    temperature = _validate.check_float("temperature", temperature)
    if top_p is None:
        top_p = 1.0
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p: expected a float in (0, 1] or None, got {top_p!r}")
    if top_k is None:
        top_k = 0
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k: expected an int or None, got {type(top_k).__name__}")
    use_multinomial = sampling_method == "multinomial" or (sampling_method == "auto" and temperature != 0.0)
    greedy = temperature == 0.0 or not use_multinomial
    return temperature, float(top_p), max(int(top_k), 0), greedy


def _check_block(model_output, sample) -> torch.Tensor:
    """``model_output`` [B, L, V] matching ``sample`` [B, L]; float64 read as float32 (the ops' dtypes)."""
    if not isinstance(sample, torch.Tensor) or sample.dim() != 2:
        raise ValueError(f"sample: expected an int64 tensor [B, L], got {getattr(sample, 'shape', type(sample))}")
    if not isinstance(model_output, torch.Tensor) or model_output.dim() != 3 or \
            tuple(model_output.shape[:2]) != tuple(sample.shape):
        raise ValueError(f"model_output: expected logits of shape [{sample.shape[0]}, {sample.shape[1]}, V] "
                         f"(sample's [B, L]), got {tuple(getattr(model_output, 'shape', ()))}")
    return model_output.float() if model_output.dtype == torch.float64 else model_output


class FusedBlockRefinementScheduler(BlockRefinementScheduler):
    """diffusers' ``BlockRefinementScheduler`` whose ``step`` is one fused op (:func:`sgkernels.ops.block_refine.block_refine_step`).

    Same config, ``set_timesteps``, ``step`` arguments and outputs; ``from_config`` of a stock
    scheduler's config gives it (and ``save_pretrained`` / ``from_pretrained`` round-trip the config).

    * greedy (``temperature == 0`` or ``sampling_method="greedy"``): the same ``prev_sample``,
      ``transfer_index``, ``editing_transfer_index`` and ``sampled_tokens`` as the stock step, and
      ``sampled_probs`` to float rounding, in the mask mode and in the uniform-corruption mode
      (``mask_token_id=None``; the random tokens are drawn with ``torch.randint(generator=...)`` as
      the stock step does, so a seeded generator gives the same ``prev_sample``);
    * sampled: the stock law (top-k, then top-p on the renormalised top-k set: ``filter_order="hf"``;
      ``"dream"`` intersects both on one distribution), drawn by the ops' inverse CDF with one seed
      per step from ``generator``: the same generator state gives the same tokens, not the stock
      ``torch.multinomial`` draws;
    * ties in confidence go to the lower position (the stock step leaves them to ``torch.topk``).

    Stricter than the stock step: ``threshold`` / ``editing_threshold`` NaN, ``top_p`` outside
    (0, 1], ``sampling_method`` unknown, and logits whose ``[B, L]`` differ from ``sample``'s raise
    ValueError naming the argument (the stock step computes on).
    """

    def set_timesteps(self, num_inference_steps, device=None, block_length=None) -> None:
        super().set_timesteps(num_inference_steps, device=device, block_length=block_length)
        self._schedule_host = [int(n) for n in self._transfer_schedule.tolist()]

    def _quota(self, step_index: int) -> int:
        """The step's entry of the transfer schedule (host copy; -1: no schedule, nothing committed)."""
        if self._transfer_schedule is None:
            return -1
        host = getattr(self, "_schedule_host", None)
        if host is None or len(host) != len(self._transfer_schedule):
            host = self._schedule_host = [int(n) for n in self._transfer_schedule.tolist()]
        return host[min(step_index, len(host) - 1)]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.LongTensor,
        *,
        mask_token_id: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        sampling_method: str = "auto",
        threshold: float | None = None,
        editing_threshold: float | None = None,
        minimal_topk: int | None = None,
        prompt_mask: torch.BoolTensor | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        filter_order: str = "hf",
    ):
        """``BlockRefinementScheduler.step``, fused (class docstring). ``filter_order``: ``"hf"``
        (the stock order, default) or ``"dream"``."""
        if threshold is None:
            threshold = float(self.config.threshold)
        if editing_threshold is None:
            editing_threshold = self.config.editing_threshold
        threshold = check_threshold("threshold", threshold)
        editing_threshold = check_threshold("editing_threshold", editing_threshold, optional=True)
        temperature, top_p, top_k, greedy = check_sampling_args(temperature, top_p, top_k, sampling_method)
        check_filter_order(filter_order)
        logits = _check_block(model_output, sample)
        step_index = int(timestep.item()) if isinstance(timestep, torch.Tensor) else int(timestep)
        seed = 0 if greedy else _seed_tensor(generator, logits.device)
        kw = dict(threshold=threshold, editing_threshold=editing_threshold, temperature=0.0 if greedy else temperature,
                  top_k=top_k, top_p=top_p, filter_order=filter_order, seed=seed, offset=0)
        if mask_token_id is None:
            if step_index == 0 or self._committed is None or self._committed.shape != sample.shape:
                self._committed = torch.zeros_like(sample, dtype=torch.bool)
            committed = self._committed
            block_length = sample.shape[1]
            target = ((step_index + 1) * block_length + self.num_inference_steps - 1) // self.num_inference_steps
            noise = torch.randint(0, model_output.shape[-1], sample.shape, device=sample.device, generator=generator)
            prev, transfer, edit, tokens, probs = block_refine_step(
                logits, sample, committed=committed, noise=noise, quota=target, **kw)
            self._committed = committed | transfer
        else:
            prev, transfer, edit, tokens, probs = block_refine_step(
                logits, sample, mask_token_id=mask_token_id, prompt_mask=prompt_mask, quota=self._quota(step_index),
                **kw)
        if not return_dict:
            return prev, transfer, edit, tokens, probs, model_output
        return BlockRefinementSchedulerOutput(prev_sample=prev, transfer_index=transfer, editing_transfer_index=edit,
                                              sampled_tokens=tokens, sampled_probs=probs, pred_logits=model_output)


class FusedEntropyBoundScheduler(EntropyBoundScheduler):
    """diffusers' ``EntropyBoundScheduler`` whose ``step`` is one fused op (:func:`sgkernels.ops.entropy_bound.entropy_bound_step`).

    Same config, ``set_timesteps``, ``step`` arguments and outputs. The annealed temperature and the
    scaled logits ``pred_logits = model_output / temperature`` are the stock step's (``pred_logits``
    is returned, as the stock step returns it, for self-conditioning); on them one op samples the
    candidates, computes the exact entropies and the accept set: the same ``accepted_index`` as the
    stock step (ties to the lower position; the entropies to float rounding), ``sampled_probs =
    softmax(pred_logits)[token]``, tokens from the same law drawn with one seed per step from
    ``generator`` (the same generator state gives the same tokens and noise). No ``[B, L, V]``
    probability tensor, no sort of the vocabulary, no host sync.
    """

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.LongTensor,
        *,
        entropy_bound: float | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """``EntropyBoundScheduler.step``, fused (class docstring)."""
        if entropy_bound is None:
            entropy_bound = float(self.config.entropy_bound)
        entropy_bound = check_threshold("entropy_bound", entropy_bound)
        _check_block(model_output, sample)
        fraction = (self.num_inference_steps - int(timestep)) / self.num_inference_steps
        temperature = self.config.t_min + (self.config.t_max - self.config.t_min) * fraction
        pred_logits = model_output / temperature
        logits = pred_logits.float() if pred_logits.dtype == torch.float64 else pred_logits
        seed = _seed_tensor(generator, logits.device)
        noise = torch.randint(0, model_output.shape[-1], sample.shape, device=sample.device, generator=generator)
        prev, accepted, tokens, probs, _ = entropy_bound_step(logits, noise, entropy_bound=entropy_bound, seed=seed)
        if not return_dict:
            return prev, accepted, tokens, probs, pred_logits
        return EntropyBoundSchedulerOutput(prev_sample=prev, accepted_index=accepted, sampled_tokens=tokens,
                                           sampled_probs=probs, pred_logits=pred_logits)


# ------------------------------------------------------------------------------------------------
# The pipeline


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return False


def _truncate_cache(cache, length: int) -> None:
    """Drop the entries of a transformers ``Cache`` past ``length`` positions (both ``crop`` APIs:
    transformers >= 5 takes the number of tokens to remove, negative; 4.x the length to keep)."""
    extra = cache.get_seq_length() - length
    if extra <= 0:
        return
    if "tokens_to_remove" in inspect.signature(cache.crop).parameters:
        cache.crop(-extra)
    else:  # pragma: no cover - transformers 4.x
        cache.crop(length)


class FusedLLaDA2Pipeline(LLaDA2Pipeline):
    """diffusers' ``LLaDA2Pipeline`` with the fused step, the LM head only on the active block and an
    optional exact prefix KV cache (docs/dllm.md, "diffusers: LLaDA2 / DiffusionGemma").

    ``FusedLLaDA2Pipeline.from_pipe(pipe)`` or ``FusedLLaDA2Pipeline(**pipe.components)`` turns a
    loaded ``LLaDA2Pipeline`` into this one (a stock ``BlockRefinementScheduler`` becomes a
    :class:`FusedBlockRefinementScheduler` with the same config). ``__call__`` takes the stock
    arguments and returns the stock outputs, plus:

    * ``fused_head=True``: when the model's LM head is known (``get_output_embeddings()`` an
      ``nn.Linear`` beside the base model, as :mod:`sgkernels.integrations._fused_head` resolves it),
      the backbone runs without its head and only the active block's rows go through
      :func:`sgkernels.head_sample` and the fused commit (:func:`sgkernels.ops.block_refine.block_commit`):
      no ``[B, window, V]`` logits. Otherwise (or ``fused_head=False``) the logits path: the model's
      logits of the active block, then the fused scheduler step.
    * ``prefix_cache=False``: ``True`` encodes each finished block once into a transformers
      ``DynamicCache`` (``past_key_values`` / ``use_cache``) and runs every step on the active block
      against it. Exact for block-causal attention (LLaDA2.x, SDAR, Fast-dLLM v2: a finished block's
      keys and values do not depend on later tokens); not for fully bidirectional models (LLaDA 1,
      Dream), whose earlier keys change with every step. Refused (ValueError) when the model's
      forward takes no ``past_key_values``, or with ``callback_on_step_end`` (a callback may rewrite
      finished blocks).

    The progress bars are the stock ones (blocks, then the steps of each block), configured by
    ``set_progress_bar_config`` (``disable=True`` turns them off). With ``callback_on_step_end`` the
    stock loop runs (with the fused scheduler step). Randomness: one
    seed per call from ``generator`` (torch's default generator without one), the op offset is the
    step count; greedy decoding (``temperature=0`` or ``sampling_method="greedy"``) is token-for-token
    the stock pipeline's.
    """

    def __init__(self, model, scheduler, tokenizer=None):
        if isinstance(scheduler, BlockRefinementScheduler) and not isinstance(scheduler, FusedBlockRefinementScheduler):
            scheduler = FusedBlockRefinementScheduler.from_config(scheduler.config)
        super().__init__(model=model, scheduler=scheduler, tokenizer=tokenizer)

    def __call__(self, *args, prefix_cache: bool = False, fused_head: bool = True, **kwargs):
        bound = inspect.signature(LLaDA2Pipeline.__call__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop("self")
        if prefix_cache and not _accepts(self.model.forward, "past_key_values"):
            raise ValueError("prefix_cache: the model's forward takes no `past_key_values` (no KV cache API); "
                             "use prefix_cache=False")
        if a["callback_on_step_end"] is not None:
            if prefix_cache:
                raise ValueError("prefix_cache: not with callback_on_step_end (a callback may rewrite finished "
                                 "blocks, which the cache cannot follow)")
            return super().__call__(*args, **kwargs)
        if not isinstance(self.scheduler, FusedBlockRefinementScheduler):
            raise TypeError(f"scheduler: FusedLLaDA2Pipeline needs a BlockRefinementScheduler, got "
                            f"{type(self.scheduler).__name__}")
        with torch.no_grad():
            return self._generate(a, prefix_cache=bool(prefix_cache), fused_head=bool(fused_head))

    # -- the loop ----------------------------------------------------------------------------------

    def _generate(self, a: dict, *, prefix_cache: bool, fused_head: bool):
        block_length = a["block_length"] if a["block_length"] is not None else self.scheduler.config.block_length
        self.check_inputs(prompt=a["prompt"], messages=a["messages"], input_ids=a["input_ids"],
                          gen_length=a["gen_length"], block_length=block_length,
                          num_inference_steps=a["num_inference_steps"], minimal_topk=a["minimal_topk"],
                          threshold=a["threshold"], sampling_method=a["sampling_method"],
                          output_type=a["output_type"], callback_on_step_end=None,
                          callback_on_step_end_tensor_inputs=None)
        threshold = check_threshold("threshold", a["threshold"])
        editing_threshold = check_threshold("editing_threshold", a["editing_threshold"], optional=True)
        temperature, top_p, top_k, greedy = check_sampling_args(a["temperature"], a["top_p"], a["top_k"],
                                                                a["sampling_method"])
        prompt_ids, prompt_mask = self._prepare_input_ids(
            prompt=a["prompt"], messages=a["messages"], input_ids=a["input_ids"], attention_mask=a["attention_mask"],
            use_chat_template=a["use_chat_template"], add_generation_prompt=a["add_generation_prompt"],
            chat_template_kwargs=None)
        device = self._execution_device
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        batch, prompt_length = prompt_ids.shape
        eos_id = a["eos_token_id"] if a["eos_token_id"] is not None else self.eos_token_id
        mask_id = a["mask_token_id"] if a["mask_token_id"] is not None else self.mask_token_id
        if mask_id is None:
            raise ValueError("mask_token_id: must be provided (or available on the tokenizer)")
        gen_length, eos_early_stop = a["gen_length"], a["eos_early_stop"]
        steps = min(a["num_inference_steps"], gen_length // a["minimal_topk"])
        self.scheduler.set_timesteps(steps, device=device, block_length=block_length)

        n_blocks = -(-(prompt_length + gen_length) // block_length)
        total = n_blocks * block_length
        attn = torch.zeros((batch, total), dtype=torch.long, device=device)
        attn[:, :prompt_length] = prompt_mask
        attn[:, prompt_length:prompt_length + gen_length] = 1
        pos = torch.arange(total, device=device).expand(batch, -1)
        x = torch.full((batch, total), mask_id, dtype=torch.long, device=device)
        x[:, :prompt_length] = prompt_ids
        first_block = prompt_length // block_length
        self._num_timesteps = steps * max(n_blocks - first_block, 0)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        editing = editing_threshold is not None and editing_threshold > 0.0
        head = resolve_head(self.model, fused_head=fused_head)
        seed = 0 if greedy else int(_seed_tensor(a["generator"], torch.device("cpu")))
        sample_kw = dict(temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p, filter_order="hf")
        cache = DynamicCache() if prefix_cache else None
        global_step = 0

        # the stock progress bars: one over the blocks, one per block over its steps (set_progress_bar_config)
        bar_config = getattr(self, "_progress_bar_config", {}).copy()
        for blk in tqdm(range(first_block, n_blocks), **{**bar_config, "position": 0, "desc": "Blocks"}):
            steps_bar = tqdm(total=steps, **{**bar_config, "position": 1, "leave": False,
                                             "desc": f"Block {blk} Inference Steps"})
            start, end = blk * block_length, (blk + 1) * block_length
            prompt_in_block = torch.arange(start, end, device=device) < prompt_length
            if cache is not None and cache.get_seq_length() < start:  # encode the finished blocks once
                done = cache.get_seq_length()
                self._forward(head, x[:, done:start], attn[:, :start], pos[:, done:start], cache, hidden_only=True)
            post_steps = step_idx = 0
            while True:
                block = x[:, start:end]
                masks_left = bool((block == mask_id).any())
                if not masks_left:
                    post_steps += 1
                lo = start if cache is not None else 0
                out = self._forward(head, x[:, lo:end], attn[:, :end], pos[:, lo:end], cache,
                                    hidden_only=head is not None)
                if cache is not None:
                    _truncate_cache(cache, start)
                rows = out[:, -block_length:]
                if head is None:
                    s = self.scheduler.step(rows, step_idx, block, mask_token_id=mask_id, temperature=a["temperature"],
                                            top_p=a["top_p"], top_k=a["top_k"], sampling_method=a["sampling_method"],
                                            threshold=threshold, editing_threshold=editing_threshold,
                                            prompt_mask=prompt_in_block, generator=a["generator"])
                    prev, transfer, edit, sampled = s.prev_sample, s.transfer_index, s.editing_transfer_index, \
                        s.sampled_tokens
                else:
                    prev, transfer, edit, sampled = self._head_step(
                        head, rows, block, mask_id, prompt_in_block, self.scheduler._quota(step_idx), threshold,
                        editing_threshold if editing else None, seed, global_step, **sample_kw)
                final = transfer | edit
                if eos_early_stop:
                    final = final & ~finished[:, None]
                x[:, start:end] = torch.where(final, prev, block)
                if eos_early_stop and eos_id is not None:
                    finished = self.scheduler.check_eos_finished(
                        cur_x=x[:, :end], sampled_tokens=sampled, final_transfer=final, finished=finished,
                        eos_token_id=eos_id, mask_token_id=mask_id, prompt_length=prompt_length)
                global_step += 1
                if masks_left:
                    step_idx += 1
                    steps_bar.update(1)
                if not self.scheduler.check_block_should_continue(
                        step_idx=step_idx, masks_remaining=masks_left, editing_enabled=editing,
                        editing_transfer_index=edit, post_steps=post_steps, max_post_steps=a["max_post_steps"],
                        finished=finished):
                    break
            steps_bar.close()
            if eos_early_stop and bool(finished.all()):
                break

        sequences = x[:, prompt_length:prompt_length + gen_length]
        texts = None
        if a["output_type"] == "text" and self.tokenizer is not None:
            decode = sequences
            if eos_id is not None:
                decode = [seq[: int((seq == eos_id).nonzero()[0, 0]) + 1] if bool((seq == eos_id).any()) else seq
                          for seq in sequences]
            texts = self.tokenizer.batch_decode(decode, skip_special_tokens=True)
        if not a["return_dict"]:
            return sequences, texts
        return LLaDA2PipelineOutput(sequences=sequences, texts=texts)

    def _forward(self, head, ids, attention_mask, position_ids, cache, *, hidden_only: bool):
        """The backbone's last hidden states (``hidden_only`` and a known head) or the model's logits."""
        kw = dict(attention_mask=attention_mask, position_ids=position_ids)
        if cache is not None:
            kw.update(past_key_values=cache, use_cache=True)
        if head is not None and hidden_only:
            return head.hidden(ids, **kw)
        return self.model(ids, **kw).logits

    @staticmethod
    def _head_step(head, hidden, block, mask_id, prompt_mask, quota, threshold, editing_threshold, seed, offset,
                   *, temperature, top_k, top_p, filter_order):
        """The active block's rows through head_sample, then the fused commit: (prev, transfer, edit, tokens)."""
        if temperature == 0.0:
            tokens, logp = head_sample(hidden, head.weight, head.bias, temperature=0.0, seed=seed, offset=offset)
            probs = logp.exp()
        else:
            tokens, _, probs = head_sample(hidden, head.weight, head.bias, temperature=temperature, top_k=top_k,
                                           top_p=top_p, filter_order=filter_order, confidence="prob", seed=seed,
                                           offset=offset)
        prev, transfer, edit = block_commit(tokens, probs, block, mask_token_id=mask_id, prompt_mask=prompt_mask,
                                            quota=quota, threshold=threshold, editing_threshold=editing_threshold)
        return prev, transfer, edit, tokens


# ------------------------------------------------------------------------------------------------
# DiffusionGemma


def fused_scheduler(scheduler):
    """The fused counterpart of a stock ``BlockRefinementScheduler`` / ``EntropyBoundScheduler`` (same
    config); any other scheduler (a fused one, ``DiscreteDDIMScheduler``) is returned as it is."""
    if isinstance(scheduler, BlockRefinementScheduler) and not isinstance(scheduler, FusedBlockRefinementScheduler):
        return FusedBlockRefinementScheduler.from_config(scheduler.config)
    if isinstance(scheduler, EntropyBoundScheduler) and not isinstance(scheduler, FusedEntropyBoundScheduler):
        return FusedEntropyBoundScheduler.from_config(scheduler.config)
    return scheduler


if DiffusionGemmaPipeline is not None:

    class FusedDiffusionGemmaPipeline(DiffusionGemmaPipeline):
        """diffusers' ``DiffusionGemmaPipeline`` stepping with the fused schedulers (docs/dllm.md).

        ``FusedDiffusionGemmaPipeline.from_pipe(pipe)`` or ``FusedDiffusionGemmaPipeline(**pipe.components)``;
        ``__call__`` is the stock one (same arguments, outputs, progress bar, callbacks, adaptive
        stopping, ``cache_implementation``). A stock ``BlockRefinementScheduler`` /
        ``EntropyBoundScheduler`` becomes :class:`FusedBlockRefinementScheduler` /
        :class:`FusedEntropyBoundScheduler` with the same config, at construction and when one is
        assigned to ``pipe.scheduler`` later (checked at each call); ``DiscreteDDIMScheduler`` runs as
        it is. Greedy output (``temperature=0``) is token-for-token the stock pipeline's: the uniform
        mode's noise is drawn from ``generator`` as the stock step draws it.

        What is not fused, and why: DiffusionGemma already runs its decoder on the canvas only
        (the active block) against an encoder KV cache of the finished blocks, so there is no
        ``[B, window, V]`` waste to remove; and the head cannot be fused away, since each step feeds
        ``softmax(logits)`` of the whole canvas back as self-conditioning and its logits are soft-capped
        (``final_logit_softcapping``, not a linear map of the hidden states).
        """

        def __init__(self, model, scheduler, processor):
            super().__init__(model=model, scheduler=fused_scheduler(scheduler), processor=processor)

        def __call__(self, *args, **kwargs):
            fused = fused_scheduler(self.scheduler)
            if fused is not self.scheduler:
                self.register_modules(scheduler=fused)
            return super().__call__(*args, **kwargs)

else:  # pragma: no cover - diffusers < 0.42
    FusedDiffusionGemmaPipeline = None
