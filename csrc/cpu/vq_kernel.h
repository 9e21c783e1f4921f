// Body of the CPU vq_lookup kernels (csrc/cpu/vq.cpp), written once against a small SIMD abstraction
// `V` (and the register block kMR x kNV) that each ISA namespace (common/isa.h) defines before
// including it. No includes here: the includer has done them.
//
// Scores: s(k) = ||e_k||^2 - 2 z.e_k (the ||z||^2 term does not change the argmin). The codebook is
// packed once per call into panels of NR = NV * V::W codes: panels[p][d][j] = -2 * e[p*NR + j][d]
// and e2p[p*NR + j] = ||e||^2 (+inf for the padding codes past K, so they never win).
// Each row keeps a running minimum per SIMD lane (lane j sees codes j, j+W, j+2W, ... in increasing
// order and updates only on a strict '<', so it holds the lowest index among its ties); the lanes
// are merged at the end by (value, index), which gives torch.argmin's lowest-index tie rule.

// acc[r][v] = e2 + sum_d z[r][d] * panel[d][v*W..]; then fold into the per-row running minimum.
template <int MR, int NV, int DT>
static inline void micro(const float* __restrict z, int64_t ldz, int d_rt, const float* __restrict panel,
                         const float* __restrict e2, int32_t code0, float* __restrict bval,
                         int32_t* __restrict bidx) {
  constexpr int W = V::W;
  constexpr int NR = NV * W;
  const int D = DT > 0 ? DT : d_rt;
  typename V::F acc[MR][NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    const typename V::F e = V::load(e2 + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r][v] = e;
  }
#pragma GCC unroll 8
  for (int d = 0; d < D; ++d) {
    typename V::F e[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) e[v] = V::load(panel + (int64_t)d * NR + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const typename V::F zb = V::set1(z[r * ldz + d]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(zb, e[v], acc[r][v]);
    }
  }
  const typename V::I base = V::addi(V::set1i(code0), V::iota());
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    typename V::F bv = V::load(bval + r * W);
    typename V::I bi = V::loadi(bidx + r * W);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const typename V::I idx = v == 0 ? base : V::addi(base, V::set1i(v * W));
      const typename V::M m = V::lt(acc[r][v], bv);
      bv = V::sel(m, acc[r][v], bv);
      bi = V::seli(m, idx, bi);
    }
    V::store(bval + r * W, bv);
    V::storei(bidx + r * W, bi);
  }
}

// One z tile (mt rows, a multiple of MR, row stride D) against all panels, blocked over the codes
// so that a block of panels stays in L2 while the tile's row micro-blocks sweep it.
template <int MR, int NV, int DT>
static void tile_impl(const float* zt, int64_t mt, int D, const float* panels, const float* e2p, int64_t npanels,
                      int64_t kc_panels, float* bval, int32_t* bidx) {
  constexpr int W = V::W;
  constexpr int NR = NV * W;
  for (int64_t i = 0; i < mt * W; ++i) {
    bval[i] = std::numeric_limits<float>::infinity();
    bidx[i] = 0;
  }
  for (int64_t p0 = 0; p0 < npanels; p0 += kc_panels) {
    const int64_t p1 = std::min(npanels, p0 + kc_panels);
    for (int64_t r0 = 0; r0 < mt; r0 += MR) {
      for (int64_t p = p0; p < p1; ++p) {
        micro<MR, NV, DT>(zt + r0 * D, D, D, panels + p * (int64_t)D * NR, e2p + p * NR, (int32_t)(p * NR),
                          bval + r0 * W, bidx + r0 * W);
      }
    }
  }
}

static void tile(const float* zt, int64_t mt, int D, const float* panels, const float* e2p, int64_t npanels,
                 int64_t kc_panels, float* bval, int32_t* bidx) {
  switch (D) {  // small D: fully unrolled, register-resident inner loop
    case 4: return tile_impl<kMR, kNV, 4>(zt, mt, D, panels, e2p, npanels, kc_panels, bval, bidx);
    case 8: return tile_impl<kMR, kNV, 8>(zt, mt, D, panels, e2p, npanels, kc_panels, bval, bidx);
    case 12: return tile_impl<kMR, kNV, 12>(zt, mt, D, panels, e2p, npanels, kc_panels, bval, bidx);
    case 16: return tile_impl<kMR, kNV, 16>(zt, mt, D, panels, e2p, npanels, kc_panels, bval, bidx);
    case 24: return tile_impl<kMR, kNV, 24>(zt, mt, D, panels, e2p, npanels, kc_panels, bval, bidx);
    case 32: return tile_impl<kMR, kNV, 32>(zt, mt, D, panels, e2p, npanels, kc_panels, bval, bidx);
    case 64: return tile_impl<kMR, kNV, 64>(zt, mt, D, panels, e2p, npanels, kc_panels, bval, bidx);
    default: return tile_impl<kMR, kNV, 0>(zt, mt, D, panels, e2p, npanels, kc_panels, bval, bidx);
  }
}

// panels [npanels][D][NR] (-2 e, zero padding) and e2p [npanels * NR] (+inf padding) from the fp32
// contiguous codebook cb [K][D]. Returns false if the codebook has a NaN or inf.
static bool pack(const float* cb, int64_t K, int D, float* panels, float* e2p) {
  constexpr int NR = kNV * V::W;
  const int64_t npanels = (K + NR - 1) / NR;
  float nonfinite = 0.f;  // (x - x) is NaN exactly for NaN/inf x
  for (int64_t p = 0; p < npanels; ++p) {
    float* P = panels + p * (int64_t)D * NR;
    for (int j = 0; j < NR; ++j) {
      const int64_t k = p * NR + j;
      if (k < K) {
        const float* e = cb + k * D;
        float s = 0.f;
        for (int d = 0; d < D; ++d) {
          const float x = e[d];
          nonfinite += x - x;
          s += x * x;
          P[(int64_t)d * NR + j] = -2.f * x;
        }
        e2p[k] = s;
      } else {
        for (int d = 0; d < D; ++d) P[(int64_t)d * NR + j] = 0.f;
        e2p[k] = std::numeric_limits<float>::infinity();
      }
    }
  }
  return nonfinite == 0.f;
}

// Running per-lane minimum of s[k] + e2[k] over k in [0, n) (codes code0 + k), rows of a GEMM tile.
static void scan_row(const float* __restrict s, const float* __restrict e2, int64_t n, int32_t code0,
                     float* __restrict bval, int32_t* __restrict bidx) {
  constexpr int W = V::W;
  typename V::F bv = V::load(bval);
  typename V::I bi = V::loadi(bidx);
  typename V::I idx = V::addi(V::set1i(code0), V::iota());
  const typename V::I step = V::set1i(W);
  int64_t k = 0;
  for (; k + W <= n; k += W) {
    const typename V::F x = V::add(V::load(s + k), V::load(e2 + k));
    const typename V::M m = V::lt(x, bv);
    bv = V::sel(m, x, bv);
    bi = V::seli(m, idx, bi);
    idx = V::addi(idx, step);
  }
  V::store(bval, bv);
  V::storei(bidx, bi);
  for (int j = 0; k < n; ++k, ++j) {  // tail: lane j sees code code0 + k, still in increasing order
    const float x = s[k] + e2[k];
    if (x < bval[j]) {
      bval[j] = x;
      bidx[j] = code0 + (int32_t)k;
    }
  }
}

constexpr VqKernels kVqKernels = {V::W, kMR, kNV, &pack, &tile, &scan_row};
