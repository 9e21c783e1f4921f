// Per-row building blocks of the CPU sampling kernels, on a thread-local float32 row buffer.
//
// Every row is processed as:
//   load:       g[i] = guide[i] + c * (logits[i] - guide[i]) (or logits[i]) in float32 for i < V,
//               g[i] = -inf for V <= i < Vp (Vp = V rounded up to kBlock), returning max(g) and
//               whether any g[i] is NaN or +inf;
//   exp_blocks: e[i] = exp((g[i] - M) * scale), the float64 sum of each kBlock block and of all;
//   sum_exp:    sum_i exp(g[i] - M) (float32 inside a block, float64 across blocks).
// Three implementations: portable scalar code, AVX2+FMA(+F16C) and AVX-512 intrinsics, chosen once
// at run time (cpu_kernels()). No -march flag is needed: the AVX2 functions carry a target attribute.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "cpu_math.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define SGK_HAVE_AVX2 1
#include <immintrin.h>
#else
#define SGK_HAVE_AVX2 0
#endif

namespace sgk {

constexpr int64_t kBlock = 64;  // elements per block of the two-level CDF search

inline int64_t padded_len(int64_t v) { return (v + kBlock - 1) / kBlock * kBlock; }

struct LoadResult {
  float max;
  bool bad;  // some g[i] is NaN or +inf
};

// Element type index: 0 float32, 1 bfloat16, 2 float16.
using LoadFn = LoadResult (*)(const void* l, const void* u, int64_t v, int64_t vp, float c, float* g);
using ExpBlocksFn = double (*)(const float* g, int64_t vp, float m, float scale, float* e, double* bsum);
using SumExpFn = double (*)(const float* g, int64_t vp, float m);

struct CpuKernels {
  LoadFn load[3][3];  // [logits type][guide type]; a null guide uses load[t][t] with u == nullptr
  ExpBlocksFn exp_blocks;
  SumExpFn sum_exp;
  const char* isa;
};

// ------------------------------------------------------------------------------------------------
// Portable scalar implementation.
namespace generic {

template <typename TL, typename TU>
LoadResult load(const void* lv, const void* uv, int64_t v, int64_t vp, float c, float* g) {
  const TL* l = static_cast<const TL*>(lv);
  const TU* u = static_cast<const TU*>(uv);
  constexpr float inf = std::numeric_limits<float>::infinity();
  float m = -inf;
  bool bad = false;
  if (u == nullptr) {
    for (int64_t i = 0; i < v; ++i) {
      const float x = static_cast<float>(l[i]);
      bad |= !(x < inf);
      m = x > m ? x : m;
      g[i] = x;
    }
  } else {
    for (int64_t i = 0; i < v; ++i) {
      const float ui = static_cast<float>(u[i]);
      float p = c * (static_cast<float>(l[i]) - ui);
      SGK_NO_CONTRACT(p);
      const float x = ui + p;
      bad |= !(x < inf);
      m = x > m ? x : m;
      g[i] = x;
    }
  }
  for (int64_t i = v; i < vp; ++i) g[i] = -inf;
  return {m, bad};
}

// Written as independent lanes (no ordered reduction) so that -O3 can vectorise it with SSE2.
inline double exp_blocks(const float* g, int64_t vp, float m, float scale, float* e, double* bsum) {
  double z = 0.0;
  for (int64_t b = 0; b < vp / kBlock; ++b) {
    const int64_t base = b * kBlock;
    for (int64_t i = 0; i < kBlock; ++i) e[base + i] = fast_expf((g[base + i] - m) * scale);
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < kBlock; i += 8)
      for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(e[base + i + j]);
    const double s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    bsum[b] = s;
    z += s;
  }
  return z;
}

inline double sum_exp(const float* g, int64_t vp, float m) {
  double z = 0.0;
  for (int64_t b = 0; b < vp / kBlock; ++b) {
    const int64_t base = b * kBlock;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < kBlock; i += 8)
      for (int j = 0; j < 8; ++j) acc[j] += fast_expf(g[base + i + j] - m);
    z += static_cast<double>(((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
  }
  return z;
}

}  // namespace generic

// ------------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C implementation.
#if SGK_HAVE_AVX2
namespace avx2 {

#define SGK_AVX2_FN __attribute__((target("avx2,fma,f16c"), always_inline)) inline
#define SGK_AVX2 __attribute__((target("avx2,fma,f16c")))

template <typename T>
struct Load8;

template <>
struct Load8<float> {
  SGK_AVX2_FN static __m256 run(const float* p) { return _mm256_loadu_ps(p); }
};
template <>
struct Load8<c10::BFloat16> {
  SGK_AVX2_FN static __m256 run(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
};
template <>
struct Load8<c10::Half> {
  SGK_AVX2_FN static __m256 run(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

// fast_expf on 8 lanes (inputs <= 0; lanes below kExpLo, -inf included, give 0).
SGK_AVX2_FN __m256 exp8(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_GE_OQ);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(12582912.0f));
  const __m256 n = _mm256_sub_ps(t, _mm256_set1_ps(12582912.0f));
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

// One vector of g from 8 logits (and 8 guide logits). Returns g; updates max and bad.
template <typename TL, typename TU, bool kGuide>
SGK_AVX2_FN __m256 guided8(const TL* l, const TU* u, __m256 c) {
  const __m256 x = Load8<TL>::run(l);
  if constexpr (!kGuide) {
    return x;
  } else {
    const __m256 uu = Load8<TU>::run(u);
    __m256 p = _mm256_mul_ps(c, _mm256_sub_ps(x, uu));
    SGK_NO_CONTRACT(p);
    return _mm256_add_ps(uu, p);
  }
}

template <typename TL, typename TU, bool kGuide>
SGK_AVX2 LoadResult load_impl(const TL* l, const TU* u, int64_t v, int64_t vp, float c, float* g) {
  const __m256 vc = _mm256_set1_ps(c);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 pinf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 m0 = ninf, m1 = ninf, bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= v; i += 16) {
    const __m256 x0 = guided8<TL, TU, kGuide>(l + i, kGuide ? u + i : u, vc);
    const __m256 x1 = guided8<TL, TU, kGuide>(l + i + 8, kGuide ? u + i + 8 : u, vc);
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(x0, pinf, _CMP_NLT_UQ), _mm256_cmp_ps(x1, pinf, _CMP_NLT_UQ)));
    m0 = _mm256_max_ps(m0, x0);
    m1 = _mm256_max_ps(m1, x1);
    _mm256_storeu_ps(g + i, x0);
    _mm256_storeu_ps(g + i + 8, x1);
  }
  for (; i < v; i += 8) {
    const int64_t rem = v - i < 8 ? v - i : 8;
    __m256 x;
    if (rem == 8) {
      x = guided8<TL, TU, kGuide>(l + i, kGuide ? u + i : u, vc);
    } else {  // tail: copy into zero-padded temporaries, then mask the padding to -inf
      alignas(32) TL lt[8];
      alignas(32) TU ut[8];
      std::memset(static_cast<void*>(lt), 0, sizeof lt);
      std::memset(static_cast<void*>(ut), 0, sizeof ut);
      std::memcpy(static_cast<void*>(lt), l + i, rem * sizeof(TL));
      if (kGuide) std::memcpy(static_cast<void*>(ut), u + i, rem * sizeof(TU));
      x = guided8<TL, TU, kGuide>(lt, ut, vc);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), lane));
      x = _mm256_blendv_ps(ninf, x, keep);
    }
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(x, pinf, _CMP_NLT_UQ));
    m0 = _mm256_max_ps(m0, x);
    _mm256_storeu_ps(g + i, x);
  }
  for (i = (v + 7) / 8 * 8; i < vp; i += 8) _mm256_storeu_ps(g + i, ninf);
  m0 = _mm256_max_ps(m0, m1);
  alignas(32) float mm[8];
  _mm256_store_ps(mm, m0);
  float m = mm[0];
  for (int j = 1; j < 8; ++j) m = mm[j] > m ? mm[j] : m;
  return {m, _mm256_movemask_ps(bad) != 0};
}

