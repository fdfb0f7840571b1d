// Schemas of the define_ops custom ops (declared once here; CPU and CUDA code attach
// implementations with TORCH_LIBRARY_IMPL) and the argument checks every backend shares.
#include <ATen/core/Tensor.h>
#include <Python.h>
#include <torch/library.h>

#include "common/cpu_buffer_pool.h"
#include "common/step_params.h"

namespace define_ops {

namespace {
void check_optional_vector(const std::optional<at::Tensor>& t, const char* name, int64_t size, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == size, "define_ops::hgt_step: ", name, " must have shape [", size,
                    "], got ", t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "define_ops::hgt_step: ", name, " has dtype ",
                   t->scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(t->device() == x.device(), "define_ops::hgt_step: ", name, " is on ", t->device(),
                    " but x is on ", x.device());
}
}  // namespace

StepParams make_step_params(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
                            const std::optional<at::Tensor>& seed, int64_t e_width, int64_t e_in_chunks,
                            int64_t e_out_chunks, bool shuffle, std::string_view activation, double dropout_p,
                            double norm_eps) {
  TORCH_CHECK_VALUE(x.dim() == 2, "define_ops::hgt_step: x must be 2-D [T, a], got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 3, "define_ops::hgt_step: weight must be 3-D [g, a/g, b/g], got shape ",
                    weight.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "define_ops::hgt_step: x must be floating point, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "define_ops::hgt_step: weight has dtype ",
                   weight.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "define_ops::hgt_step: weight is on ", weight.device(),
                    " but x is on ", x.device());
  StepParams p;
  p.tokens = x.size(0);
  p.in_width = x.size(1);
  p.groups = weight.size(0);
  p.in_group = weight.size(1);
  p.out_group = weight.size(2);
  TORCH_CHECK_VALUE(p.groups >= 1 && p.in_group * p.groups == p.in_width,
                    "define_ops::hgt_step: weight shape ", weight.sizes(), " does not match x width ", p.in_width,
                    " (need weight [g, a/g, b/g] with g * a/g == a)");
  // Empty groups would make the layouts' chunk widths 0 (a division by zero) and let g grow unbounded.
  TORCH_CHECK_VALUE(p.in_group >= 1 && p.out_group >= 1, "define_ops::hgt_step: weight shape ", weight.sizes(),
                    " has empty groups (need a/g >= 1 and b/g >= 1)");
  TORCH_CHECK_VALUE(e_width >= 0 && e_in_chunks >= 0 && e_out_chunks >= 0, "define_ops::hgt_step: e_width=",
                    e_width, ", e_in_chunks=", e_in_chunks, " and e_out_chunks=", e_out_chunks,
                    " must not be negative");
  p.out_h = p.groups * p.out_group;
  check_optional_vector(bias, "bias", p.out_h, x);
  TORCH_CHECK_VALUE(norm_weight.has_value() == norm_bias.has_value(),
                    "define_ops::hgt_step: norm_weight and norm_bias must be given together");
  check_optional_vector(norm_weight, "norm_weight", p.out_group, x);
  check_optional_vector(norm_bias, "norm_bias", p.out_group, x);
  p.bias = bias.has_value();
  p.norm = norm_weight.has_value();
  p.shuffle = shuffle && p.groups > 1;
  p.activation = parse_activation(activation);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "define_ops::hgt_step: dropout_p must be in [0, 1), got ",
                    dropout_p);
  p.dropout_p = dropout_p;
  if (dropout_p > 0.0) {
    TORCH_CHECK_VALUE(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong,
                      "define_ops::hgt_step: dropout_p=", dropout_p, " needs a one-element int64 seed tensor");
  }
  TORCH_CHECK_VALUE(norm_eps > 0.0, "define_ops::hgt_step: norm_eps must be > 0, got ", norm_eps);
  p.norm_eps = norm_eps;
  p.e_width = e_width;
  p.carry_e = e_out_chunks > 0;
  p.out_width = p.out_h;
  if (p.carry_e) {
    TORCH_CHECK_VALUE(e_width >= 1 && e_width <= p.in_width, "define_ops::hgt_step: e_width=", e_width,
                      " must be in [1, ", p.in_width, "] when e_out_chunks > 0");
    TORCH_CHECK_VALUE(e_in_chunks >= 1, "define_ops::hgt_step: e_out_chunks=", e_out_chunks,
                      " copies e from x, so e_in_chunks must be >= 1, got ", e_in_chunks);
    TORCH_CHECK_VALUE(e_width % e_in_chunks == 0 && (p.in_width - e_width) % e_in_chunks == 0,
                      "define_ops::hgt_step: x width ", p.in_width, " with e_width=", e_width,
                      " cannot be split into e_in_chunks=", e_in_chunks, " chunks");
    TORCH_CHECK_VALUE(e_width % e_out_chunks == 0 && p.out_h % e_out_chunks == 0,
                      "define_ops::hgt_step: e_width=", e_width, " and output width ", p.out_h,
                      " must both be divisible by e_out_chunks=", e_out_chunks);
    p.in_layout = MixLayout{e_width / e_in_chunks, (p.in_width - e_width) / e_in_chunks};
    p.out_layout = MixLayout{e_width / e_out_chunks, p.out_h / e_out_chunks};
    p.out_width = p.out_h + e_width;
  }
  return p;
}

