// The whole HGT stack (every layer and the Reduce) in one op call per direction:
// define_ops::hgt_stack and define_ops::hgt_stack_backward, on top of a backend's step bodies.
//
// Why: eager DeFINE used to call the step ops once per layer and direction. On a GPU host each of
// those calls is Python argument parsing, a dispatch and about five allocations (82 `aten::empty`
// per awd_ptb training step in the H100 profile, ~4.6 us each there), and the host, not the GPU,
// set the step time. Here the loop over the steps runs in C++, and what the backward needs (every
// step's output but the last, the pre-norm values, the LayerNorm statistics) is carved out of one
// buffer per dtype, `values` and `stats`, which the forward returns whole: the backward recomputes
// where each piece sits from the same arguments (StackLayout). The backward's parameter gradients
// likewise come back as one buffer, `grads` (split into per-parameter views by the caller); its
// per-step temporaries (dY, the gradient handed from one step to the one below) reuse two scratch
// buffers: the steps run in stream order, so a step's kernels have finished reading a buffer
// before the next step's kernels write it. (One buffer per result, not a list of views: a custom
// op's outputs must not alias each other.)
//
// The step bodies are the ones the single-step ops run (Backend::forward / Backend::backward),
// so the stack computes what the per-step ops compute, in the same order (equal but for a GEMM's
// last bit where a BLAS takes a pointer-alignment-dependent path for a piece of a buffer).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "cpu_buffer_pool.h"
#include "step_params.h"

namespace define_ops {

// One step's tensor arguments.
struct StepTensors {
  at::Tensor x;                            // [T, a]
  at::Tensor weight;                       // [g, a/g, b/g]
  std::optional<at::Tensor> bias;          // [b]
  std::optional<at::Tensor> norm_weight;   // [b/g]
  std::optional<at::Tensor> norm_bias;     // [b/g]
  std::optional<at::Tensor> seed;          // [] int64
};

// One step's forward results (what hgt_step returns), allocated by the caller.
struct StepOutputs {
  at::Tensor out;    // [T, out_width]
  at::Tensor saved;  // [T, b] pre-norm values in GEMM order, or empty
  at::Tensor mean;   // [T, g] or empty
  at::Tensor rstd;   // [T, g] or empty
};

// One step's gradients (what hgt_step_backward returns), allocated by the caller; `dy` is an
// optional [T, b] scratch for the GEMM-order gradient (undefined: the backend allocates it).
struct StepGrads {
  at::Tensor grad_x;       // [T, a]
  at::Tensor grad_weight;  // like weight
  at::Tensor grad_bias;    // [b] or empty
  at::Tensor grad_gamma;   // [b/g] or empty
  at::Tensor grad_beta;    // [b/g] or empty
  at::Tensor dy;           // [T, b] scratch or undefined
};

// A step over no rows: its parameter gradients are sums over nothing.
inline void zero_parameter_grads(const StepGrads& g) {
  g.grad_weight.zero_();
  g.grad_bias.zero_();
  g.grad_gamma.zero_();
  g.grad_beta.zero_();
}

inline at::ScalarType stats_dtype_of(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// What the single-step op returns, freshly allocated.
inline StepOutputs allocate_step_outputs(const StepParams& p, const at::TensorOptions& options) {
  const auto stats = options.dtype(stats_dtype_of(options.dtype().toScalarType()));
  return StepOutputs{empty_buffer({p.tokens, p.out_width}, options),
                     p.needs_saved() ? empty_buffer({p.tokens, p.out_h}, options) : at::empty({0}, options),
                     p.norm ? at::empty({p.tokens, p.groups}, stats) : at::empty({0}, stats),
                     p.norm ? at::empty({p.tokens, p.groups}, stats) : at::empty({0}, stats)};
}

// What the single-step backward returns, freshly allocated (dY left to the backend).
inline StepGrads allocate_step_grads(const StepParams& p, const at::Tensor& weight, const at::TensorOptions& options) {
  return StepGrads{empty_buffer({p.tokens, p.in_width}, options),
                   // same layout as the weight (the Reduce layer passes a transposed view of nn.Linear's)
                   at::empty_like(weight, at::MemoryFormat::Preserve),
                   at::empty({p.bias ? p.out_h : 0}, options),
                   at::empty({p.norm ? p.out_group : 0}, options),
                   at::empty({p.norm ? p.out_group : 0}, options),
                   at::Tensor()};
}

// A [sizes] view of `flat` at `offset` (contiguous, or with `strides`), made without a trip
// through the dispatcher (an as_strided call per piece was ~140 calls per awd_ptb training step).
// The pieces never leave the C++ ops and autograd never sees them, so they need no view metadata.
inline at::Tensor piece(const at::Tensor& flat, int64_t offset, at::IntArrayRef sizes,
                        at::OptionalIntArrayRef strides = std::nullopt) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(flat.storage()),
                                                   flat.key_set(), flat.dtype());
  if (strides.has_value()) {
    impl->set_sizes_and_strides(sizes, *strides, flat.storage_offset() + offset);
  } else {
    std::vector<int64_t> contiguous(sizes.size(), 1);
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 2; d >= 0; --d) {
      contiguous[d] = contiguous[d + 1] * sizes[d + 1];
    }
    impl->set_sizes_and_strides(sizes, contiguous, flat.storage_offset() + offset);
  }
  return at::Tensor(std::move(impl));
}

