// CPU kernel of cross_entropy_fwd / cross_entropy_fwd_inplace (schemas: csrc/schema.cpp): fused
// softmax cross-entropy, loss AND gradient in one pass over the logits. CUDA kernel: Triton
// (sgkernels/kernels/cross_entropy.py), registered from sgkernels/ops/cross_entropy.py, which also
// holds the fake kernels, the autograd formula and the F.cross_entropy reference.
//
// Semantics: F.cross_entropy(logits [..., V], target [...], ignore_index, label_smoothing, reduction)
// with eps = label_smoothing, per non-ignored row (loss accumulated in float32):
//   loss_r = lse - (1 - eps) x_y - (eps / V) sum_i x_i
//          = log sum exp(x - M) + (1 - eps) (M - x_y) - (eps / V) sum_i (x_i - M),  M = max x
//   grad_r = scale * (softmax(x) - eps / V - (1 - eps) onehot(y))
// scale = 1 / #non-ignored rows for "mean" (as torch: mean over the non-ignored rows, smoothing
// term included), 1 for "sum" / "none". Ignored rows: loss 0, gradient 0. "mean" with every row
// ignored gives NaN (0 / 0) and a zero gradient, as torch.
//
// Per row (at::parallel_for over rows, each row owned by one thread; csrc/cpu/cross_entropy_rows.h):
//   1. max pass (fp32 rows read in place; other dtypes / strides converted into a per-thread fp32
//      row buffer by the same loop),
//   2. e_i = exp(x_i - max) into the fp32 destination (the gradient row itself when the gradient is
//      fp32 and contiguous, else the row buffer), sum e and sum x in the same loop,
//   3. grad_i = e_i * (scale / sum e) - scale * eps / V, converted to the gradient dtype/strides;
//      then the target entry gets -scale * (1 - eps).
// One exp per element; the row is read from memory once (passes 2 and 3 hit L1/L2 for any V up to
// ~10^5), the gradient written once: itemsize bytes read and itemsize written per logit. Loops are
// `omp simd` with the branch-free polynomial exp, built once per ISA (common/isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/exp.h"
#include "common/isa.h"

namespace sgk {

struct RowArgs {
  int64_t V;
  float eps;        // label smoothing
  float scale;      // 1 / n_valid ("mean") or 1
};

struct Job {
  const void* x;
  int64_t xr, xv;  // row / column strides of the logits (elements)
  void* g;
  int64_t gr, gv;
  const int64_t* target;  // contiguous, validated
  int64_t ignore_index;
  RowArgs a;
  float* loss;  // fp32 [R]
};

using RowsFn = void (*)(const Job&, int64_t, int64_t, float*);

struct XentKernels {
  RowsFn f32, bf16, f16;
};

// No trapping-math for the kernels: lets GCC if-convert the selects and the loops into blends
// (otherwise the AVX2/SSE loops keep branches and stay scalar). No other FP semantics change.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
SGK_BEGIN_GENERIC
#include "cpu/cross_entropy_rows.h"
SGK_END_GENERIC
#if SGK_X86
SGK_BEGIN_AVX2
#include "cpu/cross_entropy_rows.h"
SGK_END_AVX2
SGK_BEGIN_AVX512
#include "cpu/cross_entropy_rows.h"
SGK_END_AVX512
#endif
#pragma GCC pop_options

namespace {

enum class Reduction { None, Mean, Sum };

Reduction parse_reduction(c10::string_view r) {
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  if (r == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "cross_entropy: reduction: expected 'mean', 'sum' or 'none', got '", std::string(r), "'");
  return Reduction::Mean;
}

void check_inputs(const at::Tensor& logits, const at::Tensor& target, double label_smoothing) {
  const auto s = logits.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16,
                   "cross_entropy: logits: expected float32, bfloat16 or float16, got ", s);
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) >= 1,
                    "cross_entropy: logits: expected shape [..., V] with V >= 1, got ", logits.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(target.scalar_type()) && !at::isComplexType(target.scalar_type()) &&
                       target.scalar_type() != at::kBool,
                   "cross_entropy: target: expected an integer tensor, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.sizes() == logits.sizes().slice(0, logits.dim() - 1),
                    "cross_entropy: target: expected shape ", logits.sizes().slice(0, logits.dim() - 1),
                    " (logits' shape without V), got ", target.sizes());
  TORCH_CHECK_VALUE(target.device() == logits.device(), "cross_entropy: target: expected device ", logits.device(),
                    " (same as logits), got ", target.device());
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "cross_entropy: label_smoothing: expected a float in [0, 1], got ", label_smoothing);
}