template <typename TL, typename TU>
SGK_AVX2 LoadResult load(const void* lv, const void* uv, int64_t v, int64_t vp, float c, float* g) {
  const TL* l = static_cast<const TL*>(lv);
  const TU* u = static_cast<const TU*>(uv);
  if (u == nullptr) return load_impl<TL, TU, false>(l, u, v, vp, c, g);
  return load_impl<TL, TU, true>(l, u, v, vp, c, g);
}

SGK_AVX2_FN double hsum_pd(__m256d a) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

SGK_AVX2 inline double exp_blocks(const float* g, int64_t vp, float m, float scale, float* e, double* bsum) {
  const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(scale);
  double z = 0.0;
  for (int64_t b = 0; b < vp / kBlock; ++b) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd(), a2 = _mm256_setzero_pd(), a3 = _mm256_setzero_pd();
    const int64_t base = b * kBlock;
    for (int64_t j = 0; j < kBlock; j += 16) {
      const __m256 y0 = exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(g + base + j), vm), vs));
      const __m256 y1 = exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(g + base + j + 8), vm), vs));
      _mm256_storeu_ps(e + base + j, y0);
      _mm256_storeu_ps(e + base + j + 8, y1);
      a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(y0)));
      a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(y0, 1)));
      a2 = _mm256_add_pd(a2, _mm256_cvtps_pd(_mm256_castps256_ps128(y1)));
      a3 = _mm256_add_pd(a3, _mm256_cvtps_pd(_mm256_extractf128_ps(y1, 1)));
    }
    const double s = hsum_pd(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
    bsum[b] = s;
    z += s;
  }
  return z;
}

