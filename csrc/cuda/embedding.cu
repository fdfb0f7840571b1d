// CUDA forward and backward of the Map step (define_ops::embedding_lookup): e = weight[ids] · scale,
// same semantics as csrc/cpu/embedding.cpp.
//
// Out-of-range ids: the CPU op raises IndexError, which on the GPU would need a host
// synchronisation per call. Here the kernels never read or write out of bounds: the forward
// writes a row of NaN for such an id (so the error cannot pass silently) and the backward skips
// it. DeFINE.forward checks ids on the host before calling the op (validate_ids=True, the
// default; skipped under torch.compile).
//
// Backward: the gradient reaches only the touched rows, deterministically: the ids are sorted
// (stable, as 32-bit keys), and one warp per distinct id sums its rows in their original order;
// padding rows get nothing. Up to kSmallBatchTokens ids there is no sort: a warp per token finds
// the id's other occurrences itself (the sort alone took ~30 us for 1,400 ids on an H100). The result is the dense [V, n] gradient the op's schema promises, so the untouched rows
// are one memset (see README, "Gradients of the table").
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common/embedding_args.h"

#include <algorithm>
#include <climits>
#include <cmath>

#include "cuda_utils.cuh"

namespace define_ops {
namespace {

using cuda::Vec;

constexpr int kLookupThreads = 256;
constexpr int kBackwardThreads = 256;  // 8 warps, one sorted position each at a time
// Largest batch whose backward skips the sort. ATen sorts up to 4096 keys with one block
// (radixSortKVInPlace: ~30 us on an H100 at 1,400 keys, the awd_ptb batch); the sort-free kernel
// scans the batch's ids once per token, O(T^2 / 32) compares. DEFINE_OPS_CUDA_SMALL_BATCH_TOKENS
// (read once; 0 always sorts) moves the threshold for a GPU session's comparison.
constexpr int64_t kSmallBatchTokensDefault = 4096;

int64_t small_batch_tokens() {
  static const int64_t limit =
      cuda::env_integer("DEFINE_OPS_CUDA_SMALL_BATCH_TOKENS", kSmallBatchTokensDefault, 0, int64_t{1} << 20);
  return limit;
}

// ============================================================================ forward
// A block covers 256 / 2^row_shift rows at a time; 2^row_shift threads share a row, each moving V
// consecutive scalars (16 bytes where aligned, else 1) per step. No 64-bit division per element.
template <typename scalar_t, typename index_t, int V>
__global__ void __launch_bounds__(kLookupThreads)
    embedding_lookup_kernel(const scalar_t* __restrict__ weight,  // [num_embeddings, width]
                            const index_t* __restrict__ ids,      // [tokens]
                            scalar_t* __restrict__ out,           // [tokens, width]
                            int64_t tokens, int64_t width, int64_t num_embeddings, bool has_padding,
                            int64_t padding_idx, at::opmath_type<scalar_t> scale, bool scaled, int row_shift) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lanes = 1 << row_shift;
  const int lane = threadIdx.x & (lanes - 1);
  const int rows_per_block = blockDim.x >> row_shift;
  const int64_t vecs_per_row = width / V;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + (threadIdx.x >> row_shift); row < tokens;
       row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t id = static_cast<int64_t>(ids[row]);
    const bool padding = has_padding && id == padding_idx;
    const bool valid = !padding && id >= 0 && id < num_embeddings;  // a bad id is flagged, never dereferenced
    const scalar_t* from = weight + (valid ? id : 0) * width;
    scalar_t* to = out + row * width;
    for (int64_t vec = lane; vec < vecs_per_row; vec += lanes) {
      Vec<scalar_t, V> value;
      if (valid) value = *reinterpret_cast<const Vec<scalar_t, V>*>(from + vec * V);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const acc_t v = valid ? (scaled ? static_cast<acc_t>(value.v[k]) * scale : static_cast<acc_t>(value.v[k]))
                              : (padding ? acc_t(0) : static_cast<acc_t>(NAN));
        value.v[k] = static_cast<scalar_t>(v);
      }
      *reinterpret_cast<Vec<scalar_t, V>*>(to + vec * V) = value;
    }
  }
}

