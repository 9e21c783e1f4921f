// CPU kernels of the sampling ops guided_sample, remask_lowest_confidence and self_guided_step
// (schemas: csrc/schema.cpp; CUDA kernels: Triton, sgkernels/kernels/sampling.py).
//
// guided_sample: one OpenMP task per row. The row's guided logits are computed once from memory
// into a thread-local float32 buffer (any strides: a row with a non-unit last-dim stride is first
// gathered), with its max and a NaN/+inf check in the same pass. Then e_i = exp((g_i - M) / T)
// (a vectorised polynomial exp) with the float64 sum of every 64-element block, and the token is
// the first i whose float64 running sum exceeds uniform * Z: found by walking the block sums, then the
// one block holding the crossing. logp = g_k - M - log(sum_i exp(g_i - M)). Greedy rows (temperature
// 0, no filter, logp confidence) take one pass instead: 1024-element chunks loaded into an L1 buffer,
// the first argmax and the sum of exps kept against the running max (greedy_row).
// remask_lowest_confidence: per batch row, composite keys (order_key(conf) << 32 | n) of the
// candidates and std::nth_element.
// self_guided_step: both (the masked rows, then the remask per batch row); known rows never touch their
// logits.
//
// Sampling method: exact inverse CDF, one Philox call per row (Gumbel-max would need a Philox call
// per 4 elements and two logs per element; python -m benchmarks.sampling_method compares the two).
// The Triton kernels use the same method, so one seed gives the same tokens on CPU and GPU.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/isa.h"
#include "common/philox.h"
#include "common/raise_status.h"
#include "cpu/sampling_filters.h"
#include "cpu/sampling_rows.h"
#include "cpu/scratch.h"

