"""The backend switch."""
from __future__ import annotations

import pytest
import torch

import sgkernels as sgk


def test_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.setenv("SGKERNELS_BACKEND", "cpp")
    assert sgk.get_backend() == "cpp"
    with sgk.use_backend("torch"):
        assert sgk.get_backend() == "torch"
        with sgk.use_backend("auto"):
            assert sgk.get_backend() == "auto"
        assert sgk.get_backend() == "torch"
    assert sgk.get_backend() == "cpp"


def test_bad_backend(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        with sgk.use_backend("cuda"):
            pass
    monkeypatch.setenv("SGKERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend"):
        sgk.guided_sample(torch.randn(2, 3))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from sgkernels._backend import triton_available

    if not triton_available():
        pytest.skip("triton not installed")
    with sgk.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sgk.guided_sample(torch.randn(2, 3))
