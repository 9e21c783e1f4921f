// Body of the CPU linear_cross_entropy kernels' row step (csrc/cpu/linear_cross_entropy.cpp): included
// once in each ISA namespace (common/isa.h), where the compiler vectorises the `omp simd` loops for
// that ISA. Plain C++ with the one polynomial exp (common/exp.h); the includer has done the includes.
//
// One row z [V] of float32 logits (the GEMM's output, bias not yet added) is turned, in place, into
// d (a * l + c * H) / d z when `grad`, after writing its statistics:
//   z_i += b_i; z_s = -FLT_MAX for s in suppress_ids; M = max z; S = sum exp(z - M)
//   l = (1 - eps) cw_y (log S + M - z_y) + (eps / V) (sum(cw) log S - sum_i cw_i (z_i - M))
//       (F.cross_entropy's label-smoothed, class-weighted row loss: cw = class weights, or ones)
//   H = log S_T - sum_i q_i t_i,  t_i = (z_i - M) / T, q = softmax(t), S_T = sum exp(t)  (conf only)
//   correct = (first argmax of z == y)                                                      (conf only)
//   dl/dz_j = p_j ((1 - eps) cw_y + (eps / V) sum(cw)) - (1 - eps) cw_y [j == y] - (eps / V) cw_j
//   dH/dz_j = (q_j / T) (log S_T - t_j - H)
// and 0 at the suppressed columns (their logit is a constant). Reads the row once from memory (V fp32,
// the GEMM just wrote it: mostly cache), two to four passes over it in L2; 1 exp per element per
// pass that needs it (2 without conf, 3 with conf at T != 1).


// LceRow: csrc/cpu/linear_cross_entropy.cpp (one type for every ISA).
constexpr int kLceLanes = 16;

// Statistics of row z (out[0] = l, out[1] = H, out[2] = correct) and, when grad, the gradient of
// a * l + c * H written over z.
SGK_INLINE void lce_row(float* z, int64_t y, float a, float c, bool grad, const LceRow& r, float* out) {
  const int64_t V = r.V;
  constexpr float kMin = -std::numeric_limits<float>::max();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (r.bias != nullptr) {
    const float* b = r.bias;
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) z[i] += b[i];
  }
  for (int64_t s = 0; s < r.n_sup; ++s) z[r.sup[s]] = kMin;
  // max in kLceLanes independent lanes (a vectorisable select); NaN is skipped here and carried by S
  float acc[kLceLanes];
  for (int k = 0; k < kLceLanes; ++k) acc[k] = kNegInf;
  const int64_t Vb = V / kLceLanes * kLceLanes;
  for (int64_t i = 0; i < Vb; i += kLceLanes) {
#pragma omp simd
    for (int k = 0; k < kLceLanes; ++k) acc[k] = acc[k] < z[i + k] ? z[i + k] : acc[k];
  }
  for (int64_t i = Vb; i < V; ++i) acc[0] = acc[0] < z[i] ? z[i] : acc[0];
  float m = acc[0];
  for (int k = 1; k < kLceLanes; ++k) m = m < acc[k] ? acc[k] : m;
  const float ms = (m == kNegInf) ? 0.0f : m;

  float S = 0.0f, Aw = 0.0f;
  if (r.eps != 0.0f) {
    const float* cw = r.cw;
#pragma omp simd reduction(+ : S, Aw)
    for (int64_t i = 0; i < V; ++i) {
      const float x = z[i] - ms;
      S += exp_nonpos(x);
      Aw += cw[i] * x;
    }
  } else {
#pragma omp simd reduction(+ : S)
    for (int64_t i = 0; i < V; ++i) S += exp_nonpos(z[i] - ms);
  }
  const float lS = std::log(S);
  const float cw_y = r.cw[y];
  const float keep = 1.0f - r.eps;
  const float sm = r.eps / static_cast<float>(V);
  out[0] = keep * cw_y * (lS + ms - z[y]) + sm * (r.cw_sum * lS - Aw);

  float lST = lS, H = 0.0f;
  if (r.conf) {
    // t_i = (z_i - M) / T, floored at -1e30: below -87 its exp is 0 anyway, and the floor keeps
    // 0 * t finite for the suppressed columns (-FLT_MAX / T overflows when T < 1)
    float ST = 0.0f, B = 0.0f;
    if (r.temp_one) {
#pragma omp simd reduction(+ : B)
      for (int64_t i = 0; i < V; ++i) {
        const float t = z[i] - ms;
        B += exp_nonpos(t) * t;
      }
      ST = S;
    } else {
      const float it = r.inv_t;
#pragma omp simd reduction(+ : ST, B)
      for (int64_t i = 0; i < V; ++i) {
        const float t0 = (z[i] - ms) * it;
        const float t = t0 < -1e30f ? -1e30f : t0;
        const float e = exp_nonpos(t);
        ST += e;
        B += e * t;
      }
      lST = std::log(ST);
    }
    H = lST - B / ST;
    int64_t arg = 0;
    for (int64_t i = 0; i < V; ++i) {
      if (z[i] == m) {
        arg = i;
        break;
      }
    }
    out[1] = H;
    out[2] = (arg == y && m == m) ? 1.0f : 0.0f;
  } else {
    out[1] = 0.0f;
    out[2] = 0.0f;
  }
  if (!grad) return;

  const float pa = a * (keep * cw_y + sm * r.cw_sum) / S;
  const float sa = a * sm;
  const float* cw = r.cw;
  if (r.conf && c != 0.0f) {
    const float it = r.temp_one ? 1.0f : r.inv_t;
    const float qa = c * it / (r.temp_one ? S : std::exp(lST));
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) {
      const float x = z[i] - ms;
      const float t0 = x * it;
      const float t = t0 < -1e30f ? -1e30f : t0;
      const float eq = exp_nonpos(t);
      z[i] = pa * exp_nonpos(x) - sa * cw[i] + qa * eq * (lST - t - H);
    }
  } else if (r.eps != 0.0f) {
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) z[i] = pa * exp_nonpos(z[i] - ms) - sa * cw[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) z[i] = pa * exp_nonpos(z[i] - ms);
  }
  z[y] -= a * keep * cw_y;
  for (int64_t s = 0; s < r.n_sup; ++s) z[r.sup[s]] = 0.0f;
}

// Rows [r0, r1) of a chunk: logits z [rows, V] (row stride V), targets y, coefficients a, c (c may be
// null), statistics out [rows, 3].
void lce_rows(float* z, const int64_t* y, const float* a, const float* c, bool grad, const LceRow& r, float* out,
              int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    lce_row(z + i * r.V, y[i], a == nullptr ? 0.0f : a[i], c == nullptr ? 0.0f : c[i], grad, r, out + 3 * i);
  }
}

constexpr void (*kLceRows)(float*, const int64_t*, const float*, const float*, bool, const LceRow&, float*, int64_t,
                           int64_t) = &lce_rows;
