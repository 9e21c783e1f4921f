// cross_entropy_fwd: fused softmax cross-entropy, loss AND gradient in one pass over the logits.
// Schemas and CPU kernel. CUDA kernel: Triton (sgkernels/kernels/cross_entropy.py), registered from
// sgkernels/ops/cross_entropy.py, which also holds the fake kernels, the autograd formula and the
// F.cross_entropy reference.
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
// CPU kernel, per row (at::parallel_for over rows, each row owned by one thread):
//   1. max pass (fp32 rows read in place; other dtypes / strides converted into a per-thread fp32
//      row buffer by the same loop),
//   2. e_i = exp(x_i - max) into the fp32 destination (the gradient row itself when the gradient is
//      fp32 and contiguous, else the row buffer), sum e and sum x in the same loop,
//   3. grad_i = e_i * (scale / sum e) - scale * eps / V, converted to the gradient dtype/strides;
//      then the target entry gets -scale * (1 - eps).
// One exp per element; the row is read from memory once (passes 2 and 3 hit L1/L2 for any V up to
// ~10^5), the gradient written once. Loops are `omp simd` with a branch-free polynomial exp, built
// three times (AVX-512F, AVX2+FMA, baseline SSE2) with `#pragma GCC target` and picked at run time.
// SGK_XENT_ISA=avx512|avx2|generic forces one (tests).
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

TORCH_LIBRARY_FRAGMENT(sgkernels, m) {
  // logits [..., V] float32/bfloat16/float16 (any strides), target [...] integer.
  // -> (loss: [] for "mean"/"sum", [...] for "none", in logits' dtype;
  //     grad: d loss / d logits, [..., V], logits' dtype, contiguous;
  //     flags: int32 [1], sgkernels.ops._status bits of bad input (CUDA; the CPU kernel raises)).
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing, "
      "str reduction) -> (Tensor, Tensor, Tensor)");
  // The same, with the gradient written over `logits` (any strides); returns the loss. Bad input:
  // CPU raises, CUDA ORs bits into `status`.
  m.def(
      "cross_entropy_fwd_inplace(Tensor(a!) logits, Tensor target, int ignore_index, float label_smoothing, "
      "str reduction, Tensor(b!) status) -> Tensor");
}

// No trapping-math for the kernels: lets GCC if-convert the selects of the exp and the loops into
// blends (otherwise the AVX2/SSE loops keep branches and stay scalar). No other FP semantics change.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

