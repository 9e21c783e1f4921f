// Schemas of the fused sampling ops. CPU kernels: this file; CUDA kernels: Triton, registered from
// sgkernels/ops/*.py with torch.library.register_kernel + wrap_triton.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(sgkernels, m) {
  // logits, guide_logits: [..., V] float32/bfloat16/float16, any strides.
  // -> tokens int64 [...], logp float32 [...] (untempered guided log-softmax at the token).
  m.def(
      "guided_sample(Tensor logits, Tensor? guide_logits, float guidance_scale, float temperature, "
      "int seed, int offset, Tensor(a!) status) -> (Tensor, Tensor)");
  // logp float32 [B, N], is_masked bool [B, N], num_to_mask int64 [B] -> remask bool [B, N].
  m.def(
      "remask_lowest_confidence(Tensor logp, Tensor is_masked, Tensor num_to_mask, "
      "float choice_temperature, int seed, int offset, Tensor(a!) status) -> Tensor");
  // tokens int64 [B, N], is_masked bool [B, N], logits/guide_logits [B, N, V], num_to_mask int64 [B]
  // -> (new_tokens int64 [B, N], new_is_masked bool [B, N]).
  m.def(
      "self_guided_step(Tensor tokens, Tensor is_masked, Tensor logits, Tensor? guide_logits, "
      "Tensor num_to_mask, float guidance_scale, float temperature, float choice_temperature, "
      "int seed, int offset, Tensor(a!) status) -> (Tensor, Tensor)");
}
