// CPU kernel of vq_lookup (schema: csrc/schema.cpp): nearest codebook entry (squared L2) of each
// row of z. CUDA kernel: csrc/cuda/vq.cu. Wrapper, fake kernel and reference: sgkernels/ops/vq_lookup.py.
//
// argmin_k ||e_k||^2 - 2 z.e_k, blocked, never materialising N x K:
//  * "micro" path (the default): z tiles (fp32 copies, any input dtype/strides) against the codebook
//    packed into panels of NR codes; an MR x NR register-blocked FMA micro-kernel with the running
//    argmin fused into its epilogue (csrc/cpu/vq_kernel.h). Small D (4..64) is a template parameter
//    (unrolled).
//  * "gemm" path: per thread, at::mm (MKL sgemm) of a z tile against a codebook chunk into a small
//    buffer (kGemmRows x kGemmCodes floats), then a fused SIMD argmin scan of it. Slower than the
//    micro path at every shape measured (MKL re-packs the codebook chunk for every z tile, and the
//    extra pass over the buffer costs too); kept as a second implementation to test against and to
//    time: the environment variable SGK_VQ_PATH=gemm selects it (read at every call; micro otherwise).
//  * One build per ISA (common/isa.h); OpenMP (at::parallel_for) over z tiles: each row is owned by
//    one thread, no merge needed.
//  * NaN/inf in z or the codebook is detected during the fp32 conversion/packing (no extra pass).
// Reads z once (itemsize bytes per element) and the codebook once per z tile (from L2); writes
// 8 bytes per row (+ 4 with return_distance).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "common/isa.h"
#include "common/vq_checks.h"

