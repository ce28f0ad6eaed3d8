// Fused MSTM token merge on the CPU: top-k selection, cosine matching and weighted merge in one
// operator, and its backward. Semantics: fastprune/reference.py::mstm_merge (the specification), from
// "Multi-Scale And Token Mergence: Make Your ViT More Efficient" (Bian et al., 2023).
//
// Forward, for every image b (x: [B, N, C] tokens, p prefix tokens, K = N - p - r kept tokens):
//   1. selection   (parallel over images): stable sort of the non-prefix scores, descending, NaN
//      first (as torch.sort(descending=True, stable=True)); the first K are kept. Output slots of
//      kept tokens follow their order (prefix first).
//   2. norms       (parallel over tokens): |m_i| clamped to COSINE_EPS, accumulated in fp32 (fp64
//      for fp64 input; a half-precision metric is converted to fp32 once); the r dropped rows of
//      every image are normalised, m_i / |m_i|, into a [B, r, Cm] block.
//   3. matching    (one batched GEMM, then parallel over dropped tokens): <m_i / |m_i|, m_j> for
//      every dropped i and every j of its image, divided by |m_j|; every dropped token takes the
//      kept non-prefix token of largest cosine similarity; ties go to the lower index (NaN counts
//      as the largest, as argmax). Only r x N similarities per image, never N x N.
//   4. grouping    (parallel over images): weights w_i (size, or size * max(score, WEIGHT_EPS)), their
//      total W_d per destination and the member lists, all in ascending token order.
//   5. merging     (parallel over output tokens): x'_d = sum_{i -> d} (w_i / W_d) x_i accumulated in
//      ascending token order from zero, so a token that absorbs nothing is copied bit for bit;
//      sizes add up.
// Backward (grad_x' = g, grad_size' = h, s_i = <g_{d(i)}, x_i>, A_d = sum_{k -> d} (w_k / W_d) s_k):
//   grad x_i = (w_i / W_d) g_d,  grad w_i = (s_i - A_d) / W_d,
//   grad size_i = grad w_i * dw/dsize + h_d,  grad score_i = grad w_i * size_i [score_i > WEIGHT_EPS]
// (the last only for weight == "size_attn"; selection and matching carry no gradient).
#include "fastprune.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

namespace fastprune {
namespace {

// Strict "ranks above" of the descending top-k: NaN above every number, then larger values.
template <typename T>
inline bool ranks_above(T a, T b) {
  return (std::isnan(a) && !std::isnan(b)) || a > b;
}

// Dot product in acc_t with eight partial sums in a fixed order: the same order for every pair,
// so identical rows give identical similarities (exact ties), and the compiler can vectorise it.
template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot(const a_t* a, const b_t* b, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    for (int k = 0; k < 8; ++k) {
      part[k] += static_cast<acc_t>(a[c + k]) * static_cast<acc_t>(b[c + k]);
    }
  }
  acc_t tail = 0;
  for (; c < n; ++c) tail += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) +
         tail;
}

// Grain size of a parallel loop whose items cost about `work` scalar operations each.
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, work));
}

// Merge weight of one token.
template <typename acc_t>
inline acc_t merge_weight(acc_t size, acc_t score, WeightMode mode) {
  if (mode == WeightMode::kSize) return size;
  const acc_t eps = static_cast<acc_t>(WEIGHT_EPS);
  // clamp_min semantics: NaN propagates.
  return size * (std::isnan(score) ? score : std::max(score, eps));
}

// Destination groups of one image, in ascending token order (step 4 of the forward; the backward
// rebuilds them from the saved index map). Fills w [N], total [n_out], offsets [n_out + 1] and
// members [N]; optionally size_out [n_out] (sum of sizes).
template <typename acc_t>
void group_image(const int64_t* idx, const acc_t* score, const acc_t* size, WeightMode mode,
                 int64_t N, int64_t n_out, acc_t* w, acc_t* total, int64_t* offsets,
                 int64_t* members, acc_t* size_out) {
  std::fill(total, total + n_out, acc_t(0));
  if (size_out != nullptr) std::fill(size_out, size_out + n_out, acc_t(0));
  std::fill(offsets, offsets + n_out + 1, int64_t(0));
  for (int64_t i = 0; i < N; ++i) {
    const int64_t d = idx[i];
    const acc_t s = size != nullptr ? size[i] : acc_t(1);
    w[i] = merge_weight<acc_t>(s, score[i], mode);
    total[d] += w[i];
    if (size_out != nullptr) size_out[d] += s;
    offsets[d + 1] += 1;
  }
  for (int64_t d = 0; d < n_out; ++d) offsets[d + 1] += offsets[d];
  std::vector<int64_t> fill(offsets, offsets + n_out);
  for (int64_t i = 0; i < N; ++i) members[fill[idx[i]]++] = i;
}

