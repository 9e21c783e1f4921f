// CPU kernels of linear_cross_entropy_fwd / linear_cross_entropy_bwd (schemas: csrc/schema.cpp): the
// cross-entropy of `input @ linear_weight^T + linear_bias` without the [rows, V] logits. Triton
// kernels: sgkernels/kernels/linear_cross_entropy.py; wrapper, fake kernels, autograd and the
// plain-PyTorch spec: sgkernels/ops/linear_cross_entropy.py.
//
// Scheme (row chunks, Liger-Kernel's and torch's chunked path, plus row compaction):
//   1. the rows to project are gathered first (index_select): those whose target is not ignore_index
//      (the backward op: and whose coefficient is not 0). The others are never read: a NaN there
//      reaches nothing, and they cost nothing.
//   2. per chunk of C rows (C * V * 4 bytes <= kChunkBytes): logits = x_c @ W^T into one float32
//      buffer (at::mm_out, BLAS), then the row step (linear_cross_entropy_rows.h, at::parallel_for
//      over rows, per ISA): bias, suppressed ids, the row's statistics (label-smoothed class-weighted
//      loss l, and with conf the entropy H of softmax(z / T) and whether the argmax is the target) and,
//      when gradients are asked for, d (a l + c H) / d z written over the buffer. Then, from that
//      buffer: dx_c = G @ W (at::mm_out) and dW += G^T @ x_c, db += sum_rows G (at::addmm_, sum).
//   So a forward with gradients costs the unfused loss's three GEMMs on the kept rows only, and the
//   memory beyond the inputs and the gradients is the chunk buffer plus the gathered rows (n x d).
//   16-bit inputs are upcast to float32 for the GEMMs (the weight once: V x d x 4 bytes); all
//   accumulation is float32, the gradients are returned in the inputs' dtypes.
//
// Bad values raise ValueError naming the argument before anything is computed: a target outside
// [0, V) that is not ignore_index, a token_weight entry that is negative or not finite, a suppressed
// id outside [0, V).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/exp.h"
#include "common/isa.h"