// Offsets of consecutive pieces of one buffer, packed: every element of a buffer is written, so
// its contents are a function of the inputs (no uninitialised padding). At the presets every
// piece is a multiple of 8 elements, so pieces start 16-byte aligned for the vector paths anyway;
// define_ops/ops.py's StackLayout mirrors this.
class Offsets {
 public:
  int64_t reserve(int64_t numel) {
    const int64_t offset = size_;
    size_ += numel;
    return offset;
  }
  int64_t size() const { return size_; }

 private:
  int64_t size_ = 0;
};

// The per-step arguments of hgt_stack / hgt_stack_backward, checked for matching lengths.
struct StackArgs {
  at::TensorList weights;
  const c10::List<std::optional<at::Tensor>>& biases;
  const c10::List<std::optional<at::Tensor>>& norm_weights;
  const c10::List<std::optional<at::Tensor>>& norm_biases;
  const c10::List<std::optional<at::Tensor>>& seeds;
  at::IntArrayRef e_widths, e_in_chunks, e_out_chunks;
  const c10::List<bool>& shuffles;
  const c10::List<std::string>& activations;
  at::ArrayRef<double> dropout_ps, norm_eps;

  int64_t steps() const {
    const auto n = static_cast<size_t>(weights.size());
    TORCH_CHECK_VALUE(n >= 1, "define_ops::hgt_stack: needs at least one step");
    TORCH_CHECK_VALUE(biases.size() == n && norm_weights.size() == n && norm_biases.size() == n && seeds.size() == n &&
                          e_widths.size() == n && e_in_chunks.size() == n && e_out_chunks.size() == n &&
                          shuffles.size() == n && activations.size() == n && dropout_ps.size() == n &&
                          norm_eps.size() == n,
                      "define_ops::hgt_stack: every per-step list must have ", n, " entries (one per weight)");
    return static_cast<int64_t>(n);
  }

  StepTensors tensors(int64_t i, const at::Tensor& x) const {
    return StepTensors{x, weights[i], biases.get(i), norm_weights.get(i), norm_biases.get(i), seeds.get(i)};
  }

  StepParams params(int64_t i, const StepTensors& t) const {
    const std::string act = activations.get(i);
    return make_step_params(t.x, t.weight, t.bias, t.norm_weight, t.norm_bias, t.seed, e_widths[i], e_in_chunks[i],
                            e_out_chunks[i], shuffles.get(i), std::string_view(act.data(), act.size()),
                            dropout_ps[i], norm_eps[i]);
  }
};