template <typename scalar_t, typename metric_t>
void merge_forward_kernel(const at::Tensor& x, const at::Tensor& scores, const at::Tensor& size,
                          const at::Tensor& metric, int64_t r, int64_t p, WeightMode mode,
                          at::Tensor& out, at::Tensor& size_out, at::Tensor& index) {
  using acc_t = at::opmath_type<scalar_t>;     // merge arithmetic (float or double)
  using macc_t = at::opmath_type<metric_t>;    // matching arithmetic
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), Cm = metric.size(2);
  const int64_t K = N - p - r, n_out = N - r;

  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* sp = scores.const_data_ptr<acc_t>();
  const acc_t* zp = size.defined() ? size.const_data_ptr<acc_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  acc_t* szp = size_out.mutable_data_ptr<acc_t>();
  int64_t* ip = index.mutable_data_ptr<int64_t>();

  // 1. Selection: index of kept tokens = their output slot, -1 for dropped tokens.
  std::vector<int64_t> cand(static_cast<size_t>(B * K));  // kept non-prefix tokens, ascending
  std::vector<int64_t> drop(static_cast<size_t>(B * r));  // dropped tokens, ascending
  at::parallel_for(0, B, grain_for(32 * N), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order(N - p);
    std::vector<uint8_t> keep(N);
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t* s = sp + b * N;
      std::iota(order.begin(), order.end(), p);
      std::stable_sort(order.begin(), order.end(),
                       [s](int64_t a, int64_t c) { return ranks_above(s[a], s[c]); });
      std::fill(keep.begin(), keep.end(), uint8_t(0));
      std::fill(keep.begin(), keep.begin() + p, uint8_t(1));
      for (int64_t k = 0; k < K; ++k) keep[order[k]] = 1;
      int64_t slot = 0, nc = 0, nd = 0;
      for (int64_t i = 0; i < N; ++i) {
        if (keep[i]) {
          ip[b * N + i] = slot++;
          if (i >= p) cand[b * K + nc++] = i;
        } else {
          ip[b * N + i] = -1;
          drop[b * r + nd++] = i;
        }
      }
    }
  });

  if (r > 0) {
    // 2. Norms. The metric in macc_t (a view of the input when it already is; half precision is
    //    converted once), the clamped norm of every non-prefix row, and the r dropped rows of every
    //    image normalised into dhat [B, r, Cm]. One item per row, so B = 1 uses every thread.
    const auto macc_dtype = c10::CppTypeToScalarType<macc_t>::value;
    const at::Tensor mf = metric.scalar_type() == macc_dtype ? metric : metric.to(macc_dtype);
    const macc_t* mfp = mf.const_data_ptr<macc_t>();
    std::vector<macc_t> norm(static_cast<size_t>(B * N));
    at::parallel_for(0, B * N, grain_for(2 * Cm), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if (t % N < p) continue;  // prefix rows are never compared
        const macc_t* m = mfp + t * Cm;
        macc_t n = std::sqrt(dot<macc_t>(m, m, Cm));
        if (!std::isnan(n)) n = std::max(n, static_cast<macc_t>(COSINE_EPS));
        norm[t] = n;
      }
    });
    at::Tensor dhat = at::empty({B, r, Cm}, mf.options());
    macc_t* dp = dhat.mutable_data_ptr<macc_t>();
    at::parallel_for(0, B * r, grain_for(2 * Cm), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t t = (q / r) * N + drop[q];
        const macc_t* m = mfp + t * Cm;
        const macc_t n = norm[t];
        macc_t* o = dp + q * Cm;
        for (int64_t c = 0; c < Cm; ++c) o[c] = m[c] / n;
      }
    });
    // 3. Matching. <m_i / |m_i|, m_j> for the r dropped rows i against all N rows j of every image
    //    in one batched GEMM (ATen's BLAS, [B, r, Cm] x [B, Cm, N]), divided by |m_j| per kept
    //    non-prefix candidate: the cosine similarity. Every dropped token takes the candidate of
    //    largest similarity; candidates are scanned in ascending order and only a strictly larger
    //    value replaces the best, so ties go to the lower index (NaN counts as the largest, as argmax).
    const at::Tensor sim = at::bmm(dhat, mf.transpose(1, 2));  // [B, r, N], contiguous
    const macc_t* simp = sim.const_data_ptr<macc_t>();
    at::parallel_for(0, B * r, grain_for(4 * K), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t b = q / r;
        const macc_t* row = simp + q * N;
        const macc_t* nb = norm.data() + b * N;
        const int64_t* cb = cand.data() + b * K;
        int64_t best_j = cb[0];
        macc_t best = row[best_j] / nb[best_j];
        for (int64_t k = 1; k < K; ++k) {
          const int64_t j = cb[k];
          const macc_t v = row[j] / nb[j];
          if (ranks_above(v, best)) {
            best = v;
            best_j = j;
          }
        }
        ip[b * N + drop[q]] = ip[b * N + best_j];  // kept entries are final since step 1
      }
    });
  }

  // 4. Grouping by destination.
  std::vector<acc_t> w(static_cast<size_t>(B * N)), total(static_cast<size_t>(B * n_out));
  std::vector<int64_t> offsets(static_cast<size_t>(B * (n_out + 1))), members(static_cast<size_t>(B * N));
  at::parallel_for(0, B, grain_for(8 * N), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      group_image<acc_t>(ip + b * N, sp + b * N, zp != nullptr ? zp + b * N : nullptr, mode, N,
                         n_out, w.data() + b * N, total.data() + b * n_out,
                         offsets.data() + b * (n_out + 1), members.data() + b * N, szp + b * n_out);
    }
  });

  // 5. Weighted merge, one output token per item.
  at::parallel_for(0, B * n_out, grain_for(2 * C * N / n_out), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_out, d = t % n_out;
      const int64_t* off = offsets.data() + b * (n_out + 1);
      const acc_t W = total[t];
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = off[d]; k < off[d + 1]; ++k) {
        const int64_t i = members[b * N + k];
        const acc_t share = w[b * N + i] / W;
        const scalar_t* xi = xp + (b * N + i) * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(xi[c]) * share;
      }
      scalar_t* o = op + t * C;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

