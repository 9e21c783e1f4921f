"""Drop-ins for the code users already run, built on the public fused ops only.

* :mod:`sgkernels.integrations.llada`: LLaDA's ``generate()`` (blockwise masked-diffusion decoding,
  CFG, low-confidence / random remasking, Fast-dLLM's confidence threshold) with one fused op per step.
* :mod:`sgkernels.integrations.diffusers`: ``FusedAmusedScheduler`` and ``FusedAmusedPipeline``
  (needs the optional ``diffusers`` package; import the submodule explicitly).

Submodules are imported on demand, so ``import sgkernels`` never needs diffusers or transformers.
"""
