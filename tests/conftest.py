"""Test setup: without a CUDA GPU the Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before anything imports triton (``triton.jit`` reads it when the
kernels are defined), so it is set here, before the test modules import sgkernels.
"""
import fnmatch
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
# dtype x shape, ...) at least once; above LARGE_GRID instances, every single value at least once (each
# backend, dtype, shape, option). The rest of the grid, the full cross product, is ``slow``
# (``make test-all``). A grid stays whole when it is small.
FAST_GRID = 12
LARGE_GRID = 24


# Tests and instances that are slow for the fast tier, and why (node id glob -> reason). CPU seconds
# measured on the 2-core box; each keeps faster siblings in the fast tier (other backends, one tile).
SLOW_TESTS = {
    "test_remask.py::test_gumbel_top1_law[[]triton-interpret*": "a law test in the Triton interpreter (~150 s)",
    "test_triton_aot.py::test_aot_compile_all_kernels_sm80_sm90": "compiles every kernel config twice (~50 s)",
    "test_filters.py::test_confidence_matches_reference_and_dream[[]triton-interpret-*-multi-tile]":
        "the interpreter's multi-tile path, 32 passes per filter (~35 s each; one-tile stays fast)",
    "test_filters.py::test_filtered_chi_square[[]triton-interpret-*": "chi-square draws in the interpreter (5-20 s each)",
    "test_filters.py::test_top_p_boundary_kernels[[]triton-interpret-multi-tile]":
        "the interpreter's multi-tile path, 32 passes per filter, six filter cases (~60-300 s; one-tile stays fast)",
    "test_head_sample.py::test_distribution_is_exact[[]triton-interpret*": "a law test in the Triton interpreter (~33 s)",
    "test_head_sample.py::test_filtered_distribution_is_exact[[]triton-interpret*": "a law test in the interpreter",
    "test_cross_entropy.py::test_half_is_float32_math_rounded_once[[]*triton-interpret*-1000-*":
        "V = 1000 in the interpreter (~14 s)",
    "test_sampler.py::test_maskgit_256_two_steps_cpu": "the MaskGIT 256 configuration at full size (~20 s)",
    "test_digits.py::test_stages_smoke": "trains every digits stage for 3 steps (~11 s)",
    "test_compile.py::test_sampler_step_tensor_seed_compiles_once_per_step": "inductor compiles 4 steps (~11 s)",
    "test_gpu_suite.py::test_dry_run": "runs the whole GPU suite script in dry mode (~9 s)",
    "test_gpu_suite.py::test_timeout_keeps_the_log_and_goes_on": "waits for step time-outs (~8 s)",
    "test_train.py::test_ddp_two_processes_gloo": "starts two training processes (~8 s)",
    "test_compile.py::test_sampler_step": "inductor compiles the sampler's step (~7 s; the ops' compile stays fast)",
    "test_cli.py::test_demo_png_is_labelled_and_its_grids_unchanged": "the demo samples and evaluates (~5 s)",
    "test_paper_realsize.py::test_real_size_*": "the paper's model at its real size: 1.3 GB of weights, 2 steps (~1 min)",
    "test_dtype_compile.py::test_compile_inductor_cpu*": "inductor compiles the passes, C++ code generation (minutes on 2 busy cores)",
    "test_dtype_compile.py::test_compile_inside_step_graphs": "dynamo traces the tiny model's passes twice, eager and graphed (~3 s)",
    "test_dtype_compile.py::test_compiled_transformer_as_diffusers_users_do": "dynamo traces the backbone (~2 s)",
    "test_dtype_compile.py::test_cli_compile": "traces the passes in two CLI runs (generate --vae, evaluate) (~9 s)",
}


def _slow_reason(nodeid: str) -> str | None:
    name = nodeid.split("/")[-1]
    return next((why for pattern, why in SLOW_TESTS.items() if fnmatch.fnmatchcase(name, pattern)), None)


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
    for item in items:
        if _slow_reason(item.nodeid) is not None:
            item.add_marker(pytest.mark.slow)
    grids: dict = {}
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and item.get_closest_marker("slow") is None:
            grids.setdefault((item.path, item.cls, item.originalname), []).append(item)
    for grid in grids.values():
        if len(grid) > FAST_GRID:
            fast = pairwise_cover([item.callspec.id for item in grid], pairs=len(grid) <= LARGE_GRID)
            for item in grid:
                if item.callspec.id not in fast:
                    item.add_marker(pytest.mark.slow)


def pairwise_cover(ids: list[str], pairs: bool = True) -> set[str]:
    """Ids (``"cpp-fp32-V13-mean"``) such that every pair of values of two ``-``-separated fields that
    occurs in ``ids`` occurs in one of them (``pairs=False``: every single value): greedy, the first id
    first among equals (deterministic)."""
    def covered(case_id: str) -> set:
        fields = list(enumerate(case_id.split("-")))
        if not pairs:
            return set(fields)
        return {(a, b) for i, a in enumerate(fields) for b in fields[i + 1:]} or {(fields[0], None)}

    of = {i: covered(i) for i in ids}
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