void check_backward_inputs(const StepParams& p, const at::Tensor& x, const at::Tensor& grad_out,
                           const at::Tensor& saved, const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == p.tokens && grad_out.size(1) == p.out_width,
                    "define_ops::hgt_step_backward: grad_out must be [", p.tokens, ", ", p.out_width, "], got ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.device() == x.device() && grad_out.scalar_type() == x.scalar_type(),
                    "define_ops::hgt_step_backward: grad_out must match x's device and dtype, got ",
                    grad_out.device(), " ", grad_out.scalar_type());
  if (p.needs_saved()) {
    TORCH_CHECK_VALUE(saved.dim() == 2 && saved.size(0) == p.tokens && saved.size(1) == p.out_h &&
                          saved.scalar_type() == x.scalar_type(),
                      "define_ops::hgt_step_backward: saved must be [", p.tokens, ", ", p.out_h, "] ",
                      x.scalar_type());
  }
  if (p.norm) {
    const auto stats_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK_VALUE(mean.numel() == p.tokens * p.groups && rstd.numel() == p.tokens * p.groups &&
                          mean.scalar_type() == stats_dtype && rstd.scalar_type() == stats_dtype,
                      "define_ops::hgt_step_backward: mean and rstd must be [", p.tokens, ", ", p.groups, "] ",
                      stats_dtype);
  }
}

}  // namespace define_ops

TORCH_LIBRARY(define_ops, m) {
  // ids [*] int32/int64 → e [numel, n] = weight[ids] · scale, padding ids give zeros.
  m.def("embedding_lookup(Tensor weight, Tensor ids, int? padding_idx, float scale) -> Tensor");
  // Dense gradient of the table [V, n]; rows of padding ids get nothing.
  m.def(
      "embedding_lookup_backward(Tensor grad, Tensor ids, int num_embeddings, int? padding_idx, float scale) -> "
      "Tensor");
  // One HGT layer: grouped GEMM → +bias → shuffle → per-group LayerNorm → activation → dropout,
  // written in the next layer's mix(e, h) layout. Returns (out, saved pre-norm values in GEMM
  // order, mean, rstd); the last three are empty when the backward does not need them.
  m.def(
      "hgt_step(Tensor x, Tensor weight, Tensor? bias, Tensor? norm_weight, Tensor? norm_bias, Tensor? seed, "
      "int e_width, int e_in_chunks, int e_out_chunks, bool shuffle, str activation, float dropout_p, "
      "float norm_eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // Its backward: (grad_x incl. the e pass-through, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias).
  m.def(
      "hgt_step_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? norm_weight, "
      "Tensor? norm_bias, Tensor? seed, Tensor saved, Tensor mean, Tensor rstd, int e_width, int e_in_chunks, "
      "int e_out_chunks, bool shuffle, str activation, float dropout_p, float norm_eps) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The whole stack in one call: hgt_step for every step in turn, step i + 1 reading step i's output.
  // Returns (out, values, stats): the last step's output, and what the backward reads (every other
  // output, the pre-norm values, the statistics) in one buffer per dtype; both are empty with
  // keep_for_backward=false (inference: each step's memory is freed as soon as the next has read it).
  m.def(
      "hgt_stack(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor?[] norm_weights, Tensor?[] norm_biases, "
      "Tensor?[] seeds, int[] e_widths, int[] e_in_chunks, int[] e_out_chunks, bool[] shuffles, str[] activations, "
      "float[] dropout_ps, float[] norm_eps, bool keep_for_backward) -> (Tensor, Tensor, Tensor)");
  // Its backward: (grad_x, grads), grads holding every weight, bias, γ and β gradient, step by step
  // (define_ops.ops.split_stack_grads cuts it into views).
  m.def(
      "hgt_stack_backward(Tensor grad_out, Tensor x, Tensor values, Tensor stats, Tensor[] weights, "
      "Tensor?[] biases, Tensor?[] norm_weights, Tensor?[] norm_biases, Tensor?[] seeds, int[] e_widths, "
      "int[] e_in_chunks, int[] e_out_chunks, bool[] shuffles, str[] activations, float[] dropout_ps, "
      "float[] norm_eps) -> (Tensor, Tensor)");
  // The pool of large CPU buffers (csrc/common/cpu_buffer_pool.h): (cached bytes, cached blocks,
  // hits, misses), and the release of every cached block. No tensor arguments: one kernel for all keys.
  m.def("cpu_cache_stats() -> int[]", [] { return define_ops::cpu_cache_stats(); });
  m.def("empty_cpu_cache() -> ()", [] { define_ops::empty_cpu_cache(); });
}

// `from define_ops import _C` loads this library so the registrations above run; the module
// itself is empty (no pybind11: the ops are reached through torch.ops.define_ops).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