template <typename scalar_t, typename index_t, int V>
void launch_lookup(const at::Tensor& table, const at::Tensor& flat, at::Tensor& e, bool has_padding,
                   int64_t padding_idx, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tokens = flat.numel(), width = table.size(1), vecs_per_row = width / V;
  int row_shift = 0;  // lanes per row: the smallest power of two >= vecs_per_row, at most a block
  while ((1 << row_shift) < vecs_per_row && (1 << row_shift) < kLookupThreads) ++row_shift;
  const int64_t rows_per_block = kLookupThreads >> row_shift;
  const int64_t blocks = std::min<int64_t>((tokens + rows_per_block - 1) / rows_per_block,
                                           static_cast<int64_t>(cuda::num_sms()) * 16);
  cuda::launch_kernel(&embedding_lookup_kernel<scalar_t, index_t, V>, blocks, kLookupThreads, 0,
                      table.const_data_ptr<scalar_t>(), flat.const_data_ptr<index_t>(), e.data_ptr<scalar_t>(), tokens,
                      width, table.size(0), has_padding, padding_idx, static_cast<acc_t>(scale), scale != 1.0,
                      row_shift);
}

at::Tensor embedding_lookup_cuda(const at::Tensor& weight,  // [V, n]
                                 const at::Tensor& ids,     // [*] int32/int64
                                 std::optional<int64_t> padding_idx, double scale) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "define_ops::embedding_lookup: weight must be [V, n], got ", weight.sizes());
  TORCH_CHECK_VALUE(ids.device() == weight.device(), "define_ops::embedding_lookup: ids are on ", ids.device(),
                    " but the table is on ", weight.device());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "define_ops::embedding_lookup: ids must be int64 or int32, got ", ids.scalar_type());
  const cuda::DeviceGuard guard(weight.device());
  padding_idx = normalized_padding_idx(padding_idx, weight.size(0));
  const at::Tensor flat = ids.reshape({-1}).contiguous();
  const at::Tensor table = weight.contiguous();
  const int64_t width = table.size(1);
  at::Tensor e = at::empty({flat.numel(), width}, weight.options());
  if (e.numel() == 0) return e;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "embedding_lookup_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(flat.scalar_type(), "embedding_lookup_cuda_ids", [&] {
      constexpr int V = 16 / sizeof(scalar_t);
      const bool vectorized = width % V == 0 && cuda::is_aligned(table.const_data_ptr<scalar_t>(), 16) &&
                              cuda::is_aligned(e.const_data_ptr<scalar_t>(), 16);
      if (vectorized) {
        launch_lookup<scalar_t, index_t, V>(table, flat, e, padding_idx.has_value(), padding_idx.value_or(0), scale);
      } else {
        launch_lookup<scalar_t, index_t, 1>(table, flat, e, padding_idx.has_value(), padding_idx.value_or(0), scale);
      }
    });
  });
  return e;
}

// ============================================================================ backward
// Whether id's row of the table gradient is written: not padding, inside the table.
template <typename index_t>
__device__ __forceinline__ bool gets_gradient(index_t id, int64_t num_embeddings, bool has_padding,
                                              int64_t padding_idx) {
  return !(has_padding && static_cast<int64_t>(id) == padding_idx) && id >= 0 &&
         static_cast<int64_t>(id) < num_embeddings;
}

// sum += V values of a gradient row · scale (one 16-byte load where V > 1).
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_row(acc_t (&sum)[V], const scalar_t* row, acc_t scale) {
  const Vec<scalar_t, V> values = *reinterpret_cast<const Vec<scalar_t, V>*>(row);
#pragma unroll
  for (int k = 0; k < V; ++k) sum[k] += static_cast<acc_t>(values.v[k]) * scale;
}

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row(scalar_t* out, const acc_t (&sum)[V]) {
  Vec<scalar_t, V> result;
#pragma unroll
  for (int k = 0; k < V; ++k) result.v[k] = static_cast<scalar_t>(sum[k]);
  *reinterpret_cast<Vec<scalar_t, V>*>(out) = result;
}

// Warp w takes sorted positions w, w + warps, ...; a position that starts a run of equal ids sums
// the gradient rows of that run (in original token order: the sort is stable), four rows in
// flight at a time, and writes the id's row of the table gradient once. No atomics.
template <typename scalar_t, typename index_t, int V>
__global__ void __launch_bounds__(kBackwardThreads)
    embedding_backward_kernel(const scalar_t* __restrict__ grad,    // [tokens, width]
                              const index_t* __restrict__ sorted,   // [tokens] ids, ascending
                              const int64_t* __restrict__ order,    // [tokens] token of each sorted id
                              scalar_t* __restrict__ grad_weight,   // [num_embeddings, width], zeros
                              int64_t tokens, int64_t width, int64_t num_embeddings, bool has_padding,
                              int64_t padding_idx, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; i < tokens;
       i += warps) {
    const index_t id = sorted[i];
    if (i > 0 && sorted[i - 1] == id) continue;  // not the first of its run
    if (!gets_gradient(id, num_embeddings, has_padding, padding_idx)) continue;
    for (int64_t col = static_cast<int64_t>(lane) * V; col < width; col += 32 * V) {
      acc_t sum[V];
#pragma unroll
      for (int k = 0; k < V; ++k) sum[k] = acc_t(0);
      int64_t j = i;
      for (; j + 3 < tokens && sorted[j + 3] == id; j += 4) {  // sorted: j .. j + 3 all equal id
        Vec<scalar_t, V> rows[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) rows[r] = *reinterpret_cast<const Vec<scalar_t, V>*>(grad + order[j + r] * width + col);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
#pragma unroll
          for (int k = 0; k < V; ++k) sum[k] += static_cast<acc_t>(rows[r].v[k]) * scale;
        }
      }
      for (; j < tokens && sorted[j] == id; ++j) add_row(sum, grad + order[j] * width + col, scale);
      store_row(grad_weight + static_cast<int64_t>(id) * width + col, sum);
    }
  }
}

