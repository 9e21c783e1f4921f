"""The build: CUDA kernels are compiled whenever nvcc is present, and registered in the dispatcher."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import sgkernels
from sgkernels import _C


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("SGKERNELS_CUDA") == "0", reason="no nvcc")
def test_cuda_kernels_were_compiled():
    assert _C.WITH_CUDA == 1, "nvcc is on PATH but the extension was built without its .cu sources"
    assert "8.0" in _C.CUDA_ARCHS and "9.0" in _C.CUDA_ARCHS
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sgkernels::vq_lookup", "CUDA")


def test_every_op_has_cpu_and_cuda_kernels():
    triton_ops = ("guided_sample", "remask_lowest_confidence", "self_guided_step", "cross_entropy_fwd",
                  "cross_entropy_fwd_inplace")
    for op in (*triton_ops, "vq_lookup"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sgkernels::{op}", "CPU"), op
    # The CUDA kernels of these ops are Triton, registered from Python.
    for op in triton_ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sgkernels::{op}", "CUDA"), op


def test_info_runs():
    out = subprocess.run([sys.executable, "-m", "sgkernels.info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "CPU ISA" in out and sgkernels.__version__ in out

