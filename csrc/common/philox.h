// Philox4x32-10 and the two draws sgkernels takes from each row's words: the spec is
// sgkernels/_rng.py (bit-identical to Triton's tl.philox). Header-only, scalar, no torch deps.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/isa.h"

namespace sgk {

struct PhiloxWords {
  uint32_t w0, w1, w2, w3;
};

// Words of flattened row `row` for the stream (seed, offset):
// key = (seed lo, seed hi), counter = (row lo, row hi, offset lo, offset hi).
inline PhiloxWords philox_row(uint64_t seed, uint64_t offset, uint64_t row) {
  uint32_t c0 = static_cast<uint32_t>(row), c1 = static_cast<uint32_t>(row >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n1 = static_cast<uint32_t>(pb);
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    const uint32_t n3 = static_cast<uint32_t>(pa);
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// float64 uniform strictly inside (0, 1): ((w0 << 20) | (w1 >> 12) + 0.5) * 2^-52.
inline double token_uniform(uint32_t w0, uint32_t w1) {
  const uint64_t u52 = (static_cast<uint64_t>(w0) << 20) | static_cast<uint64_t>(w1 >> 12);
  return (static_cast<double>(u52) + 0.5) * 0x1p-52;
}

// float32 Gumbel(0, 1) from words w2, w3, exactly as _rng.gumbel.
inline float gumbel(uint32_t w2, uint32_t w3) {
  float hi = static_cast<float>(static_cast<int32_t>(w2 & 0x7FFFFFFFu)) * 0x1p-32f;
  float lo = (static_cast<float>(w3) + 1.0f) * 0x1p-64f;
  SGK_NO_CONTRACT(hi);
  SGK_NO_CONTRACT(lo);
  const double v = static_cast<double>(hi + lo);
  const double e = (w2 >> 31) ? -std::log(v) : -std::log1p(-v);
  return static_cast<float>(-std::log(e));
}

}  // namespace sgk