// What the buffers need to know about step i before it runs (its input does not exist yet).
struct PlannedStep {
  int64_t in_width, out_h, out_group, out_width, groups;
  bool bias, norm, saved, plain;
};

// Where every piece of the stack's three buffers sits (-1: not there), from the arguments alone.
struct StackLayout {
  std::vector<PlannedStep> steps;
  // values [values_size] (x's dtype): outputs of steps 0..N-2, then pre-norm values, step by step;
  // stats [stats_size] (float, double for double): mean and rstd, step by step
  std::vector<int64_t> out_at, saved_at, mean_at, rstd_at;
  int64_t values_size = 0, stats_size = 0;
  // grads [grads_size] (x's dtype): weight, bias, γ, β gradients, step by step
  std::vector<int64_t> weight_at, bias_at, gamma_at, beta_at;
  int64_t grads_size = 0;
};

inline StackLayout make_stack_layout(const StackArgs& a, int64_t tokens, int64_t first_width) {
  const int64_t n = a.steps(), T = tokens;
  StackLayout L;
  L.steps.reserve(n);
  L.out_at.assign(n, -1);
  L.saved_at.assign(n, -1);
  L.mean_at.assign(n, -1);
  L.rstd_at.assign(n, -1);
  L.weight_at.assign(n, -1);
  L.bias_at.assign(n, -1);
  L.gamma_at.assign(n, -1);
  L.beta_at.assign(n, -1);
  Offsets values, stats, grads;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& w = a.weights[i];
    TORCH_CHECK_VALUE(w.dim() == 3, "define_ops::hgt_stack: weight ", i, " must be 3-D [g, a/g, b/g], got shape ",
                      w.sizes());
    // Before any size is derived from them (the step's own checks come later, at its call).
    TORCH_CHECK_VALUE(a.e_widths[i] >= 0 && a.e_in_chunks[i] >= 0 && a.e_out_chunks[i] >= 0,
                      "define_ops::hgt_stack: step ", i, " has e_width=", a.e_widths[i], ", e_in_chunks=",
                      a.e_in_chunks[i], ", e_out_chunks=", a.e_out_chunks[i], "; none may be negative");
    PlannedStep s;
    s.groups = w.size(0);
    s.in_width = w.size(0) * w.size(1);
    s.out_group = w.size(2);
    s.out_h = s.groups * s.out_group;
    s.out_width = s.out_h + (a.e_out_chunks[i] > 0 ? a.e_widths[i] : 0);
    s.bias = a.biases.get(i).has_value();
    s.norm = a.norm_weights.get(i).has_value();
    const std::string act = a.activations.get(i);
    s.saved = s.norm || parse_activation(std::string_view(act.data(), act.size())) != Activation::kNone;
    s.plain = !s.saved && !(a.shuffles.get(i) && s.groups > 1) && a.dropout_ps[i] == 0.0 && a.e_out_chunks[i] == 0;
    const int64_t width = i == 0 ? first_width : L.steps[i - 1].out_width;
    TORCH_CHECK_VALUE(s.in_width == width, "define_ops::hgt_stack: step ", i, " reads ", s.in_width,
                      " features (weight ", w.sizes(), ") but its input has ", width);
    L.steps.push_back(s);
    if (i + 1 < n) L.out_at[i] = values.reserve(T * s.out_width);  // the result has its own allocation
    if (s.saved) L.saved_at[i] = values.reserve(T * s.out_h);
    if (s.norm) {
      L.mean_at[i] = stats.reserve(T * s.groups);
      L.rstd_at[i] = stats.reserve(T * s.groups);
    }
    L.weight_at[i] = grads.reserve(w.numel());
    if (s.bias) L.bias_at[i] = grads.reserve(s.out_h);
    if (s.norm) {
      L.gamma_at[i] = grads.reserve(s.out_group);
      L.beta_at[i] = grads.reserve(s.out_group);
    }
  }
  L.values_size = values.size();
  L.stats_size = stats.size();
  L.grads_size = grads.size();
  return L;
}

