"""Models: MaskGIT's bidirectional transformer, the TOAST guide, checkpoint IO.

Layering: ``sgkernels.sampler`` -> ``sgkernels.models`` -> ``sgkernels.nn`` -> ``sgkernels.ops``;
models never import the sampler.
"""
from .transformer import MaskTransformer, MaskTransformerConfig, TransformerOutput
from .toast import TOAST, TOASTConfig
from .pretrained import CheckpointError, from_pretrained
from .vqgan import MaskGitVQGAN, MaskGitVQGANConfig

__all__ = ["MaskTransformer", "MaskTransformerConfig", "TOAST", "TOASTConfig", "TransformerOutput",
           "CheckpointError", "MaskGitVQGAN", "MaskGitVQGANConfig", "from_pretrained"]
