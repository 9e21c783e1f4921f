// Body of the CPU cross_entropy_fwd kernels (csrc/cpu/cross_entropy.cpp): included once in each
// ISA namespace (common/isa.h), where the compiler vectorises the `omp simd` loops for that ISA.
// Plain C++ with the one polynomial exp (common/exp.h); no includes here, the includer has done them.

// Element conversions written so the loops vectorise (c10's own conversions do not):
// bf16 -> fp32 is a shift; fp32 -> bf16 rounds to nearest even (NaN -> 0x7FC0, as c10);
// fp16 through _Float16 (vcvtph2ps / vcvtps2ph with F16C).
SGK_INLINE float to_f(float x) { return x; }
SGK_INLINE float to_f(c10::BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
SGK_INLINE float to_f(c10::Half x) {
#ifdef __FLT16_MAX__
  _Float16 h;
  std::memcpy(&h, &x.x, sizeof(h));
  return static_cast<float>(h);
#else
  return static_cast<float>(x);
#endif
}

template <typename T>
SGK_INLINE T from_f(float x);
template <>
SGK_INLINE float from_f<float>(float x) {
  return x;
}
template <>
SGK_INLINE c10::BFloat16 from_f<c10::BFloat16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}
template <>
SGK_INLINE c10::Half from_f<c10::Half>(float x) {
#ifdef __FLT16_MAX__
  const _Float16 h = static_cast<_Float16>(x);
  uint16_t b;
  std::memcpy(&b, &h, sizeof(b));
  return c10::Half(b, c10::Half::from_bits());
#else
  return static_cast<c10::Half>(x);
#endif
}

// Pass 1: max of a row, converting it to fp32 into buf when it is not fp32 with unit stride.
// Returns the fp32 row pointer. kLanes independent maxima (a vectorisable select; `omp simd
// reduction(max)` stays a serial scalar chain with GCC). NaN is skipped here: the exp pass carries it.
constexpr int kLanes = 16;

SGK_INLINE float lanes_max(const float* acc) {
  float m = acc[0];
  for (int k = 1; k < kLanes; ++k) m = m < acc[k] ? acc[k] : m;
  return m;
}

template <typename T>
SGK_INLINE const float* load_max(const T* src, int64_t sv, int64_t V, float* buf, float& mx) {
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
SGK_INLINE float row(const T* x, int64_t xv, T* g, int64_t gv, int64_t y, const RowArgs& a, float* buf) {
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
SGK_INLINE void zero_row(T* g, int64_t gv, int64_t V) {
  if (gv == 1) {
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) g[i] = from_f<T>(0.0f);
  } else {
    for (int64_t i = 0; i < V; ++i) g[i * gv] = from_f<T>(0.0f);
  }
}

template <typename T>
void rows_impl(const Job& j, int64_t r0, int64_t r1, float* buf) {
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

// kXentKernels: rows of float32, bfloat16, float16 logits.
constexpr XentKernels kXentKernels = {&rows_impl<float>, &rows_impl<c10::BFloat16>, &rows_impl<c10::Half>};
