// BAT's index map on the CPU: decoupling, attentive token matching and DPC-kNN clustering; the
// weighted merge (merge_cpu.cpp) then applies it with w = max(a, WEIGHT_EPS) x size. Semantics:
// fastprune/bat.py (decouple, attentive_token_matching, dpc_knn, bat_index: the specification),
// from "Beyond Attentive Tokens" (Long et al., CVPR 2023).
//
// Arithmetic whose rounding decides an index (cosine similarities, distances, densities, logs) is
// done by the same ATen calls as the reference, on the same tensors, so the index map is the
// reference's bit for bit; everything else (rankings, argmax/argmin, deltas, slots) are loops here,
// parallel over images, with the reference's tie and NaN rules:
//   1. decouple: the K non-prefix tokens of largest score are attentive (stable, NaN first);
//   2. matching: the attentive tokens in order alternate between A and B; each A token's partner is
//      its most similar B token (first maximum); the r A tokens with the most similar partners
//      (ties: lower index) map to their partners' slots;
//   3. DPC-kNN on the n = N - p - K inattentive tokens: D = cdist / sqrt(Cm); log density
//      = -mean of the k smallest D^2 to other tokens; delta = distance to the nearest denser token
//      (ties of density: lower index is denser), the largest distance for the densest; the c
//      largest log density + log delta are centres (ties: lower index); every token joins its
//      nearest centre (first minimum), a centre itself. Clusters follow their centres' order.
// Output slots: prefix and surviving attentive tokens in order, then the c clusters.
#include "cpu_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/cdist.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace fastprune {
namespace {

template <typename T>
inline bool ranks_below(T a, T b) {  // NaN below every number, as torch.argmin / min
  return (std::isnan(a) && !std::isnan(b)) || a < b;
}

// Step 1: the attentive [B, K] and inattentive [B, n] token positions, ascending.
template <typename score_t>
void decouple_kernel(const at::Tensor& scores, int64_t K, int64_t p, at::Tensor& att,
                     at::Tensor& inat) {
  const int64_t B = scores.size(0), N = scores.size(1), n = N - p - K;
  const score_t* sp = scores.const_data_ptr<score_t>();
  int64_t* ap = att.mutable_data_ptr<int64_t>();
  int64_t* np = inat.mutable_data_ptr<int64_t>();
  at::parallel_for(0, B, cpu::grain_for(32 * N), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order(N - p);
    std::vector<uint8_t> attentive(N);
    for (int64_t b = b0; b < b1; ++b) {
      cpu::descending_order(sp + b * N + p, N - p, order.data());
      std::fill(attentive.begin(), attentive.end(), uint8_t(0));
      for (int64_t j = 0; j < K; ++j) attentive[p + order[j]] = 1;
      int64_t na = 0, ni = 0;
      for (int64_t i = p; i < N; ++i) {
        if (attentive[i]) ap[b * K + na++] = i;
        else np[b * n + ni++] = i;
      }
    }
  });
}

// Step 2 after the similarity GEMM: survivors and the slot every matched source maps to.
template <typename acc_t>
void match_kernel(const at::Tensor& sim, const at::Tensor& att, int64_t r,
                  std::vector<int64_t>& src, std::vector<int64_t>& dst) {
  const int64_t B = att.size(0), K = att.size(1), nA = (K + 1) / 2, nB = K / 2;
  const acc_t* simp = sim.const_data_ptr<acc_t>();
  const int64_t* ap = att.const_data_ptr<int64_t>();
  at::parallel_for(0, B, cpu::grain_for(2 * nA * nB + 8 * nA), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> best(nA);
    std::vector<int64_t> partner(nA), order(nA);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t a = 0; a < nA; ++a) {
        partner[a] = cpu::masked_argmax(simp + (b * nA + a) * nB, 0, nB, &best[a]);
      }
      cpu::descending_order(best.data(), nA, order.data());
      for (int64_t j = 0; j < r; ++j) {
        src[b * r + j] = ap[b * K + 2 * order[j]];
        dst[b * r + j] = ap[b * K + 2 * partner[order[j]] + 1];
      }
    }
  });
}

