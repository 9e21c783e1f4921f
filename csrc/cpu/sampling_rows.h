// Per-row building blocks of the CPU sampling kernels (csrc/cpu/sampling.cpp), on a thread-local
// float32 row buffer g. Every row is processed as:
//   load:       g[i] = guide[i] + (1 + s) * (logits[i] - guide[i]) (or logits[i]) in float32 for
//               i < V, g[i] = -inf for V <= i < Vp (Vp = V rounded up to kBlock), returning max(g)
//               and whether any g[i] is NaN or +inf. With a guide (the caller drops the term whose
//               coefficient, 1 + s or -s, is 0): g[i] = NaN if either term is NaN or +inf, else
//               -inf if either term is -inf (the token is excluded), else the formula;
//   exp_blocks: e[i] = exp((g[i] - M) * inv_temperature), the float64 sum of each kBlock block and of all;
//   sum_exp:    sum_i exp(g[i] - M) (float32 inside a block, float64 across blocks).
// One implementation per ISA (common/isa.h): portable scalar code (vectorised by the compiler),
// AVX2+FMA+F16C and AVX-512 intrinsics. Then, the same on every ISA, the token: cdf_sample.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/exp.h"
#include "common/isa.h"

namespace sgk {

constexpr int64_t kBlock = 64;  // elements per block of the two-level CDF search

inline int64_t padded_len(int64_t v) { return (v + kBlock - 1) / kBlock * kBlock; }

struct LoadResult {
  float max;
  bool bad;  // some g[i] is NaN or +inf
};

// The index of a dtype in SampleKernels::load: 0 float32, 1 bfloat16, 2 float16, -1 any other.
inline int dtype_index(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return 0;
    case c10::kBFloat16: return 1;
    case c10::kHalf: return 2;
    default: return -1;
  }
}

using LoadFn = LoadResult (*)(const void* logits, const void* guide, int64_t v, int64_t vp, float one_plus_s,
                              float* g);
using ExpBlocksFn = double (*)(const float* g, int64_t vp, float m, float inv_temperature, float* e, double* bsum);
using SumExpFn = double (*)(const float* g, int64_t vp, float m);

struct SampleKernels {
  LoadFn load[3][3];     // [logits dtype][guide dtype] (dtype_index)
  LoadFn load_plain[3];  // [logits dtype], no guide (its argument is ignored)
  ExpBlocksFn exp_blocks;
  SumExpFn sum_exp;
};

// kSampleKernels of one ISA namespace (expanded in each, after its load<TLogit, TGuide, kGuide>).
#define SGK_SAMPLE_KERNELS                                                                          \
  using BF16 = c10::BFloat16;                                                                       \
  using F16 = c10::Half;                                                                            \
  constexpr SampleKernels kSampleKernels = {                                                        \
      {{&load<float, float, true>, &load<float, BF16, true>, &load<float, F16, true>},              \
       {&load<BF16, float, true>, &load<BF16, BF16, true>, &load<BF16, F16, true>},                 \
       {&load<F16, float, true>, &load<F16, BF16, true>, &load<F16, F16, true>}},                   \
      {&load<float, float, false>, &load<BF16, BF16, false>, &load<F16, F16, false>},               \
      &exp_blocks,                                                                                  \
      &sum_exp};

// ------------------------------------------------------------------------------------------------
SGK_BEGIN_GENERIC

// kGuide: blend with the guide (else guide_v is ignored and g = logits).
template <typename TLogit, typename TGuide, bool kGuide>
LoadResult load(const void* logits, const void* guide_v, int64_t v, int64_t vp, float one_plus_s, float* g) {
  const TLogit* l = static_cast<const TLogit*>(logits);
  const TGuide* guide = static_cast<const TGuide*>(guide_v);
  constexpr float inf = std::numeric_limits<float>::infinity();
  constexpr float nan = std::numeric_limits<float>::quiet_NaN();
  float m = -inf;
  bool bad = false;
  for (int64_t i = 0; i < v; ++i) {
    const float li = static_cast<float>(l[i]);
    float x = li;
    if constexpr (kGuide) {
      const float gi = static_cast<float>(guide[i]);
      float p = one_plus_s * (li - gi);
      SGK_NO_CONTRACT(p);
      x = gi + p;
      // the blend rule of non-finite terms (see the header comment)
      x = (li == -inf || gi == -inf) ? -inf : x;
      x = (!(li < inf) || !(gi < inf)) ? nan : x;
    }
    bad |= !(x < inf);
    m = x > m ? x : m;
    g[i] = x;
  }
  for (int64_t i = v; i < vp; ++i) g[i] = -inf;
  return {m, bad};
}

