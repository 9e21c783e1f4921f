// CPU kernel of head_sample (schema: csrc/schema.cpp; Triton: sgkernels/kernels/head_sample.py;
// spec: sgkernels/ops/head_sample.py): the LM head ``logits = h @ W^T + b`` fused with guided_sample's
// sampler, so the [R, V] logits never exist.
//
// h = guide_hidden + (1 + s) * (hidden - guide_hidden) in float32 ([R, d], the blend commutes with
// the linear head, so guidance costs one GEMM). Then two passes over vocabulary tiles of kTileV:
//
// Pass 1 (OpenMP over chunks of up to 8 tiles, as many as keep a GEMM's output at 512 KiB): a thread
// converts its W chunk to float32 once (a view when W is float32), then for every block of up to
// kRowBlock rows: logits chunk = h_block @ W_chunk^T (at::mm into a per-thread buffer: BLAS), + bias,
// and per (row, tile) it keeps: the tile max m_t, the float64 sums
// of exp(g - m_t) and exp((g - m_t) / T), the first argmax, and a NaN/+inf flag. Nothing else of
// the tile survives: the memory beyond the inputs is R x d (h) + R x ntiles x 32 B (the stats) + per
// thread one W chunk (float32) and one logits chunk of 512 KiB.
//
// Pass 2 (OpenMP over rows): the row's M = max m_t, Z_T = sum_t S_t exp((m_t - M) / T) in float64;
// the row's Philox uniform u (words w0, w1 of row id, as guided_sample) picks the tile j where the
// float64 running sum of the rescaled tile sums crosses u * Z_T (two-level inverse CDF); only that
// tile's logits are computed again (one GEMV of kTileV x d), and the token is the first index whose
// float64 running sum of exp((g - m'_j) / T) crosses the same fraction of the recomputed tile's sum
// (m'_j: the recomputed tile's own max; the GEMV may round it an ulp off pass 1's, which at
// 1/T >= 1e8 would underflow every weight of the tile). This is guided_sample's method
// (its multi-tile Triton path is the same two levels), so with the same seed the tokens are the
// same as guided_sample on the materialised logits up to float rounding (the GEMM's summation order).
// T == 0: the first argmax (no pass 2). logp = g_k - M - log(sum exp(g - M)), untempered.
//
// Why not Gumbel-max: it needs a Philox draw and two logs per vocabulary element (V x R of them);
// the two-level inverse CDF needs one Philox call per row and recomputes kTileV / V of the GEMM
// (python -m benchmarks.bench_head_sample --method prints both costs).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/isa.h"
#include "common/philox.h"
#include "common/raise_status.h"
#include "cpu/sampling_rows.h"
#include "cpu/scratch.h"

