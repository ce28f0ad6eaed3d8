// CUDA kernels of MSTM's selection and matching and of the weighted merge (CudaKernels, see
// fastprune.h, where the operators are written once for every device): the second GPU backend of
// torch.ops.fastprune.mstm_merge / mstm_merge_backward (the first is Triton, kernels/merge.py) and the
// CUDA backend of weighted_merge / weighted_merge_backward. Semantics: fastprune/reference.py; the
// CPU kernels in merge_cpu.cpp follow the same steps and the same summation order.
//
// mstm_index, two launches (p prefix tokens, K = N - p - r kept):
//   select_kernel  one block per image. Rank of each non-prefix token = number of tokens that rank
//                  above it (larger score, NaN largest, ties to the lower index): O(N^2 / threads),
//                  scores read through L1. Kept tokens (rank < K) go into a shared bitmask; popcounts
//                  give every kept token its output slot and every dropped token its place in the
//                  list of sources. Also the clamped L2 norm of every non-prefix metric row (a warp
//                  per row).
//   match_kernel   one warp per dropped token: cosine similarity with every kept non-prefix token
//                  (lanes over channels, shuffle reduction, lane 0's sum decides), argmax with ties
//                  to the lower index; writes the dropped token's index entry.
// merge: merge_kernel, one block per output token d: warp 0 collects the tokens with index == d in
//   ascending order (ballot compaction) into shared memory, thread 0 sums the weights W_d and sizes
//   in that order, then threads over channels accumulate sum (w_i / W_d) x_i in fp32 (fp64 for fp64).
//   A lone token has share w / w = 1 and is copied exactly (IEEE division: do not build with
//   --use_fast_math); a NaN reaches only the row it is merged into. Tokens whose index lies outside
//   [0, n_out) are members of no group and contribute nothing.
// merge_backward: merge_backward_kernel, one block per output token d, the same member list;
//   s_i = <g_d, x_i> (a warp per member), A_d = sum share_i s_i, grad x_i = share_i g_d,
//   grad w_i = (s_i - A_d) / W_d.
// Shared memory per block: N * (4 + sizeof(acc)) bytes forward, N * (4 + 2 sizeof(acc)) backward;
// N up to 4096 tokens in fp32. Offsets into x are int64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastprune.h"

namespace fastprune {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxSharedBytes = 48 * 1024;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
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

// Thread 0: share[k] = w_k / W of the members and W (ascending order); the block then syncs.
template <typename acc_t>
__device__ void member_shares(const acc_t* w, const int* members, int count, acc_t* share, acc_t* W_out) {
  if (threadIdx.x == 0) {
    acc_t W = 0;
    for (int k = 0; k < count; ++k) {
      share[k] = w[members[k]];
      W += share[k];
    }
    for (int k = 0; k < count; ++k) share[k] = share[k] / W;
    *W_out = W;
  }
  __syncthreads();
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
__global__ void merge_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                             const acc_t* __restrict__ size, const int64_t* __restrict__ index,
                             int64_t N, int64_t C, int64_t n_out, scalar_t* __restrict__ out,
                             acc_t* __restrict__ size_out) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem[];
  acc_t* share = reinterpret_cast<acc_t*>(smem);        // [N]
  int* members = reinterpret_cast<int*>(share + N);     // [N]
  __shared__ int count;
  __shared__ acc_t W;
  const int64_t b = blockIdx.x / n_out, d = blockIdx.x % n_out;
  collect_members(index + b * N, N, d, members, &count);
  __syncthreads();
  member_shares(w + b * N, members, count, share, &W);
  if (threadIdx.x == 0) {
    acc_t sz = 0;
    for (int k = 0; k < count; ++k) sz += size != nullptr ? size[b * N + members[k]] : acc_t(1);
    size_out[b * n_out + d] = sz;
  }
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t acc = -0.0;  // IEEE's additive identity (+0 is not, for -0): a lone token comes out bit for bit
    for (int k = 0; k < count; ++k) {
      acc += static_cast<acc_t>(x[(b * N + members[k]) * C + c]) * share[k];
    }
    out[(b * n_out + d) * C + c] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void merge_backward_kernel(const scalar_t* __restrict__ grad_x,
                                      const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                                      const int64_t* __restrict__ index, int64_t N, int64_t C,
                                      int64_t n_out, scalar_t* __restrict__ gx,
                                      acc_t* __restrict__ gw) {
  extern __shared__ __align__(sizeof(double)) unsigned char smem[];
  acc_t* share = reinterpret_cast<acc_t*>(smem);  // [N]
  acc_t* s = share + N;                           // [N] <g_d, x_i>
  int* members = reinterpret_cast<int*>(s + N);   // [N]
  __shared__ int count;
  __shared__ acc_t W, A_sh;
  const int64_t b = blockIdx.x / n_out, d = blockIdx.x % n_out;
  const scalar_t* g = grad_x + (b * n_out + d) * C;
  collect_members(index + b * N, N, d, members, &count);
  __syncthreads();
  member_shares(w + b * N, members, count, share, &W);
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
  for (int k = threadIdx.x; k < count; k += blockDim.x) {
    gw[b * N + members[k]] = (s[k] - A_sh) / W;
  }
}

inline int block_threads(int64_t C) { return C >= 512 ? 256 : 128; }

// N tokens of `per_token` shared bytes each must fit one block's shared memory.
inline void check_shared_memory(int64_t N, int64_t per_token, const char* op) {
  TORCH_CHECK_VALUE(N * per_token <= kMaxSharedBytes && N <= INT32_MAX, op, " (CUDA): N = ", N,
                    " tokens is more than this kernel's shared memory holds (",
                    kMaxSharedBytes / per_token, "); use the Triton or CPU backend");
}

}  // namespace