// Written as independent lanes (no ordered reduction) so that -O3 can vectorise it with SSE2.
inline double exp_blocks(const float* g, int64_t vp, float m, float inv_temperature, float* e, double* bsum) {
  double z = 0.0;
  for (int64_t b = 0; b < vp / kBlock; ++b) {
    const int64_t base = b * kBlock;
    for (int64_t i = 0; i < kBlock; ++i) e[base + i] = exp_nonpos((g[base + i] - m) * inv_temperature);
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
      for (int j = 0; j < 8; ++j) acc[j] += exp_nonpos(g[base + i + j] - m);
    z += static_cast<double>(((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])));
  }
  return z;
}

SGK_SAMPLE_KERNELS

SGK_END_GENERIC

#if SGK_X86
// ------------------------------------------------------------------------------------------------
SGK_BEGIN_AVX2

template <typename T>
struct Load8;

template <>
struct Load8<float> {
  SGK_INLINE static __m256 run(const float* p) { return _mm256_loadu_ps(p); }
};
template <>
struct Load8<c10::BFloat16> {
  SGK_INLINE static __m256 run(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
};
template <>
struct Load8<c10::Half> {
  SGK_INLINE static __m256 run(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

// One vector of g from 8 logits (and 8 guide logits).
template <typename TLogit, typename TGuide, bool kGuide>
SGK_INLINE __m256 guided8(const TLogit* l, const TGuide* guide, __m256 one_plus_s) {
  const __m256 x = Load8<TLogit>::run(l);
  if constexpr (!kGuide) {
    return x;
  } else {
    const __m256 gu = Load8<TGuide>::run(guide);
    __m256 p = _mm256_mul_ps(one_plus_s, _mm256_sub_ps(x, gu));
    SGK_NO_CONTRACT(p);
    const __m256 pinf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    const __m256 neg = _mm256_or_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ), _mm256_cmp_ps(gu, ninf, _CMP_EQ_OQ));
    const __m256 bad = _mm256_or_ps(_mm256_cmp_ps(x, pinf, _CMP_NLT_UQ), _mm256_cmp_ps(gu, pinf, _CMP_NLT_UQ));
    const __m256 y = _mm256_blendv_ps(_mm256_add_ps(gu, p), ninf, neg);
    return _mm256_blendv_ps(y, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), bad);
  }
}

