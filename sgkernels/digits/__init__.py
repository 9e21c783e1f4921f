"""The embedded digits model: a toy end-to-end MaskGIT + self-guidance pipeline that runs on a CPU.

* :mod:`.data`: scikit-learn's 8x8 digits upscaled to 32x32, a fixed seeded train / held-out split;
* :mod:`.nets`: the VQ tokenizer (32x32 -> 8x8 tokens) and the evaluation CNN classifier, their
  directory format, and the generator checkpoint loader;
* :mod:`.pipeline`: :class:`DigitsModel`, loading a model directory (default: the shipped weights in
  ``sgkernels/assets/digits``) and generating images (inference only: no training code);
* :mod:`.metrics`: FID, Inception Score and k-NN precision / recall on the classifier's features;
* :mod:`.evaluate`: sample and score a model, the metric line; :mod:`.plot`: the IS-FID sweep plot;
* :mod:`.stages`: the training stages (tokenizer, generator, guide, classifier);
* :mod:`.cli`: the ``sgkernels generate | evaluate | demo | train`` commands.
"""
from .pipeline import DEFAULT_MODEL_DIR, DigitsModel, SamplingDefaults  # noqa: F401
