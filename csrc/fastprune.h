// Shared host-side code of fastprune's compiled extension, used by the CPU (merge_cpu.cpp,
// tome_cpu.cpp, bat_cpu.cpp) and the CUDA (merge_cuda.cu) kernels: constants of the methods,
// argument checks, the merge weights and their gradients, and the operators themselves, written
// once over a device's kernels (`Dev`, see "Operators" below) and registered per device.
//
// The semantics are those of fastprune/reference.py (the specification). Errors use
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE so that Python sees ValueError / TypeError naming the argument.
#pragma once

// Light headers only (not ATen/ATen.h): the build runs on 2 cores.
#include <ATen/NumericUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
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

// Strict "ranks above" of a descending top-k or argmax: NaN above every number, then larger values
// (as torch.sort(descending=True) and torch.argmax). Ties are left to the caller (lower index).
template <typename T>
C10_HOST_DEVICE inline bool ranks_above(T a, T b) {
  return (at::_isnan(a) && !at::_isnan(b)) || a > b;
}

// MSTM's merge weights: w = size ("size", ToMe's size-weighted average) or
// w = size * max(score, WEIGHT_EPS) ("size_attn", MSTM's size x importance).
enum class WeightMode : int { kSize = 0, kSizeAttn = 1 };

inline WeightMode parse_weight(c10::string_view weight) {
  if (weight == "size") return WeightMode::kSize;
  if (weight == "size_attn") return WeightMode::kSizeAttn;
  TORCH_CHECK_VALUE(false, "weight must be 'size' or 'size_attn', got '", std::string(weight), "'");
  return WeightMode::kSize;  // unreachable
}

// float32 for float16/bfloat16/float32 tokens, float64 for float64 (gradient checks): the dtype of
// scores, size, weights and every accumulation, as reference.compute_dtype.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_token_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The tensor made contiguous, or an undefined tensor for None.
inline at::Tensor contiguous_or_none(const std::optional<at::Tensor>& t) {
  return given(t) ? t->contiguous() : at::Tensor();
}

// ---- argument checks ----

// t must have shape [B, n] (B = x.size(0)), dtype `dtype` and x's device.
inline void check_rows(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t n,
                       at::ScalarType dtype, const char* op) {
  const int64_t B = x.size(0);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B && t.size(1) == n, op, ": ", name,
                    " must have shape [B, ", n, "] = [", B, ", ", n, "], got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ",
                   dtype == at::kLong ? "int64" : c10::toString(dtype), " for x of dtype ",
                   x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
                    x.device());
}

// x must be [B, N, C] tokens of a supported dtype with N >= 1 and C >= 1 (`name`: its name).
inline void check_tokens(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": ", name, " must have shape [B, N, C], got ", x.sizes());
  TORCH_CHECK_TYPE(is_token_dtype(x.scalar_type()), op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(2) >= 1, op, ": ", name,
                    " must have N >= 1 tokens of C >= 1 channels, got shape ", x.sizes());
}

// A matching metric [B, N, Cm] for tokens `like` [B, N, ...] (x, or scores for BAT).
inline void check_metric(const at::Tensor& metric, const at::Tensor& like, const char* op) {
  check_tokens(metric, "metric", op);
  TORCH_CHECK_VALUE(metric.size(0) == like.size(0) && metric.size(1) == like.size(1), op,
                    ": metric must have shape [B, N, Cm] with B = ", like.size(0), ", N = ",
                    like.size(1), ", got ", metric.sizes());
  TORCH_CHECK_VALUE(metric.device() == like.device(), op, ": metric is on ", metric.device(),
                    " but x is on ", like.device());
}

inline void check_int_range(int64_t v, const char* name, int64_t lo, int64_t hi, const char* op) {
  TORCH_CHECK_VALUE(v >= lo && v <= hi, op, ": ", name, " must satisfy ", lo, " <= ", name, " <= ",
                    hi, ", got ", v);
}

// mstm_merge / mstm_merge_backward: x, scores [B, N] and size [B, N] (compute dtype).
inline void check_mstm_args(const at::Tensor& x, const at::Tensor& scores,
                            const std::optional<at::Tensor>& size, const char* op) {
  check_tokens(x, "x", op);
  const auto acc = compute_dtype(x.scalar_type());
  check_rows(scores, "scores", x, x.size(1), acc, op);
  if (given(size)) check_rows(*size, "size", x, x.size(1), acc, op);
}

// weighted_merge / weighted_merge_backward: x, w [B, N] and size [B, N] (compute dtype), index [B, N].
inline void check_weighted_merge_args(const at::Tensor& x, const at::Tensor& w,
                                      const at::Tensor& size, const at::Tensor& index,
                                      const char* op) {
  check_tokens(x, "x", op);
  const auto acc = compute_dtype(x.scalar_type());
  check_rows(w, "w", x, x.size(1), acc, op);
  check_rows(size, "size", x, x.size(1), acc, op);
  check_rows(index, "index", x, x.size(1), at::kLong, op);
}