namespace sgk {
namespace {

// A pointer to `v` contiguous elements of `es` bytes: `p` itself for a unit stride, else a copy.
const void* contiguous_row(const char* p, int64_t stride, int64_t v, int64_t es, std::vector<float>& buf) {
  if (stride == 1) return p;
  char* out = reinterpret_cast<char*>(grow(buf, (v * es + 3) / 4));
  if (es == 4) {
    for (int64_t i = 0; i < v; ++i) std::memcpy(out + 4 * i, p + 4 * i * stride, 4);
  } else {
    for (int64_t i = 0; i < v; ++i) std::memcpy(out + 2 * i, p + 2 * i * stride, 2);
  }
  return out;
}

struct SampleParams {
  int64_t vocab;
  float one_plus_s;       // 1 + guidance_scale
  float inv_temperature;  // 1 / temperature (clamped to [FLT_MIN, FLT_MAX])
  bool argmax;            // temperature == 0
  LoadFn load;            // for the logits' and the guide's dtypes
  int64_t logits_itemsize, guide_itemsize;
  int64_t logits_vstride, guide_vstride;  // last-dim strides (elements)
  const SampleKernels* kernels;
  int64_t top_k;  // 0 = off
  double top_p;   // 1 = off
  double min_p;   // 0 = off
  bool filtered;  // some filter is on
  bool hf_order;  // filter_order "hf": top-p on the distribution renormalised over the top-k set
  Confidence confidence;
};

Confidence parse_confidence(c10::string_view s) {
  if (s == "logp") return Confidence::kLogp;
  if (s == "prob") return Confidence::kProb;
  if (s == "margin") return Confidence::kMargin;
  if (s == "entropy") return Confidence::kEntropy;
  if (s == "neg_entropy") return Confidence::kNegEntropy;
  TORCH_CHECK(false, "confidence: expected \"logp\", \"prob\", \"margin\" or \"entropy\", got \"", std::string(s), "\"");
}

void set_filters(SampleParams& p, int64_t top_k, double top_p, double min_p, c10::string_view confidence,
                 c10::string_view filter_order = "dream") {
  TORCH_CHECK(filter_order == "dream" || filter_order == "hf", "filter_order: expected \"dream\" or \"hf\", got \"",
              std::string(filter_order), "\"");
  p.hf_order = filter_order == "hf";
  TORCH_CHECK(top_k >= 0, "top_k: expected an int >= 0 (0 = off), got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p: expected a float in (0, 1] (1 = off), got ", top_p);
  TORCH_CHECK(min_p >= 0.0 && min_p <= 1.0, "min_p: expected a float in [0, 1] (0 = off), got ", min_p);
  p.top_k = top_k;
  p.top_p = top_p;
  p.min_p = min_p;
  p.filtered = (top_k > 0 && top_k < p.vocab) || top_p < 1.0 || min_p > 0.0;
  p.confidence = parse_confidence(confidence);
}

// The int seed/offset, or the value of the 0-dim int64 CPU tensor that replaces it.
int64_t rng_value(const char* name, int64_t value, const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return value;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 0, name,
              "_tensor: expected a 0-dim int64 CPU tensor, got ", t->scalar_type(), " ", t->sizes(), " on ",
              t->device());
  const int64_t v = t->const_data_ptr<int64_t>()[0];
  TORCH_CHECK(v >= 0, name, ": expected a value in [0, 2**63), got ", v);
  return v;
}

SampleParams make_params(const at::Tensor& logits, const std::optional<at::Tensor>& guide, double s, double t) {
  SampleParams p{};
  p.vocab = logits.size(-1);
  p.one_plus_s = static_cast<float>(1.0 + s);
  p.argmax = t == 0.0;
  const double inv = p.argmax ? 1.0 : 1.0 / t;
  // clamped to [FLT_MIN, FLT_MAX]: a tiny T acts as argmax over the maxima, a huge T as uniform
  // over the finite entries (never 0 * -inf)
  p.inv_temperature = static_cast<float>(std::min<double>(
      std::max<double>(inv, std::numeric_limits<float>::min()), std::numeric_limits<float>::max()));
  p.kernels = &SGK_PER_ISA(kSampleKernels);
  const int logits_dtype = dtype_index(logits.scalar_type());
  p.logits_itemsize = logits.element_size();
  p.logits_vstride = logits.stride(-1);
  if (guide.has_value()) {
    p.load = p.kernels->load[logits_dtype][dtype_index(guide->scalar_type())];
    p.guide_itemsize = guide->element_size();
    p.guide_vstride = guide->stride(-1);
  } else {
    p.load = p.kernels->load_plain[logits_dtype];
  }
  return p;
}

struct RowOut {
  int64_t token;
  float logp;
  bool bad;
  float conf;  // the row's confidence (logp for Confidence::kLogp)
};

// Drop the tokens the filters reject: e[i] = 0 (e = exp((g - M) * inv_t), e at the max = 1), block
// sums recomputed; returns the kept sum.
double apply_filters(const SampleParams& p, const float* g, float* e, double* bsum, int64_t v, int64_t vp, double z,
                     Scratch& s) {
  float thr = -std::numeric_limits<float>::infinity();
  if (p.top_k > 0 && p.top_k < v) thr = std::max(thr, kth_largest(g, v, p.top_k, s.sel));
  if (p.top_p < 1.0) {
    // "hf": top-p needs top_p of the top-k set's mass (thr is the top-k cut, -inf when off)
    double mass = z;
    if (p.hf_order && thr > -std::numeric_limits<float>::infinity()) {
      mass = 0.0;
      for (int64_t i = 0; i < v; ++i)
        if (g[i] >= thr) mass += static_cast<double>(e[i]);
    }
    thr = std::max(thr, top_p_threshold(g, e, v, z, p.top_p * mass, s.sel_pairs, p.hf_order ? thr : -INFINITY));
  }
  const float min_e = static_cast<float>(p.min_p);
  double total = 0.0;
  for (int64_t b = 0; b < vp / kBlock; ++b) {
    double acc = 0.0;
    for (int64_t i = b * kBlock; i < (b + 1) * kBlock; ++i) {
      if (!(g[i] >= thr) || e[i] < min_e) e[i] = 0.0f;
      acc += static_cast<double>(e[i]);
    }
    bsum[b] = acc;
    total += acc;
  }
  return total;
}

// Dream's confidence of the kept distribution q = e / z (e at the max = 1); kNegEntropy: the exact
// sum q log q = sum q d - log z with d = (g - M) * inv_t = log e (no log per element).
float row_confidence(Confidence kind, const float* e, int64_t v, double z, int64_t tok, int64_t first_max,
                     const float* g, float m, float inv_t) {
  if (kind == Confidence::kNegEntropy) {
    double acc = 0.0;
    for (int64_t i = 0; i < v; ++i)
      if (e[i] > 0.0f) acc += static_cast<double>(e[i]) * (static_cast<double>(g[i] - m) * inv_t);
    return static_cast<float>(acc / z - std::log(z));
  }
  if (kind == Confidence::kProb) return static_cast<float>(static_cast<double>(e[tok]) / z);
  if (kind == Confidence::kMargin) {
    float e2 = 0.0f;
    for (int64_t i = 0; i < v; ++i)
      if (i != first_max && e[i] > e2) e2 = e[i];
    return static_cast<float>((1.0 - static_cast<double>(e2)) / z);
  }
  const float inv_z = static_cast<float>(1.0 / z);
  double acc = 0.0;
  for (int64_t i = 0; i < v; ++i) {
    const float q = e[i] * inv_z;
    if (q > 0.0f) acc += static_cast<double>(q * std::log(q + 1e-10f));
  }
  return static_cast<float>(acc);
}

// A greedy row (temperature 0, no filter, logp confidence) in one pass over the logits: chunks of
// kGreedyChunk elements are loaded (blended) into a buffer that stays in L1; a chunk is searched for
// the first index of its max only when that max exceeds the running one (so the token is the first
// argmax of the row), and sum exp(g - M) is kept relative to the running max M, rescaled by
// exp(M_old - M_new) in float64 when M grows.
constexpr int64_t kGreedyChunk = 1024;  // a multiple of kBlock

struct GreedyRow {
  int64_t token;
  float max;
  double sum;
  bool bad;  // some g[i] is NaN or +inf, or every g[i] is -inf
};

GreedyRow greedy_row(const SampleParams& p, const char* logits, const char* guide, float* buf) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  const int64_t v = p.vocab;
  float m = ninf;
  double z = 0.0;
  int64_t tok = 0;
  for (int64_t c = 0; c < v; c += kGreedyChunk) {
    const int64_t n = std::min(kGreedyChunk, v - c), np = padded_len(n);
    const LoadResult lr = p.load(logits + c * p.logits_itemsize, guide == nullptr ? nullptr : guide + c * p.guide_itemsize,
                                 n, np, p.one_plus_s, buf);
    if (lr.bad) return {0, ninf, 0.0, true};
    if (lr.max > m) {
      int64_t i = 0;
      while (buf[i] != lr.max) ++i;
      tok = c + i;
      if (m != ninf) z *= std::exp(static_cast<double>(m) - static_cast<double>(lr.max));
      m = lr.max;
    }
    if (m != ninf) z += p.kernels->sum_exp(buf, np, m);
  }
  return {tok, m, z, m == ninf};
}

