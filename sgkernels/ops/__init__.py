"""The fused ops. Each module: thin wrapper, fake kernel, kernel registration, PyTorch reference."""
from ._status import check_errors
from .block_refine import block_commit, block_commit_reference, block_refine_step, block_refine_step_reference
from .cross_entropy import cross_entropy_reference, fused_cross_entropy
from .entropy_bound import entropy_bound_step, entropy_bound_step_reference
from .guided_sample import guided_sample, guided_sample_reference
from .head_sample import head_sample, head_sample_reference
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .remask import remask_lowest_confidence, remask_reference
from .self_guided_step import self_guided_step, self_guided_step_reference
from .vq_lookup import vq_lookup, vq_lookup_reference

__all__ = [
    "block_commit",
    "block_commit_reference",
    "block_refine_step",
    "block_refine_step_reference",
    "check_errors",
    "cross_entropy_reference",
    "entropy_bound_step",
    "entropy_bound_step_reference",
    "fused_cross_entropy",
    "guided_sample",
    "guided_sample_reference",
    "head_sample",
    "head_sample_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "remask_lowest_confidence",
    "remask_reference",
    "self_guided_step",
    "self_guided_step_reference",
    "vq_lookup",
    "vq_lookup_reference",
]