// hgt_stack: (out [T, out_width of the last step], values, stats). With keep_for_backward=false
// (inference) every step allocates its own output, freed once the next step has read it, and
// values and stats come back empty.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_stack_forward(const at::Tensor& x, const StackArgs& a,
                                                                 bool keep_for_backward) {
  TORCH_CHECK_VALUE(x.dim() == 2, "define_ops::hgt_stack: x must be 2-D [T, a], got shape ", x.sizes());
  const StackLayout L = make_stack_layout(a, x.size(0), x.size(1));
  const int64_t steps = static_cast<int64_t>(L.steps.size()), T = x.size(0);
  const at::TensorOptions options = x.options();
  const at::TensorOptions stats_options = options.dtype(stats_dtype_of(x.scalar_type()));
  const at::Tensor values = empty_buffer({keep_for_backward ? L.values_size : 0}, options);
  const at::Tensor stats = empty_buffer({keep_for_backward ? L.stats_size : 0}, stats_options);
  const at::Tensor no_values = at::empty({0}, options), no_stats = at::empty({0}, stats_options);

  at::Tensor input = x;
  for (int64_t i = 0; i < steps; ++i) {
    const PlannedStep& s = L.steps[i];
    // kept for the backward: a piece of values/stats; otherwise a fresh tensor (or none at all)
    auto result = [&](const at::Tensor& buffer, int64_t at, at::IntArrayRef sizes, const at::TensorOptions& opts) {
      return keep_for_backward && at >= 0 ? piece(buffer, at, sizes) : empty_buffer(sizes, opts);
    };
    StepOutputs o;
    o.out = result(values, L.out_at[i], {T, s.out_width}, options);
    o.saved = s.saved ? result(values, L.saved_at[i], {T, s.out_h}, options) : no_values;
    o.mean = s.norm ? result(stats, L.mean_at[i], {T, s.groups}, stats_options) : no_stats;
    o.rstd = s.norm ? result(stats, L.rstd_at[i], {T, s.groups}, stats_options) : no_stats;
    const StepTensors t = a.tensors(i, input);
    Backend::forward(a.params(i, t), t, o);
    input = o.out;
  }
  return {input, values, stats};
}

