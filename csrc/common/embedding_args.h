// Argument checks shared by every backend's embedding_lookup ops (CPU and CUDA).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace define_ops {

// padding_idx as nn.Embedding takes it: none, or a row in [-V, V), a negative one counted from the
// end. Returned as a row in [0, V) (or none); anything else is a clear error, never a silent no-op.
inline std::optional<int64_t> normalized_padding_idx(std::optional<int64_t> padding_idx, int64_t num_embeddings) {
  if (!padding_idx.has_value()) return padding_idx;
  const int64_t row = *padding_idx;
  TORCH_CHECK_VALUE(row >= -num_embeddings && row < num_embeddings, "define_ops::embedding_lookup: padding_idx=",
                    row, " is out of range for num_embeddings=", num_embeddings);
  return row < 0 ? row + num_embeddings : row;
}

inline void check_num_embeddings(int64_t num_embeddings) {
  TORCH_CHECK_VALUE(num_embeddings >= 0, "define_ops::embedding_lookup_backward: num_embeddings=", num_embeddings,
                    " must not be negative");
}

}  // namespace define_ops