template <typename scalar_t>
void merge_backward_kernel(const at::Tensor& grad_x, const at::Tensor& grad_size,
                           const at::Tensor& x, const at::Tensor& scores, const at::Tensor& size,
                           const at::Tensor& index, WeightMode mode, at::Tensor& gx,
                           at::Tensor& gscores, at::Tensor& gsize) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), n_out = grad_x.size(1);
  const scalar_t* gp = grad_x.const_data_ptr<scalar_t>();
  const acc_t* hp = grad_size.const_data_ptr<acc_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* sp = scores.const_data_ptr<acc_t>();
  const acc_t* zp = size.defined() ? size.const_data_ptr<acc_t>() : nullptr;
  const int64_t* ip = index.const_data_ptr<int64_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  acc_t* gsp = gscores.mutable_data_ptr<acc_t>();
  acc_t* gzp = gsize.mutable_data_ptr<acc_t>();

  // Validate the index map before using it as an address.
  at::parallel_for(0, B * N, grain_for(1), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      TORCH_CHECK_VALUE(ip[t] >= 0 && ip[t] < n_out, "mstm_merge_backward: index values must lie in "
                        "[0, N - r) = [0, ", n_out, "), got ", ip[t]);
    }
  });

  std::vector<acc_t> w(static_cast<size_t>(B * N)), total(static_cast<size_t>(B * n_out));
  std::vector<int64_t> offsets(static_cast<size_t>(B * (n_out + 1))), members(static_cast<size_t>(B * N));
  at::parallel_for(0, B, grain_for(8 * N), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      group_image<acc_t>(ip + b * N, sp + b * N, zp != nullptr ? zp + b * N : nullptr, mode, N,
                         n_out, w.data() + b * N, total.data() + b * n_out,
                         offsets.data() + b * (n_out + 1), members.data() + b * N, nullptr);
    }
  });

  // grad x_i = share_i g_d and s_i = <g_d, x_i>, one input token per item.
  std::vector<acc_t> share(static_cast<size_t>(B * N)), s(static_cast<size_t>(B * N));
  at::parallel_for(0, B * N, grain_for(3 * C), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / N, d = ip[t];
      const acc_t sh = w[t] / total[b * n_out + d];
      const scalar_t* g = gp + (b * n_out + d) * C;
      share[t] = sh;
      s[t] = dot<acc_t>(g, xp + t * C, C);
      scalar_t* o = gxp + t * C;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(sh * static_cast<acc_t>(g[c]));
    }
  });

  // grad of the weights, then of size and scores, one image per item.
  at::parallel_for(0, B, grain_for(8 * N), [&](int64_t b0, int64_t b1) {
    const acc_t eps = static_cast<acc_t>(WEIGHT_EPS);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* off = offsets.data() + b * (n_out + 1);
      const int64_t* mem = members.data() + b * N;
      for (int64_t d = 0; d < n_out; ++d) {
        acc_t A = 0;
        for (int64_t k = off[d]; k < off[d + 1]; ++k) A += share[b * N + mem[k]] * s[b * N + mem[k]];
        const acc_t W = total[b * n_out + d];
        const acc_t h = hp[b * n_out + d];
        for (int64_t k = off[d]; k < off[d + 1]; ++k) {
          const int64_t t = b * N + mem[k];
          const acc_t gw = (s[t] - A) / W;
          const acc_t sz = zp != nullptr ? zp[t] : acc_t(1);
          if (mode == WeightMode::kSize) {
            gzp[t] = gw + h;
            gsp[t] = 0;
          } else {
            const acc_t sc = sp[t];
            gzp[t] = gw * (std::isnan(sc) ? sc : std::max(sc, eps)) + h;
            gsp[t] = sc > eps ? gw * sz : acc_t(0);
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mstm_merge_cpu(
    const at::Tensor& x_, const at::Tensor& scores_, const std::optional<at::Tensor>& size_,
    const std::optional<at::Tensor>& metric_, int64_t r, int64_t num_prefix_tokens,
    c10::string_view weight) {
  check_merge_forward_args(x_, scores_, size_, metric_, r, num_prefix_tokens);
  const WeightMode mode = parse_weight(weight);
  const at::Tensor x = x_.contiguous();
  const at::Tensor scores = scores_.contiguous();
  const at::Tensor size = size_.has_value() && size_->defined() ? size_->contiguous() : at::Tensor();
  const at::Tensor metric =
      metric_.has_value() && metric_->defined() ? metric_->contiguous() : x;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), n_out = N - r;

  at::Tensor out = at::empty({B, n_out, C}, x.options());
  at::Tensor size_out = at::empty({B, n_out}, scores.options());
  at::Tensor index = at::empty({B, N}, x.options().dtype(at::kLong));
  if (B == 0) return {out, size_out, index};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mstm_merge_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(),
                                    "mstm_merge_cpu_metric", [&] {
      merge_forward_kernel<x_t, scalar_t>(x, scores, size, metric, r, num_prefix_tokens, mode, out,
                                          size_out, index);
    });
  });
  return {out, size_out, index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mstm_merge_backward_cpu(
    const at::Tensor& grad_x_, const at::Tensor& grad_size_, const at::Tensor& x_,
    const at::Tensor& scores_, const std::optional<at::Tensor>& size_, const at::Tensor& index_,
    c10::string_view weight) {
  check_merge_backward_args(grad_x_, grad_size_, x_, scores_, size_, index_);
  const WeightMode mode = parse_weight(weight);
  const at::Tensor grad_x = grad_x_.contiguous();
  const at::Tensor grad_size = grad_size_.contiguous();
  const at::Tensor x = x_.contiguous();
  const at::Tensor scores = scores_.contiguous();
  const at::Tensor size = size_.has_value() && size_->defined() ? size_->contiguous() : at::Tensor();
  const at::Tensor index = index_.contiguous();

  at::Tensor gx = at::empty_like(x);
  at::Tensor gscores = at::empty_like(scores);
  at::Tensor gsize = at::empty_like(scores);
  if (x.numel() == 0) return {gx, gscores.zero_(), gsize.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "mstm_merge_backward_cpu", [&] {
    merge_backward_kernel<scalar_t>(grad_x, grad_size, x, scores, size, index, mode, gx, gscores,
                                    gsize);
  });
  return {gx, gscores, gsize};
}

}  // namespace fastprune