// The gradients of a merge into n_out tokens: grad_x [B, n_out, C] in x's dtype, grad_size [B, n_out].
inline void check_merge_grads(const at::Tensor& grad_x, const at::Tensor& grad_size,
                              const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(grad_x.dim() == 3 && grad_x.size(0) == x.size(0) && grad_x.size(2) == x.size(2) &&
                        grad_x.size(1) >= 1 && grad_x.size(1) <= x.size(1),
                    op, ": grad_x must have shape [B, n_out, C] with 1 <= n_out <= N, got ",
                    grad_x.sizes(), " for x of shape ", x.sizes());
  TORCH_CHECK_TYPE(grad_x.scalar_type() == x.scalar_type(), op, ": grad_x must have x's dtype ",
                   x.scalar_type(), ", got ", grad_x.scalar_type());
  TORCH_CHECK_VALUE(grad_x.device() == x.device(), op, ": grad_x is on ", grad_x.device(),
                    " but x is on ", x.device());
  check_rows(grad_size, "grad_size", x, grad_x.size(1), compute_dtype(x.scalar_type()), op);
}

// ---- merge weights (MSTM's `weight` argument) and their gradients, on any device ----

// w = size, or size * clamp_min(scores, WEIGHT_EPS) (NaN propagates); size undefined means ones.
inline at::Tensor merge_weights(const at::Tensor& scores, const at::Tensor& size, WeightMode mode) {
  if (mode == WeightMode::kSize) return size.defined() ? size : at::ones_like(scores);
  const at::Tensor clamped = scores.clamp_min(WEIGHT_EPS);
  return size.defined() ? size.mul(clamped) : clamped;
}

// (grad scores, grad size) of the weights from grad w and the size gradient h of every token's
// destination: grad size = grad w * dw/dsize + h, grad score = grad w * size [score > WEIGHT_EPS].
inline std::tuple<at::Tensor, at::Tensor> merge_weight_grads(const at::Tensor& gw, const at::Tensor& h,
                                                             const at::Tensor& scores,
                                                             const at::Tensor& size, WeightMode mode) {
  if (mode == WeightMode::kSize) return {at::zeros_like(scores), gw.add(h)};
  const at::Tensor gscores = size.defined() ? gw.mul(size) : gw.clone();
  return {gscores.masked_fill_(scores.gt(WEIGHT_EPS).logical_not(), 0),
          gw.mul(scores.clamp_min(WEIGHT_EPS)).add(h)};
}

// ---- Operators, written once over a device's kernels ----
//
// `Dev` provides, for contiguous inputs that passed the checks above and B >= 1:
//   Dev::Guard                       RAII device guard, constructed from x's device;
//   Dev::mstm_index(scores, metric, r, p) -> index [B, N]: MSTM's top-k selection and cosine
//       matching (kept token -> its output slot, dropped token -> the slot of its best kept token);
//   Dev::merge(x, w, size?, index, n_out) -> (x' [B, n_out, C], size' [B, n_out]): the weighted merge
//       x'_d = sum_{i -> d} (w_i / W_d) x_i, W_d = sum_{i -> d} w_i, summed in ascending i from zero
//       (a token that absorbs nothing is copied bit for bit); sizes add (ones when size is undefined);
//   Dev::merge_backward(grad_x', x, w, index) -> (grad x, grad w): grad x_i = (w_i / W_d) g_d,
//       grad w_i = (<g_d, x_i> - A_d) / W_d with A_d = sum_{k -> d} (w_k / W_d) <g_d, x_k>.

struct NoGuard {
  explicit NoGuard(const at::Device&) {}
};