// Step 3 after the distance and density ATen calls: delta [B, n] of every inattentive token.
template <typename acc_t>
void delta_kernel(const at::Tensor& D, const at::Tensor& log_density, at::Tensor& delta) {
  const int64_t B = D.size(0), n = D.size(1);
  const acc_t* Dp = D.const_data_ptr<acc_t>();
  const acc_t* lp = log_density.const_data_ptr<acc_t>();
  acc_t* op = delta.mutable_data_ptr<acc_t>();
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, B * n, cpu::grain_for(2 * n), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n, i = t % n;
      const acc_t* row = Dp + t * n;
      const acc_t* ld = lp + b * n;
      bool any_denser = false;
      acc_t v = inf;
      for (int64_t j = 0; j < n; ++j) {
        if (ld[j] > ld[i] || (ld[j] == ld[i] && j < i)) {  // j is denser than i
          any_denser = true;
          if (ranks_below(row[j], v)) v = row[j];
        }
      }
      if (!any_denser) {  // the densest: its largest distance (NaN propagates, as max)
        v = -inf;
        for (int64_t j = 0; j < n; ++j) {
          if (ranks_above(row[j], v)) v = row[j];
        }
      }
      op[t] = v;
    }
  });
}

// Step 3, centres and nearest centre: the cluster of every inattentive token into its index entry.
template <typename acc_t>
void cluster_kernel(const at::Tensor& D, const at::Tensor& log_score, const at::Tensor& inat,
                    int64_t c, int64_t first_slot, int64_t N, at::Tensor& index) {
  const int64_t B = D.size(0), n = D.size(1);
  const acc_t* Dp = D.const_data_ptr<acc_t>();
  const acc_t* sp = log_score.const_data_ptr<acc_t>();
  const int64_t* np = inat.const_data_ptr<int64_t>();
  int64_t* ip = index.mutable_data_ptr<int64_t>();
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, B, cpu::grain_for(2 * n * c + 32 * n), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> order(n), rank(n);
    std::vector<uint8_t> centre(n);
    for (int64_t b = b0; b < b1; ++b) {
      cpu::descending_order(sp + b * n, n, order.data());
      std::fill(centre.begin(), centre.end(), uint8_t(0));
      for (int64_t j = 0; j < c; ++j) centre[order[j]] = 1;
      for (int64_t j = 0, seen = 0; j < n; ++j) {
        seen += centre[j];
        rank[j] = seen - 1;  // cumsum(centres) - 1
      }
      for (int64_t i = 0; i < n; ++i) {
        int64_t nearest = i;
        if (!centre[i]) {  // argmin over the row with non-centres masked to +inf
          const acc_t* row = Dp + (b * n + i) * n;
          nearest = 0;
          acc_t v = centre[0] ? row[0] : inf;
          for (int64_t j = 1; j < n; ++j) {
            const acc_t d = centre[j] ? row[j] : inf;
            if (ranks_below(d, v)) {
              v = d;
              nearest = j;
            }
          }
        }
        ip[b * N + np[b * n + i]] = first_slot + rank[nearest];
      }
    }
  });
}

// The k smallest of D_ij^2 over j != i, ascending, per row [B, n, k]: the values
// (D ** 2).masked_fill(eye, inf).topk(k, largest=False) returns (numbers, then inf, then NaN).
template <typename acc_t>
void knn_kernel(const at::Tensor& D, int64_t k, at::Tensor& knn) {
  const int64_t B = D.size(0), n = D.size(1);
  const acc_t* Dp = D.const_data_ptr<acc_t>();
  acc_t* op = knn.mutable_data_ptr<acc_t>();
  const auto before = [](acc_t a, acc_t b) { return (std::isnan(b) && !std::isnan(a)) || a < b; };
  at::parallel_for(0, B * n, cpu::grain_for(8 * n), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> row(n);
    for (int64_t t = t0; t < t1; ++t) {
      const acc_t* d = Dp + t * n;
      for (int64_t j = 0; j < n; ++j) row[j] = d[j] * d[j];
      row[t % n] = std::numeric_limits<acc_t>::infinity();
      std::partial_sort(row.begin(), row.begin() + k, row.end(), before);
      std::copy(row.begin(), row.begin() + k, op + t * k);
    }
  });
}

// m[b, idx[b, j], :] for every j: [B, J, Cm], contiguous (exact copies, as torch.gather).
at::Tensor gather_rows(const at::Tensor& m_, const at::Tensor& idx_) {
  const at::Tensor m = m_.contiguous(), idx = idx_.contiguous();
  const int64_t B = m.size(0), N = m.size(1), Cm = m.size(2), J = idx.size(1);
  at::Tensor out = at::empty({B, J, Cm}, m.options());
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const int64_t row_bytes = Cm * static_cast<int64_t>(m.element_size());
  const char* src = static_cast<const char*>(m.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, B * J, cpu::grain_for(Cm), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      std::memcpy(dst + t * row_bytes, src + ((t / J) * N + ip[t]) * row_bytes, row_bytes);
    }
  });
  return out;
}

}  // namespace

