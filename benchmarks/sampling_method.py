"""Token sampling method on CPU: exact inverse CDF (what sgkernels ships) against Gumbel-max.

``python -m benchmarks.sampling_method`` JIT-compiles a Gumbel-max row sampler that uses the same
Philox stream code (csrc/common/philox.h: one Philox call per 4 vocabulary elements, ``-log(-log u)`` per
element with libm's logf) and times it against ``torch.ops.sgkernels.guided_sample`` (one Philox
call per row, one exp per element, float64 running sum) on the same logits, both OpenMP over rows.
The result decided the sampling method of both the C++ and the Triton kernels; the measurement is
recorded in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import os

import torch
from torch.utils.cpp_extension import load_inline

import sgkernels  # noqa: F401

from sgkernels.bench.timing import median_ms_interleaved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCE = r"""
#include <torch/extension.h>
#include <cmath>
#include "philox.h"

torch::Tensor gumbel_max(torch::Tensor logits, int64_t seed) {
  auto x = logits.contiguous();
  const int64_t rows = x.size(0), vocab = x.size(1);
  auto out = torch::empty({rows}, torch::kInt64);
  const float* p = x.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float best = -INFINITY;
    int64_t arg = 0;
    for (int64_t j = 0; j < vocab; j += 4) {
      const auto w = sgk::philox_row(seed, 0, static_cast<uint64_t>(r * vocab + j));
      const uint32_t ws[4] = {w.w0, w.w1, w.w2, w.w3};
      for (int t = 0; t < 4 && j + t < vocab; ++t) {
        const float u = (static_cast<float>(ws[t] >> 8) + 0.5f) * 0x1p-24f;
        const float s = p[r * vocab + j + t] - std::log(-std::log(u));
        if (s > best) { best = s; arg = j + t; }
      }
    }
    o[r] = arg;
  }
  return out;
}
"""


def main() -> int:
    ext = load_inline(
        "sgk_gumbel_max_bench", cpp_sources=SOURCE, functions=["gumbel_max"],
        extra_include_paths=[os.path.join(ROOT, "csrc", "common")], extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"], verbose=False,
    )
    status = torch.zeros(1, dtype=torch.int32)
    print("| rows x V | inverse CDF (sgkernels) ms | Gumbel-max ms | Gumbel-max / inverse CDF |")
    print("|---|---:|---:|---:|")
    for rows, vocab in [(2048, 1024), (8192, 1024), (2048, 8192)]:
        logits = torch.randn(rows, vocab)
        ms = median_ms_interleaved({"inv": lambda: torch.ops.sgkernels.guided_sample(logits, None, 0.0, 1.0, 1, 0, status),
                                    "gm": lambda: ext.gumbel_max(logits, 1)}, "cpu", repeats=10)
        inv, gm = ms["inv"], ms["gm"]
        print(f"| {rows} x {vocab} | {inv:.2f} | {gm:.2f} | {gm / inv:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
