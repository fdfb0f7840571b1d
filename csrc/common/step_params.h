// Shape and layout arithmetic of one HGT layer step, shared by the CPU and CUDA kernels.
//
// A layer reads x [T, a] (groups of a/g contiguous features) and produces h [T, b]. When the
// layer carries the skip connection, its output is mix(e, h, c): c chunks, chunk j holding
// [e_j ‖ h_j] with e_j = e[j·n/c, (j+1)·n/c) and h_j = h[j·b/c, (j+1)·b/c); c = 1 is [e ‖ h].
// Its input x holds e the same way with c_in chunks (layer 1: x = e, c_in = 1).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

namespace define_ops {

enum class Activation : int { kNone = 0, kGelu = 1, kRelu = 2, kSwish = 3 };

inline Activation parse_activation(std::string_view name) {
  if (name == "none" || name.empty()) return Activation::kNone;
  if (name == "gelu") return Activation::kGelu;
  if (name == "relu") return Activation::kRelu;
  if (name == "swish") return Activation::kSwish;
  TORCH_CHECK_VALUE(false, "define_ops::hgt_step: unknown activation '", std::string(name),
                    "' (expected none, gelu, relu or swish)");
}

// Position of element q of e, or p of h, inside a mix(e, h, chunks) row.
struct MixLayout {
  int64_t e_chunk = 0;  // n / chunks
  int64_t h_chunk = 0;  // b / chunks
  C10_HOST_DEVICE int64_t e_pos(int64_t q) const {
    return (q / e_chunk) * (e_chunk + h_chunk) + q % e_chunk;
  }
  C10_HOST_DEVICE int64_t h_pos(int64_t p) const {
    return (p / h_chunk) * (e_chunk + h_chunk) + e_chunk + p % h_chunk;
  }
};

struct StepParams {
  int64_t tokens = 0;     // T
  int64_t in_width = 0;   // a
  int64_t out_h = 0;      // b
  int64_t groups = 0;     // g
  int64_t in_group = 0;   // a / g
  int64_t out_group = 0;  // b / g (= s, the shuffle and norm group size)
  int64_t e_width = 0;    // n
  int64_t out_width = 0;  // b, or n + b with the skip
  bool carry_e = false;   // output is mix(e, h, e_out_chunks)
  MixLayout in_layout;    // where e sits in x (valid when carry_e)
  MixLayout out_layout;   // where e and h go in the output (valid when carry_e)
  bool shuffle = false;
  bool norm = false;
  bool bias = false;
  Activation activation = Activation::kNone;
  double dropout_p = 0.0;
  uint64_t seed = 0;
  double norm_eps = 1e-5;

  // Feature p of the (shuffled) output comes from GEMM column src(p): z[t·g + i] = y[i·s + t].
  C10_HOST_DEVICE int64_t src(int64_t p) const {
    return shuffle ? (p % groups) * out_group + p / groups : p;
  }
  C10_HOST_DEVICE int64_t out_pos(int64_t p) const { return carry_e ? out_layout.h_pos(p) : p; }
  bool needs_saved() const { return norm || activation != Activation::kNone; }
  bool plain() const { return !needs_saved() && !shuffle && dropout_p == 0.0 && !carry_e; }
};

// Validates every argument of hgt_step / hgt_step_backward and derives the layout.
StepParams make_step_params(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
                            const std::optional<at::Tensor>& seed, int64_t e_width, int64_t e_in_chunks,
                            int64_t e_out_chunks, bool shuffle, std::string_view activation, double dropout_p,
                            double norm_eps);

// Validates hgt_step_backward's own inputs (the gradient and what the forward saved) against p.
void check_backward_inputs(const StepParams& p, const at::Tensor& x, const at::Tensor& grad_out,
                           const at::Tensor& saved, const at::Tensor& mean, const at::Tensor& rstd);

}  // namespace define_ops
