"""Drop-ins for the code users already run, built on the public fused ops only.

* :mod:`sgkernels.integrations.llada`: LLaDA's ``generate()`` (blockwise masked-diffusion decoding,
  left-padded batches, CFG, low-confidence / random remasking, EOS/EoT flags, Fast-dLLM's threshold
  and factor rules) with one fused op per step, and Fast-dLLM's ``generate_with_prefix_cache`` /
  ``generate_with_dual_cache``.
* :mod:`sgkernels.integrations.dream`: Dream's ``diffusion_generate`` and ``patch(model)`` (needs
  ``transformers``; import the submodule explicitly).
* :mod:`sgkernels.integrations.diffusers`: ``FusedAmusedScheduler`` and ``FusedAmusedPipeline``, and
  for block diffusion (LLaDA2 / DiffusionGemma, diffusers >= 0.39) ``FusedBlockRefinementScheduler``,
  ``FusedEntropyBoundScheduler``, ``FusedLLaDA2Pipeline`` and (diffusers >= 0.42)
  ``FusedDiffusionGemmaPipeline`` (needs the optional ``diffusers`` and
  ``transformers`` packages; import the submodule explicitly).

Submodules are imported on demand, so ``import sgkernels`` never needs diffusers or transformers.
"""