namespace sgk {
namespace {

constexpr int64_t kTileV = 512;      // vocabulary tile (a multiple of kBlock)
constexpr int64_t kRowBlock = 256;   // rows per GEMM of pass 1
constexpr int64_t kChunkFloats = 256 * kTileV;  // logits per GEMM of pass 1 (512 KiB): fewer rows, more tiles
constexpr int64_t kMaxChunkTiles = 8;

struct TileStats {
  float* max;      // [R, nt]
  double* usum;    // [R, nt] sum exp(g - m_t)
  double* tsum;    // [R, nt] sum exp((g - m_t) / T) (== usum when T == 1; unused when T == 0)
  int32_t* arg;    // [R, nt] first argmax inside the tile
  uint8_t* bad;    // [R, nt] NaN or +inf in the tile
};

bool is_float_dtype(at::ScalarType t) { return dtype_index(t) >= 0; }

// Per-row statistics of one logits tile row g[0, vlen) (g[vlen..vp) is set to -inf), written at slot i.
// The max and the NaN / +inf flag by the ISA's vectorised row load (in place), then the first argmax
// by a scan that stops at the max.
void tile_row_stats(const SampleKernels& k, float* g, int64_t vlen, int64_t vp, float inv_t, bool greedy,
                    bool temp_one, float* e, double* bsum, const TileStats& st, int64_t i) {
  const LoadResult lr = k.load_plain[0](g, nullptr, vlen, vp, 1.0f, g);
  const float m = lr.max;
  const bool bad = lr.bad;
  int32_t arg = 0;
  if (!bad)
    while (arg < vlen && g[arg] != m) ++arg;
  if (arg == vlen) arg = 0;
  st.max[i] = m;
  st.arg[i] = arg;
  st.bad[i] = bad;
  if (bad || m == -std::numeric_limits<float>::infinity()) {
    st.usum[i] = 0.0;
    st.tsum[i] = 0.0;
    return;
  }
  st.usum[i] = k.sum_exp(g, vp, m);
  if (greedy) {
    st.tsum[i] = 0.0;
  } else if (temp_one) {
    st.tsum[i] = st.usum[i];
  } else {
    st.tsum[i] = k.exp_blocks(g, vp, m, inv_t, e, bsum);
  }
}

void check_2d(const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK(is_float_dtype(x.scalar_type()), name, ": expected float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, name, ": expected 2 dims, got shape ", x.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> head_sample_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& guide,
                                                   const std::optional<at::Tensor>& row_ids, double guidance_scale,
                                                   double temperature, int64_t seed, int64_t offset,
                                                   const at::Tensor& status) {
  check_2d("hidden", hidden);
  check_2d("weight", weight);
  const int64_t R = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(weight.size(1) == D, "weight: expected shape [V, ", D, "] (d of hidden), got ", weight.sizes());
  TORCH_CHECK(V >= 1, "weight: expected V >= 1 rows, got ", weight.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && is_float_dtype(bias->scalar_type()), "bias: expected a float CPU tensor");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, "bias: expected shape [", V, "], got ", bias->sizes());
  }
  if (guide.has_value()) {
    check_2d("guide_hidden", *guide);
    TORCH_CHECK(guide->sizes() == hidden.sizes(), "guide_hidden: expected shape ", hidden.sizes(), ", got ",
                guide->sizes());
  }
  if (row_ids.has_value()) {
    TORCH_CHECK(row_ids->device().is_cpu() && row_ids->scalar_type() == at::kLong && row_ids->dim() == 1 &&
                    row_ids->size(0) == R,
                "row_ids: expected an int64 CPU tensor of shape [", R, "]");
  }
  TORCH_CHECK(std::isfinite(guidance_scale), "guidance_scale: expected a finite float");
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0, "temperature: expected a finite float >= 0, got ",
              temperature);
  TORCH_CHECK(seed >= 0 && offset >= 0, "seed and offset: expected values >= 0");
  TORCH_CHECK(status.device().is_cpu() && status.scalar_type() == at::kInt && status.numel() >= 1,
              "status: expected an int32 CPU tensor with at least one element");

  at::Tensor tokens = at::empty({R}, hidden.options().dtype(at::kLong));
  at::Tensor logp = at::empty({R}, hidden.options().dtype(at::kFloat));
  if (R == 0) return {tokens, logp};

  // h: the blended hidden states in float32, rounded as the reference (sub, mul, add). A term whose
  // coefficient is 0 is dropped (guided_sample's blend rule): s == 0 is exactly hidden, s == -1
  // exactly the guide, whatever the other holds.
  at::Tensor h = hidden.to(at::kFloat);
  if (guide.has_value() && guidance_scale != 0.0) {
    const at::Tensor u = guide->to(at::kFloat);
    h = 1.0 + guidance_scale == 0.0 ? u : at::add(u, at::mul(at::sub(h, u), 1.0 + guidance_scale));
  }
  h = h.contiguous();
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  const float* bp = bias.has_value() ? b32.const_data_ptr<float>() : nullptr;
  const bool w_f32 = weight.scalar_type() == at::kFloat;
  const at::Tensor w = weight.contiguous();

  const bool greedy = temperature == 0.0;
  const double inv_d = greedy ? 1.0 : 1.0 / temperature;
  // clamped to [FLT_MIN, FLT_MAX] as guided_sample's kernels: a tiny T acts as argmax over the
  // maxima, a huge T as uniform over the finite entries (never 0 * -inf)
  const float inv_t = static_cast<float>(std::min<double>(
      std::max<double>(inv_d, std::numeric_limits<float>::min()), std::numeric_limits<float>::max()));
  const bool temp_one = !greedy && inv_t == 1.0f;
  const SampleKernels& k = SGK_PER_ISA(kSampleKernels);

