// Small scalar helpers shared by the CPU kernels: a contraction barrier, a fast float32 exp and an
// order-preserving float -> uint32 key.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Keep `v` materialised so the compiler cannot fuse the multiply that produced it into an FMA
// with a later add (the references round a*b and then a+b separately).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SGK_NO_CONTRACT(v) __asm__("" : "+x"(v))
#elif defined(__GNUC__) && defined(__aarch64__)
#define SGK_NO_CONTRACT(v) __asm__("" : "+w"(v))
#else
#define SGK_NO_CONTRACT(v) ((void)0)
#endif

namespace sgk {

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// Cephes-style expf: range reduction by ln2 (two-part constant), degree-6 polynomial, scale by
// 2^n through the exponent bits. About 1 ulp on [-87, 0]; x < -87 (and -inf) -> 0; no NaN. The AVX2 kernel (cpu_rows.h) uses the same constants and steps.
constexpr float kExpLo = -87.0f;
constexpr float kExpHi = 88.3f;  // the AVX kernels clamp to it; fast_expf assumes x <= 88
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f;
constexpr float kExpP1 = 1.3981999507e-3f;
constexpr float kExpP2 = 8.3334519073e-3f;
constexpr float kExpP3 = 4.1665795894e-2f;
constexpr float kExpP4 = 1.6666665459e-1f;
constexpr float kExpP5 = 5.0000001201e-1f;

inline float fast_expf(float x) {
  // Branch- and conversion-free so loops of it vectorise with plain -O3: keep = all ones iff
  // x >= kExpLo (false for -inf and NaN, whose lanes compute garbage that is then masked to 0).
  // Adding 1.5 * 2^23 rounds x * log2(e) to the nearest integer n, whose bits are then the low
  // bits of t. Callers pass x <= 0 (the kernels only take exp(g - max)); valid for x <= 88.
  const uint32_t keep = 0u - static_cast<uint32_t>(x >= kExpLo);
  const float t = x * kLog2e + 12582912.0f;
  const float n = t - 12582912.0f;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kExpP0;
  p = p * r + kExpP1;
  p = p * r + kExpP2;
  p = p * r + kExpP3;
  p = p * r + kExpP4;
  p = p * r + kExpP5;
  const float y = p * r * r + r + 1.0f;
  const uint32_t scale_bits = (float_to_bits(t) - 0x4B400000u + 127u) << 23;
  return bits_to_float(float_to_bits(y * bits_to_float(scale_bits)) & keep);
}

// uint32 key with key(a) < key(b) iff a < b as floats; -0 and +0 map to the same key; every NaN
// maps to the largest key (torch's sort puts NaN last).
inline uint32_t order_key(float f) {
  if (f != f) return 0xFFFFFFFFu;
  f = f + 0.0f;  // -0 -> +0
  const uint32_t b = float_to_bits(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

}  // namespace sgk