template <typename TLogit, typename TGuide, bool kGuide>
LoadResult load(const void* logits, const void* guide_v, int64_t v, int64_t vp, float one_plus_s, float* g) {
  const TLogit* l = static_cast<const TLogit*>(logits);
  const TGuide* guide = static_cast<const TGuide*>(guide_v);
  const __m256 vc = _mm256_set1_ps(one_plus_s);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 pinf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 m0 = ninf, m1 = ninf, bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= v; i += 16) {
    const __m256 x0 = guided8<TLogit, TGuide, kGuide>(l + i, kGuide ? guide + i : guide, vc);
    const __m256 x1 = guided8<TLogit, TGuide, kGuide>(l + i + 8, kGuide ? guide + i + 8 : guide, vc);
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
      x = guided8<TLogit, TGuide, kGuide>(l + i, kGuide ? guide + i : guide, vc);
    } else {  // tail: copy into zero-padded temporaries, then mask the padding to -inf
      alignas(32) TLogit lt[8];
      alignas(32) TGuide gt[8];
      std::memset(static_cast<void*>(lt), 0, sizeof lt);
      std::memset(static_cast<void*>(gt), 0, sizeof gt);
      std::memcpy(static_cast<void*>(lt), l + i, rem * sizeof(TLogit));
      if (kGuide) std::memcpy(static_cast<void*>(gt), guide + i, rem * sizeof(TGuide));
      x = guided8<TLogit, TGuide, kGuide>(lt, gt, vc);
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

SGK_INLINE double hsum_pd(__m256d a) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

inline double exp_blocks(const float* g, int64_t vp, float m, float inv_temperature, float* e, double* bsum) {
  const __m256 vm = _mm256_set1_ps(m), vs = _mm256_set1_ps(inv_temperature);
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

inline double sum_exp(const float* g, int64_t vp, float m) {
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

SGK_SAMPLE_KERNELS

SGK_END_AVX2

// ------------------------------------------------------------------------------------------------
// The same steps as avx2, 16 lanes, masked tails.
SGK_BEGIN_AVX512

template <typename T>
struct Load16;

template <>
struct Load16<float> {
  SGK_INLINE static __m512 run(const float* p) { return _mm512_loadu_ps(p); }
  SGK_INLINE static __m512 run_masked(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
};
template <>
struct Load16<c10::BFloat16> {
  SGK_INLINE static __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  SGK_INLINE static __m512 run(const c10::BFloat16* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  SGK_INLINE static __m512 run_masked(const c10::BFloat16* p, __mmask16 k) {
    return widen(_mm256_maskz_loadu_epi16(k, p));
  }
};
template <>
struct Load16<c10::Half> {
  SGK_INLINE static __m512 run(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  SGK_INLINE static __m512 run_masked(const c10::Half* p, __mmask16 k) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
  }
};

template <typename TGuide, bool kGuide>
SGK_INLINE __m512 guided16(__m512 x, const TGuide* guide, __m512 one_plus_s, __mmask16 k, bool masked) {
  if constexpr (!kGuide) {
    return x;
  } else {
    const __m512 gu = masked ? Load16<TGuide>::run_masked(guide, k) : Load16<TGuide>::run(guide);
    __m512 p = _mm512_mul_ps(one_plus_s, _mm512_sub_ps(x, gu));
    SGK_NO_CONTRACT(p);
    const __m512 pinf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const __mmask16 neg = _mm512_cmp_ps_mask(x, ninf, _CMP_EQ_OQ) | _mm512_cmp_ps_mask(gu, ninf, _CMP_EQ_OQ);
    const __mmask16 bad = _mm512_cmp_ps_mask(x, pinf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(gu, pinf, _CMP_NLT_UQ);
    const __m512 y = _mm512_mask_blend_ps(neg, _mm512_add_ps(gu, p), ninf);
    return _mm512_mask_blend_ps(bad, y, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
  }
}

template <typename TLogit, typename TGuide, bool kGuide>
LoadResult load(const void* logits, const void* guide_v, int64_t v, int64_t vp, float one_plus_s, float* g) {
  const TLogit* l = static_cast<const TLogit*>(logits);
  const TGuide* guide = static_cast<const TGuide*>(guide_v);
  const __m512 vc = _mm512_set1_ps(one_plus_s);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 pinf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 m0 = ninf, m1 = ninf;
  __mmask16 bad = 0;
  int64_t i = 0;
  for (; i + 32 <= v; i += 32) {
    const __m512 x0 = guided16<TGuide, kGuide>(Load16<TLogit>::run(l + i), kGuide ? guide + i : guide, vc, 0xFFFF, false);
    const __m512 x1 =
        guided16<TGuide, kGuide>(Load16<TLogit>::run(l + i + 16), kGuide ? guide + i + 16 : guide, vc, 0xFFFF, false);
    bad |= _mm512_cmp_ps_mask(x0, pinf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(x1, pinf, _CMP_NLT_UQ);
    m0 = _mm512_max_ps(m0, x0);
    m1 = _mm512_max_ps(m1, x1);
    _mm512_storeu_ps(g + i, x0);
    _mm512_storeu_ps(g + i + 16, x1);
  }
  for (; i < v; i += 16) {
    const int64_t rem = v - i < 16 ? v - i : 16;
    const __mmask16 k = static_cast<__mmask16>((1u << rem) - 1u);
    __m512 x = guided16<TGuide, kGuide>(Load16<TLogit>::run_masked(l + i, k), kGuide ? guide + i : guide, vc, k, true);
    x = _mm512_mask_blend_ps(k, ninf, x);
    bad |= _mm512_mask_cmp_ps_mask(k, x, pinf, _CMP_NLT_UQ);
    m0 = _mm512_max_ps(m0, x);
    _mm512_storeu_ps(g + i, x);
  }
  for (i = (v + 15) / 16 * 16; i < vp; i += 16) _mm512_storeu_ps(g + i, ninf);
  return {_mm512_reduce_max_ps(_mm512_max_ps(m0, m1)), bad != 0};
}

inline double exp_blocks(const float* g, int64_t vp, float m, float inv_temperature, float* e, double* bsum) {
  const __m512 vm = _mm512_set1_ps(m), vs = _mm512_set1_ps(inv_temperature);
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

inline double sum_exp(const float* g, int64_t vp, float m) {
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

SGK_SAMPLE_KERNELS

SGK_END_AVX512
#endif  // SGK_X86

#undef SGK_SAMPLE_KERNELS

// ------------------------------------------------------------------------------------------------
// First i < v whose running float64 sum of e exceeds thr (e >= 0, bsum = per-block sums of exp_blocks),
// or -1: walks the block sums, then the one block holding the crossing.
inline int64_t cdf_search(const float* e, const double* bsum, int64_t nblocks, int64_t v, double thr) {
  double prefix = 0.0;
  for (int64_t b = 0; b < nblocks; ++b) {
    const double next = prefix + bsum[b];
    if (next > thr) {
      double c = prefix;
      const int64_t end = std::min((b + 1) * kBlock, v);
      for (int64_t i = b * kBlock; i < end; ++i) {
        c += static_cast<double>(e[i]);
        if (c > thr) return i;
      }
      prefix = c;  // rounding put the crossing past this block after all
    } else {
      prefix = next;
    }
  }
  return -1;
}

// The sampled index of e[0, v) (e over Vp = padded_len(v) elements, bsum its block sums) at thr =
// uniform * total: cdf_search, or when thr rounded up to the total, the last index of nonzero weight.
inline int64_t cdf_sample(const float* e, const double* bsum, int64_t v, double thr) {
  int64_t i = cdf_search(e, bsum, padded_len(v) / kBlock, v, thr);
  if (i < 0) {
    i = v - 1;
    while (i > 0 && !(e[i] > 0.0f)) --i;
  }
  return i;
}

}  // namespace sgk
