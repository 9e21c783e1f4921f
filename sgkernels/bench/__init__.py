"""``sgkernels bench``: throughput on your own model and device, stock against fused, and where the time goes.

* ``sgkernels bench sampler`` (:mod:`.sampler`): images/s of a self-guided MaskGIT model;
* ``sgkernels bench dllm`` (:mod:`.dllm`): tokens/s of a diffusion LM folder, upstream algorithm
  against the drop-in, with the greedy token agreement;
* ``sgkernels bench ops`` (:mod:`.ops`): every op against the code users run today, with the
  measured roofline (the rows of ``python -m benchmarks``: one code path).

Shared: :mod:`.timing` (device-synchronised timers, blocked autorange, median and spread, peak
memory), :mod:`.machine` (machine info, measured roofline), :mod:`.parts` (where the time goes),
:mod:`.anchors` (the baselines, written as the public code writes them), :mod:`.report` (table,
JSON, plot). Nothing here is imported by ``import sgkernels``.
"""