// hgt_stack_backward: from x and the values and stats hgt_stack returned, (grad_x [T, a0], grads).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> run_stack_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const at::Tensor& values, const at::Tensor& stats,
                                                      const StackArgs& a) {
  TORCH_CHECK_VALUE(x.dim() == 2, "define_ops::hgt_stack_backward: x must be 2-D [T, a], got shape ", x.sizes());
  const StackLayout L = make_stack_layout(a, x.size(0), x.size(1));
  const int64_t steps = static_cast<int64_t>(L.steps.size()), T = x.size(0);
  const at::TensorOptions options = x.options();
  const auto stats_dtype = stats_dtype_of(x.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == L.values_size && values.scalar_type() == x.scalar_type() &&
                        values.device() == x.device() && values.is_contiguous() &&
                        stats.dim() == 1 && stats.numel() == L.stats_size && stats.scalar_type() == stats_dtype &&
                        stats.device() == x.device() && stats.is_contiguous(),
                    "define_ops::hgt_stack_backward: values and stats must be what hgt_stack(keep_for_backward=True) "
                    "returned for these arguments: [", L.values_size, "] ", x.scalar_type(), " and [", L.stats_size,
                    "] ", stats_dtype, " on ", x.device(), ", got [", values.numel(), "] ", values.scalar_type(),
                    " and [", stats.numel(), "] ", stats.scalar_type());
  const at::Tensor none = at::empty({0}, options), no_stats = at::empty({0}, options.dtype(stats_dtype));

  // What the forward kept, as views; every step's arguments are checked before any kernel runs.
  std::vector<StepOutputs> kept(steps);
  std::vector<at::Tensor> inputs(steps);
  std::vector<StepParams> params;
  params.reserve(steps);
  for (int64_t i = 0; i < steps; ++i) {
    const PlannedStep& s = L.steps[i];
    inputs[i] = i == 0 ? x : piece(values, L.out_at[i - 1], {T, L.steps[i - 1].out_width});
    kept[i].saved = s.saved ? piece(values, L.saved_at[i], {T, s.out_h}) : none;
    kept[i].mean = s.norm ? piece(stats, L.mean_at[i], {T, s.groups}) : no_stats;
    kept[i].rstd = s.norm ? piece(stats, L.rstd_at[i], {T, s.groups}) : no_stats;
    params.push_back(a.params(i, a.tensors(i, inputs[i])));
  }
  check_backward_inputs(params[steps - 1], inputs[steps - 1], grad_out, kept[steps - 1].saved, kept[steps - 1].mean,
                        kept[steps - 1].rstd);

  // Parameter gradients in one buffer; dY and the gradient handed down in reused scratch.
  const at::Tensor grads = empty_buffer({L.grads_size}, options);
  Offsets scratch_offsets;
  int64_t dy_numel = 0, handed_numel = 0;
  for (int64_t i = 0; i < steps; ++i) {
    if (!L.steps[i].plain) dy_numel = std::max(dy_numel, T * L.steps[i].out_h);
    if (i > 0) handed_numel = std::max(handed_numel, T * L.steps[i].in_width);
  }
  const int64_t dy_at = scratch_offsets.reserve(dy_numel);
  const int64_t handed_at[2] = {scratch_offsets.reserve(handed_numel), scratch_offsets.reserve(handed_numel)};
  const at::Tensor scratch = empty_buffer({scratch_offsets.size()}, options);

  at::Tensor grad = grad_out;
  for (int64_t i = steps - 1; i >= 0; --i) {
    const PlannedStep& s = L.steps[i];
    const at::Tensor& w = a.weights[i];
    StepGrads g;
    // Step i writes the gradient of its input into the scratch half step i + 1 did not use.
    g.grad_x = i > 0 ? piece(scratch, handed_at[i % 2], {T, s.in_width}) : empty_buffer({T, s.in_width}, options);
    // the weight's own layout where it is dense (the Reduce layer passes a transposed view)
    g.grad_weight = piece(grads, L.weight_at[i], w.sizes(),
                          w.is_non_overlapping_and_dense() ? at::OptionalIntArrayRef(w.strides()) : std::nullopt);
    g.grad_bias = s.bias ? piece(grads, L.bias_at[i], {s.out_h}) : none;
    g.grad_gamma = s.norm ? piece(grads, L.gamma_at[i], {s.out_group}) : none;
    g.grad_beta = s.norm ? piece(grads, L.beta_at[i], {s.out_group}) : none;
    if (!s.plain) g.dy = piece(scratch, dy_at, {T, s.out_h});
    Backend::backward(params[i], grad, a.tensors(i, inputs[i]), kept[i], g);
    grad = g.grad_x;
  }
  return {grad, grads};
}

