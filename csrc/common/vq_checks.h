// Argument checks of vq_lookup shared by the CPU (csrc/cpu/vq.cpp) and CUDA (csrc/cuda/vq.cu) kernels,
// a second line of defence behind the Python wrapper. NaN/inf are checked elsewhere: fused into the
// CPU kernel's conversion pass, and by the Python wrapper on CUDA.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

namespace sgk {

inline void check_vq_inputs(const at::Tensor& z, const at::Tensor& codebook) {
  auto is_float = [](const at::Tensor& t) {
    const auto s = t.scalar_type();
    return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
  };
  TORCH_CHECK_TYPE(is_float(z), "vq_lookup: z: expected float32, bfloat16 or float16, got ", z.scalar_type());
  TORCH_CHECK_TYPE(is_float(codebook), "vq_lookup: codebook: expected float32, bfloat16 or float16, got ",
                   codebook.scalar_type());
  TORCH_CHECK_VALUE(codebook.dim() == 2, "vq_lookup: codebook: expected shape [K, D], got ", codebook.sizes());
  TORCH_CHECK_VALUE(codebook.size(0) >= 1, "vq_lookup: codebook: expected K >= 1 codes, got shape ",
                    codebook.sizes());
  TORCH_CHECK_VALUE(codebook.size(1) >= 1, "vq_lookup: codebook: expected D >= 1, got shape ", codebook.sizes());
  TORCH_CHECK_VALUE(z.dim() >= 1 && z.size(-1) == codebook.size(1), "vq_lookup: z: expected shape [..., ",
                    codebook.size(1), "] (D of codebook), got ", z.sizes());
  TORCH_CHECK_VALUE(z.device() == codebook.device(), "vq_lookup: codebook: expected device ", z.device(),
                    " (same as z), got ", codebook.device());
  TORCH_CHECK_VALUE(codebook.size(0) <= std::numeric_limits<int32_t>::max() - 4096,
                    "vq_lookup: codebook: K too large");
}

}  // namespace sgk
