"""Triton kernels (the CUDA kernels of the ``torch.ops.sgkernels`` sampling ops).

Imported lazily by ``sgkernels.ops`` so that sgkernels works without Triton.
"""