SGK_AVX2 inline double sum_exp(const float* g, int64_t vp, float m) {
  const __m256 vm = _mm256_set1_ps(m);
  double z = 0.0;
  for (int64_t b = 0; b < vp / kBlock; ++b) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    const int64_t base = b * kBlock;
    for (int64_t j = 0; j < kBlock; j += 16) {
      a0 = _mm256_add_ps(a0, exp8(_mm256_sub_ps(_mm256_loadu_ps(g + base + j), vm)));
      a1 = _mm256_add_ps(a1, exp8(_mm256_sub_ps(_mm256_loadu_ps(g + base + j + 8), vm)));
    }
    const __m256 a = _mm256_add_ps(a0, a1);
    z += hsum_pd(_mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1))));
  }
  return z;
}

#undef SGK_AVX2_FN
#undef SGK_AVX2

}  // namespace avx2

// ------------------------------------------------------------------------------------------------
// AVX-512 (F + BW + DQ + VL) implementation: the same steps as avx2, 16 lanes.
namespace avx512 {

#define SGK_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"), always_inline)) inline
#define SGK_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))

template <typename T>
struct Load16;

template <>
struct Load16<float> {
  SGK_AVX512_FN static __m512 run(const float* p) { return _mm512_loadu_ps(p); }
  SGK_AVX512_FN static __m512 run_masked(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
};
template <>
struct Load16<c10::BFloat16> {
  SGK_AVX512_FN static __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  SGK_AVX512_FN static __m512 run(const c10::BFloat16* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  SGK_AVX512_FN static __m512 run_masked(const c10::BFloat16* p, __mmask16 k) {
    return widen(_mm256_maskz_loadu_epi16(k, p));
  }
};
template <>
struct Load16<c10::Half> {
  SGK_AVX512_FN static __m512 run(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  SGK_AVX512_FN static __m512 run_masked(const c10::Half* p, __mmask16 k) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
  }
};

// fast_expf on 16 lanes (inputs <= 0; lanes below kExpLo, -inf included, give 0).
SGK_AVX512_FN __m512 exp16(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_GE_OQ);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(12582912.0f));
  const __m512 n = _mm512_sub_ps(t, _mm512_set1_ps(12582912.0f));
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

template <typename TL, typename TU, bool kGuide>
SGK_AVX512_FN __m512 guided16(__m512 x, const TU* u, __m512 c, __mmask16 k, bool masked) {
  if constexpr (!kGuide) {
    return x;
  } else {
    const __m512 uu = masked ? Load16<TU>::run_masked(u, k) : Load16<TU>::run(u);
    __m512 p = _mm512_mul_ps(c, _mm512_sub_ps(x, uu));
    SGK_NO_CONTRACT(p);
    return _mm512_add_ps(uu, p);
  }
}

template <typename TL, typename TU, bool kGuide>
SGK_AVX512 LoadResult load_impl(const TL* l, const TU* u, int64_t v, int64_t vp, float c, float* g) {
  const __m512 vc = _mm512_set1_ps(c);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 pinf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 m0 = ninf, m1 = ninf;
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 32 <= v; i += 32) {
    const __m512 x0 = guided16<TL, TU, kGuide>(Load16<TL>::run(l + i), kGuide ? u + i : u, vc, 0xFFFF, false);
    const __m512 x1 = guided16<TL, TU, kGuide>(Load16<TL>::run(l + i + 16), kGuide ? u + i + 16 : u, vc, 0xFFFF, false);
    bad |= _mm512_cmp_ps_mask(x0, pinf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(x1, pinf, _CMP_NLT_UQ);
    m0 = _mm512_max_ps(m0, x0);
    m1 = _mm512_max_ps(m1, x1);
    _mm512_storeu_ps(g + i, x0);
    _mm512_storeu_ps(g + i + 16, x1);
  }
  for (; i < v; i += 16) {
    const int64_t rem = v - i < 16 ? v - i : 16;
    const __mmask16 k = static_cast<__mmask16>((1u << rem) - 1u);
    __m512 x = guided16<TL, TU, kGuide>(Load16<TL>::run_masked(l + i, k), kGuide ? u + i : u, vc, k, true);
    x = _mm512_mask_blend_ps(k, ninf, x);
    bad |= _mm512_mask_cmp_ps_mask(k, x, pinf, _CMP_NLT_UQ);
    m0 = _mm512_max_ps(m0, x);
    _mm512_storeu_ps(g + i, x);
  }
  for (i = (v + 15) / 16 * 16; i < vp; i += 16) _mm512_storeu_ps(g + i, ninf);
  return {_mm512_reduce_max_ps(_mm512_max_ps(m0, m1)), bad != 0};
}

template <typename TL, typename TU>
SGK_AVX512 LoadResult load(const void* lv, const void* uv, int64_t v, int64_t vp, float c, float* g) {
  const TL* l = static_cast<const TL*>(lv);
  const TU* u = static_cast<const TU*>(uv);
  if (u == nullptr) return load_impl<TL, TU, false>(l, u, v, vp, c, g);
  return load_impl<TL, TU, true>(l, u, v, vp, c, g);
}

SGK_AVX512 inline double exp_blocks(const float* g, int64_t vp, float m, float scale, float* e, double* bsum) {
  const __m512 vm = _mm512_set1_ps(m), vs = _mm512_set1_ps(scale);
  double z = 0.0;
  for (int64_t b = 0; b < vp / kBlock; ++b) {
    const int64_t base = b * kBlock;
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    for (int64_t j = 0; j < kBlock; j += 32) {
      const __m512 y0 = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(g + base + j), vm), vs));
      const __m512 y1 = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(g + base + j + 16), vm), vs));
      _mm512_storeu_ps(e + base + j, y0);
      _mm512_storeu_ps(e + base + j + 16, y1);
      a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(y0)));
      a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y0), 1))));
      a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(y1)));
      a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y1), 1))));
    }
    const double s = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
    bsum[b] = s;
    z += s;
  }
  return z;
}

