// The one float32 exp of the CPU kernels, for arguments <= 0 (they only take exp(x - max)):
// Cephes-style range reduction by ln2 (two-part constant), degree-6 polynomial, scaling by 2^n
// through the exponent bits. About 1 ulp on [-87, 0]; x < -87 and -inf give 0, NaN gives NaN.
// exp_nonpos is the scalar form (branch-free so loops of it vectorise with plain -O3); avx2::exp8
// and avx512::exp16 are the same steps on 8 and 16 lanes, with FMA.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/isa.h"

namespace sgk {

constexpr float kExpLo = -87.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f;
constexpr float kExpP1 = 1.3981999507e-3f;
constexpr float kExpP2 = 8.3334519073e-3f;
constexpr float kExpP3 = 4.1665795894e-2f;
constexpr float kExpP4 = 1.6666665459e-1f;
constexpr float kExpP5 = 5.0000001201e-1f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer

SGK_INLINE float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

SGK_INLINE uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

SGK_INLINE float exp_nonpos(float x) {
  // keep = all ones unless x < kExpLo (-inf included; NaN is kept and stays NaN). t = x log2(e)
  // + 1.5 * 2^23 holds n = round(x log2(e)) in its low mantissa bits.
  const uint32_t keep = 0u - static_cast<uint32_t>(!(x < kExpLo));
  const float t = x * kLog2e + kRoundMagic;
  const float n = t - kRoundMagic;
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

#if SGK_X86
SGK_BEGIN_AVX2
// exp_nonpos on 8 lanes (lanes below kExpLo, -inf included, give 0).
SGK_INLINE __m256 exp8(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_GE_OQ);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(kRoundMagic));
  const __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(kRoundMagic));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP5));
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 y = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i k = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127 - 0x4B400000)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(k)), keep);
}
SGK_END_AVX2

SGK_BEGIN_AVX512
// exp_nonpos on 16 lanes (lanes below kExpLo, -inf included, give 0).
SGK_INLINE __m512 exp16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_GE_OQ);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(kRoundMagic));
  const __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(kRoundMagic));
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP5));
  const __m512 r2 = _mm512_mul_ps(r, r);
  const __m512 y = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(keep, y, n);  // y * 2^n, n >= -126 on the kept lanes
}
SGK_END_AVX512
#endif

}  // namespace sgk
