// Gather and scatter of token rows on the CPU: the data movement of token idling ("No Token Left
// Behind: Efficient Vision Transformer via Dynamic Token Idling", Xu et al., 2023). In an idle layer
// the K selected tokens are gathered into a dense [B, K, C] batch, go through the block, and are
// scattered back to their positions; every other token stays bit-identical.
//
//   gather_tokens(x [B, N, C], index [B, K])            -> x[b, index[b, k]]             [B, K, C]
//   scatter_tokens(x, index, src [B, K, C])             -> copy of x with rows replaced   [B, N, C]
//   scatter_tokens_inplace(x, index, src)               -> the same, written into x
//   scatter_add_tokens(x, index, src)                   -> copy of x with src rows added  [B, N, C]
//
// Rows are copied as bytes (any dtype); scatter_add accumulates in fp32 (fp64 for fp64) in ascending
// k, so repeated indices (allowed in gather and scatter_add, the backward of gather) are exact and
// deterministic. scatter_tokens rejects repeated indices within an image (the result would depend on
// the write order). All are parallel over rows with at::parallel_for.
#include "fastprune.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace fastprune {
namespace {

inline int64_t row_grain(int64_t bytes) {
  return std::max<int64_t>(1, kGrainSize / std::max<int64_t>(1, bytes / 4));
}

void check_index(const at::Tensor& x, const at::Tensor& index, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 3, op, ": x must have shape [B, N, C], got ", x.sizes());
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(0) == x.size(0), op,
                    ": index must have shape [B, K] with B = ", x.size(0), ", got ", index.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, op, ": index must be int64, got ",
                   index.scalar_type());
  TORCH_CHECK_VALUE(index.device() == x.device(), op, ": index is on ", index.device(),
                    " but x is on ", x.device());
  const int64_t N = x.size(1);
  const at::Tensor idx = index.contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < idx.numel(); ++t) {
    TORCH_CHECK_VALUE(ip[t] >= 0 && ip[t] < N, op, ": index values must lie in [0, N) = [0, ", N,
                      "), got ", ip[t]);
  }
}

void check_src(const at::Tensor& x, const at::Tensor& index, const at::Tensor& src,
               const char* op) {
  TORCH_CHECK_VALUE(src.dim() == 3 && src.size(0) == x.size(0) && src.size(1) == index.size(1) &&
                        src.size(2) == x.size(2),
                    op, ": src must have shape [B, K, C] = [", x.size(0), ", ", index.size(1), ", ",
                    x.size(2), "], got ", src.sizes());
  TORCH_CHECK_TYPE(src.scalar_type() == x.scalar_type(), op, ": src must have x's dtype ",
                   x.scalar_type(), ", got ", src.scalar_type());
  TORCH_CHECK_VALUE(src.device() == x.device(), op, ": src is on ", src.device(), " but x is on ",
                    x.device());
}

void check_unique(const at::Tensor& x, const at::Tensor& index, const char* op) {
  const int64_t B = index.size(0), K = index.size(1), N = x.size(1);
  const at::Tensor idx = index.contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  at::parallel_for(0, B, row_grain(4 * (N + K)), [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> seen(N);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(seen.begin(), seen.end(), uint8_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = ip[b * K + k];
        TORCH_CHECK_VALUE(!seen[n], op, ": index must not repeat a token within an image, but "
                          "image ", b, " lists token ", n, " twice");
        seen[n] = 1;
      }
    }
  });
}

// out[b, index[b, k]] = src[b, k] for contiguous out and src.
void copy_rows_in(at::Tensor& out, const at::Tensor& index, const at::Tensor& src) {
  const int64_t B = index.size(0), K = index.size(1), N = out.size(1);
  const int64_t row = out.size(2) * out.element_size();
  const at::Tensor idx = index.contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  char* op = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, B * K, row_grain(row), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / K;
      std::memcpy(op + (b * N + ip[t]) * row, sp + t * row, row);
    }
  });
}

}  // namespace

at::Tensor gather_tokens_cpu(const at::Tensor& x_, const at::Tensor& index) {
  check_index(x_, index, "gather_tokens");
  const at::Tensor x = x_.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t B = x.size(0), N = x.size(1), K = idx.size(1);
  at::Tensor out = at::empty({B, K, x.size(2)}, x.options());
  const int64_t row = x.size(2) * x.element_size();
  if (out.numel() == 0) return out;
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* op = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, B * K, row_grain(row), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / K;
      std::memcpy(op + t * row, xp + (b * N + ip[t]) * row, row);
    }
  });
  return out;
}

at::Tensor scatter_tokens_cpu(const at::Tensor& x, const at::Tensor& index, const at::Tensor& src) {
  check_index(x, index, "scatter_tokens");
  check_src(x, index, src, "scatter_tokens");
  check_unique(x, index, "scatter_tokens");
  at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
  if (src.numel() > 0) copy_rows_in(out, index, src.contiguous());
  return out;
}

void scatter_tokens_inplace_cpu(const at::Tensor& x, const at::Tensor& index, const at::Tensor& src) {
  check_index(x, index, "scatter_tokens_inplace");
  check_src(x, index, src, "scatter_tokens_inplace");
  TORCH_CHECK_VALUE(x.is_contiguous(), "scatter_tokens_inplace: x must be contiguous (it is written "
                    "in place), got strides ", x.strides());
  check_unique(x, index, "scatter_tokens_inplace");
  at::Tensor out = x;
  if (src.numel() > 0) copy_rows_in(out, index, src.contiguous());
}

at::Tensor scatter_add_tokens_cpu(const at::Tensor& x, const at::Tensor& index,
                                  const at::Tensor& src_) {
  check_index(x, index, "scatter_add_tokens");
  check_src(x, index, src_, "scatter_add_tokens");
  TORCH_CHECK_TYPE(x.is_floating_point(), "scatter_add_tokens: x must be a floating-point tensor, got ",
                   x.scalar_type());
  at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
  const at::Tensor src = src_.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = idx.size(1);
  if (src.numel() == 0) return out;
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  // Sources of every row, in ascending k (counting sort per image).
  std::vector<int64_t> offsets(static_cast<size_t>(B * (N + 1)), 0), members(static_cast<size_t>(B * K));
  at::parallel_for(0, B, row_grain(4 * (N + K)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* off = offsets.data() + b * (N + 1);
      for (int64_t k = 0; k < K; ++k) off[ip[b * K + k] + 1] += 1;
      for (int64_t n = 0; n < N; ++n) off[n + 1] += off[n];
      std::vector<int64_t> fill(off, off + N);
      for (int64_t k = 0; k < K; ++k) members[b * K + fill[ip[b * K + k]]++] = k;
    }
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scatter_add_tokens_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = src.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * N, std::max<int64_t>(1, kGrainSize / (2 * C)),
                     [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(C);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / N, n = t % N;
        const int64_t* off = offsets.data() + b * (N + 1);
        if (off[n] == off[n + 1]) continue;
        scalar_t* o = op + t * C;
        for (int64_t c = 0; c < C; ++c) acc[c] = static_cast<acc_t>(o[c]);
        for (int64_t m = off[n]; m < off[n + 1]; ++m) {
          const scalar_t* s = sp + (b * K + members[b * K + m]) * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(s[c]);
        }
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return out;
}

}  // namespace fastprune
