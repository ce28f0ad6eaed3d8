// Fused MSTM token merge on CUDA GPUs: the second GPU backend of torch.ops.fastprune.mstm_merge and
// mstm_merge_backward (the first is Triton, kernels/merge.py). Semantics: fastprune/reference.py
// (Bian et al., 2023, "Multi-Scale And Token Mergence"); the CPU kernels in merge_cpu.cpp follow the
// same steps and the same summation order.
//
// Forward, three launches (x [B, N, C], p prefix tokens, K = N - p - r kept, n_out = N - r):
//   select_kernel  one block per image. Rank of each non-prefix token = number of tokens that rank
//                  above it (larger score, NaN largest, ties to the lower index): O(N^2 / threads),
//                  scores read through L1. Kept tokens (rank < K) go into a shared bitmask; popcounts
//                  give every kept token its output slot and every dropped token its place in the
//                  list of sources. Also the clamped L2 norm of every non-prefix metric row (a warp
//                  per row).
//   match_kernel   one warp per dropped token: cosine similarity with every kept non-prefix token
//                  (lanes over channels, shuffle reduction, lane 0's sum decides), argmax with ties
//                  to the lower index; writes the dropped token's index entry.
//   merge_kernel   one block per output token d: warp 0 collects the tokens with index == d in
//                  ascending order (ballot compaction) into shared memory, thread 0 sums the weights
//                  W_d and sizes in that order, then threads over channels accumulate
//                  sum (w_i / W_d) x_i in fp32 (fp64 for fp64). A lone token has share w / w = 1 and
//                  is copied exactly (IEEE division: do not build with --use_fast_math).
// Backward, one launch: merge_backward_kernel, one block per output token d, the same member list;
//   s_i = <g_d, x_i> (a warp per member), A_d = sum share_i s_i, grad x_i = share_i g_d,
//   grad w_i = (s_i - A_d) / W_d, then the gradients of size and scores as in merge_cpu.cpp.
// Shared memory per block: N * (4 + sizeof(acc)) bytes forward, N * (4 + 2 sizeof(acc)) backward;
// N up to 4096 tokens in fp32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastprune.h"

namespace fastprune {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxSharedBytes = 48 * 1024;

template <typename T>
__device__ __forceinline__ bool ranks_above(T a, T b) {
  return (isnan(a) && !isnan(b)) || a > b;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t merge_weight(acc_t size, acc_t score, int mode) {
  if (mode == static_cast<int>(WeightMode::kSize)) return size;
  const acc_t eps = static_cast<acc_t>(WEIGHT_EPS);
  return size * (isnan(score) ? score : (score > eps ? score : eps));
}

// Warp 0 writes the tokens i (ascending) with idx[i] == d into members and their number into *count.
__device__ void collect_members(const int64_t* idx, int64_t N, int64_t d, int* members, int* count) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  int total = 0;
  for (int64_t base = 0; base < N; base += 32) {
    const int64_t i = base + lane;
    const bool hit = i < N && idx[i] == d;
    const unsigned mask = __ballot_sync(kFullMask, hit);
    if (hit) members[total + __popc(mask & ((1u << lane) - 1u))] = static_cast<int>(i);
    total += __popc(mask);
  }
  if (lane == 0) *count = total;
}

template <typename acc_t, typename metric_t, typename macc_t>
__global__ void select_kernel(const acc_t* __restrict__ scores, const metric_t* __restrict__ metric,
                              int64_t N, int64_t Cm, int64_t p, int64_t r, int64_t* __restrict__ index,
                              int* __restrict__ cand, int* __restrict__ src, macc_t* __restrict__ norm) {
  extern __shared__ unsigned keep_bits[];  // ceil(N / 32) words
  const int64_t b = blockIdx.x;
  const int64_t K = N - p - r;
  const acc_t* s = scores + b * N;
  const int64_t words = (N + 31) / 32;
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) keep_bits[w] = 0u;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    bool keep = true;
    if (i >= p) {
      const acc_t si = s[i];
      int64_t rank = 0;
      for (int64_t j = p; j < N; ++j) {
        const acc_t sj = s[j];
        rank += (ranks_above(sj, si) || (j < i && !ranks_above(si, sj))) ? 1 : 0;
      }
      keep = rank < K;
    }
    if (keep) atomicOr(&keep_bits[i >> 5], 1u << (i & 31));
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const int64_t w = i >> 5;
    int64_t before = 0;  // kept tokens with a lower index
    for (int64_t u = 0; u < w; ++u) before += __popc(keep_bits[u]);
    before += __popc(keep_bits[w] & ((1u << (i & 31)) - 1u));
    if ((keep_bits[w] >> (i & 31)) & 1u) {
      index[b * N + i] = before;
      if (i >= p) cand[b * K + (before - p)] = static_cast<int>(i);
    } else {
      index[b * N + i] = -1;  // set by match_kernel
      src[b * r + (i - before)] = static_cast<int>(i);
    }
  }
  if (r == 0) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t i = p + warp; i < N; i += nwarps) {
    const metric_t* m = metric + (b * N + i) * Cm;
    macc_t ss = 0;
    for (int64_t c = lane; c < Cm; c += 32) {
      const macc_t v = static_cast<macc_t>(m[c]);
      ss += v * v;
    }
    ss = warp_sum(ss);
    if (lane == 0) {
      const macc_t n = sqrt(ss);
      const macc_t eps = static_cast<macc_t>(COSINE_EPS);
      norm[b * N + i] = isnan(n) ? n : (n > eps ? n : eps);
    }
  }
}

