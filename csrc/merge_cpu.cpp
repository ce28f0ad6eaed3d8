// CPU kernels of MSTM's selection and matching, and the weighted merge every method shares
// (CpuKernels, see fastprune.h; the operators themselves are written once there). Semantics:
// fastprune/reference.py (mstm_merge, weighted_merge), MSTM from "Multi-Scale And Token Mergence:
// Make Your ViT More Efficient" (Bian et al., 2023).
//
// mstm_index, for every image b (x: [B, N, C] tokens, p prefix tokens, K = N - p - r kept tokens):
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
// merge (the weighted merge; index maps every input token to an output token):
//   grouping (parallel over images): the members of every destination in ascending token order (a
//   counting sort of the index map); then, parallel over output tokens, W_d = sum of the members'
//   weights and x'_d = sum (w_i / W_d) x_i, both accumulated in ascending token order from zero, so
//   a token that absorbs nothing is copied bit for bit, a NaN reaches only its own destination, and
//   the sums are those of the reference's scatter_add; sizes add up.
// merge_backward (grad_x' = g, s_i = <g_{d(i)}, x_i>, A_d = sum_{k -> d} (w_k / W_d) s_k):
//   grad x_i = (w_i / W_d) g_d,  grad w_i = (s_i - A_d) / W_d.
#include "cpu_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>

#include <cmath>
#include <vector>

namespace fastprune {
namespace {

using cpu::grain_for;

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

template <typename acc_t, typename metric_t>
void mstm_index_kernel(const at::Tensor& scores, const at::Tensor& metric, int64_t r, int64_t p,
                       at::Tensor& index) {
  using macc_t = at::opmath_type<metric_t>;  // matching arithmetic
  const int64_t B = scores.size(0), N = scores.size(1), Cm = metric.size(2);
  const int64_t K = N - p - r;
  const acc_t* sp = scores.const_data_ptr<acc_t>();
  int64_t* ip = index.mutable_data_ptr<int64_t>();

  // 1. Selection: index of kept tokens = their output slot, -1 for dropped tokens.
  std::vector<int64_t> cand(static_cast<size_t>(B * K));  // kept non-prefix tokens, ascending
  std::vector<int64_t> drop(static_cast<size_t>(B * r));  // dropped tokens, ascending
  at::parallel_for(0, B, grain_for(32 * N), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order(N - p);
    std::vector<uint8_t> keep(N);
    for (int64_t b = b0; b < b1; ++b) {
      cpu::descending_order(sp + b * N + p, N - p, order.data());
      std::fill(keep.begin(), keep.end(), uint8_t(0));
      std::fill(keep.begin(), keep.begin() + p, uint8_t(1));
      for (int64_t k = 0; k < K; ++k) keep[p + order[k]] = 1;
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
  if (r == 0) return;

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

// The members of every destination of every image, ascending: members[b * N + offsets[b, d] ..
// offsets[b, d + 1]) are the tokens i with index[b, i] == d. Validates the index map first (it is
// used as an address).
struct Groups {
  std::vector<int64_t> offsets, members;
  int64_t N, n_out;

  Groups(const int64_t* idx, int64_t B, int64_t N_, int64_t n_out_, const char* op)
      : offsets(static_cast<size_t>(B * (n_out_ + 1)), 0), members(static_cast<size_t>(B * N_)),
        N(N_), n_out(n_out_) {
    at::parallel_for(0, B * N, grain_for(1), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        TORCH_CHECK_VALUE(idx[t] >= 0 && idx[t] < n_out, op, ": index values must lie in [0, n_out) "
                          "= [0, ", n_out, "), got ", idx[t]);
      }
    });
    at::parallel_for(0, B, grain_for(4 * N), [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> fill(n_out);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* ib = idx + b * N;
        int64_t* off = offsets.data() + b * (n_out + 1);
        for (int64_t i = 0; i < N; ++i) off[ib[i] + 1] += 1;
        for (int64_t d = 0; d < n_out; ++d) off[d + 1] += off[d];
        std::copy(off, off + n_out, fill.begin());
        for (int64_t i = 0; i < N; ++i) members[b * N + fill[ib[i]]++] = i;
      }
    });
  }

  // Members of output token t = b * n_out + d, as [begin, end) of token indices i (image-local).
  const int64_t* begin(int64_t t) const {
    return members.data() + (t / n_out) * N + offsets[(t / n_out) * (n_out + 1) + t % n_out];
  }
  const int64_t* end(int64_t t) const {
    return members.data() + (t / n_out) * N + offsets[(t / n_out) * (n_out + 1) + t % n_out + 1];
  }
};

// W_d of every output token: the members' weights summed in ascending order from zero.
template <typename acc_t>
std::vector<acc_t> group_totals(const Groups& g, const acc_t* w, int64_t B) {
  std::vector<acc_t> total(static_cast<size_t>(B * g.n_out));
  at::parallel_for(0, B * g.n_out, grain_for(g.N / g.n_out + 1), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const acc_t* wb = w + (t / g.n_out) * g.N;
      acc_t W = 0;
      for (const int64_t* k = g.begin(t); k != g.end(t); ++k) W += wb[*k];
      total[t] = W;
    }
  });
  return total;
}

