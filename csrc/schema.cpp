// Every op of the torch.ops.sgkernels namespace: the schemas. Kernels: CPU in csrc/cpu/, CUDA in
// csrc/cuda/ (vq_lookup) or Triton (sgkernels/kernels/, registered from sgkernels/ops/), fake
// kernels and references in sgkernels/ops/. `status` is the int32 status word the CUDA (Triton)
// kernels OR common/status_bits.h bits into on bad input; the CPU kernels raise ValueError per
// call instead and leave it untouched. `seed` is a SymInt so that a seed drawn inside
// torch.compile (seed=None: torch.randint(...).item(), an unbacked SymInt) can reach the op, and
// `offset` so that a step index that dynamo made dynamic does too; the kernels take an int64_t
// (the dispatcher converts the concrete value at run time).
#include <torch/library.h>

TORCH_LIBRARY(sgkernels, m) {
  // logits, guide_logits: [..., V] float32/bfloat16/float16, any strides. top_k (0 = off), top_p
  // (1 = off), min_p (0 = off): filters of softmax(g / temperature) (sgkernels/ops/filters.py);
  // confidence: "logp" | "prob" | "margin" | "entropy". seed_tensor / offset_tensor: 0-dim int64
  // tensors on the logits' device that replace the int seed / offset when given (read by the kernel).
  // row_ids: int64 [rows] on the logits' device, each row's Philox row key (None: its flat index).
  // filter_order: "dream" (top-k and top-p on one distribution, intersected) or "hf" (top-p on the
  // distribution renormalised over the top-k set).
  // -> tokens int64 [...], logp float32 [...] (untempered, unfiltered guided log-softmax at the
  //    token), conf float32 [...] (the confidence of each row).
  m.def(
      "guided_sample(Tensor logits, Tensor? guide_logits, float guidance_scale, float temperature, "
      "SymInt seed, SymInt offset, Tensor(a!) status, int top_k=0, float top_p=1.0, float min_p=0.0, "
      "str confidence=\"logp\", Tensor? seed_tensor=None, Tensor? offset_tensor=None, Tensor? row_ids=None, "
      "str filter_order=\"dream\") -> (Tensor, Tensor, Tensor)");
  // head_sample: the LM head fused with guided_sample. hidden, guide_hidden [R, d], weight [V, d],
  // bias [V] (float32/bfloat16/float16), row_ids int64 [R] (each row's Philox row index; None = 0..R-1).
  // -> tokens int64 [R], logp float32 [R] of guided_sample(blend(hidden) @ weight^T + bias).
  m.def(
      "head_sample(Tensor hidden, Tensor weight, Tensor? bias, Tensor? guide_hidden, Tensor? row_ids, "
      "float guidance_scale, float temperature, int seed, int offset, Tensor(a!) status) -> (Tensor, Tensor)");
  // logp float32 [B, N], is_masked bool [B, N], num_to_mask int64 [B] -> remask bool [B, N].
  // decoded_confidence: None (decoded positions are never chosen) or the confidence with which
  // they compete; strict_below: the tie rule (choose the confidences strictly below the one of
  // rank num_to_mask) instead of exactly num_to_mask.
  m.def(
      "remask_lowest_confidence(Tensor logp, Tensor is_masked, Tensor num_to_mask, "
      "float choice_temperature, SymInt seed, SymInt offset, Tensor(a!) status, "
      "float? decoded_confidence=None, bool strict_below=False, Tensor? seed_tensor=None, "
      "Tensor? offset_tensor=None) -> Tensor");
  // tokens int64 [B, N], is_masked bool [B, N], logits/guide_logits [B, N, V], num_to_mask int64 [B]
  // -> (new_tokens int64 [B, N], new_is_masked bool [B, N]). decoded_confidence and strict_below
  // as remask_lowest_confidence; mask_token_id: the token of re-masked positions (None: tokens'
  // own, the mask id; required with decoded_confidence). Filters, confidence (the remask score)
  // and seed/offset tensors as guided_sample.
  m.def(
      "self_guided_step(Tensor tokens, Tensor is_masked, Tensor logits, Tensor? guide_logits, "
      "Tensor num_to_mask, float guidance_scale, float temperature, float choice_temperature, "
      "SymInt seed, SymInt offset, Tensor(a!) status, float? decoded_confidence=None, bool strict_below=False, "
      "int? mask_token_id=None, int top_k=0, float top_p=1.0, float min_p=0.0, str confidence=\"logp\", "
      "Tensor? seed_tensor=None, Tensor? offset_tensor=None) -> (Tensor, Tensor)");

  // One step of block-wise refinement (diffusers' BlockRefinementScheduler; spec:
  // sgkernels/ops/block_refine.py). logits [B, L, V] float32/bfloat16/float16 (any strides), sample
  // int64 [B, L]; mask_token_id given: mask mode (committed, noise unused; prompt_mask bool [L] or
  // None: never edited); None: uniform mode (committed bool [B, L] and noise int64 [B, L] required).
  // quota: mask mode: commits owed this step (< 0: none); uniform: the cumulative target.
  // editing_threshold: None = no editing. temperature 0: argmax and the untempered probability;
  // else guided_sample with top_k / top_p in filter_order and confidence "prob".
  // -> prev_sample int64, transfer bool, edit bool, tokens int64, probs float32, each [B, L].
  m.def(
      "block_refine_step(Tensor logits, Tensor sample, Tensor? committed, Tensor? prompt_mask, Tensor? noise, "
      "int? mask_token_id, int quota, float threshold, float? editing_threshold, float temperature, int top_k, "
      "float top_p, str filter_order, SymInt seed, SymInt offset, Tensor(a!) status, Tensor? seed_tensor=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The commit of block_refine_step alone, on sampled tokens int64 [B, L] and probs float32 [B, L].
  // -> prev_sample int64, transfer bool, edit bool, each [B, L].
  m.def(
      "block_commit(Tensor tokens, Tensor probs, Tensor sample, Tensor? committed, Tensor? prompt_mask, "
      "Tensor? noise, int? mask_token_id, int quota, float threshold, float? editing_threshold) "
      "-> (Tensor, Tensor, Tensor)");

  // One step of diffusers' EntropyBoundScheduler (spec: sgkernels/ops/entropy_bound.py) on the
  // temperature-scaled logits [B, L, V]: tokens ~ softmax(logits), their probabilities, the exact
  // entropy of each row, and per batch row the positions (by increasing entropy, ties to the lower
  // position) whose earlier entropies sum to <= entropy_bound; noise int64 [B, L] elsewhere.
  // -> prev_sample int64, accepted bool, tokens int64, probs float32, entropy float32, each [B, L].
  m.def(
      "entropy_bound_step(Tensor logits, Tensor noise, float entropy_bound, SymInt seed, SymInt offset, "
      "Tensor(a!) status, Tensor? seed_tensor=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // logits [..., V] float32/bfloat16/float16 (any strides), target [...] integer.
  // -> (loss: [] for "mean"/"sum", [...] for "none", in logits' dtype;
  //     grad: d loss / d logits, [..., V], logits' dtype, contiguous;
  //     flags: int32 [1], status bits of bad input (CUDA; the CPU kernel raises)).
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing, "
      "str reduction) -> (Tensor, Tensor, Tensor)");
  // The same, with the gradient written over `logits` (any strides); returns the loss. Bad input:
  // CPU raises, CUDA ORs bits into `status`.
  m.def(
      "cross_entropy_fwd_inplace(Tensor(a!) logits, Tensor target, int ignore_index, float label_smoothing, "
      "str reduction, Tensor(b!) status) -> Tensor");

  // linear_cross_entropy (sgkernels/ops/linear_cross_entropy.py): the cross-entropy of
  // input [N, d] @ linear_weight [V, d]^T + linear_bias [V] (one float dtype) against target [N]
  // (integer; ignore_index rows are never projected), weight [V] (class weights, any float dtype),
  // token_weight [N] (>= 0), suppress_ids int [S] (logits counted as -FLT_MAX), without the logits.
  // reduction "sum" | "mean" (divided by max(sum of the kept rows' token_weight * weight[target],
  // denom_min)). conf: also the entropy of softmax(logits / temperature) and the argmax test.
  // -> (loss float32 [], denominator float32 [], rows float32 [N, 3] = (row loss l, entropy H,
  //     correct) (0 on ignored rows), and d loss / d (input, linear_weight, linear_bias) in their
  //     dtypes for the bits of grad (1: input, 2: linear_weight, 4: linear_bias), [0] tensors for the
  //     others and for a missing bias; the gradients are made in the same sweep as the loss).
  m.def(
      "linear_cross_entropy_fwd(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
      "Tensor? weight, Tensor? token_weight, Tensor? suppress_ids, int ignore_index, float label_smoothing, "
      "float temperature, str reduction, float denom_min, bool conf, int grad, int chunk_rows) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The gradients of sum_r nll_coef[r] * l_r + ent_coef[r] * H_r (ent_coef None: no entropy term), the
  // logits recomputed chunk by chunk; rows with both coefficients 0 are not projected.
  // -> (grad_input [N, d], grad_linear_weight [V, d], grad_linear_bias [V]) in the inputs' dtypes, for
  //     the bits of needs (as grad above; [0] tensors for the others).
  m.def(
      "linear_cross_entropy_bwd(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
      "Tensor? weight, Tensor nll_coef, Tensor? ent_coef, Tensor? suppress_ids, int ignore_index, "
      "float label_smoothing, float temperature, int needs, int chunk_rows) -> (Tensor, Tensor, Tensor)");

  // z [..., D] float32/bfloat16/float16 (any strides), codebook [K, D] (same float dtypes).
  // -> (indices int64 [...], sq_distance float32 [...] if return_distance else float32 [0]).
  m.def("vq_lookup(Tensor z, Tensor codebook, bool return_distance) -> (Tensor, Tensor)");
}
