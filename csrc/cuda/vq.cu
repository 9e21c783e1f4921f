// CUDA kernel of sgkernels::vq_lookup (schema: csrc/schema.cpp; CPU kernel: csrc/cpu/vq.cpp).
//
// A clean fp32 SIMT tiled kernel: each block owns BM rows of z and sweeps the whole codebook in
// chunks of BN codes; D is streamed through shared memory in BD-wide slices (z slice converted to
// fp32 on load, codebook pre-converted to fp32). Each thread accumulates a TM x TN register tile of
// z.e, turns it into s = ||e||^2 - 2 z.e and folds it into a per-row running (value, index)
// minimum held in registers, so the N x K matrix is never written. At the end the BN/TN threads
// sharing a row merge their minima in shared memory by (value, index): ties go to the lowest index.
// The BD slice is a template parameter picked at launch from D (8 / 16 / 32).
//
// Not done yet: tensor cores (mma.sync bf16/fp16 -> fp32 for D >= 64 half inputs), split-K over
// codes for small N with large K, keeping the z tile resident in smem across code chunks.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common/vq_checks.h"

#include <cfloat>
#include <cstdint>
#include <tuple>

namespace sgk {

constexpr int BM = 64;  // z rows per block
constexpr int BN = 64;  // codes per chunk
constexpr int TM = 4;   // rows per thread
constexpr int TN = 4;   // codes per thread
constexpr int RY = BM / TM;  // 16 thread rows
constexpr int CX = BN / TN;  // 16 thread columns
constexpr int NT = RY * CX;  // 256 threads

template <typename T, int BD>
__global__ void __launch_bounds__(NT) vq_argmin_kernel(const T* __restrict__ z, int64_t N, int D,
                                                       const float* __restrict__ cb, const float* __restrict__ e2,
                                                       int64_t K, float* __restrict__ best_out,
                                                       int64_t* __restrict__ idx_out) {
  __shared__ float zs[BD][BM + 1];
  __shared__ float es[BD][BN + 1];
  __shared__ float red_v[BM][CX];
  __shared__ int64_t red_i[BM][CX];

  const int tid = threadIdx.x;
  const int ty = tid / CX;
  const int tx = tid % CX;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;

  float bv[TM];
  int64_t bi[TM];
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    bv[i] = FLT_MAX * 2.f;  // +inf
    bi[i] = 0;
  }

  for (int64_t k0 = 0; k0 < K; k0 += BN) {
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

    for (int d0 = 0; d0 < D; d0 += BD) {
      // stage z[row0 : row0+BM, d0 : d0+BD] and cb[k0 : k0+BN, d0 : d0+BD], zero padded, d-major
      for (int e = tid; e < BM * BD; e += NT) {
        const int r = e / BD, dd = e % BD;
        const int64_t row = row0 + r;
        const int d = d0 + dd;
        zs[dd][r] = (row < N && d < D) ? static_cast<float>(z[row * D + d]) : 0.f;
      }
      for (int e = tid; e < BN * BD; e += NT) {
        const int c = e / BD, dd = e % BD;
        const int64_t code = k0 + c;
        const int d = d0 + dd;
        es[dd][c] = (code < K && d < D) ? cb[code * D + d] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int dd = 0; dd < BD; ++dd) {
        float a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = zs[dd][ty + i * RY];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = es[dd][tx + j * CX];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
    // fold the chunk into the running minimum (codes visited in increasing order per thread)
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t code = k0 + tx + j * CX;
      if (code < K) {
        const float en = e2[code];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          const float s = fmaf(-2.f, acc[i][j], en);
          if (s < bv[i] || (s == bv[i] && code < bi[i])) {
            bv[i] = s;
            bi[i] = code;
          }
        }
      }
    }
  }

  // merge the CX partial minima of each row: smallest value, then smallest index
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    red_v[ty + i * RY][tx] = bv[i];
    red_i[ty + i * RY][tx] = bi[i];
  }
  __syncthreads();
  if (tid < BM) {
    const int64_t row = row0 + tid;
    float v = red_v[tid][0];
    int64_t k = red_i[tid][0];
    for (int c = 1; c < CX; ++c) {
      const float v2 = red_v[tid][c];
      const int64_t k2 = red_i[tid][c];
      if (v2 < v || (v2 == v && k2 < k)) {
        v = v2;
        k = k2;
      }
    }
    if (row < N) {
      best_out[row] = v;
      idx_out[row] = k;
    }
  }
}

template <typename T>
static void launch(const at::Tensor& z2, const at::Tensor& cb, const at::Tensor& e2, at::Tensor& best,
                   at::Tensor& idx) {
  const int64_t N = z2.size(0), K = cb.size(0);
  const int D = static_cast<int>(cb.size(1));
  const dim3 grid(static_cast<unsigned>((N + BM - 1) / BM));
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* zp = reinterpret_cast<const T*>(z2.const_data_ptr());
  if (D <= 8) {
    vq_argmin_kernel<T, 8><<<grid, NT, 0, stream>>>(zp, N, D, cb.const_data_ptr<float>(), e2.const_data_ptr<float>(),
                                                   K, best.data_ptr<float>(), idx.data_ptr<int64_t>());
  } else if (D <= 16) {
    vq_argmin_kernel<T, 16><<<grid, NT, 0, stream>>>(zp, N, D, cb.const_data_ptr<float>(),
                                                    e2.const_data_ptr<float>(), K, best.data_ptr<float>(),
                                                    idx.data_ptr<int64_t>());
  } else {
    vq_argmin_kernel<T, 32><<<grid, NT, 0, stream>>>(zp, N, D, cb.const_data_ptr<float>(),
                                                    e2.const_data_ptr<float>(), K, best.data_ptr<float>(),
                                                    idx.data_ptr<int64_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> vq_lookup_cuda(const at::Tensor& z, const at::Tensor& codebook,
                                                  bool return_distance) {
  check_vq_inputs(z, codebook);
  // NaN/inf are checked by the Python wrapper (a host sync); this kernel does not look for them.
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t D = codebook.size(1);
  const at::Tensor z2 = z.reshape({-1, D}).contiguous();
  const int64_t N = z2.size(0);
  auto lead = z.sizes().slice(0, z.dim() - 1);
  at::Tensor idx = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor best = at::empty({N}, z.options().dtype(at::kFloat));
  if (N > 0) {
    const at::Tensor cb = codebook.to(at::kFloat).contiguous();
    const at::Tensor e2 = cb.mul(cb).sum(1);
    switch (z2.scalar_type()) {
      case at::kFloat: launch<float>(z2, cb, e2, best, idx); break;
      case at::kHalf: launch<c10::Half>(z2, cb, e2, best, idx); break;
      default: launch<c10::BFloat16>(z2, cb, e2, best, idx); break;
    }
  }
  at::Tensor dist;
  if (return_distance) {
    const at::Tensor zf = z2.to(at::kFloat);
    dist = best.add_(zf.mul(zf).sum(1)).clamp_min_(0.0).view(lead);
  } else {
    dist = at::empty({0}, z.options().dtype(at::kFloat));
  }
  return {idx.view(lead), dist};
}

}  // namespace sgk

TORCH_LIBRARY_IMPL(sgkernels, CUDA, m) { m.impl("vq_lookup", &sgk::vq_lookup_cuda); }