template <typename scalar_t>
void merge_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& size,
                  const at::Tensor& index, int64_t n_out, at::Tensor& out, at::Tensor& size_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  const acc_t* zp = size.defined() ? size.const_data_ptr<acc_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  acc_t* szp = size_out.mutable_data_ptr<acc_t>();
  const Groups g(index.const_data_ptr<int64_t>(), B, N, n_out, "weighted_merge");
  const std::vector<acc_t> total = group_totals<acc_t>(g, wp, B);

  at::parallel_for(0, B * n_out, grain_for(2 * C * N / n_out), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(C);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_out;
      const acc_t W = total[t];
      scalar_t* o = op + t * C;
      if (g.end(t) - g.begin(t) == 1 && wp[b * N + *g.begin(t)] / W == acc_t(1)) {
        // a row that absorbs nothing: its token, copied bit for bit (-0.0 included), no accumulator pass
        const int64_t i = b * N + *g.begin(t);
        szp[t] = zp != nullptr ? zp[i] : acc_t(1);
        std::copy(xp + i * C, xp + (i + 1) * C, o);
        continue;
      }
      acc_t sz = 0;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (const int64_t* k = g.begin(t); k != g.end(t); ++k) {
        const int64_t i = b * N + *k;
        const acc_t share = wp[i] / W;
        sz += zp != nullptr ? zp[i] : acc_t(1);
        const scalar_t* xi = xp + i * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(xi[c]) * share;
      }
      szp[t] = sz;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

template <typename scalar_t>
void merge_backward_kernel(const at::Tensor& grad_x, const at::Tensor& x, const at::Tensor& w,
                           const at::Tensor& index, at::Tensor& gx, at::Tensor& gw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), n_out = grad_x.size(1);
  const scalar_t* gp = grad_x.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  acc_t* gwp = gw.mutable_data_ptr<acc_t>();
  const Groups g(ip, B, N, n_out, "weighted_merge_backward");
  const std::vector<acc_t> total = group_totals<acc_t>(g, wp, B);

  // grad x_i = share_i g_d and s_i = <g_d, x_i>, one input token per item.
  std::vector<acc_t> share(static_cast<size_t>(B * N)), s(static_cast<size_t>(B * N));
  at::parallel_for(0, B * N, grain_for(3 * C), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t d = (t / N) * n_out + ip[t];
      const acc_t sh = wp[t] / total[d];
      const scalar_t* gd = gp + d * C;
      share[t] = sh;
      s[t] = dot<acc_t>(gd, xp + t * C, C);
      scalar_t* o = gxp + t * C;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(sh * static_cast<acc_t>(gd[c]));
    }
  });
  // grad w_i = (s_i - A_d) / W_d, one output token per item.
  at::parallel_for(0, B * n_out, grain_for(4 * N / n_out + 1), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t base = (t / n_out) * N;
      acc_t A = 0;
      for (const int64_t* k = g.begin(t); k != g.end(t); ++k) A += share[base + *k] * s[base + *k];
      for (const int64_t* k = g.begin(t); k != g.end(t); ++k) {
        gwp[base + *k] = (s[base + *k] - A) / total[t];
      }
    }
  });
}

}  // namespace

at::Tensor CpuKernels::mstm_index(const at::Tensor& scores, const at::Tensor& metric, int64_t r,
                                  int64_t p) {
  at::Tensor index = at::empty(scores.sizes(), scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mstm_index_cpu", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(),
                                    "mstm_index_cpu_metric", [&] {
      mstm_index_kernel<acc_t, scalar_t>(scores, metric, r, p, index);
    });
  });
  return index;
}

std::tuple<at::Tensor, at::Tensor> CpuKernels::merge(const at::Tensor& x, const at::Tensor& w,
                                                     const at::Tensor& size, const at::Tensor& index,
                                                     int64_t n_out) {
  at::Tensor out = at::empty({x.size(0), n_out, x.size(2)}, x.options());
  at::Tensor size_out = at::empty({x.size(0), n_out}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "weighted_merge_cpu", [&] {
    merge_kernel<scalar_t>(x, w, size, index, n_out, out, size_out);
  });
  return {out, size_out};
}

std::tuple<at::Tensor, at::Tensor> CpuKernels::merge_backward(const at::Tensor& grad_x,
                                                              const at::Tensor& x,
                                                              const at::Tensor& w,
                                                              const at::Tensor& index) {
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "weighted_merge_backward_cpu", [&] {
    merge_backward_kernel<scalar_t>(grad_x, x, w, index, gx, gw);
  });
  return {gx, gw};
}

}  // namespace fastprune
