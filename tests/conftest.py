"""Test setup: without a CUDA GPU the Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before anything imports triton (``triton.jit`` reads it when the
kernels are defined), so it is set here, before the test modules import sgkernels.
"""
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import op_contract  # noqa: E402  (after TRITON_INTERPRET: it imports sgkernels)


# A skipif with one of these reasons means "runs on the GPU when there is one": such tests are CUDA
# tests, whatever their file forgot to say (``-m cuda`` in benchmarks/gpu_suite.sh selects them).
_GPU_SKIP_REASON = re.compile(r"\bno CUDA device\b|\bneeds a CUDA device\b|\bwithout a GPU\b")


def pytest_collection_modifyitems(config, items):
    """Mark ``cuda`` every test that runs on a CUDA device when one is visible (see _GPU_SKIP_REASON)."""
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            continue
        reasons = [m.kwargs.get("reason", "") for m in item.iter_markers("skipif")]
        if any(_GPU_SKIP_REASON.search(r) for r in reasons):
            item.add_marker(pytest.mark.cuda)


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
