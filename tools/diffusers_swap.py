"""pytest plugin: run diffusers' own tests of ``BlockRefinementScheduler``, ``EntropyBoundScheduler`` and
``LLaDA2Pipeline`` (and ``DiffusionGemmaPipeline``) with sgkernels' fused classes swapped in (``make test-diffusers-upstream``).

Loaded with ``-p diffusers_swap`` (``tools/`` on ``PYTHONPATH``): before the test files are imported,
the names in ``diffusers`` (and ``diffusers.schedulers`` / ``diffusers.pipelines``) point at
:class:`FusedBlockRefinementScheduler`, :class:`FusedEntropyBoundScheduler`,
:class:`FusedLLaDA2Pipeline` and :class:`FusedDiffusionGemmaPipeline`, so ``from diffusers import BlockRefinementScheduler`` in those files
gets the fused class. The test files are read from the diffusers repository, never copied here.
"""
from __future__ import annotations

SWAPS = {
    "BlockRefinementScheduler": "FusedBlockRefinementScheduler",
    "EntropyBoundScheduler": "FusedEntropyBoundScheduler",
    "LLaDA2Pipeline": "FusedLLaDA2Pipeline",
    "DiffusionGemmaPipeline": "FusedDiffusionGemmaPipeline",  # diffusers >= 0.42
}


def pytest_configure(config):
    import diffusers
    import diffusers.pipelines
    import diffusers.schedulers

    from sgkernels.integrations import diffusers as fused

    for stock, ours in SWAPS.items():
        if not hasattr(diffusers, stock):  # an older diffusers without this class (nor its tests)
            continue
        cls = getattr(fused, ours)
        for module in (diffusers, diffusers.schedulers, diffusers.pipelines):
            setattr(module, stock, cls)


def pytest_report_header(config):
    return "diffusers_swap: " + ", ".join(f"{k} -> {v}" for k, v in SWAPS.items())