namespace sgk_xent {

#define SGK_XENT_INLINE inline __attribute__((always_inline))

// exp(t) for t <= 0 (the argument is always x - max), branch-free so `omp simd` loops vectorise:
// t = n ln2 + r, |r| <= ln2 / 2, Cephes' degree-6 polynomial, 2^n by the exponent bits. Max relative
// error ~2 ulp; t < -87.3 (results below FLT_MIN) gives 0, -inf gives 0, NaN gives NaN.
SGK_XENT_INLINE float exp_nonpos(float t) {
  const float lo = -87.33654f;
  const float tc = t < lo ? lo : t;  // NaN stays NaN
  const float fn = (tc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = tc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fn);
  int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  const float e = p * scale;
  return t < lo ? 0.0f : e;
}

// Element conversions written so the loops vectorise (c10's own conversions do not):
// bf16 -> fp32 is a shift; fp32 -> bf16 rounds to nearest even (NaN -> 0x7FC0, as c10);
// fp16 through _Float16 (vcvtph2ps / vcvtps2ph with F16C).
SGK_XENT_INLINE float to_f(float x) { return x; }
SGK_XENT_INLINE float to_f(c10::BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
SGK_XENT_INLINE float to_f(c10::Half x) {
#ifdef __FLT16_MAX__
  _Float16 h;
  std::memcpy(&h, &x.x, sizeof(h));
  return static_cast<float>(h);
#else
  return static_cast<float>(x);
#endif
}

template <typename T>
SGK_XENT_INLINE T from_f(float x);
template <>
SGK_XENT_INLINE float from_f<float>(float x) {
  return x;
}
template <>
SGK_XENT_INLINE c10::BFloat16 from_f<c10::BFloat16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}
template <>
SGK_XENT_INLINE c10::Half from_f<c10::Half>(float x) {
#ifdef __FLT16_MAX__
  const _Float16 h = static_cast<_Float16>(x);
  uint16_t b;
  std::memcpy(&b, &h, sizeof(b));
  return c10::Half(b, c10::Half::from_bits());
#else
  return static_cast<c10::Half>(x);
#endif
}

struct RowArgs {
  int64_t V;
  float eps;        // label smoothing
  float scale;      // 1 / n_valid ("mean") or 1
};

// Pass 1: max of a row, converting it to fp32 into buf when it is not fp32 with unit stride.
// Returns the fp32 row pointer. kLanes independent maxima (a vectorisable select; `omp simd
// reduction(max)` stays a serial scalar chain with GCC). NaN is skipped here: the exp pass carries it.
constexpr int kLanes = 16;

SGK_XENT_INLINE float lanes_max(const float* acc) {
  float m = acc[0];
  for (int k = 1; k < kLanes; ++k) m = m < acc[k] ? acc[k] : m;
  return m;
}

template <typename T>
SGK_XENT_INLINE const float* load_max(const T* src, int64_t sv, int64_t V, float* buf, float& mx) {
  float acc[kLanes];
  for (int k = 0; k < kLanes; ++k) acc[k] = -std::numeric_limits<float>::infinity();
  const float* out = buf;
  bool direct = false;
  if constexpr (std::is_same_v<T, float>) direct = sv == 1;
  const int64_t Vb = V / kLanes * kLanes;
  if (direct) {
    const float* s = reinterpret_cast<const float*>(src);
    for (int64_t i = 0; i < Vb; i += kLanes) {
#pragma omp simd
      for (int k = 0; k < kLanes; ++k) acc[k] = acc[k] < s[i + k] ? s[i + k] : acc[k];
    }
    for (int64_t i = Vb; i < V; ++i) acc[0] = acc[0] < s[i] ? s[i] : acc[0];
    out = s;
  } else if (sv == 1) {
    for (int64_t i = 0; i < Vb; i += kLanes) {
#pragma omp simd
      for (int k = 0; k < kLanes; ++k) {
        const float x = to_f(src[i + k]);
        buf[i + k] = x;
        acc[k] = acc[k] < x ? x : acc[k];
      }
    }
    for (int64_t i = Vb; i < V; ++i) {
      const float x = to_f(src[i]);
      buf[i] = x;
      acc[0] = acc[0] < x ? x : acc[0];
    }
  } else {
    for (int64_t i = 0; i < V; ++i) {
      const float x = to_f(src[i * sv]);
      buf[i] = x;
      acc[0] = acc[0] < x ? x : acc[0];
    }
  }
  mx = lanes_max(acc);
  return out;
}

// One row: loss, and the gradient into g (dtype T, stride gv). x may alias g (in place).
template <typename T>
SGK_XENT_INLINE float row(const T* x, int64_t xv, T* g, int64_t gv, int64_t y, const RowArgs& a, float* buf) {
  const int64_t V = a.V;
  float m;
  const float* xf = load_max(x, xv, V, buf, m);
  // NaN anywhere: std::max drops it, so the sum below carries it instead (loss and grad NaN).
  const float x_y = xf[y];
  // fp32 destination of e: the gradient row itself when it is fp32 and contiguous.
  float* ef = buf;
  if constexpr (std::is_same_v<T, float>) {
    if (gv == 1) ef = g;
  }
  const float ms = (m == -std::numeric_limits<float>::infinity()) ? 0.0f : m;
  float d = 0.0f, sx = 0.0f;
#pragma omp simd reduction(+ : d, sx)
  for (int64_t i = 0; i < V; ++i) {
    const float xi = xf[i];
    const float e = exp_nonpos(xi - ms);
    ef[i] = e;
    d += e;
    sx += xi - ms;
  }
  // relative to the max, as log_softmax: x_y - max is exact for nearby values however large
  float loss = std::log(d) + (1.0f - a.eps) * (ms - x_y);
  if (a.eps != 0.0f) loss -= (a.eps / static_cast<float>(V)) * sx;
  const float mul = a.scale / d;
  const float sub = a.scale * a.eps / static_cast<float>(V);
  const float g_y = ef[y] * mul - sub - a.scale * (1.0f - a.eps);
  if (static_cast<const void*>(ef) == static_cast<const void*>(g)) {
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) ef[i] = ef[i] * mul - sub;
  } else if (gv == 1) {
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) g[i] = from_f<T>(ef[i] * mul - sub);
  } else {
    for (int64_t i = 0; i < V; ++i) g[i * gv] = from_f<T>(ef[i] * mul - sub);
  }
  g[y * gv] = from_f<T>(g_y);
  return loss;
}