RowOut sample_row(const char* logits, const char* guide, const SampleParams& p, double uniform, Scratch& s) {
  const SampleKernels& k = *p.kernels;
  const int64_t v = p.vocab, vp = padded_len(v);
  const void* logits_row = contiguous_row(logits, p.logits_vstride, v, p.logits_itemsize, s.raw_logits);
  const void* guide_row = guide == nullptr ? nullptr : contiguous_row(guide, p.guide_vstride, v, p.guide_itemsize, s.raw_guide);
  if (p.argmax && !p.filtered && p.confidence == Confidence::kLogp) {
    const GreedyRow gr = greedy_row(p, static_cast<const char*>(logits_row), static_cast<const char*>(guide_row),
                                    grow(s.g, kGreedyChunk));
    if (gr.bad) return {0, std::numeric_limits<float>::quiet_NaN(), true, std::numeric_limits<float>::quiet_NaN()};
    const float lp = static_cast<float>(-std::log(gr.sum));  // g[token] == max
    return {gr.token, lp, false, lp};
  }
  float* g = grow(s.g, vp);
  const LoadResult lr = p.load(logits_row, guide_row, v, vp, p.one_plus_s, g);
  const float m = lr.max;
  if (lr.bad || m == -std::numeric_limits<float>::infinity()) {
    return {0, std::numeric_limits<float>::quiet_NaN(), true, std::numeric_limits<float>::quiet_NaN()};
  }
  int64_t tok = 0;
  double sum;
  if (!p.filtered && p.confidence == Confidence::kLogp) {  // sampling (greedy rows took greedy_row)
    float* e = grow(s.e, vp);
    double* bsum = grow(s.bsum, vp / kBlock);
    const double z = k.exp_blocks(g, vp, m, p.inv_temperature, e, bsum);
    sum = p.inv_temperature == 1.0f ? z : k.sum_exp(g, vp, m);
    tok = cdf_sample(e, bsum, v, uniform * z);
    const double lp = static_cast<double>(g[tok]) - static_cast<double>(m) - std::log(sum);
    return {tok, static_cast<float>(lp), false, static_cast<float>(lp)};
  }
  // filters and/or a Dream confidence: e = exp((g - M) / T) (T = 1 when greedy), filtered in place
  const float inv_t = p.argmax ? 1.0f : p.inv_temperature;
  float* e = grow(s.e, vp);
  double* bsum = grow(s.bsum, vp / kBlock);
  double z = k.exp_blocks(g, vp, m, inv_t, e, bsum);
  sum = inv_t == 1.0f ? z : k.sum_exp(g, vp, m);  // untempered, unfiltered: for logp
  if (p.filtered) z = apply_filters(p, g, e, bsum, v, vp, z, s);
  int64_t first_max = 0;
  while (g[first_max] != m) ++first_max;
  if (p.argmax) {
    tok = first_max;
  } else {
    tok = cdf_sample(e, bsum, v, uniform * z);
  }
  const double lp = static_cast<double>(g[tok]) - static_cast<double>(m) - std::log(sum);
  const float conf = p.confidence == Confidence::kLogp ? static_cast<float>(lp)
                                                        : row_confidence(p.confidence, e, v, z, tok, first_max, g, m,
                                                                         inv_t);
  return {tok, static_cast<float>(lp), false, conf};
}

// The positions (low 32 bits) of a row's chosen keys set in `out`, from the composite keys
// (order_key(conf) << 32 | n) of its candidates:
//   exact k:      the min(n, #keys) smallest keys (ties in conf go to the lower position);
//   strict below: the keys whose conf is strictly below the conf of rank n (0-based), all of them
//                 when n >= #keys (so ties at the cut can leave fewer than n chosen).
// A negative n chooses none and returns status::NEGATIVE_NUM_TO_MASK (else 0).
int mark_smallest(std::vector<uint64_t>& keys, int64_t n, bool strict_below, bool* out) {
  const int64_t cnt = static_cast<int64_t>(keys.size());
  if (n <= 0) return n < 0 ? status::NEGATIVE_NUM_TO_MASK : 0;
  if (strict_below && n < cnt) {
    std::nth_element(keys.begin(), keys.begin() + n, keys.end());
    const uint64_t cut = keys[n] >> 32;
    for (int64_t i = 0; i < n; ++i)
      if ((keys[i] >> 32) < cut) out[keys[i] & 0xFFFFFFFFu] = true;
    return 0;
  }
  if (n < cnt) std::nth_element(keys.begin(), keys.begin() + n, keys.end());
  for (int64_t i = 0; i < std::min(n, cnt); ++i) out[keys[i] & 0xFFFFFFFFu] = true;
  return 0;
}