template <typename metric_t, typename macc_t>
__global__ void match_kernel(const metric_t* __restrict__ metric, const macc_t* __restrict__ norm,
                             const int* __restrict__ cand, const int* __restrict__ src, int64_t B,
                             int64_t N, int64_t Cm, int64_t K, int64_t r, int64_t* __restrict__ index) {
  const int lane = threadIdx.x & 31;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (gw >= B * r) return;  // uniform per warp
  const int64_t b = gw / r, q = gw % r;
  const int64_t i = src[b * r + q];
  const metric_t* mi = metric + (b * N + i) * Cm;
  macc_t best = 0;
  int64_t best_j = -1;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t j = cand[b * K + k];
    const metric_t* mj = metric + (b * N + j) * Cm;
    macc_t dot = 0;
    for (int64_t c = lane; c < Cm; c += 32) {
      dot += static_cast<macc_t>(mi[c]) * static_cast<macc_t>(mj[c]);
    }
    dot = __shfl_sync(kFullMask, warp_sum(dot), 0);
    // |m_i| is the same for every candidate: dividing by |m_j| alone keeps the argmax.
    const macc_t sim = dot / norm[b * N + j];
    if (best_j < 0 || ranks_above(sim, best)) {
      best = sim;
      best_j = j;
    }
  }
  if (lane == 0) index[b * N + i] = index[b * N + best_j];
}