SGK_AVX512 inline double sum_exp(const float* g, int64_t vp, float m) {
  const __m512 vm = _mm512_set1_ps(m);
  double z = 0.0;
  for (int64_t b = 0; b < vp / kBlock; ++b) {
    const int64_t base = b * kBlock;
    __m512 a0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(g + base), vm));
    __m512 a1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(g + base + 16), vm));
    a0 = _mm512_add_ps(a0, exp16(_mm512_sub_ps(_mm512_loadu_ps(g + base + 32), vm)));
    a1 = _mm512_add_ps(a1, exp16(_mm512_sub_ps(_mm512_loadu_ps(g + base + 48), vm)));
    const __m512 a = _mm512_add_ps(a0, a1);
    z += _mm512_reduce_add_pd(_mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(a)),
                                            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)))));
  }
  return z;
}

#undef SGK_AVX512_FN
#undef SGK_AVX512

}  // namespace avx512
#endif  // SGK_HAVE_AVX2

// ------------------------------------------------------------------------------------------------
namespace detail {

template <typename Impl>
CpuKernels make_kernels(const char* isa) {
  CpuKernels k{};
  k.isa = isa;
  Impl::template fill<float, float>(k.load[0][0]);
  Impl::template fill<float, c10::BFloat16>(k.load[0][1]);
  Impl::template fill<float, c10::Half>(k.load[0][2]);
  Impl::template fill<c10::BFloat16, float>(k.load[1][0]);
  Impl::template fill<c10::BFloat16, c10::BFloat16>(k.load[1][1]);
  Impl::template fill<c10::BFloat16, c10::Half>(k.load[1][2]);
  Impl::template fill<c10::Half, float>(k.load[2][0]);
  Impl::template fill<c10::Half, c10::BFloat16>(k.load[2][1]);
  Impl::template fill<c10::Half, c10::Half>(k.load[2][2]);
  Impl::fill_rest(k);
  return k;
}

struct GenericImpl {
  template <typename TL, typename TU>
  static void fill(LoadFn& f) { f = &generic::load<TL, TU>; }
  static void fill_rest(CpuKernels& k) {
    k.exp_blocks = &generic::exp_blocks;
    k.sum_exp = &generic::sum_exp;
  }
};

#if SGK_HAVE_AVX2
struct Avx512Impl {
  template <typename TL, typename TU>
  static void fill(LoadFn& f) { f = &avx512::load<TL, TU>; }
  static void fill_rest(CpuKernels& k) {
    k.exp_blocks = &avx512::exp_blocks;
    k.sum_exp = &avx512::sum_exp;
  }
};

struct Avx2Impl {
  template <typename TL, typename TU>
  static void fill(LoadFn& f) { f = &avx2::load<TL, TU>; }
  static void fill_rest(CpuKernels& k) {
    k.exp_blocks = &avx2::exp_blocks;
    k.sum_exp = &avx2::sum_exp;
  }
};
#endif

// SGKERNELS_CPU_ISA=generic|avx2 caps the instruction set (to test every path on one machine).
inline CpuKernels choose_kernels() {
  const char* env = std::getenv("SGKERNELS_CPU_ISA");
  const std::string cap = env == nullptr ? "" : env;
  if (cap == "generic") return make_kernels<GenericImpl>("generic");
#if SGK_HAVE_AVX2
  __builtin_cpu_init();
  if (cap != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return make_kernels<Avx512Impl>("avx512");
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return make_kernels<Avx2Impl>("avx2");
  }
#endif
  return make_kernels<GenericImpl>("generic");
}

}  // namespace detail

// The kernels for this CPU (chosen on first use).
inline const CpuKernels& cpu_kernels() {
  static const CpuKernels k = detail::choose_kernels();
  return k;
}

}  // namespace sgk
