"""Test setup: without a CUDA GPU the Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before anything imports triton (``triton.jit`` reads it when the
kernels are defined), so it is set here, before the test modules import sgkernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