  const int64_t nt = (V + kTileV - 1) / kTileV;
  std::vector<float> s_max(R * nt);
  std::vector<double> s_usum(R * nt), s_tsum(R * nt);
  std::vector<int32_t> s_arg(R * nt);
  std::vector<uint8_t> s_bad(R * nt);
  const TileStats st{s_max.data(), s_usum.data(), s_tsum.data(), s_arg.data(), s_bad.data()};

  // ---- pass 1: every (chunk of tiles, row block) GEMM, reduced to per-(row, tile) stats at once ----
  // A GEMM covers `chunk` consecutive tiles (kChunkFloats of logits per call, so few rows get wide
  // calls: 8 tiles at R <= 32): fewer, larger BLAS calls; the stats stay per tile.
  const int64_t r_block = std::min(kRowBlock, R);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(kMaxChunkTiles, kChunkFloats / (r_block * kTileV)));
  const int64_t nchunks = (nt + chunk - 1) / chunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    const at::NoGradGuard no_grad;
    std::vector<float> wbuf, lbuf, ebuf;
    std::vector<double> bbuf;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t_first = c * chunk, t_end = std::min(nt, t_first + chunk);
      const int64_t v0 = t_first * kTileV, vlen = std::min(t_end * kTileV, V) - v0;
      const int64_t ld = (t_end - t_first) * kTileV;  // every tile's row slot is kTileV (>= its padded length)
      at::Tensor wt;
      if (w_f32) {
        wt = w.narrow(0, v0, vlen);
      } else {
        wt = at::from_blob(grow(wbuf, vlen * D), {vlen, D}, at::TensorOptions().dtype(at::kFloat));
        wt.copy_(w.narrow(0, v0, vlen));
      }
      float* e = grow(ebuf, kTileV);
      double* bsum = grow(bbuf, kTileV / kBlock);
      for (int64_t r0 = 0; r0 < R; r0 += kRowBlock) {
        const int64_t rn = std::min(kRowBlock, R - r0);
        at::Tensor lt = at::from_blob(grow(lbuf, rn * ld), {rn, vlen}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
        at::mm_out(lt, h.narrow(0, r0, rn), wt.t());
        for (int64_t r = 0; r < rn; ++r) {
          for (int64_t t = t_first; t < t_end; ++t) {
            const int64_t tv0 = t * kTileV, tlen = std::min(kTileV, V - tv0), tvp = padded_len(tlen);
            float* g = lbuf.data() + r * ld + (tv0 - v0);
            if (bp != nullptr)
              for (int64_t v = 0; v < tlen; ++v) g[v] += bp[tv0 + v];
            tile_row_stats(k, g, tlen, tvp, inv_t, greedy, temp_one, e, bsum, st, (r0 + r) * nt + t);
          }
        }
      }
    }
  });

  // ---- pass 2: per row, combine the tile stats, pick a tile, recompute it, pick the token ----
  const at::Tensor ids_keep = row_ids.has_value() ? row_ids->contiguous() : at::Tensor();
  const int64_t* ids = row_ids.has_value() ? ids_keep.const_data_ptr<int64_t>() : nullptr;
  int64_t* tok_out = tokens.mutable_data_ptr<int64_t>();
  float* logp_out = logp.mutable_data_ptr<float>();
  const float* hp = h.const_data_ptr<float>();
  int flags = 0;
  std::vector<uint8_t> row_bad(R, 0);
  at::parallel_for(0, R, 1, [&](int64_t ra, int64_t rb) {
    const at::NoGradGuard no_grad;
    Scratch& s = scratch();
    std::vector<float> wtile;
    std::vector<double> tw(nt);
    for (int64_t r = ra; r < rb; ++r) {
      const float* tm = st.max + r * nt;
      float M = -std::numeric_limits<float>::infinity();
      bool bad = false;
      for (int64_t t = 0; t < nt; ++t) {
        bad |= st.bad[r * nt + t] != 0;
        M = std::max(M, tm[t]);
      }
      if (bad || M == -std::numeric_limits<float>::infinity()) {
        row_bad[r] = 1;
        tok_out[r] = 0;
        logp_out[r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      double zu = 0.0;
      for (int64_t t = 0; t < nt; ++t)
        if (tm[t] != -std::numeric_limits<float>::infinity())
          zu += st.usum[r * nt + t] * std::exp(static_cast<double>(tm[t]) - static_cast<double>(M));
      const double log_zu = std::log(zu);
      if (greedy) {
        int64_t t = 0;
        while (tm[t] != M) ++t;
        tok_out[r] = t * kTileV + st.arg[r * nt + t];
        logp_out[r] = static_cast<float>(-log_zu);
        continue;
      }
      // the tile: inverse CDF over the rescaled tile sums
      const uint64_t row = ids != nullptr ? static_cast<uint64_t>(ids[r]) : static_cast<uint64_t>(r);
      const PhiloxWords pw = philox_row(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), row);
      const double uni = token_uniform(pw.w0, pw.w1);
      double z = 0.0;
      int64_t last = 0;
      for (int64_t t = 0; t < nt; ++t) {
        const double sc = tm[t] == -std::numeric_limits<float>::infinity()
                              ? 0.0
                              : std::exp((static_cast<double>(tm[t]) - static_cast<double>(M)) * static_cast<double>(inv_t));
        tw[t] = st.tsum[r * nt + t] * sc;
        z += tw[t];
        if (tw[t] > 0.0) last = t;
      }
      const double thr = uni * z;
      int64_t j = 0;
      double before = 0.0;
      for (; j < last; ++j) {
        if (before + tw[j] > thr) break;
        before += tw[j];
      }
      // the fraction of tile j's weight below the threshold (in [0, 1]): the recomputed tile is
      // weighed relative to its own maximum, so the GEMV's rounding (which may move that maximum
      // off pass 1's m_j by an ulp) never underflows or overflows every weight at a tiny T
      const double frac = tw[j] > 0.0 ? std::min(1.0, std::max(0.0, (thr - before) / tw[j])) : 0.0;
      // recompute tile j of this row
      const int64_t v0 = j * kTileV, vlen = std::min(kTileV, V - v0), vp = padded_len(vlen);
      float* g = grow(s.g, vp);
      at::Tensor gt = at::from_blob(g, {vlen}, at::TensorOptions().dtype(at::kFloat));
      const at::Tensor hrow = at::from_blob(const_cast<float*>(hp + r * D), {D}, at::TensorOptions().dtype(at::kFloat));
      if (w_f32) {
        at::mv_out(gt, w.narrow(0, v0, vlen), hrow);
      } else {
        at::Tensor wt = at::from_blob(grow(wtile, vlen * D), {vlen, D}, at::TensorOptions().dtype(at::kFloat));
        wt.copy_(w.narrow(0, v0, vlen));
        at::mv_out(gt, wt, hrow);
      }
      if (bp != nullptr)
        for (int64_t v = 0; v < vlen; ++v) g[v] += bp[v0 + v];
      for (int64_t v = vlen; v < vp; ++v) g[v] = -std::numeric_limits<float>::infinity();
      float m_re = -std::numeric_limits<float>::infinity();
      for (int64_t v = 0; v < vlen; ++v) m_re = std::max(m_re, g[v]);
      float* e = grow(s.e, vp);
      double* bsum = grow(s.bsum, vp / kBlock);
      const double z_re = k.exp_blocks(g, vp, m_re, inv_t, e, bsum);
      const int64_t kk = cdf_sample(e, bsum, vlen, frac * z_re);
      tok_out[r] = v0 + kk;
      logp_out[r] = static_cast<float>(static_cast<double>(g[kk]) - static_cast<double>(M) - log_zu);
    }
  });
  for (int64_t r = 0; r < R; ++r) flags |= row_bad[r] ? status::NONFINITE_LOGITS : 0;
  status::raise_flags(flags);  // per call: the status word is never written on CPU
  return {tokens, logp};
}

}  // namespace sgk

TORCH_LIBRARY_IMPL(sgkernels, CPU, m) { m.impl("head_sample", &sgk::head_sample_cpu); }
