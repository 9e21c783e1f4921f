"""Benchmarks: every op against the code users would otherwise run, in one process.

``python -m benchmarks`` runs them all and writes ``benchmarks/RESULTS.md``. Each ``bench_<op>.py``
exposes ``run(device, quick) -> list[dict]`` rows with keys ``op, shape, dtype, impl, ms, peak_mb``
and optionally ``bytes`` (for bandwidth) or ``flops``; the row whose impl is ``"sgkernels"`` is the
one the ratios are taken against.
"""
