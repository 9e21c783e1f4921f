"""Bits of the device-side status word that kernels OR into (raised by ``sgkernels.ops._status``).

A primitive below both ``kernels/`` and ``ops/`` so that kernels never import an op module.
"""
NONFINITE_LOGITS = 1  # a sampled row had NaN / +inf guided logits, or was all -inf
NEGATIVE_NUM_TO_MASK = 2  # num_to_mask[b] < 0
BAD_TARGET = 4  # cross_entropy: a target outside [0, V) that is not ignore_index