namespace sgk {

struct VqKernels {
  int W, MR, NV;
  bool (*pack)(const float*, int64_t, int, float*, float*);
  void (*tile)(const float*, int64_t, int, const float*, const float*, int64_t, int64_t, float*, int32_t*);
  void (*scan_row)(const float*, const float*, int64_t, int32_t, float*, int32_t*);
};

// ---------------------------------------------------------------- portable (any CPU)
SGK_BEGIN_GENERIC
struct V {
  static constexpr int W = 8;
  struct F { float v[W]; };
  struct I { int32_t v[W]; };
  struct M { bool v[W]; };
  static F load(const float* p) { F r; for (int i = 0; i < W; ++i) r.v[i] = p[i]; return r; }
  static void store(float* p, F a) { for (int i = 0; i < W; ++i) p[i] = a.v[i]; }
  static I loadi(const int32_t* p) { I r; for (int i = 0; i < W; ++i) r.v[i] = p[i]; return r; }
  static void storei(int32_t* p, I a) { for (int i = 0; i < W; ++i) p[i] = a.v[i]; }
  static F set1(float x) { F r; for (int i = 0; i < W; ++i) r.v[i] = x; return r; }
  static I set1i(int32_t x) { I r; for (int i = 0; i < W; ++i) r.v[i] = x; return r; }
  static I iota() { I r; for (int i = 0; i < W; ++i) r.v[i] = i; return r; }
  static I addi(I a, I b) { for (int i = 0; i < W; ++i) a.v[i] += b.v[i]; return a; }
  static F add(F a, F b) { for (int i = 0; i < W; ++i) a.v[i] += b.v[i]; return a; }
  static F fmadd(F a, F b, F c) { for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
  static M lt(F a, F b) { M m; for (int i = 0; i < W; ++i) m.v[i] = a.v[i] < b.v[i]; return m; }
  static F sel(M m, F a, F b) { for (int i = 0; i < W; ++i) b.v[i] = m.v[i] ? a.v[i] : b.v[i]; return b; }
  static I seli(M m, I a, I b) { for (int i = 0; i < W; ++i) b.v[i] = m.v[i] ? a.v[i] : b.v[i]; return b; }
};
constexpr int kMR = 4;
constexpr int kNV = 1;
#include "cpu/vq_kernel.h"
SGK_END_GENERIC

#if SGK_X86
// ---------------------------------------------------------------- AVX2 + FMA
SGK_BEGIN_AVX2
struct V {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  using M = __m256;
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
  static I loadi(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void storei(int32_t* p, I a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), a); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static I set1i(int32_t x) { return _mm256_set1_epi32(x); }
  static I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static I addi(I a, I b) { return _mm256_add_epi32(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static F sel(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
  static I seli(M m, I a, I b) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(b), _mm256_castsi256_ps(a), m));
  }
};
constexpr int kMR = 6;
constexpr int kNV = 2;
#include "cpu/vq_kernel.h"
SGK_END_AVX2

// ---------------------------------------------------------------- AVX-512
SGK_BEGIN_AVX512
struct V {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static I loadi(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void storei(int32_t* p, I a) { _mm512_storeu_si512(p, a); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static I set1i(int32_t x) { return _mm512_set1_epi32(x); }
  static I iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static I addi(I a, I b) { return _mm512_add_epi32(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static F sel(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
  static I seli(M m, I a, I b) { return _mm512_mask_blend_epi32(m, b, a); }
};
constexpr int kMR = 8;
constexpr int kNV = 2;
#include "cpu/vq_kernel.h"
SGK_END_AVX512
#endif

namespace {

// ---------------------------------------------------------------- z tiles -> fp32
// Rows [r0, r0 + rows) of the 2-D view (strides s0, s1) into out [mt][D], rows past `rows` zeroed.
// Returns the sum of (x - x): NaN iff a value is NaN or inf.
template <typename T>
static float load_rows(const T* base, int64_t s0, int64_t s1, int64_t r0, int64_t rows, int64_t mt, int D,
                       float* out) {
  float nonfinite = 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = base + (r0 + r) * s0;
    float* dst = out + r * D;
    if (s1 == 1) {
      for (int d = 0; d < D; ++d) {
        const float x = static_cast<float>(src[d]);
        nonfinite += x - x;
        dst[d] = x;
      }
    } else {
      for (int d = 0; d < D; ++d) {
        const float x = static_cast<float>(src[d * s1]);
        nonfinite += x - x;
        dst[d] = x;
      }
    }
  }
  if (mt > rows) std::memset(out + rows * D, 0, sizeof(float) * (mt - rows) * D);
  return nonfinite;
}

static float load_rows_any(const at::Tensor& z2, int64_t r0, int64_t rows, int64_t mt, int D, float* out) {
  const int64_t s0 = z2.stride(0), s1 = z2.stride(1);
  switch (z2.scalar_type()) {
    case at::kFloat: return load_rows(z2.const_data_ptr<float>(), s0, s1, r0, rows, mt, D, out);
    case at::kHalf: return load_rows(z2.const_data_ptr<c10::Half>(), s0, s1, r0, rows, mt, D, out);
    case at::kBFloat16: return load_rows(z2.const_data_ptr<c10::BFloat16>(), s0, s1, r0, rows, mt, D, out);
    default: TORCH_CHECK_TYPE(false, "vq_lookup: z: unsupported dtype ", z2.scalar_type());
  }
  return 0.f;
}

static std::tuple<at::Tensor, at::Tensor> finish(at::Tensor idx, at::Tensor dist, const at::Tensor& z,
                                                 bool return_distance) {
  auto lead = z.sizes().slice(0, z.dim() - 1);
  idx = idx.view(lead);
  if (return_distance) dist = dist.view(lead);
  return {idx, dist};
}

constexpr int64_t kGemmCodes = 512;  // codes per sgemm chunk (buffer: rows x kGemmCodes floats)

std::tuple<at::Tensor, at::Tensor> vq_lookup_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                 bool return_distance) {
  check_vq_inputs(z, codebook);
  TORCH_CHECK(z.device().is_cpu(), "vq_lookup_cpu: expected CPU tensors");
  const int64_t K = codebook.size(0);
  const int D = static_cast<int>(codebook.size(1));
  const at::Tensor z2 = z.reshape({-1, D});  // a view whenever the strides allow it
  const int64_t N = z2.size(0);
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor dist = at::empty({return_distance ? N : 0}, z.options().dtype(at::kFloat));
  if (N == 0) return finish(idx, dist, z, return_distance);

  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const VqKernels& isa = SGK_PER_ISA(kVqKernels);
  const char* path_env = std::getenv("SGK_VQ_PATH");
  const bool use_gemm = path_env != nullptr && std::string(path_env) == "gemm";
  const int W = isa.W;
  const int MR = isa.MR;
  const int NR = isa.NV * isa.W;
  const int nthreads = std::max<int>(1, at::get_num_threads());

  // z tile rows: keep the fp32 tile within ~128 KiB (L2-resident), and give every thread a few tiles.
  int64_t mt;
  if (use_gemm) {
    mt = 128;
  } else {
    mt = std::max<int64_t>(MR, (128 * 1024 / 4) / std::max(D, 1));
    mt = std::min<int64_t>(mt, 256);
  }
  const int64_t per_thread = (N + nthreads * 4 - 1) / (nthreads * 4);
  mt = std::min<int64_t>(mt, std::max<int64_t>(per_thread, 1));
  mt = (mt + MR - 1) / MR * MR;
  const int64_t ntiles = (N + mt - 1) / mt;

  // packed codebook (micro path) or -2 * codebook (gemm path), and ||e||^2
  const int64_t npanels = (K + NR - 1) / NR;
  std::vector<float> panels, e2p;
  at::Tensor cbm2;
  if (use_gemm) {
    cbm2 = cb.mul(-2.0);
    // e2 with zero tail padding to a multiple of W (never read past K by scan_row)
    at::Tensor e2t = cb.mul(cb).sum(1);
    e2p.assign(e2t.const_data_ptr<float>(), e2t.const_data_ptr<float>() + K);
    TORCH_CHECK_VALUE(bool(at::isfinite(cb).all().item<bool>()), "vq_lookup: codebook: contains NaN or inf");
  } else {
    panels.resize(static_cast<size_t>(npanels) * D * NR);
    e2p.resize(static_cast<size_t>(npanels) * NR);
    const bool ok = isa.pack(cb.const_data_ptr<float>(), K, D, panels.data(), e2p.data());
    TORCH_CHECK_VALUE(ok, "vq_lookup: codebook: contains NaN or inf");
  }
  // code blocking of the micro path: ~512 KiB of panels per block
  const int64_t kc_panels = std::max<int64_t>(1, (512 * 1024 / 4) / (std::max(D, 1) * (int64_t)NR));

  int64_t* idx_out = idx.data_ptr<int64_t>();
  float* dist_out = return_distance ? dist.data_ptr<float>() : nullptr;
  std::vector<uint8_t> bad(ntiles, 0);

  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> zt(static_cast<size_t>(mt) * D);
    std::vector<float> bval(static_cast<size_t>(mt) * W);
    std::vector<int32_t> bidx(static_cast<size_t>(mt) * W);
    std::vector<float> gbuf(use_gemm ? static_cast<size_t>(mt) * kGemmCodes : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * mt;
      const int64_t rows = std::min(mt, N - r0);
      const float nf = load_rows_any(z2, r0, rows, mt, D, zt.data());
      if (nf != 0.f) {  // NaN: some z value was NaN or inf
        bad[t] = 1;
        continue;
      }
      if (!use_gemm) {
        isa.tile(zt.data(), mt, D, panels.data(), e2p.data(), npanels, kc_panels, bval.data(), bidx.data());
      } else {
        for (int64_t i = 0; i < mt * W; ++i) {
          bval[i] = std::numeric_limits<float>::infinity();
          bidx[i] = 0;
        }
        const at::Tensor zt_t = at::from_blob(zt.data(), {rows, D}, cb.options());
        for (int64_t k0 = 0; k0 < K; k0 += kGemmCodes) {
          const int64_t kn = std::min(kGemmCodes, K - k0);
          at::Tensor out = at::from_blob(gbuf.data(), {rows, kn}, cb.options());
          at::mm_out(out, zt_t, cbm2.narrow(0, k0, kn).t());
          for (int64_t r = 0; r < rows; ++r) {
            isa.scan_row(gbuf.data() + r * kn, e2p.data() + k0, kn, static_cast<int32_t>(k0), bval.data() + r * W,
                         bidx.data() + r * W);
          }
        }
      }
      // merge the lanes of each row: smallest value, then smallest index
      for (int64_t r = 0; r < rows; ++r) {
        const float* bv = bval.data() + r * W;
        const int32_t* bi = bidx.data() + r * W;
        float best = bv[0];
        int32_t bk = bi[0];
        for (int j = 1; j < W; ++j) {
          if (bv[j] < best || (bv[j] == best && bi[j] < bk)) {
            best = bv[j];
            bk = bi[j];
          }
        }
        if (!(best < std::numeric_limits<float>::infinity())) bk = 0;  // all +inf (overflow): code 0
        idx_out[r0 + r] = bk;
        if (dist_out) {
          const float* zr = zt.data() + r * D;
          float zz = 0.f;
          for (int d = 0; d < D; ++d) zz += zr[d] * zr[d];
          dist_out[r0 + r] = std::max(zz + best, 0.f);
        }
      }
    }
  });
  TORCH_CHECK_VALUE(std::none_of(bad.begin(), bad.end(), [](uint8_t b) { return b != 0; }),
                    "vq_lookup: z: contains NaN or inf");
  return finish(idx, dist, z, return_distance);
}

}  // namespace
}  // namespace sgk

TORCH_LIBRARY_IMPL(sgkernels, CPU, m) { m.impl("vq_lookup", &sgk::vq_lookup_cpu); }