template <typename T>
SGK_XENT_INLINE void zero_row(T* g, int64_t gv, int64_t V) {
  if (gv == 1) {
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) g[i] = from_f<T>(0.0f);
  } else {
    for (int64_t i = 0; i < V; ++i) g[i * gv] = from_f<T>(0.0f);
  }
}

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

template <typename T>
SGK_XENT_INLINE void rows_impl(const Job& j, int64_t r0, int64_t r1, float* buf) {
  const T* x = static_cast<const T*>(j.x);
  T* g = static_cast<T*>(j.g);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t y = j.target[r];
    T* gr = g + r * j.gr;
    if (y == j.ignore_index) {
      zero_row(gr, j.gv, j.a.V);
      j.loss[r] = 0.0f;
    } else {
      j.loss[r] = row(x + r * j.xr, j.xv, gr, j.gv, y, j.a, buf);
    }
  }
}

using RowsFn = void (*)(const Job&, int64_t, int64_t, float*);

struct Isa {
  const char* name;
  RowsFn f32, bf16, f16;
};

#define SGK_XENT_DEFINE_ISA(NS, ATTR)                                                                  \
  namespace NS {                                                                                      \
  ATTR __attribute__((flatten)) static void f32(const Job& j, int64_t r0, int64_t r1, float* b) {      \
    rows_impl<float>(j, r0, r1, b);                                                                   \
  }                                                                                                   \
  ATTR __attribute__((flatten)) static void bf16(const Job& j, int64_t r0, int64_t r1, float* b) {     \
    rows_impl<c10::BFloat16>(j, r0, r1, b);                                                           \
  }                                                                                                   \
  ATTR __attribute__((flatten)) static void f16(const Job& j, int64_t r0, int64_t r1, float* b) {      \
    rows_impl<c10::Half>(j, r0, r1, b);                                                               \
  }                                                                                                   \
  static Isa get() { return {#NS, &f32, &bf16, &f16}; }                                               \
  }

SGK_XENT_DEFINE_ISA(generic, )
#if defined(__x86_64__) || defined(_M_X64)
#define SGK_XENT_X86 1
SGK_XENT_DEFINE_ISA(avx2, __attribute__((target("avx2,fma,f16c"))))
SGK_XENT_DEFINE_ISA(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,prefer-vector-width=512"))))
#else
#define SGK_XENT_X86 0
#endif

static Isa select_isa() {
  const char* env = std::getenv("SGK_XENT_ISA");
  const std::string want = env ? env : "";
#if SGK_XENT_X86
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (want == "generic") return generic::get();
  if (want == "avx2" && has2) return avx2::get();
  if (has512 && (want.empty() || want == "avx512" || want == "auto")) return avx512::get();
  if (has2) return avx2::get();
#endif
  return generic::get();
}

enum class Reduction { None, Mean, Sum };

static Reduction parse_reduction(c10::string_view r) {
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  if (r == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "cross_entropy: reduction: expected 'mean', 'sum' or 'none', got '", std::string(r), "'");
  return Reduction::Mean;
}

static void check_inputs(const at::Tensor& logits, const at::Tensor& target, double label_smoothing) {
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
static at::Tensor prepare_target(const at::Tensor& target, int64_t V, int64_t ignore_index, int64_t& n_valid) {
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
static at::Tensor run(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& g2, int64_t ignore_index,
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

  const Isa isa = select_isa();
  RowsFn fn = logits.scalar_type() == at::kFloat ? isa.f32 : logits.scalar_type() == at::kBFloat16 ? isa.bf16 : isa.f16;
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

}  // namespace sgk_xent

#pragma GCC pop_options

TORCH_LIBRARY_IMPL(sgkernels, CPU, m) {
  m.impl("cross_entropy_fwd", &sgk_xent::cross_entropy_fwd_cpu);
  m.impl("cross_entropy_fwd_inplace", &sgk_xent::cross_entropy_fwd_inplace_cpu);
}