namespace sgk {

struct LceRow {
  int64_t V;
  float eps;           // label smoothing
  float inv_t;         // 1 / temperature
  bool temp_one;       // temperature == 1
  bool conf;           // entropy and argmax statistics
  const float* bias;   // [V] float32 or null
  const float* cw;     // [V] float32 class weights (ones when none were given)
  float cw_sum;        // sum(cw)
  const int64_t* sup;  // suppressed ids
  int64_t n_sup;
};

#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
SGK_BEGIN_GENERIC
#include "cpu/linear_cross_entropy_rows.h"
SGK_END_GENERIC
#if SGK_X86
SGK_BEGIN_AVX2
#include "cpu/linear_cross_entropy_rows.h"
SGK_END_AVX2
SGK_BEGIN_AVX512
#include "cpu/linear_cross_entropy_rows.h"
SGK_END_AVX512
#endif
#pragma GCC pop_options

namespace {

constexpr int64_t kChunkBytes = 32 << 20;  // float32 logits of one chunk

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

int64_t chunk_rows_for(int64_t n, int64_t V, int64_t requested) {
  const int64_t cap = std::max<int64_t>(n, 1);
  if (requested > 0) return std::min(requested, cap);
  return std::clamp<int64_t>(kChunkBytes / (4 * V), 1, cap);
}

struct Inputs {
  at::Tensor x;    // [N, d] as given
  at::Tensor wf;   // [V, d] float32 (the weight itself when it is float32)
  at::Tensor bf;   // [V] float32, or undefined
  at::Tensor cw;   // [V] float32 class weights (ones when none)
  at::Tensor y;    // [N] int64 contiguous
  at::Tensor sup;  // [S] int64 contiguous (S may be 0)
  int64_t N, d, V;
  float cw_sum;
};

Inputs prepare(const at::Tensor& input, const at::Tensor& w, const std::optional<at::Tensor>& b,
               const at::Tensor& target, const std::optional<at::Tensor>& cls_w,
               const std::optional<at::Tensor>& sup, int64_t ignore_index) {
  TORCH_CHECK_TYPE(is_float(input.scalar_type()),
                   "linear_cross_entropy: input: expected float32, bfloat16 or float16, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() == 2, "linear_cross_entropy: input: expected shape [N, d], got ", input.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == input.scalar_type(), "linear_cross_entropy: linear_weight: expected dtype ",
                   input.scalar_type(), " (same as input), got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == input.size(1) && w.size(0) >= 1,
                    "linear_cross_entropy: linear_weight: expected shape [V, ", input.size(1), "] (d of input), got ",
                    w.sizes());
  Inputs in;
  in.N = input.size(0);
  in.d = input.size(1);
  in.V = w.size(0);
  in.x = input;
  in.wf = w.scalar_type() == at::kFloat ? w : w.to(at::kFloat);
  if (b.has_value()) {
    TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == in.V, "linear_cross_entropy: linear_bias: expected shape [", in.V,
                      "], got ", b->sizes());
    TORCH_CHECK_TYPE(b->scalar_type() == input.scalar_type(), "linear_cross_entropy: linear_bias: expected dtype ",
                     input.scalar_type(), ", got ", b->scalar_type());
    in.bf = b->to(at::kFloat).contiguous();
  }
  if (cls_w.has_value()) {
    TORCH_CHECK_VALUE(cls_w->dim() == 1 && cls_w->size(0) == in.V, "linear_cross_entropy: weight: expected shape [",
                      in.V, "], got ", cls_w->sizes());
    TORCH_CHECK_TYPE(is_float(cls_w->scalar_type()), "linear_cross_entropy: weight: expected a float tensor, got ",
                     cls_w->scalar_type());
    in.cw = cls_w->to(at::kFloat).contiguous();
  } else {
    in.cw = at::ones({in.V}, input.options().dtype(at::kFloat));
  }
  in.cw_sum = static_cast<float>(in.cw.sum(at::kDouble).item<double>());
  TORCH_CHECK_TYPE(!at::isFloatingType(target.scalar_type()) && !at::isComplexType(target.scalar_type()) &&
                       target.scalar_type() != at::kBool,
                   "linear_cross_entropy: target: expected an integer tensor, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == in.N, "linear_cross_entropy: target: expected shape [",
                    in.N, "], got ", target.sizes());
  in.y = target.to(at::kLong).contiguous();
  const int64_t* yp = in.y.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < in.N; ++r) {
    const int64_t t = yp[r];
    TORCH_CHECK_VALUE(t == ignore_index || (t >= 0 && t < in.V),
                      "linear_cross_entropy: target: expected class indices in [0, ", in.V, ") or ignore_index (",
                      ignore_index, "), got ", t, " at row ", r);
  }
  if (sup.has_value()) {
    TORCH_CHECK_TYPE(!at::isFloatingType(sup->scalar_type()) && sup->scalar_type() != at::kBool,
                     "linear_cross_entropy: suppress_ids: expected an integer tensor, got ", sup->scalar_type());
    in.sup = sup->reshape({-1}).to(at::kLong).contiguous();
    const int64_t* sp = in.sup.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < in.sup.numel(); ++i) {
      TORCH_CHECK_VALUE(sp[i] >= 0 && sp[i] < in.V, "linear_cross_entropy: suppress_ids: expected token ids in [0, ",
                        in.V, "), got ", sp[i]);
    }
  } else {
    in.sup = at::empty({0}, input.options().dtype(at::kLong));
  }
  return in;
}

LceRow row_params(const Inputs& in, double label_smoothing, double temperature, bool conf) {
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "linear_cross_entropy: label_smoothing: expected a float in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature),
                    "linear_cross_entropy: temperature: expected a finite float > 0, got ", temperature);
  LceRow r;
  r.V = in.V;
  r.eps = static_cast<float>(label_smoothing);
  r.inv_t = static_cast<float>(1.0 / temperature);
  r.temp_one = temperature == 1.0;
  r.conf = conf;
  r.bias = in.bf.defined() ? in.bf.const_data_ptr<float>() : nullptr;
  r.cw = in.cw.const_data_ptr<float>();
  r.cw_sum = in.cw_sum;
  r.sup = in.sup.const_data_ptr<int64_t>();
  r.n_sup = in.sup.numel();
  return r;
}

using RowsFn = void (*)(float*, const int64_t*, const float*, const float*, bool, const LceRow&, float*, int64_t,
                        int64_t);

// Which gradients a call makes (the schema's `grad` / `needs` bits).
constexpr int64_t kGradInput = 1, kGradWeight = 2, kGradBias = 4;