template <typename scalar_t, typename acc_t>
__global__ void merge_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ scores,
                             const acc_t* __restrict__ size, const int64_t* __restrict__ index,
                             int64_t N, int64_t C, int64_t n_out, int mode,
                             scalar_t* __restrict__ out, acc_t* __restrict__ size_out) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem[];
  acc_t* share = reinterpret_cast<acc_t*>(smem);        // [N]
  int* members = reinterpret_cast<int*>(share + N);     // [N]
  __shared__ int count;
  const int64_t b = blockIdx.x / n_out, d = blockIdx.x % n_out;
  collect_members(index + b * N, N, d, members, &count);
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t W = 0, sz = 0;
    for (int k = 0; k < count; ++k) {
      const int64_t t = b * N + members[k];
      const acc_t s = size != nullptr ? size[t] : acc_t(1);
      share[k] = merge_weight<acc_t>(s, scores[t], mode);
      W += share[k];
      sz += s;
    }
    for (int k = 0; k < count; ++k) share[k] = share[k] / W;
    size_out[b * n_out + d] = sz;
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t acc = 0;
    for (int k = 0; k < count; ++k) {
      acc += static_cast<acc_t>(x[(b * N + members[k]) * C + c]) * share[k];
    }
    out[(b * n_out + d) * C + c] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void merge_backward_kernel(const scalar_t* __restrict__ grad_x,
                                      const acc_t* __restrict__ grad_size,
                                      const scalar_t* __restrict__ x, const acc_t* __restrict__ scores,
                                      const acc_t* __restrict__ size,
                                      const int64_t* __restrict__ index, int64_t N, int64_t C,
                                      int64_t n_out, int mode, scalar_t* __restrict__ gx,
                                      acc_t* __restrict__ gscores, acc_t* __restrict__ gsize) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem[];
  acc_t* share = reinterpret_cast<acc_t*>(smem);  // [N]
  acc_t* s = share + N;                           // [N] <g_d, x_i>
  int* members = reinterpret_cast<int*>(s + N);   // [N]
  __shared__ int count;
  __shared__ acc_t W_sh, A_sh;
  const int64_t b = blockIdx.x / n_out, d = blockIdx.x % n_out;
  const scalar_t* g = grad_x + (b * n_out + d) * C;
  collect_members(index + b * N, N, d, members, &count);
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t W = 0;
    for (int k = 0; k < count; ++k) {
      const int64_t t = b * N + members[k];
      share[k] = merge_weight<acc_t>(size != nullptr ? size[t] : acc_t(1), scores[t], mode);
      W += share[k];
    }
    for (int k = 0; k < count; ++k) share[k] = share[k] / W;
    W_sh = W;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int k = warp; k < count; k += nwarps) {
    const scalar_t* xi = x + (b * N + members[k]) * C;
    acc_t v = 0;
    for (int64_t c = lane; c < C; c += 32) v += static_cast<acc_t>(g[c]) * static_cast<acc_t>(xi[c]);
    v = warp_sum(v);
    if (lane == 0) s[k] = v;
  }
  for (int64_t e = threadIdx.x; e < count * C; e += blockDim.x) {
    const int64_t k = e / C, c = e % C;
    gx[(b * N + members[k]) * C + c] = static_cast<scalar_t>(share[k] * static_cast<acc_t>(g[c]));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t A = 0;
    for (int k = 0; k < count; ++k) A += share[k] * s[k];
    A_sh = A;
  }
  __syncthreads();
  const acc_t W = W_sh, A = A_sh, h = grad_size[b * n_out + d];
  const acc_t eps = static_cast<acc_t>(WEIGHT_EPS);
  for (int k = threadIdx.x; k < count; k += blockDim.x) {
    const int64_t t = b * N + members[k];
    const acc_t gw = (s[k] - A) / W;
    if (mode == static_cast<int>(WeightMode::kSize)) {
      gsize[t] = gw + h;
      gscores[t] = 0;
    } else {
      const acc_t sc = scores[t];
      const acc_t sz = size != nullptr ? size[t] : acc_t(1);
      gsize[t] = gw * (isnan(sc) ? sc : (sc > eps ? sc : eps)) + h;
      gscores[t] = sc > eps ? gw * sz : acc_t(0);
    }
  }
}

