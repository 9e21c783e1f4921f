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


# The fast tier (``make test``, ``-m "not slow"``) runs, of a test with more than FAST_GRID instances,
# a pairwise-covering subset of its parameter grid: every pair of parameter values (backend x dtype,
# dtype x shape, ...) at least once. The rest of the grid, the full cross product, is ``slow``
# (``make test-all``). A grid stays whole when it is small.
FAST_GRID = 12


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks added here
def pytest_collection_modifyitems(config, items):
    """Mark ``cuda`` every test that runs on a CUDA device when one is visible (see _GPU_SKIP_REASON),
    and ``slow`` the instances of large parameter grids outside their pairwise cover."""
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            continue
        reasons = [m.kwargs.get("reason", "") for m in item.iter_markers("skipif")]
        if any(_GPU_SKIP_REASON.search(r) for r in reasons):
            item.add_marker(pytest.mark.cuda)
    grids: dict = {}
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and item.get_closest_marker("slow") is None:
            grids.setdefault((item.path, item.cls, item.originalname), []).append(item)
    for grid in grids.values():
        if len(grid) > FAST_GRID:
            fast = pairwise_cover([item.callspec.id for item in grid])
            for item in grid:
                if item.callspec.id not in fast:
                    item.add_marker(pytest.mark.slow)


def pairwise_cover(ids: list[str]) -> set[str]:
    """Ids (``"cpp-fp32-V13-mean"``) such that every pair of values of two ``-``-separated fields that
    occurs in ``ids`` occurs in one of them: greedy, the first id first among equals (deterministic)."""
    def pairs(case_id: str) -> set:
        fields = list(enumerate(case_id.split("-")))
        return {(a, b) for i, a in enumerate(fields) for b in fields[i + 1:]} or {(fields[0], None)}

    of = {i: pairs(i) for i in ids}
    uncovered = set().union(*of.values())
    chosen: set[str] = set()
    while uncovered:
        best = max(ids, key=lambda i: len(of[i] & uncovered))
        chosen.add(best)
        uncovered -= of[best]
    return chosen


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
