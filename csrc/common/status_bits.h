// Bits of the int32 status word that the kernels OR into on bad input (sgkernels/ops/_status.py
// raises them). The one definition: module.cpp exports them as constants of sgkernels._C, which
// sgkernels/_status_bits.py re-exports to the Triton kernels and the ops.
#pragma once

// X(name, value): the name is the same in C++ (sgk::status::name) and Python (_C.name).
#define SGK_STATUS_BITS(X)                                                         \
  X(NONFINITE_LOGITS, 1)     /* a sampled row had NaN / +inf guided logits, or was all -inf */ \
  X(NEGATIVE_NUM_TO_MASK, 2) /* num_to_mask[b] < 0 */                                           \
  X(BAD_TARGET, 4)           /* cross_entropy: a target outside [0, V) that is not ignore_index */

namespace sgk::status {
#define SGK_STATUS_ENUM(name, value) name = value,
enum Bit : int { SGK_STATUS_BITS(SGK_STATUS_ENUM) };
#undef SGK_STATUS_ENUM
}  // namespace sgk::status
