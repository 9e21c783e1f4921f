"""Block diffusion through diffusers (LLaDA2 / DiffusionGemma): the fused schedulers and pipeline.

Imported by :mod:`sgkernels.integrations.diffusers`, which documents them; needs diffusers >= 0.39
(``BlockRefinementScheduler``, ``EntropyBoundScheduler``, ``LLaDA2Pipeline``).
"""
from __future__ import annotations

import numbers

import torch
from diffusers import BlockRefinementScheduler, EntropyBoundScheduler
from diffusers.schedulers.scheduling_block_refinement import BlockRefinementSchedulerOutput
from diffusers.schedulers.scheduling_entropy_bound import EntropyBoundSchedulerOutput

from ..ops import _validate
from ..ops.block_refine import block_refine_step, check_threshold
from ..ops.filters import check_filter_order

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