// Projects rows `ids` of in.x chunk by chunk. Statistics (l, H, correct) into rows [N, 3]; with
// gradients (mask: kGrad* bits), d (sum a_i l_i + c_i H_i) into dx (float32 [N, d], rows ids only),
// dw (float32 [V, d], added), db (float32 [V], added); those not asked for are undefined. a, c: per
// kept row (c empty: no entropy term).
void sweep(const Inputs& in, const std::vector<int64_t>& ids, const std::vector<float>& a, const std::vector<float>& c,
           const LceRow& rp, int64_t chunk_req, int64_t mask, float* rows, at::Tensor& dx, at::Tensor& dw,
           at::Tensor& db) {
  const bool grad = mask != 0;
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n == 0) return;
  const int64_t V = in.V;
  at::Tensor idx = at::from_blob(const_cast<int64_t*>(ids.data()), {n}, at::TensorOptions().dtype(at::kLong)).clone();
  const at::Tensor xc = in.x.index_select(0, idx).to(at::kFloat).contiguous();  // [n, d]
  std::vector<int64_t> yc(static_cast<size_t>(n));
  const int64_t* yp = in.y.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) yc[i] = yp[ids[i]];
  const int64_t C = chunk_rows_for(n, V, chunk_req);
  at::Tensor buf = at::empty({C, V}, xc.options());
  std::vector<float> st(static_cast<size_t>(3 * n));
  at::Tensor dxc = dx.defined() ? at::empty({n, in.d}, xc.options()) : at::Tensor();
  const RowsFn fn = SGK_PER_ISA(kLceRows);
  const float* ap = a.empty() ? nullptr : a.data();
  const float* cp = c.empty() ? nullptr : c.data();
  for (int64_t s = 0; s < n; s += C) {
    const int64_t rn = std::min(C, n - s);
    at::Tensor L = buf.narrow(0, 0, rn);
    const at::Tensor xs = xc.narrow(0, s, rn);
    at::mm_out(L, xs, in.wf.t());
    float* zp = L.data_ptr<float>();
    at::parallel_for(0, rn, 1, [&](int64_t r0, int64_t r1) {
      fn(zp, yc.data() + s, ap == nullptr ? nullptr : ap + s, cp == nullptr ? nullptr : cp + s, grad, rp,
         st.data() + 3 * s, r0, r1);
    });
    if (dxc.defined()) {
      at::Tensor dxs = dxc.narrow(0, s, rn);
      at::mm_out(dxs, L, in.wf);
    }
    if (dw.defined()) dw.addmm_(L.t(), xs);
    if (db.defined()) db.add_(L.sum(0));
  }
  for (int64_t i = 0; i < n; ++i) std::memcpy(rows + 3 * ids[i], st.data() + 3 * i, 3 * sizeof(float));
  if (dx.defined()) dx.index_copy_(0, idx, dxc);
}

struct Grads {
  at::Tensor dx, dw, db;  // float32 accumulators
};

