// ToMe's bipartite soft matching on the CPU: the index map of merging r tokens, which the weighted
// merge (merge_cpu.cpp) then applies with w = size. Semantics: fastprune/tome.py
// (bipartite_soft_matching, the specification), from "Token Merging: Your ViT but Faster" (Bolya et
// al., ICLR 2023).
//
// For every image (parallel over images), with A = even positions, B = odd positions:
//   1. cosine similarities of every A token with every B token: the metric L2-normalised (norms
//      clamped to COSINE_EPS) and one batched GEMM, the same ATen calls as the reference, so the
//      similarities and therefore the index map are the reference's bit for bit;
//   2. the best B partner of every A token (first maximum, NaN largest); prefix A tokens are never
//      sources (score -inf) and prefix B tokens never destinations;
//   3. the r A tokens with the largest best-partner similarity merge (ties: lower A index);
//   4. output slots: prefix tokens, unmerged A tokens, B tokens, each group in its original order;
//      a merged A token maps to its partner's slot.
#include "cpu_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>

#include <vector>

namespace fastprune {
namespace {

template <typename acc_t>
void tome_index_kernel(const at::Tensor& sim, int64_t N, int64_t r, int64_t p, at::Tensor& index) {
  const int64_t B = index.size(0), NA = (N + 1) / 2, NB = N / 2;
  const int64_t a_prefix = (p + 1) / 2, b_prefix = p / 2;  // A rows 2a < p, B columns 2b + 1 < p
  const acc_t* simp = sim.const_data_ptr<acc_t>();
  int64_t* ip = index.mutable_data_ptr<int64_t>();
  at::parallel_for(0, B, cpu::grain_for(2 * NA * NB + 8 * N), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> score(NA);
    std::vector<int64_t> partner(NA), order(NA), slot(N);
    std::vector<uint8_t> merged(NA);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t a = 0; a < NA; ++a) {
        const acc_t* row = simp + (b * NA + a) * NB;
        partner[a] = a < a_prefix ? cpu::masked_argmax(row, NB, NB, &score[a])
                                  : cpu::masked_argmax(row, b_prefix, NB, &score[a]);
      }
      cpu::descending_order(score.data(), NA, order.data());
      std::fill(merged.begin(), merged.end(), uint8_t(0));
      for (int64_t k = 0; k < r; ++k) merged[order[k]] = 1;
      int64_t s = 0;
      for (int64_t i = 0; i < p; ++i) slot[i] = s++;
      for (int64_t i = p + (p & 1); i < N; i += 2) {
        if (!merged[i / 2]) slot[i] = s++;
      }
      for (int64_t i = p + 1 - (p & 1); i < N; i += 2) slot[i] = s++;
      int64_t* ib = ip + b * N;
      for (int64_t i = 0; i < N; ++i) {
        ib[i] = (i % 2 == 0 && merged[i / 2]) ? slot[2 * partner[i / 2] + 1] : slot[i];
      }
    }
  });
}

}  // namespace

at::Tensor tome_match_cpu(const at::Tensor& metric, int64_t r, int64_t p) {
  const char* op = "tome_match";
  check_tokens(metric, "metric", op);
  const int64_t B = metric.size(0), N = metric.size(1);
  check_int_range(p, "num_prefix_tokens", 0, N - 1, op);
  check_int_range(r, "r", 0, (N - p) / 2, op);
  at::Tensor index = at::empty({B, N}, metric.options().dtype(at::kLong));
  if (B == 0) return index;
  // the metric as it came (not made contiguous): the reference normalises this very tensor
  const at::Tensor m = cpu::normalized_rows(metric);
  const at::Tensor sim =
      at::matmul(m.slice(1, 0, N, 2), m.slice(1, 1, N, 2).transpose(1, 2)).contiguous();
  AT_DISPATCH_FLOATING_TYPES(sim.scalar_type(), "tome_match_cpu", [&] {
    tome_index_kernel<scalar_t>(sim, N, r, p, index);
  });
  return index;
}

}  // namespace fastprune
