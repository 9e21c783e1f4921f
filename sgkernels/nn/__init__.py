"""nn.Modules built on the sgkernels ops."""
from .attention import SelfAttention, attention, attention_backend
from .vector_quantizer import DiffusersVectorQuantizer, VectorQuantizer

__all__ = ["DiffusersVectorQuantizer", "SelfAttention", "VectorQuantizer", "attention", "attention_backend"]