// Validates the targets (raises for one out of [0, V) that is not ignore_index) and counts the
// non-ignored rows. Returns the contiguous int64 targets.
at::Tensor prepare_target(const at::Tensor& target, int64_t V, int64_t ignore_index, int64_t& n_valid) {
  at::Tensor t = target.reshape({-1}).to(at::kLong).contiguous();
  const int64_t* p = t.const_data_ptr<int64_t>();
  const int64_t R = t.numel();
  int64_t n = 0, bad = -1;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t y = p[r];
    if (y == ignore_index) continue;
    ++n;
    if ((y < 0 || y >= V) && bad < 0) bad = r;
  }
  TORCH_CHECK_VALUE(bad < 0, "cross_entropy: target: expected class indices in [0, ", V, ") or ignore_index (",
                    ignore_index, "), got ", p[bad < 0 ? 0 : bad], " at row ", bad);
  n_valid = n;
  return t;
}

// Runs the kernel: gradient into g2 ([R, V] view, any strides, logits' dtype); returns the loss.
at::Tensor run(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& g2, int64_t ignore_index,
                      double label_smoothing, Reduction red) {
  const int64_t V = logits.size(-1);
  int64_t n_valid = 0;
  const at::Tensor t = prepare_target(target, V, ignore_index, n_valid);
  const at::Tensor x2 = logits.reshape({-1, V});  // a view whenever the strides allow it
  const int64_t R = x2.size(0);
  at::Tensor loss_rows = at::empty({R}, logits.options().dtype(at::kFloat));

  Job j;
  j.x = x2.const_data_ptr();
  j.xr = x2.stride(0);
  j.xv = x2.stride(1);
  j.g = g2.data_ptr();
  j.gr = g2.stride(0);
  j.gv = g2.stride(1);
  j.target = t.const_data_ptr<int64_t>();
  j.ignore_index = ignore_index;
  j.a.V = V;
  j.a.eps = static_cast<float>(label_smoothing);
  j.a.scale = (red == Reduction::Mean) ? static_cast<float>(1.0 / static_cast<double>(std::max<int64_t>(n_valid, 1)))
                                       : 1.0f;
  j.loss = loss_rows.data_ptr<float>();

  const XentKernels& k = SGK_PER_ISA(kXentKernels);
  RowsFn fn = logits.scalar_type() == at::kFloat ? k.f32 : logits.scalar_type() == at::kBFloat16 ? k.bf16 : k.f16;
  const int64_t grain = std::max<int64_t>(1, 16384 / V);  // >= ~16K elements per task
  if (R > 0) {
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(static_cast<size_t>(V));
      fn(j, r0, r1, buf.data());
    });
  }

  if (red == Reduction::None) return loss_rows.to(logits.scalar_type()).view(target.sizes());
  // fixed order, double accumulation: deterministic for any thread count
  const float* lr = loss_rows.const_data_ptr<float>();
  double total = 0.0;
  for (int64_t r = 0; r < R; ++r) total += lr[r];
  if (red == Reduction::Mean) total /= static_cast<double>(n_valid);  // 0 / 0 = NaN, as torch
  return at::scalar_tensor(total, logits.options().dtype(at::kFloat)).to(logits.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                                     int64_t ignore_index, double label_smoothing,
                                                                     c10::string_view reduction) {
  check_inputs(logits, target, label_smoothing);
  const Reduction red = parse_reduction(reduction);
  at::Tensor grad = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor loss = run(logits, target, grad.view({-1, logits.size(-1)}), ignore_index, label_smoothing, red);
  return {loss, grad, at::zeros({1}, logits.options().dtype(at::kInt))};
}

at::Tensor cross_entropy_fwd_inplace_cpu(at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                                         double label_smoothing, c10::string_view reduction, at::Tensor& status) {
  check_inputs(logits, target, label_smoothing);
  const Reduction red = parse_reduction(reduction);
  (void)status;  // the CPU kernel raises instead
  const int64_t V = logits.size(-1);
  at::Tensor g2 = logits.view({-1, V});  // in place: needs a [R, V] view of the logits' storage
  return run(logits, target, g2, ignore_index, label_smoothing, red);
}

}  // namespace
}  // namespace sgk

TORCH_LIBRARY_IMPL(sgkernels, CPU, m) {
  m.impl("cross_entropy_fwd", &sgk::cross_entropy_fwd_cpu);
  m.impl("cross_entropy_fwd_inplace", &sgk::cross_entropy_fwd_inplace_cpu);
}
