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
                  "cross_entropy_fwd_inplace", "linear_cross_entropy_fwd", "linear_cross_entropy_bwd",
                  "head_sample", "block_refine_step", "block_commit", "entropy_bound_step")
    for op in (*triton_ops, "vq_lookup"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sgkernels::{op}", "CPU"), op
    # The CUDA kernels of these ops are Triton, registered from Python.
    for op in triton_ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sgkernels::{op}", "CUDA"), op


def test_info_runs():
    out = subprocess.run([sys.executable, "-m", "sgkernels.info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "CPU ISA" in out and sgkernels.__version__ in out



def test_status_bits_come_from_the_extension():
    from sgkernels import _status_bits

    bits = {"NONFINITE_LOGITS": 1, "NEGATIVE_NUM_TO_MASK": 2, "BAD_TARGET": 4}
    for name, value in bits.items():
        assert getattr(_C, name) == getattr(_status_bits, name) == value, name


def test_cpu_isa_is_the_dispatchers_choice(monkeypatch):
    monkeypatch.delenv("SGKERNELS_CPU_ISA", raising=False)
    widest = _C.cpu_isa()
    assert widest in ("avx512", "avx2", "generic")
    monkeypatch.setenv("SGKERNELS_CPU_ISA", "generic")
    assert _C.cpu_isa() == "generic"
    monkeypatch.setenv("SGKERNELS_CPU_ISA", "avx2")
    assert _C.cpu_isa() == ("generic" if widest == "generic" else "avx2")
    monkeypatch.setenv("SGKERNELS_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="SGKERNELS_CPU_ISA"):
        _C.cpu_isa()


def test_public_namespace_is_the_public_api():
    import sgkernels

    names = [n for n in dir(sgkernels) if not n.startswith("__")]
    assert "torch" not in names and "importlib" not in names
    assert sorted(names) == sorted(sgkernels.__all__)
    for name in sgkernels.__all__:  # every listed name resolves (lazy ones included)
        assert getattr(sgkernels, name) is not None
