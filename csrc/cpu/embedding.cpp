// CPU forward and backward of the Map step (define_ops::embedding_lookup): e = weight[ids] · scale.
//
// Ids are checked here, inside the op, so a bad id raises a Python IndexError naming the value
// even under torch.compile, where the Python-side check is skipped.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/cpu_buffer_pool.h"
#include "../common/embedding_args.h"
#include "convert.h"

namespace define_ops {
namespace {

void check_ids(const at::Tensor& ids, int64_t num_embeddings) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
                   "define_ops::embedding_lookup: ids must be int64 or int32, got ", ids.scalar_type());
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "define_ops_check_ids", [&] {
    const index_t* id = ids.const_data_ptr<index_t>();
    for (int64_t i = 0; i < ids.numel(); ++i) {
      TORCH_CHECK_INDEX(id[i] >= 0 && id[i] < num_embeddings, "define_ops: token id ", static_cast<int64_t>(id[i]),
                        " at flat position ", i, " is out of range for num_embeddings=", num_embeddings);
    }
  });
}

at::Tensor embedding_lookup_cpu(const at::Tensor& weight,  // [V, n]
                                const at::Tensor& ids,     // [*] int32/int64
                                std::optional<int64_t> padding_idx, double scale) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "define_ops::embedding_lookup: weight must be [V, n], got ", weight.sizes());
  TORCH_CHECK_VALUE(ids.device() == weight.device(), "define_ops::embedding_lookup: ids are on ", ids.device(),
                    " but the table is on ", weight.device());
  const int64_t num_embeddings = weight.size(0), width = weight.size(1);
  const at::Tensor flat = ids.reshape({-1}).contiguous();
  check_ids(flat, num_embeddings);
  const at::Tensor table = weight.contiguous();
  at::Tensor e = at::empty({flat.numel(), width}, weight.options());
  const int64_t pad = normalized_padding_idx(padding_idx, num_embeddings).value_or(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "embedding_lookup_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(flat.scalar_type(), "embedding_lookup_cpu_ids", [&] {
      const index_t* id = flat.const_data_ptr<index_t>();
      const scalar_t* src = table.const_data_ptr<scalar_t>();
      scalar_t* dst = e.data_ptr<scalar_t>();
      at::parallel_for(0, flat.numel(), 64, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          scalar_t* row = dst + i * width;
          if (id[i] == pad) {
            std::fill(row, row + width, scalar_t(0));
            continue;
          }
          const scalar_t* from = src + static_cast<int64_t>(id[i]) * width;
          for (int64_t c = 0; c < width; ++c) {
            row[c] = cpu_convert::from_acc<scalar_t>(cpu_convert::to_acc(from[c]) * acc_t(scale));
          }
        }
      });
    });
  });
  return e;
}

// Dense [V, n] gradient. Threads own disjoint column ranges and walk the ids in order, so the
// sum for a repeated id is always taken in the same order (deterministic, no atomics).
at::Tensor embedding_lookup_backward_cpu(const at::Tensor& grad,  // [numel, n]
                                         const at::Tensor& ids,   // [*] int32/int64
                                         int64_t num_embeddings, std::optional<int64_t> padding_idx,
                                         double scale) {
  const at::Tensor flat = ids.reshape({-1}).contiguous();
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == flat.numel(),
                    "define_ops::embedding_lookup_backward: grad must be [", flat.numel(), ", n], got ",
                    grad.sizes());
  check_num_embeddings(num_embeddings);
  check_ids(flat, num_embeddings);  // the rows below are written through them
  const int64_t width = grad.size(1);
  const at::Tensor g = grad.contiguous();
  const auto acc_dtype = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // A pooled block, zeroed: at lstm_wt103 this is the 274 MB [V, n] gradient of every step.
  at::Tensor acc = empty_buffer({num_embeddings, width}, grad.options().dtype(acc_dtype)).zero_();
  const int64_t pad = normalized_padding_idx(padding_idx, num_embeddings).value_or(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "embedding_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(flat.scalar_type(), "embedding_backward_cpu_ids", [&] {
      const index_t* id = flat.const_data_ptr<index_t>();
      const scalar_t* src = g.const_data_ptr<scalar_t>();
      acc_t* dst = acc.data_ptr<acc_t>();
      at::parallel_for(0, width, 16, [&](int64_t col_begin, int64_t col_end) {
        for (int64_t i = 0; i < flat.numel(); ++i) {
          if (id[i] == pad) continue;
          acc_t* row = dst + static_cast<int64_t>(id[i]) * width;
          const scalar_t* from = src + i * width;
          for (int64_t c = col_begin; c < col_end; ++c) row[c] += cpu_convert::to_acc(from[c]) * acc_t(scale);
        }
      });
    });
  });
  return acc.scalar_type() == grad.scalar_type() ? acc : acc.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(define_ops, CPU, m) {
  m.impl("embedding_lookup", &embedding_lookup_cpu);
  m.impl("embedding_lookup_backward", &embedding_lookup_backward_cpu);
}

}  // namespace define_ops