at::Tensor bat_index_cpu(const at::Tensor& scores_, const at::Tensor& metric, int64_t K, int64_t r,
                         int64_t c, int64_t k, int64_t p) {
  const char* op = "bat_index";
  TORCH_CHECK_VALUE(scores_.dim() == 2, op, ": scores must have shape [B, N], got ", scores_.sizes());
  TORCH_CHECK_TYPE(scores_.scalar_type() == at::kFloat || scores_.scalar_type() == at::kDouble, op,
                   ": scores must be float32 or float64, got ", scores_.scalar_type());
  check_metric(metric, scores_, op);
  const int64_t B = scores_.size(0), N = scores_.size(1);
  check_int_range(p, "num_prefix_tokens", 0, N - 1, op);
  check_int_range(K, "K", 1, N - p, op);
  const int64_t n = N - p - K;
  check_int_range(r, "r", 0, K / 2, op);
  check_int_range(c, "c", n > 0 ? 1 : 0, n, op);
  check_int_range(k, "k", 0, std::max<int64_t>(0, n - 1), op);
  at::Tensor index = at::empty({B, N}, scores_.options().dtype(at::kLong));
  if (B == 0) return index;
  const at::Tensor scores = scores_.contiguous();
  const auto long_opts = scores.options().dtype(at::kLong);

  // 1. decouple
  at::Tensor att = at::empty({B, K}, long_opts), inat = at::empty({B, n}, long_opts);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "bat_decouple_cpu", [&] {
    decouple_kernel<scalar_t>(scores, K, p, att, inat);
  });

  // 2. attentive token matching (the GEMM as in the reference: gathered normalised rows)
  std::vector<int64_t> src(static_cast<size_t>(B * r)), dst(static_cast<size_t>(B * r));
  if (r > 0) {
    const at::Tensor m = cpu::normalized_rows(metric);
    const at::Tensor sim = at::matmul(gather_rows(m, att.slice(1, 0, K, 2)),
                                      gather_rows(m, att.slice(1, 1, K, 2)).transpose(1, 2))
                               .contiguous();
    AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "bat_match_cpu", [&] {
      match_kernel<scalar_t>(sim, att, r, src, dst);
    });
  }
  // slots of the survivors (prefix and attentive tokens not merged away), in order
  int64_t* ip = index.mutable_data_ptr<int64_t>();
  const int64_t* ap = att.const_data_ptr<int64_t>();
  at::parallel_for(0, B, cpu::grain_for(4 * N), [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> survives(N);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(survives.begin(), survives.end(), uint8_t(0));
      std::fill(survives.begin(), survives.begin() + p, uint8_t(1));
      for (int64_t j = 0; j < K; ++j) survives[ap[b * K + j]] = 1;
      for (int64_t j = 0; j < r; ++j) survives[src[b * r + j]] = 0;
      int64_t* ib = ip + b * N;
      for (int64_t i = 0, seen = 0; i < N; ++i) {
        seen += survives[i];
        ib[i] = seen - 1;  // cumsum(survivors) - 1
      }
      for (int64_t j = r - 1; j >= 0; --j) ib[src[b * r + j]] = ib[dst[b * r + j]];
    }
  });

  // 3. DPC-kNN clustering of the inattentive tokens
  if (c > 0) {
    const at::Tensor mi = gather_rows(metric.to(compute_dtype(metric.scalar_type())), inat);
    const at::Tensor D = at::cdist(mi, mi, 2.0, /*compute_mode=donot_use_mm_for_euclid_dist*/ 2)
                             .div(std::sqrt(static_cast<double>(metric.size(2))));
    at::Tensor log_density;
    if (k > 0) {
      at::Tensor knn = at::empty({B, n, k}, D.options());
      AT_DISPATCH_FLOATING_TYPES(D.scalar_type(), "bat_knn_cpu", [&] { knn_kernel<scalar_t>(D, k, knn); });
      log_density = knn.mean(at::IntArrayRef{-1}).neg();  // ATen's mean: the reference's rounding
    } else {
      log_density = at::zeros_like(D.select(2, 0));
    }
    at::Tensor delta = at::empty_like(log_density);
    AT_DISPATCH_FLOATING_TYPES(D.scalar_type(), "bat_delta_cpu", [&] {
      delta_kernel<scalar_t>(D, log_density, delta);
    });
    const at::Tensor log_score = log_density.add(delta.log());
    AT_DISPATCH_FLOATING_TYPES(D.scalar_type(), "bat_cluster_cpu", [&] {
      cluster_kernel<scalar_t>(D, log_score, inat, c, p + K - r, N, index);
    });
  }
  return index;
}

}  // namespace fastprune