inline int block_threads(int64_t C) { return C >= 512 ? 256 : 128; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> mstm_merge_cuda(
    const at::Tensor& x_, const at::Tensor& scores_, const std::optional<at::Tensor>& size_,
    const std::optional<at::Tensor>& metric_, int64_t r, int64_t p, c10::string_view weight) {
  check_merge_forward_args(x_, scores_, size_, metric_, r, p);
  const WeightMode mode = parse_weight(weight);
  TORCH_CHECK_VALUE(x_.is_cuda(), "mstm_merge (CUDA): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor scores = scores_.contiguous();
  const at::Tensor size = size_.has_value() && size_->defined() ? size_->contiguous() : at::Tensor();
  const at::Tensor metric = metric_.has_value() && metric_->defined() ? metric_->contiguous() : x;
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), Cm = metric.size(2);
  const int64_t K = N - p - r, n_out = N - r;
  const int64_t acc_bytes = static_cast<int64_t>(scores.element_size());
  TORCH_CHECK_VALUE(N * (4 + acc_bytes) <= kMaxSharedBytes && N <= INT32_MAX,
                    "mstm_merge (CUDA): N = ", N, " tokens is more than this kernel's shared memory "
                    "holds (", kMaxSharedBytes / (4 + acc_bytes), "); use the Triton or CPU backend");

  at::Tensor out = at::empty({B, n_out, C}, x.options());
  at::Tensor size_out = at::empty({B, n_out}, scores.options());
  at::Tensor index = at::empty({B, N}, x.options().dtype(at::kLong));
  if (B == 0) return {out, size_out, index};
  at::Tensor cand = at::empty({B, K}, x.options().dtype(at::kInt));
  at::Tensor src = at::empty({B, std::max<int64_t>(r, 1)}, x.options().dtype(at::kInt));
  at::Tensor norm = at::empty({B, N}, metric.options().dtype(compute_dtype(metric.scalar_type())));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t words = (N + 31) / 32;

  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mstm_merge_cuda_select", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(),
                                    "mstm_merge_cuda_select_metric", [&] {
      using macc_t = at::opmath_type<scalar_t>;
      select_kernel<acc_t, scalar_t, macc_t><<<B, 256, words * sizeof(unsigned), stream>>>(
          scores.const_data_ptr<acc_t>(), metric.const_data_ptr<scalar_t>(), N, Cm, p, r,
          index.mutable_data_ptr<int64_t>(), cand.mutable_data_ptr<int>(),
          src.mutable_data_ptr<int>(), norm.mutable_data_ptr<macc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (r > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(),
                                    "mstm_merge_cuda_match", [&] {
      using macc_t = at::opmath_type<scalar_t>;
      constexpr int kThreads = 256;
      const int64_t blocks = (B * r + kThreads / 32 - 1) / (kThreads / 32);
      match_kernel<scalar_t, macc_t><<<blocks, kThreads, 0, stream>>>(
          metric.const_data_ptr<scalar_t>(), norm.const_data_ptr<macc_t>(),
          cand.const_data_ptr<int>(), src.const_data_ptr<int>(), B, N, Cm, K, r,
          index.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mstm_merge_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = N * (sizeof(acc_t) + sizeof(int));
    merge_kernel<scalar_t, acc_t><<<B * n_out, block_threads(C), smem, stream>>>(
        x.const_data_ptr<scalar_t>(), scores.const_data_ptr<acc_t>(),
        size.defined() ? size.const_data_ptr<acc_t>() : nullptr, index.const_data_ptr<int64_t>(),
        N, C, n_out, static_cast<int>(mode), out.mutable_data_ptr<scalar_t>(),
        size_out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, size_out, index};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mstm_merge_backward_cuda(
    const at::Tensor& grad_x_, const at::Tensor& grad_size_, const at::Tensor& x_,
    const at::Tensor& scores_, const std::optional<at::Tensor>& size_, const at::Tensor& index_,
    c10::string_view weight) {
  check_merge_backward_args(grad_x_, grad_size_, x_, scores_, size_, index_);
  const WeightMode mode = parse_weight(weight);
  TORCH_CHECK_VALUE(x_.is_cuda(), "mstm_merge_backward (CUDA): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor grad_x = grad_x_.contiguous();
  const at::Tensor grad_size = grad_size_.contiguous();
  const at::Tensor x = x_.contiguous();
  const at::Tensor scores = scores_.contiguous();
  const at::Tensor size = size_.has_value() && size_->defined() ? size_->contiguous() : at::Tensor();
  const at::Tensor index = index_.contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), n_out = grad_x.size(1);
  const int64_t acc_bytes = static_cast<int64_t>(scores.element_size());
  TORCH_CHECK_VALUE(N * (4 + 2 * acc_bytes) <= kMaxSharedBytes,
                    "mstm_merge_backward (CUDA): N = ", N, " tokens is more than this kernel's "
                    "shared memory holds (", kMaxSharedBytes / (4 + 2 * acc_bytes), ")");

  at::Tensor gx = at::empty_like(x);
  at::Tensor gscores = at::empty_like(scores);
  at::Tensor gsize = at::empty_like(scores);
  if (B * n_out == 0 || C == 0) return {gx.zero_(), gscores.zero_(), gsize.zero_()};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "mstm_merge_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = N * (2 * sizeof(acc_t) + sizeof(int));
    merge_backward_kernel<scalar_t, acc_t><<<B * n_out, block_threads(C), smem, stream>>>(
        grad_x.const_data_ptr<scalar_t>(), grad_size.const_data_ptr<acc_t>(),
        x.const_data_ptr<scalar_t>(), scores.const_data_ptr<acc_t>(),
        size.defined() ? size.const_data_ptr<acc_t>() : nullptr, index.const_data_ptr<int64_t>(),
        N, C, n_out, static_cast<int>(mode), gx.mutable_data_ptr<scalar_t>(),
        gscores.mutable_data_ptr<acc_t>(), gsize.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gscores, gsize};
}

}  // namespace
}  // namespace fastprune

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("mstm_merge", &fastprune::mstm_merge_cuda);
  m.impl("mstm_merge_backward", &fastprune::mstm_merge_backward_cuda);
}
