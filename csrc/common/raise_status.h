// Bad input found by one call of a CPU kernel: a Python ValueError raised by that call (never a
// shared flag, so threads calling at once get their own errors only). The messages are those of
// sgkernels/ops/_status.py.
#pragma once

#include <string>

#include <c10/util/Exception.h>

#include "common/status_bits.h"

namespace sgk::status {

inline void raise_flags(int flags) {
  if (flags == 0) return;
  std::string msg = "sgkernels (cpu): ";
  if (flags & NONFINITE_LOGITS) {
    msg += "logits: a sampled row had NaN or +inf guided logits (or all -inf); its token is meaningless";
  }
  if (flags & NEGATIVE_NUM_TO_MASK) {
    if (flags & NONFINITE_LOGITS) msg += "; ";
    msg += "num_to_mask: expected values >= 0, got a negative entry";
  }
  TORCH_CHECK_VALUE(false, msg);
}

}  // namespace sgk::status
