"""diffusers drop-ins: ``FusedAmusedScheduler`` and ``FusedAmusedPipeline`` (needs ``pip install diffusers``),
and for block diffusion (LLaDA2 / DiffusionGemma, diffusers >= 0.39) ``FusedBlockRefinementScheduler``,
``FusedEntropyBoundScheduler``, ``FusedLLaDA2Pipeline`` and (diffusers >= 0.42) ``FusedDiffusionGemmaPipeline``
(:mod:`._block_diffusion`; docs/dllm.md).

``FusedAmusedScheduler`` has diffusers' ``AmusedScheduler`` config, ``set_timesteps``, ``step`` and
outputs, and does the step with two fused ops (:func:`sgkernels.guided_sample` then
:func:`sgkernels.remask_lowest_confidence`), so a pipeline takes it without other changes::

    pipe = AmusedPipeline.from_pretrained("amused/amused-256")
    pipe.scheduler = FusedAmusedScheduler.from_config(pipe.scheduler.config)

``FusedAmusedPipeline`` (an ``AmusedPipeline``) also moves the pipeline's classifier-free-guidance
blend ``uncond + guidance_scale * (cond - uncond)`` into the fused op (``guide = uncond``,
``logits = cond``, op scale ``guidance_scale - 1``, since the op blends ``u + (1 + s)(l - u)``),
so the blended ``[B, codebook, H, W]`` tensor is never written. The hook: while it runs, the
transformer's ``[uncond; cond]`` output is handed on as a :class:`CFGLogits` object whose
``chunk(2)``, ``-``, ``*`` and ``+`` build a :class:`GuidedLogits` (the two halves and the scale)
instead of computing; the fused scheduler's ``step`` consumes it. Any other use raises TypeError.
Users with their own loop call ``scheduler.step(cond, t, sample, uncond_logits=uncond,
guidance_scale=w)`` directly.

Semantics, as diffusers' ``AmusedScheduler.step``:

* tokens are sampled from ``softmax(model_output)`` (no token temperature) at the masked positions
  (``sample == mask_token_id``); ``pred_original_sample`` = sampled tokens there, ``sample`` elsewhere;
* ``mask_len = max(1, min(#masked - 1, floor(seq_len * starting_mask_ratio * r)))`` with
  ``r = cos(pi/2 (k+1)/T)`` ("cosine") or ``1 - (k+1)/T`` ("linear"), k the step index of
  ``timestep``, computed with the same float32 tensor ops as diffusers; nothing is re-masked when
  ``timestep == 0``;
* the ``mask_len`` masked positions with the lowest ``log p(token) + temperature_k * Gumbel`` are
  masked again, ``temperature_k`` being ``set_timesteps``' linear interpolation (the *choice*
  temperature);
* ``model_output`` ``[B, codebook, H, W]`` with ``sample`` ``[B, H, W]``, or ``[B, seq, codebook]``
  with ``sample`` ``[B, seq]``; outputs have ``sample``'s layout;
* ``generator``: one int64 is drawn from it per step and seeds the ops (offset = step index), so
  a seeded generator reproduces the run; without one the seed comes from torch's default
  generator. Draws differ from diffusers' ``torch.multinomial`` stream, the distributions do not.

Where it differs from diffusers (deliberately): already-known positions are never re-masked
(diffusers gives them confidence ``log(float32 max) + temperature * Gumbel``, which only loses to a
masked position for temperatures above ~10); the confidence uses the exact log-probability (diffusers
clamps probabilities at 1e-20); ties are broken by position (diffusers' ``confidence < cutoff``
masks fewer than ``mask_len`` on exact ties, e.g. at temperature 0); and when no position is masked
nothing is re-masked (diffusers re-masks one known token).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

try:
    from diffusers import AmusedPipeline, AmusedScheduler
    from diffusers.schedulers.scheduling_amused import AmusedSchedulerOutput
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("sgkernels.integrations.diffusers needs diffusers: pip install diffusers transformers") from e

from ..ops import guided_sample, remask_lowest_confidence

__all__ = ["CFGLogits", "FusedAmusedPipeline", "FusedAmusedScheduler", "GuidedLogits"]

# Block diffusion (LLaDA2 / DiffusionGemma): diffusers >= 0.39 has the stock classes.
try:
    from ._block_diffusion import (FusedBlockRefinementScheduler, FusedEntropyBoundScheduler,  # noqa: F401
                                   FusedLLaDA2Pipeline)
except ImportError as e:  # pragma: no cover - depends on the install
    _BLOCK_DIFFUSION_ERROR = e
else:
    _BLOCK_DIFFUSION_ERROR = None
    __all__ += ["FusedBlockRefinementScheduler", "FusedEntropyBoundScheduler", "FusedLLaDA2Pipeline"]
    from ._block_diffusion import FusedDiffusionGemmaPipeline as _FusedDiffusionGemmaPipeline

    if _FusedDiffusionGemmaPipeline is not None:  # diffusers >= 0.42
        FusedDiffusionGemmaPipeline = _FusedDiffusionGemmaPipeline
        __all__ += ["FusedDiffusionGemmaPipeline"]


def __getattr__(name):
    if name == "FusedDiffusionGemmaPipeline" and _BLOCK_DIFFUSION_ERROR is None:
        raise ImportError("FusedDiffusionGemmaPipeline needs diffusers >= 0.42 (DiffusionGemmaPipeline): "
                          "pip install -U diffusers")
    if name.startswith("Fused") and _BLOCK_DIFFUSION_ERROR is not None:
        raise ImportError(f"{name} needs diffusers >= 0.39 (BlockRefinementScheduler, LLaDA2Pipeline): "
                          f"pip install -U diffusers ({_BLOCK_DIFFUSION_ERROR})")
    raise AttributeError(name)


@dataclass
class GuidedLogits:
    """``uncond + guidance_scale * (cond - uncond)``, not computed: the fused op blends while it reads."""

    cond: torch.Tensor
    uncond: torch.Tensor
    guidance_scale: float

    @property
    def ndim(self) -> int:
        return self.cond.ndim

    @property
    def shape(self) -> torch.Size:
        return self.cond.shape


def _blend_error(what: str) -> TypeError:
    return TypeError(
        f"FusedAmusedPipeline: the transformer output was used as `{what}`; the fused CFG hook only supports "
        "`uncond, cond = out.chunk(2); uncond + guidance_scale * (cond - uncond)` followed by the fused "
        "scheduler's step. Use AmusedPipeline with FusedAmusedScheduler instead."
    )


class CFGLogits:
    """The transformer's ``[uncond; cond]`` output, kept unblended until the fused scheduler step."""

    def __init__(self, both: torch.Tensor):
        self.both = both

    def chunk(self, chunks: int, dim: int = 0):
        if chunks != 2 or dim != 0:
            raise _blend_error(f"chunk({chunks}, dim={dim})")
        uncond, cond = self.both.chunk(2, dim=0)
        return _Half(uncond, cond, 0), _Half(uncond, cond, 1)

    def __getattr__(self, name):
        raise _blend_error(name)


