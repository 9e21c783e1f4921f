"""sgkernels: fused kernels for self-guided sampling of masked generative models.

Quick use::

    import sgkernels as sgk
    tokens, logp = sgk.guided_sample(logits, guide_logits, guidance_scale=1.0, seed=0)
    new_tokens, new_mask = sgk.self_guided_step(tokens, is_masked, logits, guide_logits, n,
                                                guidance_scale=1.0, choice_temperature=25.0, seed=0, offset=step)

Guide training (``sgkernels.training``, also reachable as ``sgkernels.train``, with
``sgkernels.train_guide`` and ``sgkernels.TrainConfig``) is imported on first use, not by ``import sgkernels``.
"""
from importlib import import_module as _import_module

import torch  # noqa: F401  (loads libc10/libtorch before the extension)

from . import _C  # noqa: F401  (registers the torch.ops.sgkernels schemas and C++/CUDA kernels)
from ._backend import get_backend, use_backend
from .ops import (
    check_errors,
    cross_entropy_reference,
    fused_cross_entropy,
    guided_sample,
    guided_sample_reference,
    remask_lowest_confidence,
    remask_reference,
    self_guided_step,
    self_guided_step_reference,
    vq_lookup,
    vq_lookup_reference,
)
from .ops import head_sample, head_sample_reference
from .schedule import choice_temperature, mask_len, mask_ratio

from . import integrations, models, nn  # noqa: E402  (models -> nn -> ops: imported after the ops)
from .models import TOAST, MaskTransformer, MaskTransformerConfig, TOASTConfig  # noqa: E402
from .models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .sampler import SelfGuidedSampler  # noqa: E402
from .pipeline import SelfGuidedPipeline  # noqa: E402

__version__ = "0.1.0"

_LAZY_TRAINING = ("TrainConfig", "train_guide")


def __getattr__(name: str):
    """``sgkernels.training`` (alias ``sgkernels.train``) and its names, imported on first access."""
    if name in ("training", "train"):
        return _import_module(".training", __name__)
    if name in _LAZY_TRAINING:
        return getattr(_import_module(".training", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API only (what ``__all__`` lists), not the modules this file imports."""
    return sorted([*__all__, "__version__"])


del torch  # imported for its side effect only

__all__ = [
    "MaskTransformer",
    "MaskTransformerConfig",
    "SelfGuidedPipeline",
    "SelfGuidedSampler",
    "TrainConfig",
    "TOAST",
    "TOASTConfig",
    "load_checkpoint",
    "integrations",
    "models",
    "nn",
    "save_checkpoint",
    "train",
    "train_guide",
    "training",
    "check_errors",
    "cross_entropy_reference",
    "fused_cross_entropy",
    "choice_temperature",
    "get_backend",
    "guided_sample",
    "guided_sample_reference",
    "head_sample",
    "head_sample_reference",
    "mask_len",
    "mask_ratio",
    "remask_lowest_confidence",
    "remask_reference",
    "self_guided_step",
    "self_guided_step_reference",
    "use_backend",
    "vq_lookup",
    "vq_lookup_reference",
]
