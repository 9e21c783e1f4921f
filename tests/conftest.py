"""Test setup: without a CUDA GPU the Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before anything imports triton (``triton.jit`` reads it when the
kernels are defined), so it is set here, before the test modules import sgkernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import op_contract  # noqa: E402  (after TRITON_INTERPRET: it imports sgkernels)


def pytest_generate_tests(metafunc):
    """The ``backend`` / ``kernel`` / ``case`` / ``bad`` arguments of the op test files."""
    op_contract.parametrize(metafunc)


@pytest.fixture
def one_thread_for_tiny_models(request):
    """Tiny models: one intra-op thread (OpenMP barriers dominate otherwise on a busy 2-core box).

    Tests whose name contains "maskgit_256" keep every thread.
    """
    n = torch.get_num_threads()
    if "maskgit_256" not in request.node.name:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