class _Half:
    def __init__(self, uncond, cond, which):
        self.uncond, self.cond, self.which = uncond, cond, which

    def __sub__(self, other):  # cond - uncond
        if self.which == 1 and isinstance(other, _Half) and other.which == 0 and other.cond is self.cond:
            return _Delta(self.uncond, self.cond, 1.0)
        raise _blend_error("-")

    def __add__(self, other):  # uncond + scale * (cond - uncond)
        if self.which == 0 and isinstance(other, _Delta) and other.cond is self.cond:
            return GuidedLogits(self.cond, self.uncond, other.scale)
        raise _blend_error("+")

    def __getattr__(self, name):
        raise _blend_error(name)


class _Delta:
    def __init__(self, uncond, cond, scale):
        self.uncond, self.cond, self.scale = uncond, cond, scale

    def __mul__(self, scale):
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            return _Delta(self.uncond, self.cond, self.scale * float(scale))
        raise _blend_error("*")

    __rmul__ = __mul__


class FusedAmusedScheduler(AmusedScheduler):
    """diffusers' ``AmusedScheduler`` with the step done by sgkernels' fused ops (see module docstring)."""

    def set_timesteps(self, num_inference_steps, temperature=(2, 0), device=None):
        super().set_timesteps(num_inference_steps, temperature, device)
        self._timesteps_host = [int(t) for t in self.timesteps.tolist()]
        self._temperatures_host = [float(t) for t in self.temperatures.tolist()]

    def _step_index(self, timestep) -> int:
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps before step")
        if getattr(self, "_timesteps_host", None) is None or len(self._timesteps_host) != len(self.timesteps):
            self._timesteps_host = [int(t) for t in self.timesteps.tolist()]
            self._temperatures_host = [float(t) for t in self.temperatures.tolist()]
        t = int(timestep)
        if t not in self._timesteps_host:
            raise ValueError(f"timestep {t} is not in the scheduler's timesteps {self._timesteps_host}")
        return self._timesteps_host.index(t)

    def _mask_len(self, step_idx: int, seq_len: int, unknown: torch.Tensor, starting_mask_ratio: float):
        """diffusers' mask_len, same float32 tensor arithmetic, as int64 [B] on ``unknown``'s device."""
        device = unknown.device
        ratio = torch.tensor(step_idx + 1, device=device) / len(self._timesteps_host)
        if self.config.masking_schedule == "cosine":
            mask_ratio = torch.cos(ratio * math.pi / 2)
        elif self.config.masking_schedule == "linear":
            mask_ratio = 1 - ratio
        else:
            raise ValueError(f"unknown masking schedule {self.config.masking_schedule}")
        mask_len = (seq_len * (starting_mask_ratio * mask_ratio)).floor()
        mask_len = torch.minimum(unknown.sum(dim=-1) - 1, mask_len)
        return mask_len.clamp_min(1).to(torch.int64)

    def step(
        self,
        model_output,
        timestep,
        sample: torch.LongTensor,
        starting_mask_ratio: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        uncond_logits: torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ):
        """``AmusedScheduler.step`` with fused ops.

        ``model_output`` may be a :class:`GuidedLogits` (from :class:`FusedAmusedPipeline`), or the
        conditional logits with ``uncond_logits`` and ``guidance_scale`` given: then the step samples
        from ``uncond + guidance_scale * (model_output - uncond)`` without materialising it.
        """
        if isinstance(model_output, GuidedLogits):
            model_output, uncond_logits, guidance_scale = model_output.cond, model_output.uncond, model_output.guidance_scale
        if (uncond_logits is None) != (guidance_scale is None):
            raise ValueError("pass both uncond_logits and guidance_scale, or neither")
        step_idx = self._step_index(timestep)
        two_dim_input = sample.ndim == 3 and model_output.ndim == 4
        logits, guide = model_output, uncond_logits
        if two_dim_input:
            batch, codebook, height, width = model_output.shape
            sample = sample.reshape(batch, height * width)
            logits = model_output.reshape(batch, codebook, height * width).permute(0, 2, 1)
            if guide is not None:
                guide = guide.reshape(batch, codebook, height * width).permute(0, 2, 1)
        # diffusers takes any float dtype; the ops read float32 / bfloat16 / float16: float64 is sampled in float32
        if logits.dtype == torch.float64:
            logits = logits.float()
        if guide is not None and guide.dtype == torch.float64:
            guide = guide.float()
        unknown = sample == self.config.mask_token_id
        # one seed for both ops of this step, from the generator (torch's default one without it)
        gen_device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).item())
        seed_kw = dict(seed=seed, offset=step_idx)
        scale = 0.0 if guide is None else float(guidance_scale) - 1.0
        tokens, logp = guided_sample(logits, guide, guidance_scale=scale, temperature=1.0, **seed_kw)
        pred_original_sample = torch.where(unknown, tokens, sample)
        if int(timestep) == 0:
            prev_sample = pred_original_sample
        else:
            n = self._mask_len(step_idx, sample.shape[1], unknown, starting_mask_ratio)
            remask = remask_lowest_confidence(logp, unknown, n, choice_temperature=self._temperatures_host[step_idx],
                                              **seed_kw)
            prev_sample = torch.where(remask, self.config.mask_token_id, pred_original_sample)
        if two_dim_input:
            prev_sample = prev_sample.reshape(batch, height, width)
            pred_original_sample = pred_original_sample.reshape(batch, height, width)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return AmusedSchedulerOutput(prev_sample, pred_original_sample)


def _wrap_cfg_output(module, args, output):
    return CFGLogits(output)


class FusedAmusedPipeline(AmusedPipeline):
    """``AmusedPipeline`` whose CFG blend happens inside the fused scheduler step.

    Takes the same components (an ``AmusedScheduler`` is converted to :class:`FusedAmusedScheduler`
    with the same config) and the same call arguments; ``FusedAmusedPipeline(**pipe.components)``
    turns a loaded pipeline into a fused one.
    """

    def __init__(self, vqvae, tokenizer, text_encoder, transformer, scheduler):
        if not isinstance(scheduler, FusedAmusedScheduler):
            scheduler = FusedAmusedScheduler.from_config(scheduler.config)
        super().__init__(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                         scheduler=scheduler)

    def __call__(self, *args, **kwargs):
        bound = inspect.signature(AmusedPipeline.__call__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        if not (bound.arguments["guidance_scale"] > 1.0 and isinstance(self.scheduler, FusedAmusedScheduler)):
            return super().__call__(*args, **kwargs)
        handle = self.transformer.register_forward_hook(_wrap_cfg_output)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            handle.remove()