// uint32 key with key(a) < key(b) iff a < b as floats; -0 and +0 map to the same key; every NaN
// maps to the largest key (torch's sort puts NaN last).
inline uint32_t order_key(float f) {
  if (f != f) return 0xFFFFFFFFu;
  f = f + 0.0f;  // -0 -> +0
  const uint32_t b = float_to_bits(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The composite key of position n with confidence conf (see mark_smallest).
inline uint64_t conf_key(float conf, int64_t n) {
  return static_cast<uint64_t>(order_key(conf)) << 32 | static_cast<uint64_t>(n);
}

inline float noisy_confidence(float logp, float tau, uint32_t w2, uint32_t w3) {
  float noise = tau * gumbel(w2, w3);
  SGK_NO_CONTRACT(noise);
  return logp + noise;
}

int num_threads_for(int64_t work) {
  const int nt = at::get_num_threads();
  return work < 32768 ? 1 : std::max(nt, 1);
}

// body(i, scratch) for i in [0, n) on nt OpenMP threads, in dynamic chunks of `chunk` indices (0: about
// n / (16 nt)), each thread with its Scratch; returns the OR of the status flags the calls return.
template <typename Body>
int parallel_rows(int64_t n, int nt, int64_t chunk, const Body& body) {
  if (chunk == 0) chunk = std::max<int64_t>(1, n / (static_cast<int64_t>(nt) * 16));
  int flags = 0;
#pragma omp parallel num_threads(nt) reduction(| : flags)
  {
    Scratch& s = scratch();
#pragma omp for schedule(dynamic, chunk)
    for (int64_t i = 0; i < n; ++i) flags |= body(i, s);
  }
  return flags;
}

// The blend's terms whose coefficient is 0 are dropped: s == 0 reads the logits alone, s == -1
// (1 + s == 0) the guide alone, so a NaN/inf in a dropped term has no effect.
struct Terms {
  at::Tensor base;
  std::optional<at::Tensor> guide;
};

Terms blend_terms(const at::Tensor& logits, const std::optional<at::Tensor>& guide, double s) {
  if (!guide.has_value() || s == 0.0) return {logits, std::nullopt};
  if (1.0 + s == 0.0) return {*guide, std::nullopt};
  return {logits, guide};
}

void check_decoded_confidence(const std::optional<double>& c) {
  TORCH_CHECK_VALUE(!c.has_value() || std::isfinite(*c), "decoded_confidence: expected a finite float or None, got ",
                    c.has_value() ? *c : 0.0);
}

void check_status(const at::Tensor& status) {
  TORCH_CHECK(status.device().is_cpu() && status.scalar_type() == at::kInt && status.numel() >= 1,
              "status: expected an int32 CPU tensor with at least one element");
}

void check_logits(const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK(dtype_index(x.scalar_type()) >= 0, name, ": expected float32, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) >= 1, name, ": expected shape [..., V] with V >= 1, got ", x.sizes());
}

void check_common(const at::Tensor& logits, const std::optional<at::Tensor>& guide, double t, int64_t seed,
                  int64_t offset) {
  check_logits("logits", logits);
  if (guide.has_value()) {
    check_logits("guide_logits", *guide);
    TORCH_CHECK(guide->sizes() == logits.sizes(), "guide_logits: expected shape ", logits.sizes(), ", got ",
                guide->sizes());
  }
  TORCH_CHECK(std::isfinite(t) && t >= 0.0, "temperature: expected a finite float >= 0, got ", t);
  TORCH_CHECK(seed >= 0 && offset >= 0, "seed and offset: expected values >= 0");
}

// ------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> guided_sample_cpu(
    const at::Tensor& logits_in, const std::optional<at::Tensor>& guide_in, double guidance_scale, double temperature,
    int64_t seed, int64_t offset, const at::Tensor& status, int64_t top_k, double top_p, double min_p,
    c10::string_view confidence, const std::optional<at::Tensor>& seed_tensor,
    const std::optional<at::Tensor>& offset_tensor, const std::optional<at::Tensor>& row_ids,
    c10::string_view filter_order) {
  seed = rng_value("seed", seed, seed_tensor);
  offset = rng_value("offset", offset, offset_tensor);
  check_common(logits_in, guide_in, temperature, seed, offset);
  TORCH_CHECK(std::isfinite(guidance_scale), "guidance_scale: expected a finite float");
  check_status(status);
  const Terms terms = blend_terms(logits_in, guide_in, guidance_scale);
  const at::Tensor& logits = terms.base;
  const std::optional<at::Tensor>& guide = terms.guide;
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  at::Tensor tokens = at::empty(lead, logits.options().dtype(at::kLong));
  at::Tensor logp = at::empty(lead, logits.options().dtype(at::kFloat));
  at::Tensor conf = at::empty(lead, logits.options().dtype(at::kFloat));
  SampleParams p = make_params(logits, guide, guidance_scale, temperature);
  set_filters(p, top_k, top_p, min_p, confidence, filter_order);
  const int64_t rows = tokens.numel();
  at::Tensor ids_c;
  if (row_ids.has_value()) {
    TORCH_CHECK(row_ids->scalar_type() == at::kLong && row_ids->dim() == 1 && row_ids->numel() == rows &&
                    row_ids->device().is_cpu(),
                "row_ids: expected an int64 CPU tensor [", rows, "] (one key per row)");
    ids_c = row_ids->contiguous();
    TORCH_CHECK(rows == 0 || ids_c.min().item<int64_t>() >= 0, "row_ids: expected values >= 0");
  }
  const int64_t* ids = ids_c.defined() ? ids_c.const_data_ptr<int64_t>() : nullptr;
  if (rows == 0) return {tokens, logp, conf};
  const int nd = static_cast<int>(lead.size());
  std::vector<int64_t> sizes(lead.begin(), lead.end()), logits_bstr(nd), guide_bstr(nd, 0);
  for (int d = 0; d < nd; ++d) {
    logits_bstr[d] = logits.stride(d) * p.logits_itemsize;
    if (guide.has_value()) guide_bstr[d] = guide->stride(d) * p.guide_itemsize;
  }
  const char* logits_base = static_cast<const char*>(logits.const_data_ptr());
  const char* guide_base = guide.has_value() ? static_cast<const char*>(guide->const_data_ptr()) : nullptr;
  int64_t* tok_out = tokens.mutable_data_ptr<int64_t>();
  float* logp_out = logp.mutable_data_ptr<float>();
  float* conf_out = conf.mutable_data_ptr<float>();
  const uint64_t useed = static_cast<uint64_t>(seed), uoff = static_cast<uint64_t>(offset);
  const int flags = parallel_rows(rows, num_threads_for(rows * p.vocab), 0, [&](int64_t r, Scratch& s) {
    int64_t rem = r, logits_off = 0, guide_off = 0;
    for (int d = nd - 1; d >= 0; --d) {
      const int64_t i = rem % sizes[d];
      rem /= sizes[d];
      logits_off += i * logits_bstr[d];
      guide_off += i * guide_bstr[d];
    }
    const PhiloxWords w = philox_row(useed, uoff, static_cast<uint64_t>(ids == nullptr ? r : ids[r]));
    const RowOut o = sample_row(logits_base + logits_off, guide_base == nullptr ? nullptr : guide_base + guide_off, p,
                                token_uniform(w.w0, w.w1), s);
    tok_out[r] = o.token;
    logp_out[r] = o.logp;
    conf_out[r] = o.conf;
    return o.bad ? status::NONFINITE_LOGITS : 0;
  });
  status::raise_flags(flags);
  return {tokens, logp, conf};
}

// ------------------------------------------------------------------------------------------------
at::Tensor remask_cpu(const at::Tensor& logp, const at::Tensor& is_masked, const at::Tensor& num_to_mask,
                      double choice_temperature, int64_t seed, int64_t offset, const at::Tensor& status,
                      std::optional<double> decoded_confidence, bool strict_below,
                      const std::optional<at::Tensor>& seed_tensor, const std::optional<at::Tensor>& offset_tensor) {
  seed = rng_value("seed", seed, seed_tensor);
  offset = rng_value("offset", offset, offset_tensor);
  TORCH_CHECK(logp.device().is_cpu() && logp.scalar_type() == at::kFloat && logp.dim() == 2,
              "logp: expected a float32 CPU tensor [B, N], got ", logp.scalar_type(), " ", logp.sizes());
  TORCH_CHECK(is_masked.device().is_cpu() && is_masked.scalar_type() == at::kBool && is_masked.sizes() == logp.sizes(),
              "is_masked: expected a bool CPU tensor of shape ", logp.sizes());
  const int64_t batch = logp.size(0), n_tok = logp.size(1);
  TORCH_CHECK(num_to_mask.device().is_cpu() && num_to_mask.scalar_type() == at::kLong && num_to_mask.dim() == 1 &&
                  num_to_mask.size(0) == batch,
              "num_to_mask: expected an int64 CPU tensor of shape [", batch, "]");
  TORCH_CHECK(std::isfinite(choice_temperature) && choice_temperature >= 0.0,
              "choice_temperature: expected a finite float >= 0");
  TORCH_CHECK(seed >= 0 && offset >= 0, "seed and offset: expected values >= 0");
  TORCH_CHECK(n_tok < (int64_t(1) << 32), "N must be < 2**32");
  check_decoded_confidence(decoded_confidence);
  check_status(status);
  at::Tensor out = at::zeros({batch, n_tok}, is_masked.options());
  if (out.numel() == 0) {
    return out;
  }
  const at::Tensor lp = logp.contiguous(), mk = is_masked.contiguous(), nm = num_to_mask.contiguous();
  const float* lpp = lp.const_data_ptr<float>();
  const bool* mkp = mk.const_data_ptr<bool>();
  const int64_t* nmp = nm.const_data_ptr<int64_t>();
  bool* outp = out.mutable_data_ptr<bool>();
  const float tau = static_cast<float>(choice_temperature);
  const bool has_dec = decoded_confidence.has_value();
  const float dec = has_dec ? static_cast<float>(*decoded_confidence) : 0.0f;
  const uint64_t useed = static_cast<uint64_t>(seed), uoff = static_cast<uint64_t>(offset);
  const int nt = static_cast<int>(std::min<int64_t>(num_threads_for(batch * n_tok * 16), batch));
  const int flags = parallel_rows(batch, nt, 1, [&](int64_t b, Scratch& s) {
    s.keys.clear();
    for (int64_t n = 0; n < n_tok; ++n) {
      const int64_t r = b * n_tok + n;
      if (!mkp[r] && !has_dec) continue;
      const PhiloxWords w = philox_row(useed, uoff, static_cast<uint64_t>(r));
      s.keys.push_back(conf_key(noisy_confidence(mkp[r] ? lpp[r] : dec, tau, w.w2, w.w3), n));
    }
    return mark_smallest(s.keys, nmp[b], strict_below, outp + b * n_tok);
  });
  status::raise_flags(flags);
  return out;
}

// ------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> self_guided_step_cpu(const at::Tensor& tokens, const at::Tensor& is_masked,
                                                        const at::Tensor& logits_in,
                                                        const std::optional<at::Tensor>& guide_in,
                                                        const at::Tensor& num_to_mask, double guidance_scale,
                                                        double temperature, double choice_temperature, int64_t seed,
                                                        int64_t offset, const at::Tensor& status,
                                                        std::optional<double> decoded_confidence, bool strict_below,
                                                        std::optional<int64_t> mask_token_id, int64_t top_k,
                                                        double top_p, double min_p, c10::string_view confidence,
                                                        const std::optional<at::Tensor>& seed_tensor,
                                                        const std::optional<at::Tensor>& offset_tensor) {
  seed = rng_value("seed", seed, seed_tensor);
  offset = rng_value("offset", offset, offset_tensor);
  check_common(logits_in, guide_in, temperature, seed, offset);
  const Terms terms = blend_terms(logits_in, guide_in, guidance_scale);
  const at::Tensor& logits = terms.base;
  const std::optional<at::Tensor>& guide = terms.guide;
  TORCH_CHECK(logits.dim() == 3, "logits: expected shape [B, N, V], got ", logits.sizes());
  TORCH_CHECK(std::isfinite(guidance_scale), "guidance_scale: expected a finite float");
  TORCH_CHECK(std::isfinite(choice_temperature) && choice_temperature >= 0.0,
              "choice_temperature: expected a finite float >= 0");
  const int64_t batch = logits.size(0), n_tok = logits.size(1);
  TORCH_CHECK(tokens.device().is_cpu() && tokens.scalar_type() == at::kLong && tokens.dim() == 2 &&
                  tokens.size(0) == batch && tokens.size(1) == n_tok,
              "tokens: expected an int64 CPU tensor of shape [", batch, ", ", n_tok, "]");
  TORCH_CHECK(is_masked.device().is_cpu() && is_masked.scalar_type() == at::kBool && is_masked.sizes() == tokens.sizes(),
              "is_masked: expected a bool CPU tensor of shape [", batch, ", ", n_tok, "]");
  TORCH_CHECK(num_to_mask.device().is_cpu() && num_to_mask.scalar_type() == at::kLong && num_to_mask.dim() == 1 &&
                  num_to_mask.size(0) == batch,
              "num_to_mask: expected an int64 CPU tensor of shape [", batch, "]");
  TORCH_CHECK(n_tok < (int64_t(1) << 32), "N must be < 2**32");
  check_decoded_confidence(decoded_confidence);
  TORCH_CHECK_VALUE(!decoded_confidence.has_value() || mask_token_id.has_value(),
                    "mask_token_id: expected an int when decoded_confidence is set (re-masked decoded positions "
                    "get it), got None");
  check_status(status);

  at::Tensor new_tokens = at::empty({batch, n_tok}, tokens.options());
  at::Tensor new_mask = at::empty({batch, n_tok}, is_masked.options());
  if (new_tokens.numel() == 0) return {new_tokens, new_mask};
  const at::Tensor tk = tokens.contiguous(), mk = is_masked.contiguous(), nm = num_to_mask.contiguous();
  const int64_t* tkp = tk.const_data_ptr<int64_t>();
  const bool* mkp = mk.const_data_ptr<bool>();
  const int64_t* nmp = nm.const_data_ptr<int64_t>();
  int64_t* out_tok = new_tokens.mutable_data_ptr<int64_t>();
  bool* out_mask = new_mask.mutable_data_ptr<bool>();

  std::vector<int64_t> rows;
  rows.reserve(static_cast<size_t>(batch * n_tok));
  for (int64_t r = 0; r < batch * n_tok; ++r)
    if (mkp[r]) rows.push_back(r);
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  std::vector<float> conf(static_cast<size_t>(batch * n_tok));
  std::vector<int64_t> sampled(static_cast<size_t>(batch * n_tok));

  SampleParams p = make_params(logits, guide, guidance_scale, temperature);
  set_filters(p, top_k, top_p, min_p, confidence);
  const int64_t ls0 = logits.stride(0) * p.logits_itemsize, ls1 = logits.stride(1) * p.logits_itemsize;
  const int64_t gs0 = guide.has_value() ? guide->stride(0) * p.guide_itemsize : 0;
  const int64_t gs1 = guide.has_value() ? guide->stride(1) * p.guide_itemsize : 0;
  const char* logits_base = static_cast<const char*>(logits.const_data_ptr());
  const char* guide_base = guide.has_value() ? static_cast<const char*>(guide->const_data_ptr()) : nullptr;
  const float tau = static_cast<float>(choice_temperature);
  const bool has_dec = decoded_confidence.has_value();
  const float dec = has_dec ? static_cast<float>(*decoded_confidence) : 0.0f;
  const bool has_mask_id = mask_token_id.has_value();
  const int64_t mask_id = has_mask_id ? *mask_token_id : 0;
  const uint64_t useed = static_cast<uint64_t>(seed), uoff = static_cast<uint64_t>(offset);
  const int nt = num_threads_for(std::max(n_rows * p.vocab, batch * n_tok * 16));
  int flags = parallel_rows(n_rows, nt, 0, [&](int64_t i, Scratch& s) {
    const int64_t r = rows[i];
    const int64_t b = r / n_tok, n = r % n_tok;
    const PhiloxWords w = philox_row(useed, uoff, static_cast<uint64_t>(r));
    const RowOut o = sample_row(logits_base + b * ls0 + n * ls1,
                                guide_base == nullptr ? nullptr : guide_base + b * gs0 + n * gs1, p,
                                token_uniform(w.w0, w.w1), s);
    sampled[r] = o.token;
    conf[r] = noisy_confidence(o.conf, tau, w.w2, w.w3);
    return o.bad ? status::NONFINITE_LOGITS : 0;
  });
  // then the remask, one batch row at a time
  flags |= parallel_rows(batch, nt, 1, [&](int64_t b, Scratch& s) {
    s.keys.clear();
    const int64_t base = b * n_tok;
    for (int64_t n = 0; n < n_tok; ++n) {
      out_mask[base + n] = false;
      if (mkp[base + n]) {
        s.keys.push_back(conf_key(conf[base + n], n));
      } else if (has_dec) {  // a decoded position competes with confidence dec + tau * G
        const PhiloxWords w = philox_row(useed, uoff, static_cast<uint64_t>(base + n));
        s.keys.push_back(conf_key(noisy_confidence(dec, tau, w.w2, w.w3), n));
      }
    }
    const int row_flags = mark_smallest(s.keys, nmp[b], strict_below, out_mask + base);
    for (int64_t n = 0; n < n_tok; ++n) {
      const int64_t r = base + n;
      if (out_mask[r]) {
        out_tok[r] = has_mask_id ? mask_id : tkp[r];
      } else {
        out_tok[r] = mkp[r] ? sampled[r] : tkp[r];
      }
    }
    return row_flags;
  });
  status::raise_flags(flags);
  return {new_tokens, new_mask};
}

// ------------------------------------------------------------------------------------------------
// block_commit / block_refine_step (spec: sgkernels/ops/block_refine.py). Per batch row: the
// candidates' composite keys (order_key(-prob) << 32 | position), the `need` smallest by
// std::nth_element (most confident first, ties to the lower position), OR the ones above threshold.
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_commit_cpu(
    const at::Tensor& tokens, const at::Tensor& probs, const at::Tensor& sample,
    const std::optional<at::Tensor>& committed, const std::optional<at::Tensor>& prompt_mask,
    const std::optional<at::Tensor>& noise, std::optional<int64_t> mask_token_id, int64_t quota, double threshold,
    std::optional<double> editing_threshold) {
  TORCH_CHECK(sample.device().is_cpu() && sample.scalar_type() == at::kLong && sample.dim() == 2,
              "sample: expected an int64 CPU tensor [B, L], got ", sample.scalar_type(), " ", sample.sizes());
  TORCH_CHECK(tokens.device().is_cpu() && tokens.scalar_type() == at::kLong && tokens.sizes() == sample.sizes(),
              "tokens: expected an int64 CPU tensor of shape ", sample.sizes());
  TORCH_CHECK(probs.device().is_cpu() && probs.scalar_type() == at::kFloat && probs.sizes() == sample.sizes(),
              "probs: expected a float32 CPU tensor of shape ", sample.sizes());
  TORCH_CHECK_VALUE(!std::isnan(threshold), "threshold: expected a float, got NaN");
  TORCH_CHECK_VALUE(!editing_threshold.has_value() || !std::isnan(*editing_threshold),
                    "editing_threshold: expected a float or None, got NaN");
  const bool mask_mode = mask_token_id.has_value();
  const int64_t batch = sample.size(0), len = sample.size(1);
  TORCH_CHECK(len < (int64_t(1) << 32), "L must be < 2**32");
  at::Tensor comm_c, noise_c, prompt_c;
  if (!mask_mode) {
    TORCH_CHECK(committed.has_value() && committed->device().is_cpu() && committed->scalar_type() == at::kBool &&
                    committed->sizes() == sample.sizes(),
                "committed: expected a bool CPU tensor of shape ", sample.sizes(), " in the uniform mode");
    TORCH_CHECK(noise.has_value() && noise->device().is_cpu() && noise->scalar_type() == at::kLong &&
                    noise->sizes() == sample.sizes(),
                "noise: expected an int64 CPU tensor of shape ", sample.sizes(), " in the uniform mode");
    comm_c = committed->contiguous();
    noise_c = noise->contiguous();
  } else if (prompt_mask.has_value()) {
    TORCH_CHECK(prompt_mask->device().is_cpu() && prompt_mask->scalar_type() == at::kBool && prompt_mask->dim() == 1 &&
                    prompt_mask->size(0) == len,
                "prompt_mask: expected a bool CPU tensor of shape [", len, "]");
    prompt_c = prompt_mask->contiguous();
  }
  at::Tensor prev = at::empty({batch, len}, sample.options());
  at::Tensor transfer = at::zeros({batch, len}, sample.options().dtype(at::kBool));
  at::Tensor edit = at::empty({batch, len}, sample.options().dtype(at::kBool));
  if (prev.numel() == 0) return {prev, transfer, edit};
  const at::Tensor tk = tokens.contiguous(), pr = probs.contiguous(), sm = sample.contiguous();
  const int64_t* tkp = tk.const_data_ptr<int64_t>();
  const float* prp = pr.const_data_ptr<float>();
  const int64_t* smp = sm.const_data_ptr<int64_t>();
  const bool* cmp = comm_c.defined() ? comm_c.const_data_ptr<bool>() : nullptr;
  const int64_t* nzp = noise_c.defined() ? noise_c.const_data_ptr<int64_t>() : nullptr;
  const bool* pmp = prompt_c.defined() ? prompt_c.const_data_ptr<bool>() : nullptr;
  int64_t* prev_p = prev.mutable_data_ptr<int64_t>();
  bool* tr_p = transfer.mutable_data_ptr<bool>();
  bool* ed_p = edit.mutable_data_ptr<bool>();
  // float32 comparisons, as torch compares a float32 tensor with a Python float
  const float thr = static_cast<float>(threshold);
  const bool edit_on = editing_threshold.has_value();
  const float eth = edit_on ? static_cast<float>(*editing_threshold) : 0.0f;
  const int64_t mask_id = mask_mode ? *mask_token_id : 0;
  const int nt = static_cast<int>(std::min<int64_t>(num_threads_for(batch * len * 16), batch));
  parallel_rows(batch, nt, 1, [&](int64_t b, Scratch& s) {
    const int64_t base = b * len;
    int64_t need = quota;
    if (!mask_mode) {
      int64_t n_comm = 0;
      for (int64_t n = 0; n < len; ++n) n_comm += cmp[base + n] ? 1 : 0;
      need = std::max<int64_t>(quota - n_comm, 0);
    }
    if (!mask_mode || quota >= 0) {
      s.keys.clear();
      for (int64_t n = 0; n < len; ++n) {
        const int64_t r = base + n;
        const bool cand = mask_mode ? smp[r] == mask_id : !cmp[r];
        if (!cand) continue;
        s.keys.push_back(conf_key(-prp[r], n));
        if (prp[r] > thr) tr_p[r] = true;
      }
      mark_smallest(s.keys, need, false, tr_p + base);
    }
    for (int64_t n = 0; n < len; ++n) {
      const int64_t r = base + n;
      bool e = false;
      if (edit_on) {
        const bool editable = mask_mode ? (smp[r] != mask_id && (pmp == nullptr || !pmp[n])) : cmp[r];
        e = editable && tkp[r] != smp[r] && prp[r] > eth;
      }
      ed_p[r] = e;
      int64_t v = (tr_p[r] || e) ? tkp[r] : smp[r];
      if (!mask_mode && !(cmp[r] || tr_p[r])) v = nzp[r];
      prev_p[r] = v;
    }
    return 0;
  });
  return {prev, transfer, edit};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_refine_step_cpu(
    const at::Tensor& logits, const at::Tensor& sample, const std::optional<at::Tensor>& committed,
    const std::optional<at::Tensor>& prompt_mask, const std::optional<at::Tensor>& noise,
    std::optional<int64_t> mask_token_id, int64_t quota, double threshold, std::optional<double> editing_threshold,
    double temperature, int64_t top_k, double top_p, c10::string_view filter_order, int64_t seed, int64_t offset,
    const at::Tensor& status, const std::optional<at::Tensor>& seed_tensor) {
  TORCH_CHECK(logits.dim() == 3 && sample.dim() == 2 && logits.size(0) == sample.size(0) &&
                  logits.size(1) == sample.size(1),
              "logits: expected shape [B, L, V] with [B, L] = sample's ", sample.sizes(), ", got ", logits.sizes());
  const bool greedy = temperature == 0.0;
  // greedy: argmax and the untempered, unfiltered probability exp(logp) (diffusers ignores the filters)
  auto [tokens, logp, conf] = guided_sample_cpu(logits, std::nullopt, 0.0, temperature, seed, offset, status,
                                                greedy ? 0 : top_k, greedy ? 1.0 : top_p, 0.0,
                                                greedy ? "logp" : "prob", seed_tensor, std::nullopt, std::nullopt,
                                                filter_order);
  at::Tensor probs = greedy ? logp.exp() : conf;
  auto [prev, transfer, edit] = block_commit_cpu(tokens, probs, sample, committed, prompt_mask, noise, mask_token_id,
                                                 quota, threshold, editing_threshold);
  return {prev, transfer, edit, tokens, probs};
}

// entropy_bound_step (spec: sgkernels/ops/entropy_bound.py): guided_sample at temperature 1 with the
// exact entropy of each row, then per batch row the positions sorted by (entropy, position) and
// accepted while the float64 sum of the entropies before them is <= entropy_bound.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> entropy_bound_step_cpu(
    const at::Tensor& logits, const at::Tensor& noise, double entropy_bound, int64_t seed, int64_t offset,
    const at::Tensor& status, const std::optional<at::Tensor>& seed_tensor) {
  TORCH_CHECK(logits.dim() == 3, "logits: expected shape [B, L, V], got ", logits.sizes());
  TORCH_CHECK(noise.device().is_cpu() && noise.scalar_type() == at::kLong && noise.dim() == 2 &&
                  noise.size(0) == logits.size(0) && noise.size(1) == logits.size(1),
              "noise: expected an int64 CPU tensor of shape [", logits.size(0), ", ", logits.size(1), "]");
  TORCH_CHECK_VALUE(!std::isnan(entropy_bound), "entropy_bound: expected a float, got NaN");
  auto [tokens, logp, negh] = guided_sample_cpu(logits, std::nullopt, 0.0, 1.0, seed, offset, status, 0, 1.0, 0.0,
                                                "neg_entropy", seed_tensor, std::nullopt, std::nullopt, "dream");
  at::Tensor entropy = negh.neg();
  const int64_t batch = logits.size(0), len = logits.size(1);
  TORCH_CHECK(len < (int64_t(1) << 32), "L must be < 2**32");
  at::Tensor accepted = at::empty({batch, len}, noise.options().dtype(at::kBool));
  at::Tensor prev = at::empty({batch, len}, noise.options());
  if (prev.numel() == 0) return {prev, accepted, tokens, logp.exp(), entropy};
  const at::Tensor nz = noise.contiguous();
  const float* hp = entropy.const_data_ptr<float>();
  const int64_t* tkp = tokens.const_data_ptr<int64_t>();
  const int64_t* nzp = nz.const_data_ptr<int64_t>();
  bool* acc_p = accepted.mutable_data_ptr<bool>();
  int64_t* prev_p = prev.mutable_data_ptr<int64_t>();
  const double bound = static_cast<double>(static_cast<float>(entropy_bound));  // float32, as torch compares
  const int nt = static_cast<int>(std::min<int64_t>(num_threads_for(batch * len * 16), batch));
  parallel_rows(batch, nt, 1, [&](int64_t b, Scratch& s) {
    const int64_t base = b * len;
    s.keys.clear();
    for (int64_t n = 0; n < len; ++n) s.keys.push_back(conf_key(hp[base + n], n));
    std::sort(s.keys.begin(), s.keys.end());
    double before = 0.0;
    for (const uint64_t key : s.keys) {
      const int64_t n = static_cast<int64_t>(key & 0xFFFFFFFFu);
      acc_p[base + n] = before <= bound;
      before += static_cast<double>(hp[base + n]);
    }
    for (int64_t n = 0; n < len; ++n) prev_p[base + n] = acc_p[base + n] ? tkp[base + n] : nzp[base + n];
    return 0;
  });
  return {prev, accepted, tokens, logp.exp(), entropy};
}

}  // namespace
}  // namespace sgk

TORCH_LIBRARY_IMPL(sgkernels, CPU, m) {
  m.impl("entropy_bound_step", &sgk::entropy_bound_step_cpu);
  m.impl("block_refine_step", &sgk::block_refine_step_cpu);
  m.impl("block_commit", &sgk::block_commit_cpu);
  m.impl("guided_sample", &sgk::guided_sample_cpu);
  m.impl("remask_lowest_confidence", &sgk::remask_cpu);
  m.impl("self_guided_step", &sgk::self_guided_step_cpu);
}