Grads grad_buffers(const Inputs& in, int64_t mask, bool has_bias, const at::Tensor& w) {
  Grads g;
  if (mask & kGradInput) g.dx = at::zeros({in.N, in.d}, in.x.options().dtype(at::kFloat));
  if (mask & kGradWeight) g.dw = at::zeros({in.V, in.d}, w.options().dtype(at::kFloat));
  if ((mask & kGradBias) && has_bias) g.db = at::zeros({in.V}, w.options().dtype(at::kFloat));
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(const Grads& g, const at::Tensor& input, const at::Tensor& w,
                                                      const std::optional<at::Tensor>& b) {
  return {g.dx.defined() ? g.dx.to(input.scalar_type()) : at::empty({0}, input.options()),
          g.dw.defined() ? g.dw.to(w.scalar_type()) : at::empty({0}, w.options()),
          g.db.defined() ? g.db.to(b->scalar_type()) : at::empty({0}, w.options())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cpu(
    const at::Tensor& input, const at::Tensor& linear_weight, const std::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& token_weight,
    const std::optional<at::Tensor>& suppress_ids, int64_t ignore_index, double label_smoothing, double temperature,
    c10::string_view reduction, double denom_min, bool conf, int64_t grad, int64_t chunk_rows) {
  const Inputs in = prepare(input, linear_weight, linear_bias, target, weight, suppress_ids, ignore_index);
  const LceRow rp = row_params(in, label_smoothing, temperature, conf);
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum",
                    "linear_cross_entropy: reduction: expected 'mean' or 'sum' (the op), got '", std::string(reduction),
                    "'");
  const bool mean = reduction == "mean";
  at::Tensor tw;
  const float* twp = nullptr;
  if (token_weight.has_value()) {
    TORCH_CHECK_VALUE(token_weight->numel() == in.N, "linear_cross_entropy: token_weight: expected ", in.N,
                      " entries (one per row), got shape ", token_weight->sizes());
    tw = token_weight->reshape({-1}).to(at::kFloat).contiguous();
    twp = tw.const_data_ptr<float>();
    for (int64_t r = 0; r < in.N; ++r) {
      TORCH_CHECK_VALUE(std::isfinite(twp[r]) && twp[r] >= 0.0f,
                        "linear_cross_entropy: token_weight: expected finite values >= 0, got ", twp[r], " at row ", r);
    }
  }
  // the kept rows, their weights and the normalisation (before any GEMM)
  const int64_t* yp = in.y.const_data_ptr<int64_t>();
  const float* cwp = in.cw.const_data_ptr<float>();
  std::vector<int64_t> ids;
  std::vector<float> rho;
  double D = 0.0;
  for (int64_t r = 0; r < in.N; ++r) {
    if (yp[r] == ignore_index) continue;
    const float w = twp == nullptr ? 1.0f : twp[r];
    ids.push_back(r);
    rho.push_back(w);
    D += static_cast<double>(w) * cwp[yp[r]];
  }
  const double denom = mean ? std::max(D, denom_min) : 1.0;
  const double scale = denom > 0.0 ? 1.0 / denom : 0.0;  // gradient coefficients (no row: 0, as torch)
  std::vector<float> a(rho.size());
  for (size_t i = 0; i < rho.size(); ++i) a[i] = static_cast<float>(rho[i] * scale);

  at::Tensor rows = at::zeros({in.N, 3}, input.options().dtype(at::kFloat));
  Grads g = grad_buffers(in, grad, linear_bias.has_value(), linear_weight);
  sweep(in, ids, a, {}, rp, chunk_rows, grad, rows.data_ptr<float>(), g.dx, g.dw, g.db);

  // fixed order, double accumulation: deterministic for any thread count
  const float* rw = rows.const_data_ptr<float>();
  double total = 0.0;
  for (size_t i = 0; i < ids.size(); ++i) total += static_cast<double>(rho[i]) * rw[3 * ids[i]];
  if (mean) total /= denom;  // 0 / 0 = NaN (every row ignored), as torch
  const auto f32 = input.options().dtype(at::kFloat);
  at::Tensor loss = at::scalar_tensor(total, f32);
  at::Tensor den = at::scalar_tensor(denom, f32);
  auto [dx, dw, db] = finish(g, input, linear_weight, linear_bias);
  return {loss, den, rows, dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_bwd_cpu(
    const at::Tensor& input, const at::Tensor& linear_weight, const std::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& nll_coef,
    const std::optional<at::Tensor>& ent_coef, const std::optional<at::Tensor>& suppress_ids, int64_t ignore_index,
    double label_smoothing, double temperature, int64_t needs, int64_t chunk_rows) {
  const Inputs in = prepare(input, linear_weight, linear_bias, target, weight, suppress_ids, ignore_index);
  const bool conf = ent_coef.has_value();
  const LceRow rp = row_params(in, label_smoothing, temperature, conf);
  TORCH_CHECK_VALUE(nll_coef.numel() == in.N, "linear_cross_entropy: nll_coef: expected ", in.N, " entries");
  const at::Tensor ac = nll_coef.reshape({-1}).to(at::kFloat).contiguous();
  at::Tensor cc;
  if (conf) {
    TORCH_CHECK_VALUE(ent_coef->numel() == in.N, "linear_cross_entropy: ent_coef: expected ", in.N, " entries");
    cc = ent_coef->reshape({-1}).to(at::kFloat).contiguous();
  }
  const float* app = ac.const_data_ptr<float>();
  const float* cpp = conf ? cc.const_data_ptr<float>() : nullptr;
  const int64_t* yp = in.y.const_data_ptr<int64_t>();
  std::vector<int64_t> ids;
  std::vector<float> a, c;
  for (int64_t r = 0; r < in.N; ++r) {
    if (yp[r] == ignore_index) continue;
    const float ar = app[r], cr = conf ? cpp[r] : 0.0f;
    if (ar == 0.0f && cr == 0.0f) continue;  // no gradient from this row: not projected
    ids.push_back(r);
    a.push_back(ar);
    if (conf) c.push_back(cr);
  }
  Grads g = grad_buffers(in, needs, linear_bias.has_value(), linear_weight);
  at::Tensor rows = at::empty({in.N, 3}, input.options().dtype(at::kFloat));
  if (needs != 0) sweep(in, ids, a, c, rp, chunk_rows, needs, rows.data_ptr<float>(), g.dx, g.dw, g.db);
  return finish(g, input, linear_weight, linear_bias);
}

}  // namespace sgk

TORCH_LIBRARY_IMPL(sgkernels, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &sgk::linear_cross_entropy_fwd_cpu);
  m.impl("linear_cross_entropy_bwd", &sgk::linear_cross_entropy_bwd_cpu);
}