// Small batches, no sort: warp w takes tokens w, w + warps, ... A token whose id occurs earlier in
// the batch is skipped; otherwise the warp sums the rows of every occurrence of the id, in token
// order (the order the stable sort gives the sorted path, so the two agree bit for bit), finding
// them 32 ids at a time: one id per lane, the matches gathered into a bit mask by a shuffle sum.
template <typename scalar_t, typename index_t, int V>
__global__ void __launch_bounds__(kBackwardThreads)
    embedding_backward_small_kernel(const scalar_t* __restrict__ grad,  // [tokens, width]
                                    const index_t* __restrict__ ids,    // [tokens]
                                    scalar_t* __restrict__ grad_weight, // [num_embeddings, width], zeros
                                    int64_t tokens, int64_t width, int64_t num_embeddings, bool has_padding,
                                    int64_t padding_idx, at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; i < tokens;
       i += warps) {
    const index_t id = ids[i];
    if (!gets_gradient(id, num_embeddings, has_padding, padding_idx)) continue;
    bool seen_before = false;  // the same for every lane of the warp
    for (int64_t j0 = 0; j0 < i && !seen_before; j0 += 32) {
      const int64_t j = j0 + lane;
      seen_before = cuda::warp_sum(j < i && ids[j] == id ? 1u : 0u) != 0u;
    }
    if (seen_before) continue;
    for (int64_t col = static_cast<int64_t>(lane) * V; col - lane * V < width; col += 32 * V) {
      const bool active = col < width;  // every lane joins the shuffles; a lane past the row only looks
      acc_t sum[V];
#pragma unroll
      for (int k = 0; k < V; ++k) sum[k] = acc_t(0);
      for (int64_t j0 = i; j0 < tokens; j0 += 32) {
        const int64_t j = j0 + lane;
        unsigned matches = cuda::warp_sum(j < tokens && ids[j] == id ? 1u << lane : 0u);  // distinct bits: an OR
        while (matches != 0u) {
          const int64_t row = j0 + cuda::lowest_set_bit(matches);
          matches &= matches - 1u;
          if (active) add_row(sum, grad + row * width + col, scale);
        }
      }
      if (active) store_row(grad_weight + static_cast<int64_t>(id) * width + col, sum);
    }
  }
}

// int64 ids → int32 sort keys: a 32-bit radix sort takes half the passes (and launches) of a
// 64-bit one. Ids outside [0, V) become -1, which the backward kernel skips like every
// out-of-range id, so that no such id can wrap onto a valid row in the narrowing.
__global__ void __launch_bounds__(kLookupThreads)
    narrow_ids_kernel(const int64_t* __restrict__ ids,  // [tokens]
                      int32_t* __restrict__ keys,       // [tokens]
                      int64_t tokens, int64_t num_embeddings) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < tokens; i += stride) {
    const int64_t id = ids[i];
    keys[i] = id >= 0 && id < num_embeddings ? static_cast<int32_t>(id) : -1;
  }
}

at::Tensor sort_keys(const at::Tensor& flat, int64_t num_embeddings) {
  if (flat.scalar_type() != at::kLong || num_embeddings > INT32_MAX) return flat;
  at::Tensor keys = at::empty(flat.sizes(), flat.options().dtype(at::kInt));
  const int64_t tokens = flat.numel();
  const int64_t blocks = std::min<int64_t>((tokens + kLookupThreads - 1) / kLookupThreads,
                                           static_cast<int64_t>(cuda::num_sms()) * 8);
  cuda::launch_kernel(&narrow_ids_kernel, blocks, kLookupThreads, 0, flat.const_data_ptr<int64_t>(),
                      keys.data_ptr<int32_t>(), tokens, num_embeddings);
  return keys;
}

