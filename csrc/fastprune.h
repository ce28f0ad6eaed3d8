// Shared declarations of fastprune's compiled extension: constants of the method, argument checks
// used by both the CPU (merge_cpu.cpp) and the CUDA (merge_cuda.cu) kernels, and the
// CPU entry points that ops.cpp registers as torch.ops.fastprune.*.
//
// The semantics are those of fastprune/reference.py (the specification): MSTM token merging
// ("Multi-Scale And Token Mergence", Bian et al., 2023). Errors use TORCH_CHECK_VALUE / TORCH_CHECK_TYPE so that Python
// sees ValueError / TypeError naming the argument.
#pragma once

// Light headers only (not ATen/ATen.h): the build runs on 2 cores.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace fastprune {

// Keep equal to fastprune/reference.py.
// Norms below COSINE_EPS are clamped before dividing in cosine similarity.
constexpr double COSINE_EPS = 1e-6;
// Importance weights (weight == "size_attn") are clamped to at least WEIGHT_EPS.
constexpr double WEIGHT_EPS = 1e-12;

// Scalar operations per at::parallel_for chunk (ATen's own GRAIN_SIZE): smaller loops run inline,
// without waking the thread pool.
constexpr int64_t kGrainSize = 32768;

// Merge weights: w = size ("size", ToMe's size-weighted average) or w = size * max(score, WEIGHT_EPS)
// ("size_attn", MSTM's size x importance).
enum class WeightMode : int { kSize = 0, kSizeAttn = 1 };

inline WeightMode parse_weight(c10::string_view weight) {
  if (weight == "size") return WeightMode::kSize;
  if (weight == "size_attn") return WeightMode::kSizeAttn;
  TORCH_CHECK_VALUE(false, "weight must be 'size' or 'size_attn', got '", std::string(weight), "'");
  return WeightMode::kSize;  // unreachable
}

