"""Bits of the device-side status word that kernels OR into (raised by ``sgkernels.ops._status``).

Defined once, in csrc/common/status_bits.h, and exported by the extension. A primitive below both
``kernels/`` and ``ops/`` so that kernels never import an op module.
"""
import torch  # noqa: F401  (loads libc10/libtorch before the extension)

from ._C import BAD_TARGET, NEGATIVE_NUM_TO_MASK, NONFINITE_LOGITS

__all__ = ["BAD_TARGET", "NEGATIVE_NUM_TO_MASK", "NONFINITE_LOGITS"]