// The ops' entry points on top of a backend's step bodies (registered by each backend): the
// single-step ops (hgt_step, hgt_step_backward) ...
template <typename Backend>
struct StepOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& x,                           // [T, a]
      const at::Tensor& weight,                      // [g, a/g, b/g]
      const std::optional<at::Tensor>& bias,         // [b]
      const std::optional<at::Tensor>& norm_weight,  // [b/g]
      const std::optional<at::Tensor>& norm_bias,    // [b/g]
      const std::optional<at::Tensor>& seed,         // [] int64
      int64_t e_width, int64_t e_in_chunks, int64_t e_out_chunks, bool shuffle, c10::string_view activation,
      double dropout_p, double norm_eps) {
    const StepParams p = make_step_params(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks,
                                          e_out_chunks, shuffle, std::string_view(activation.data(), activation.size()),
                                          dropout_p, norm_eps);
    const StepOutputs o = allocate_step_outputs(p, x.options());
    Backend::forward(p, StepTensors{x, weight, bias, norm_weight, norm_bias, seed}, o);
    return {o.out, o.saved, o.mean, o.rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out,                    // [T, out_width]
      const at::Tensor& x,                           // [T, a]
      const at::Tensor& weight,                      // [g, a/g, b/g]
      const std::optional<at::Tensor>& bias,         // [b]
      const std::optional<at::Tensor>& norm_weight,  // [b/g]
      const std::optional<at::Tensor>& norm_bias,    // [b/g]
      const std::optional<at::Tensor>& seed,         // [] int64
      const at::Tensor& saved,                       // [T, b] pre-norm values, GEMM order (or empty)
      const at::Tensor& mean,                        // [T, g] (or empty)
      const at::Tensor& rstd,                        // [T, g] (or empty)
      int64_t e_width, int64_t e_in_chunks, int64_t e_out_chunks, bool shuffle, c10::string_view activation,
      double dropout_p, double norm_eps) {
    const StepParams p = make_step_params(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks,
                                          e_out_chunks, shuffle, std::string_view(activation.data(), activation.size()),
                                          dropout_p, norm_eps);
    check_backward_inputs(p, x, grad_out, saved, mean, rstd);
    const StepGrads g = allocate_step_grads(p, weight, x.options());
    Backend::backward(p, grad_out, StepTensors{x, weight, bias, norm_weight, norm_bias, seed},
                      StepOutputs{at::Tensor(), saved, mean, rstd}, g);
    return {g.grad_x, g.grad_weight, g.grad_bias, g.grad_gamma, g.grad_beta};
  }
};

// ... and the stack ops (hgt_stack, hgt_stack_backward).
template <typename Backend>
struct StackOps {
  using Optionals = c10::List<std::optional<at::Tensor>>;

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& x,                                     // [T, a0]
      at::TensorList weights,                                  // per step [g, a/g, b/g]
      const Optionals& biases, const Optionals& norm_weights,  // per step [b], [b/g] or None
      const Optionals& norm_biases, const Optionals& seeds,    // per step [b/g], [] int64 or None
      at::IntArrayRef e_widths, at::IntArrayRef e_in_chunks, at::IntArrayRef e_out_chunks,
      const c10::List<bool>& shuffles, const c10::List<std::string>& activations, at::ArrayRef<double> dropout_ps,
      at::ArrayRef<double> norm_eps, bool keep_for_backward) {
    const StackArgs a{weights,     biases,       norm_weights, norm_biases, seeds,      e_widths,
                      e_in_chunks, e_out_chunks, shuffles,     activations, dropout_ps, norm_eps};
    return run_stack_forward<Backend>(x, a, keep_for_backward);
  }

  static std::tuple<at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out,                        // [T, out_width of the last step]
      const at::Tensor& x,                               // [T, a0]
      const at::Tensor& values, const at::Tensor& stats,  // as hgt_stack returned them
      at::TensorList weights, const Optionals& biases, const Optionals& norm_weights, const Optionals& norm_biases,
      const Optionals& seeds, at::IntArrayRef e_widths, at::IntArrayRef e_in_chunks, at::IntArrayRef e_out_chunks,
      const c10::List<bool>& shuffles, const c10::List<std::string>& activations, at::ArrayRef<double> dropout_ps,
      at::ArrayRef<double> norm_eps) {
    const StackArgs a{weights,     biases,       norm_weights, norm_biases, seeds,      e_widths,
                      e_in_chunks, e_out_chunks, shuffles,     activations, dropout_ps, norm_eps};
    return run_stack_backward<Backend>(grad_out, x, values, stats, a);
  }
};

}  // namespace define_ops