// float32 for float16/bfloat16/float32 tokens, float64 for float64 (gradient checks): the dtype of
// scores, size and every accumulation, as reference.compute_dtype.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_token_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Validates the arguments of mstm_merge / mstm_merge_backward shared by every backend.
inline void check_merge_args(const at::Tensor& x, const at::Tensor& scores,
                             const std::optional<at::Tensor>& size, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must have shape [B, N, C], got ", x.sizes());
  TORCH_CHECK_TYPE(is_token_dtype(x.scalar_type()), op,
                   ": x must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  const int64_t B = x.size(0), N = x.size(1);
  const auto acc = compute_dtype(x.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == B && scores.size(1) == N, op,
                    ": scores must have shape [B, N] = [", B, ", ", N, "], got ", scores.sizes());
  TORCH_CHECK_TYPE(scores.scalar_type() == acc, op, ": scores must be ", acc, " for x of dtype ",
                   x.scalar_type(), ", got ", scores.scalar_type());
  TORCH_CHECK_VALUE(scores.device() == x.device(), op, ": scores is on ", scores.device(),
                    " but x is on ", x.device());
  if (size.has_value() && size->defined()) {
    TORCH_CHECK_VALUE(size->dim() == 2 && size->size(0) == B && size->size(1) == N, op,
                      ": size must have shape [B, N] = [", B, ", ", N, "], got ", size->sizes());
    TORCH_CHECK_TYPE(size->scalar_type() == acc, op, ": size must be ", acc, " for x of dtype ",
                     x.scalar_type(), ", got ", size->scalar_type());
    TORCH_CHECK_VALUE(size->device() == x.device(), op, ": size is on ", size->device(),
                      " but x is on ", x.device());
  }
}

inline void check_merge_forward_args(const at::Tensor& x, const at::Tensor& scores,
                                     const std::optional<at::Tensor>& size,
                                     const std::optional<at::Tensor>& metric, int64_t r,
                                     int64_t num_prefix_tokens) {
  check_merge_args(x, scores, size, "mstm_merge");
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(N >= 1 && x.size(2) >= 1, "mstm_merge: x must have N >= 1 tokens of C >= 1 "
                    "channels, got shape ", x.sizes());
  TORCH_CHECK_VALUE(num_prefix_tokens >= 0 && num_prefix_tokens <= N - 1,
                    "mstm_merge: num_prefix_tokens must satisfy 0 <= num_prefix_tokens <= N - 1 = ",
                    N - 1, ", got ", num_prefix_tokens);
  TORCH_CHECK_VALUE(r >= 0 && r <= N - num_prefix_tokens - 1,
                    "mstm_merge: r must satisfy 0 <= r <= N - num_prefix_tokens - 1 = ",
                    N - num_prefix_tokens - 1, ", got ", r);
  if (metric.has_value() && metric->defined()) {
    TORCH_CHECK_VALUE(metric->dim() == 3 && metric->size(0) == B && metric->size(1) == N &&
                          metric->size(2) >= 1,
                      "mstm_merge: metric must have shape [B, N, Cm] with B = ", B, ", N = ", N,
                      ", got ", metric->sizes());
    TORCH_CHECK_TYPE(is_token_dtype(metric->scalar_type()),
                     "mstm_merge: metric must be float32, float16, bfloat16 or float64, got ",
                     metric->scalar_type());
    TORCH_CHECK_VALUE(metric->device() == x.device(), "mstm_merge: metric is on ", metric->device(),
                      " but x is on ", x.device());
  }
}

inline void check_merge_backward_args(const at::Tensor& grad_x, const at::Tensor& grad_size,
                                      const at::Tensor& x, const at::Tensor& scores,
                                      const std::optional<at::Tensor>& size,
                                      const at::Tensor& index) {
  check_merge_args(x, scores, size, "mstm_merge_backward");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  TORCH_CHECK_VALUE(grad_x.dim() == 3 && grad_x.size(0) == B && grad_x.size(2) == C &&
                        grad_x.size(1) <= N,
                    "mstm_merge_backward: grad_x must have shape [B, N - r, C], got ", grad_x.sizes(),
                    " for x of shape ", x.sizes());
  TORCH_CHECK_TYPE(grad_x.scalar_type() == x.scalar_type(),
                   "mstm_merge_backward: grad_x must have x's dtype ", x.scalar_type(), ", got ",
                   grad_x.scalar_type());
  const int64_t n_out = grad_x.size(1);
  TORCH_CHECK_VALUE(grad_size.dim() == 2 && grad_size.size(0) == B && grad_size.size(1) == n_out,
                    "mstm_merge_backward: grad_size must have shape [B, N - r] = [", B, ", ", n_out,
                    "], got ", grad_size.sizes());
  TORCH_CHECK_TYPE(grad_size.scalar_type() == scores.scalar_type(),
                   "mstm_merge_backward: grad_size must be ", scores.scalar_type(), ", got ",
                   grad_size.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(0) == B && index.size(1) == N,
                    "mstm_merge_backward: index must have shape [B, N] = [", B, ", ", N, "], got ",
                    index.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong,
                   "mstm_merge_backward: index must be int64, got ", index.scalar_type());
  for (const at::Tensor* t : {&grad_x, &grad_size, &index}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), "mstm_merge_backward: all tensors must be on ",
                      x.device(), ", got one on ", t->device());
  }
}

// ---- CPU entry points (merge_cpu.cpp) ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> mstm_merge_cpu(
    const at::Tensor& x, const at::Tensor& scores, const std::optional<at::Tensor>& size,
    const std::optional<at::Tensor>& metric, int64_t r, int64_t num_prefix_tokens,
    c10::string_view weight);

std::tuple<at::Tensor, at::Tensor, at::Tensor> mstm_merge_backward_cpu(
    const at::Tensor& grad_x, const at::Tensor& grad_size, const at::Tensor& x,
    const at::Tensor& scores, const std::optional<at::Tensor>& size, const at::Tensor& index,
    c10::string_view weight);

}  // namespace fastprune
