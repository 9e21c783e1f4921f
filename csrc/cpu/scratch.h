// Per-thread scratch buffers of the CPU sampling kernels (csrc/cpu/sampling.cpp, head_sample.cpp):
// grown on demand and kept across calls, so a row never allocates once its thread has seen a row as
// long. One set per thread, shared by the ops (a thread runs one row at a time).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace sgk {

struct Scratch {
  std::vector<float> g, e;    // a row's guided logits and exp((g - M) / T) ([Vp], see sampling_rows.h)
  std::vector<double> bsum;   // the float64 sums of e per block of kBlock
  std::vector<float> raw_logits, raw_guide;  // gathered rows of a non-unit last-dim stride (bytes)
  std::vector<uint64_t> keys;                      // remask: composite keys of one batch row
  std::vector<float> sel;                          // top-k selection
  std::vector<std::pair<float, float>> sel_pairs;  // top-p selection
};

// The calling thread's buffers.
inline Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// v.data() with at least n elements (grown, never shrunk; new elements value-initialised).
template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

}  // namespace sgk
