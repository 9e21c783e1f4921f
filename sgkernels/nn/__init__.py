"""nn.Modules built on the sgkernels ops."""
from .vector_quantizer import DiffusersVectorQuantizer, VectorQuantizer

__all__ = ["DiffusersVectorQuantizer", "VectorQuantizer"]
