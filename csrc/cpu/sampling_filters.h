// Token filters (top-k, top-p, min-p) and confidences (prob, margin, entropy) of one row, for the CPU
// sampling kernels (csrc/cpu/sampling.cpp). Semantics: sgkernels/ops/filters.py. No sort of the
// vocabulary: the k-th largest logit by std::nth_element (expected O(V)), the top-p threshold by a
// mass-weighted quickselect (3-way partition around a pivot logit, recurse into the side that holds
// the threshold; expected O(V)) over the tokens that can matter.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace sgk {

// kNegEntropy: the exact negative entropy sum q log q (entropy_bound_step; not a remask confidence).
enum class Confidence : int { kLogp = 0, kProb = 1, kMargin = 2, kEntropy = 3, kNegEntropy = 4 };

// The k-th largest of g[0..v) (1 <= k < v); `buf` is scratch.
inline float kth_largest(const float* g, int64_t v, int64_t k, std::vector<float>& buf) {
  buf.assign(g, g + v);
  std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), std::greater<float>());
  return buf[static_cast<size_t>(k - 1)];
}

// The largest logit value t among g[0..v) with sum_{g_i >= t} e_i > target (0 < target < sum e; the
// smallest value when none): top-p keeps {g_i >= t}, i.e. a token while the mass before it is
// <= target (Dream's and diffusers' rule; sgkernels/ops/filters.py). e_i >= 0 is monotone in g_i.
// Tokens with e_i < (sum e - target) / v are below t (the others together weigh more than target),
// so only the others are searched.
// min_g: only tokens with g_i >= min_g can matter (filter_order "hf": the top-k cut, which t is at least).
inline float top_p_threshold(const float* g, const float* e, int64_t v, double total, double target,
                             std::vector<std::pair<float, float>>& buf,
                             float min_g = -std::numeric_limits<float>::infinity()) {
  const double floor_e = (total - target) / static_cast<double>(v);
  buf.clear();
  for (int64_t i = 0; i < v; ++i)
    if (e[i] > 0.0f && static_cast<double>(e[i]) >= floor_e && g[i] >= min_g) buf.emplace_back(g[i], e[i]);
  auto lo = buf.begin(), hi = buf.end();
  double need = target;
  float last = std::numeric_limits<float>::infinity();
  while (lo != hi) {
    auto a = lo, b = lo + (hi - lo) / 2, c = hi - 1;  // median-of-three pivot
    float pv = std::max(std::min(a->first, b->first), std::min(std::max(a->first, b->first), c->first));
    auto gt_end = std::partition(lo, hi, [pv](const std::pair<float, float>& x) { return x.first > pv; });
    auto eq_end = std::partition(gt_end, hi, [pv](const std::pair<float, float>& x) { return x.first == pv; });
    double m_gt = 0.0, m_eq = 0.0;
    for (auto it = lo; it != gt_end; ++it) m_gt += it->second;
    for (auto it = gt_end; it != eq_end; ++it) m_eq += it->second;
    last = pv;
    if (gt_end != lo && m_gt > need) {
      hi = gt_end;
    } else if (m_gt + m_eq > need || eq_end == hi) {
      return pv;
    } else {
      need -= m_gt + m_eq;
      lo = eq_end;
    }
  }
  return last;
}

}  // namespace sgk
