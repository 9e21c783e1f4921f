"""Models: MaskGIT's bidirectional transformer, the TOAST guide, checkpoint IO, open-muse converters.

Layering: ``sgkernels.sampler`` / ``sgkernels.training`` -> ``sgkernels.models`` -> ``sgkernels.nn``
-> ``sgkernels.ops``; models never import the sampler. Inside this package ``open_muse`` and
``checkpoint`` import ``transformer`` and ``toast``, never the reverse.
"""
from .transformer import MaskTransformer, MaskTransformerConfig, TransformerOutput
from .toast import TOAST, TOASTConfig
from .open_muse import toast_from_open_muse, transformer_from_open_muse
from .pretrained import CheckpointError, from_pretrained
from .vqgan import MaskGitVQGAN, MaskGitVQGANConfig

__all__ = [
    "CheckpointError",
    "MaskGitVQGAN",
    "MaskGitVQGANConfig",
    "MaskTransformer",
    "MaskTransformerConfig",
    "TOAST",
    "TOASTConfig",
    "TransformerOutput",
    "from_pretrained",
    "toast_from_open_muse",
    "transformer_from_open_muse",
]