template <typename scalar_t, typename index_t, int V>
void launch_backward(const at::Tensor& grad, const at::Tensor& sorted, const at::Tensor& order,
                     at::Tensor& grad_weight, bool has_padding, int64_t padding_idx, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tokens = sorted.numel();
  constexpr int warps_per_block = kBackwardThreads / 32;
  const int64_t blocks = std::min<int64_t>((tokens + warps_per_block - 1) / warps_per_block,
                                           static_cast<int64_t>(cuda::num_sms()) * 16);
  cuda::launch_kernel(&embedding_backward_kernel<scalar_t, index_t, V>, blocks, kBackwardThreads, 0,
                      grad.const_data_ptr<scalar_t>(), sorted.const_data_ptr<index_t>(),
                      order.const_data_ptr<int64_t>(), grad_weight.data_ptr<scalar_t>(), tokens, grad.size(1),
                      grad_weight.size(0), has_padding, padding_idx, static_cast<acc_t>(scale));
}

template <typename scalar_t, typename index_t, int V>
void launch_small_backward(const at::Tensor& grad, const at::Tensor& ids, at::Tensor& grad_weight, bool has_padding,
                           int64_t padding_idx, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tokens = ids.numel();
  constexpr int warps_per_block = kBackwardThreads / 32;
  const int64_t blocks = std::min<int64_t>((tokens + warps_per_block - 1) / warps_per_block,
                                           static_cast<int64_t>(cuda::num_sms()) * 16);
  cuda::launch_kernel(&embedding_backward_small_kernel<scalar_t, index_t, V>, blocks, kBackwardThreads, 0,
                      grad.const_data_ptr<scalar_t>(), ids.const_data_ptr<index_t>(), grad_weight.data_ptr<scalar_t>(),
                      tokens, grad.size(1), grad_weight.size(0), has_padding, padding_idx, static_cast<acc_t>(scale));
}

at::Tensor embedding_lookup_backward_cuda(const at::Tensor& grad,  // [numel, n]
                                          const at::Tensor& ids,   // [*] int32/int64
                                          int64_t num_embeddings, std::optional<int64_t> padding_idx,
                                          double scale) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "define_ops::embedding_lookup_backward: ids must be int64 or int32, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.device() == grad.device(), "define_ops::embedding_lookup_backward: ids are on ", ids.device(),
                    " but grad is on ", grad.device());
  const cuda::DeviceGuard guard(grad.device());
  const at::Tensor flat = ids.reshape({-1}).contiguous();
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == flat.numel(),
                    "define_ops::embedding_lookup_backward: grad must be [", flat.numel(), ", n], got ",
                    grad.sizes());
  check_num_embeddings(num_embeddings);
  padding_idx = normalized_padding_idx(padding_idx, num_embeddings);
  const int64_t width = grad.size(1);
  at::Tensor grad_weight = at::zeros({num_embeddings, width}, grad.options());
  if (flat.numel() == 0 || width == 0 || num_embeddings == 0) return grad_weight;
  const at::Tensor g = grad.contiguous();
  if (flat.numel() <= small_batch_tokens()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "embedding_backward_small_cuda", [&] {
      AT_DISPATCH_INDEX_TYPES(flat.scalar_type(), "embedding_backward_small_cuda_ids", [&] {
        constexpr int V = 16 / sizeof(scalar_t);
        const bool vectorized = width % V == 0 && cuda::is_aligned(g.const_data_ptr<scalar_t>(), 16) &&
                                cuda::is_aligned(grad_weight.const_data_ptr<scalar_t>(), 16);
        if (vectorized) {
          launch_small_backward<scalar_t, index_t, V>(g, flat, grad_weight, padding_idx.has_value(),
                                                      padding_idx.value_or(0), scale);
        } else {
          launch_small_backward<scalar_t, index_t, 1>(g, flat, grad_weight, padding_idx.has_value(),
                                                      padding_idx.value_or(0), scale);
        }
      });
    });
    return grad_weight;
  }
  const at::Tensor keys = sort_keys(flat, num_embeddings);
  const auto [sorted, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "embedding_backward_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "embedding_backward_cuda_ids", [&] {
      constexpr int V = 16 / sizeof(scalar_t);
      const bool vectorized = width % V == 0 && cuda::is_aligned(g.const_data_ptr<scalar_t>(), 16) &&
                              cuda::is_aligned(grad_weight.const_data_ptr<scalar_t>(), 16);
      if (vectorized) {
        launch_backward<scalar_t, index_t, V>(g, sorted, order, grad_weight, padding_idx.has_value(),
                                              padding_idx.value_or(0), scale);
      } else {
        launch_backward<scalar_t, index_t, 1>(g, sorted, order, grad_weight, padding_idx.has_value(),
                                              padding_idx.value_or(0), scale);
      }
    });
  });
  return grad_weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(define_ops, CUDA, m) {
  m.impl("embedding_lookup", &embedding_lookup_cuda);
  m.impl("embedding_lookup_backward", &embedding_lookup_backward_cuda);
}

}  // namespace define_ops
