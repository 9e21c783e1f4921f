"""The repository's benchmark scripts. The op rows, anchors and timing live in the package
(:mod:`sgkernels.bench`), so ``python -m benchmarks`` and the installed ``sgkernels bench ops`` are
one code path; this folder adds what only a checkout needs: writing ``benchmarks/RESULTS.md``, the
pytest-benchmark files (``pytest benchmarks/``), the GPU suite and its sanitizer runs.
"""
