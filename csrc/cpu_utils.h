// Helpers of the CPU kernels (merge_cpu.cpp, tome_cpu.cpp, bat_cpu.cpp): the ranking, argmax and
// normalisation steps that MSTM, ToMe and BAT share, each with the tie and NaN rules of
// fastprune/reference.py.
#pragma once

#include "fastprune.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linalg_vector_norm.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace fastprune {
namespace cpu {

// Grain size of a parallel loop whose items cost about `work` scalar operations each.
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, work));
}

// order[0 .. n) = 0 .. n - 1 sorted by descending key (NaN first), ties to the lower index: the
// permutation torch.sort(key, descending=True, stable=True) returns.
template <typename T>
void descending_order(const T* key, int64_t n, int64_t* order) {
  std::iota(order, order + n, int64_t(0));
  std::stable_sort(order, order + n, [key](int64_t a, int64_t b) { return ranks_above(key[a], key[b]); });
}

// The first j in [begin, n) of largest row[j] (NaN largest), as torch.argmax over a row whose
// columns before `begin` are masked to -inf: 0 with -inf when nothing beats -inf. Returns j and
// writes the value to *best. Two vectorised (SIMD) passes: the maximum over independent lanes,
// with the sum of v - v (NaN only if some v is NaN or +-inf), then the first block of lanes
// holding it and in it the first element equal to it: the element the sequential scan keeps
// (-0.0 == +0.0). A row holding a NaN or an infinity takes the sequential scan.
template <typename T>
int64_t masked_argmax(const T* row, int64_t begin, int64_t n, T* best) {
  constexpr int kLanes = 16;  // independent maxima: the loop is not bound by one max's latency
  const T lowest = -std::numeric_limits<T>::infinity();
  T lane[kLanes], bad[kLanes];
  std::fill(lane, lane + kLanes, lowest);
  std::fill(bad, bad + kLanes, T(0));
  int64_t j = begin;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      const T v = row[j + k];
      lane[k] = v > lane[k] ? v : lane[k];
      bad[k] += v - v;
    }
  }
  T m = lowest, poison = 0;
  for (int k = 0; k < kLanes; ++k) {
    m = lane[k] > m ? lane[k] : m;
    poison += bad[k];
  }
  for (; j < n; ++j) {
    m = row[j] > m ? row[j] : m;
    poison += row[j] - row[j];
  }
  if (poison == T(0)) {  // every value finite
    if (!(m > lowest)) {  // an empty range
      *best = lowest;
      return 0;
    }
    for (j = begin; j + kLanes <= n; j += kLanes) {  // the block holding the first maximum
      int hit = 0;
#pragma omp simd reduction(| : hit)
      for (int k = 0; k < kLanes; ++k) hit |= row[j + k] == m;
      if (hit) break;
    }
    while (row[j] != m) ++j;
    *best = row[j];
    return j;
  }
  int64_t best_j = 0;
  T v = lowest;
  for (j = begin; j < n; ++j) {
    if (ranks_above(row[j], v)) {
      v = row[j];
      best_j = j;
    }
  }
  *best = v;
  return best_j;
}

// m / max(|m|, COSINE_EPS) per row of metric [B, N, Cm], in the compute dtype: the same ATen calls
// as the reference (bit for bit, so that the similarity GEMM that follows matches it too).
inline at::Tensor normalized_rows(const at::Tensor& metric) {
  const at::Tensor m = metric.to(compute_dtype(metric.scalar_type()));
  return m.div(at::linalg_vector_norm(m, 2, at::IntArrayRef{-1}, /*keepdim=*/true).clamp_min(COSINE_EPS));
}

}  // namespace cpu
}  // namespace fastprune