template <class Dev>
std::tuple<at::Tensor, at::Tensor> weighted_merge_op(const at::Tensor& x_, const at::Tensor& w_,
                                                     const at::Tensor& size_, const at::Tensor& index_,
                                                     int64_t n_out) {
  check_weighted_merge_args(x_, w_, size_, index_, "weighted_merge");
  check_int_range(n_out, "n_out", 1, x_.size(1), "weighted_merge");
  const typename Dev::Guard guard(x_.device());
  if (x_.size(0) == 0) {
    return {x_.new_empty({0, n_out, x_.size(2)}), size_.new_empty({0, n_out})};
  }
  return Dev::merge(x_.contiguous(), w_.contiguous(), size_.contiguous(), index_.contiguous(), n_out);
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_merge_backward_op(
    const at::Tensor& grad_x_, const at::Tensor& grad_size_, const at::Tensor& x_,
    const at::Tensor& w_, const at::Tensor& index_) {
  const char* op = "weighted_merge_backward";
  check_tokens(x_, "x", op);
  check_merge_grads(grad_x_, grad_size_, x_, op);
  check_rows(w_, "w", x_, x_.size(1), compute_dtype(x_.scalar_type()), op);
  check_rows(index_, "index", x_, x_.size(1), at::kLong, op);
  const typename Dev::Guard guard(x_.device());
  if (x_.size(0) == 0) return {at::zeros_like(x_), at::zeros_like(w_), at::zeros_like(w_)};
  const at::Tensor index = index_.contiguous();
  auto [gx, gw] = Dev::merge_backward(grad_x_.contiguous(), x_.contiguous(), w_.contiguous(), index);
  return {gx, gw, grad_size_.gather(1, index)};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mstm_merge_op(
    const at::Tensor& x_, const at::Tensor& scores_, const std::optional<at::Tensor>& size_,
    const std::optional<at::Tensor>& metric_, int64_t r, int64_t p, c10::string_view weight) {
  const char* op = "mstm_merge";
  check_mstm_args(x_, scores_, size_, op);
  const int64_t B = x_.size(0), N = x_.size(1), C = x_.size(2);
  check_int_range(p, "num_prefix_tokens", 0, N - 1, op);
  check_int_range(r, "r", 0, N - p - 1, op);
  if (given(metric_)) check_metric(*metric_, x_, op);
  const WeightMode mode = parse_weight(weight);
  const typename Dev::Guard guard(x_.device());
  if (B == 0) {
    return {x_.new_empty({0, N - r, C}), scores_.new_empty({0, N - r}),
            scores_.new_empty({0, N}, scores_.options().dtype(at::kLong))};
  }
  const at::Tensor x = x_.contiguous(), scores = scores_.contiguous(), size = contiguous_or_none(size_);
  const at::Tensor index = Dev::mstm_index(scores, given(metric_) ? metric_->contiguous() : x, r, p);
  auto [out, size_out] = Dev::merge(x, merge_weights(scores, size, mode), size, index, N - r);
  return {out, size_out, index};
}

template <class Dev>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mstm_merge_backward_op(
    const at::Tensor& grad_x_, const at::Tensor& grad_size_, const at::Tensor& x_,
    const at::Tensor& scores_, const std::optional<at::Tensor>& size_, const at::Tensor& index_,
    c10::string_view weight) {
  const char* op = "mstm_merge_backward";
  check_mstm_args(x_, scores_, size_, op);
  check_merge_grads(grad_x_, grad_size_, x_, op);
  check_rows(index_, "index", x_, x_.size(1), at::kLong, op);
  const WeightMode mode = parse_weight(weight);
  const typename Dev::Guard guard(x_.device());
  if (x_.size(0) == 0) return {at::zeros_like(x_), at::zeros_like(scores_), at::zeros_like(scores_)};
  const at::Tensor scores = scores_.contiguous(), size = contiguous_or_none(size_);
  const at::Tensor index = index_.contiguous();
  const at::Tensor w = merge_weights(scores, size, mode);
  auto [gx, gw] = Dev::merge_backward(grad_x_.contiguous(), x_.contiguous(), w, index);
  auto [gscores, gsize] = merge_weight_grads(gw, grad_size_.gather(1, index), scores, size, mode);
  return {gx, gscores, gsize};
}

// Registers the device's kernels of the merge operators (the schemas are in ops.cpp).
template <class Dev>
void impl_merge_ops(torch::Library& m) {
  m.impl("mstm_merge", &mstm_merge_op<Dev>);
  m.impl("mstm_merge_backward", &mstm_merge_backward_op<Dev>);
  m.impl("weighted_merge", &weighted_merge_op<Dev>);
  m.impl("weighted_merge_backward", &weighted_merge_backward_op<Dev>);
}

// ---- CPU kernels (merge_cpu.cpp, tome_cpu.cpp, bat_cpu.cpp) ----

struct CpuKernels {
  using Guard = NoGuard;
  static at::Tensor mstm_index(const at::Tensor& scores, const at::Tensor& metric, int64_t r,
                               int64_t p);
  static std::tuple<at::Tensor, at::Tensor> merge(const at::Tensor& x, const at::Tensor& w,
                                                  const at::Tensor& size, const at::Tensor& index,
                                                  int64_t n_out);
  static std::tuple<at::Tensor, at::Tensor> merge_backward(const at::Tensor& grad_x,
                                                           const at::Tensor& x, const at::Tensor& w,
                                                           const at::Tensor& index);
};

// ToMe's bipartite soft matching: index [B, N] (r already clipped to (N - p) // 2).
at::Tensor tome_match_cpu(const at::Tensor& metric, int64_t r, int64_t num_prefix_tokens);

// BAT's decoupling, attentive token matching and DPC-kNN clustering: index [B, N].
at::Tensor bat_index_cpu(const at::Tensor& scores, const at::Tensor& metric, int64_t K, int64_t r,
                         int64_t c, int64_t k, int64_t num_prefix_tokens);

}  // namespace fastprune