struct CudaKernels {
  using Guard = c10::cuda::CUDAGuard;

  static at::Tensor mstm_index(const at::Tensor& scores, const at::Tensor& metric, int64_t r,
                               int64_t p) {
    const int64_t B = scores.size(0), N = scores.size(1), Cm = metric.size(2), K = N - p - r;
    at::Tensor index = at::empty({B, N}, scores.options().dtype(at::kLong));
    at::Tensor cand = at::empty({B, K}, scores.options().dtype(at::kInt));
    at::Tensor src = at::empty({B, std::max<int64_t>(r, 1)}, scores.options().dtype(at::kInt));
    at::Tensor norm = at::empty({B, N}, metric.options().dtype(compute_dtype(metric.scalar_type())));
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t words = (N + 31) / 32;
    AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mstm_index_cuda_select", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(),
                                      "mstm_index_cuda_select_metric", [&] {
        using macc_t = at::opmath_type<scalar_t>;
        select_kernel<acc_t, scalar_t, macc_t><<<B, 256, words * sizeof(unsigned), stream>>>(
            scores.const_data_ptr<acc_t>(), metric.const_data_ptr<scalar_t>(), N, Cm, p, r,
            index.mutable_data_ptr<int64_t>(), cand.mutable_data_ptr<int>(),
            src.mutable_data_ptr<int>(), norm.mutable_data_ptr<macc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    if (r == 0) return index;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(),
                                    "mstm_index_cuda_match", [&] {
      using macc_t = at::opmath_type<scalar_t>;
      constexpr int kThreads = 256;
      const int64_t blocks = (B * r + kThreads / 32 - 1) / (kThreads / 32);
      match_kernel<scalar_t, macc_t><<<blocks, kThreads, 0, stream>>>(
          metric.const_data_ptr<scalar_t>(), norm.const_data_ptr<macc_t>(),
          cand.const_data_ptr<int>(), src.const_data_ptr<int>(), B, N, Cm, K, r,
          index.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return index;
  }

  static std::tuple<at::Tensor, at::Tensor> merge(const at::Tensor& x, const at::Tensor& w,
                                                  const at::Tensor& size, const at::Tensor& index,
                                                  int64_t n_out) {
    const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
    check_shared_memory(N, 4 + static_cast<int64_t>(w.element_size()), "weighted_merge");
    at::Tensor out = at::empty({B, n_out, C}, x.options());
    at::Tensor size_out = at::empty({B, n_out}, w.options());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "weighted_merge_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const size_t smem = N * (sizeof(acc_t) + sizeof(int));
      merge_kernel<scalar_t, acc_t><<<B * n_out, block_threads(C), smem, stream>>>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
          size.defined() ? size.const_data_ptr<acc_t>() : nullptr, index.const_data_ptr<int64_t>(),
          N, C, n_out, out.mutable_data_ptr<scalar_t>(), size_out.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {out, size_out};
  }

  static std::tuple<at::Tensor, at::Tensor> merge_backward(const at::Tensor& grad_x,
                                                           const at::Tensor& x, const at::Tensor& w,
                                                           const at::Tensor& index) {
    const int64_t B = x.size(0), N = x.size(1), C = x.size(2), n_out = grad_x.size(1);
    check_shared_memory(N, 4 + 2 * static_cast<int64_t>(w.element_size()), "weighted_merge_backward");
    at::Tensor gx = at::zeros_like(x);  // tokens outside every group get no gradient
    at::Tensor gw = at::zeros_like(w);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "weighted_merge_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const size_t smem = N * (2 * sizeof(acc_t) + sizeof(int));
      merge_backward_kernel<scalar_t, acc_t><<<B * n_out, block_threads(C), smem, stream>>>(
          grad_x.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
          index.const_data_ptr<int64_t>(), N, C, n_out, gx.mutable_data_ptr<scalar_t>(),
          gw.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {gx, gw};
  }
};

}  // namespace fastprune

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  fastprune::impl_merge_ops<fastprune::CudaKernels>(m);
}
