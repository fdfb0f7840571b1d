// CPU forward and backward of one HGT layer step (define_ops::hgt_step).
//
// The grouped GEMM goes to ATen's GEMM (MKL/oneDNN) on strided views, one call per group, so no
// input or output is ever transposed or concatenated. Everything around it (bias, shuffle,
// per-group LayerNorm, activation, dropout, the write into the next layer's mix(e, h) layout and
// the copy of e) is one pass over the GEMM output, parallel over tokens. The backward mirrors
// it: one pass builds the GEMM-order gradient dY (and the bias/norm partial sums), then two
// GEMMs per group give dx and dW.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/philox.h"
#include "../common/step_params.h"

namespace define_ops {
namespace {

// Rows per reduction chunk: the bias/norm gradients are summed per fixed chunk and then in
// chunk order, so results do not depend on the number of threads.
constexpr int64_t kRowsPerChunk = 32;

template <typename acc_t>
inline acc_t activation_forward(Activation act, acc_t v) {
  switch (act) {
    case Activation::kGelu:
      return acc_t(0.5) * v * (acc_t(1) + std::erf(v * acc_t(M_SQRT1_2)));
    case Activation::kRelu:
      return v > acc_t(0) ? v : acc_t(0);
    case Activation::kSwish:
      return v / (acc_t(1) + std::exp(-v));
    default:
      return v;
  }
}

// d activation / d v at the pre-activation value v.
template <typename acc_t>
inline acc_t activation_grad(Activation act, acc_t v) {
  switch (act) {
    case Activation::kGelu: {
      const acc_t cdf = acc_t(0.5) * (acc_t(1) + std::erf(v * acc_t(M_SQRT1_2)));
      const acc_t pdf = std::exp(acc_t(-0.5) * v * v) * acc_t(0.3989422804014327);  // 1/sqrt(2π)
      return cdf + v * pdf;
    }
    case Activation::kRelu:
      return v > acc_t(0) ? acc_t(1) : acc_t(0);
    case Activation::kSwish: {
      const acc_t sig = acc_t(1) / (acc_t(1) + std::exp(-v));
      return sig * (acc_t(1) + v * (acc_t(1) - sig));
    }
    default:
      return acc_t(1);
  }
}

// Keep/drop decisions of one row, four features per Philox call.
struct RowDropout {
  uint64_t seed;
  uint32_t threshold;
  int64_t row;
  int64_t quad = -1;
  PhiloxWords words{};
  bool keep(int64_t feature) {
    if (feature / 4 != quad) {
      quad = feature / 4;
      words = philox4x32_10(seed, static_cast<uint32_t>(quad), static_cast<uint32_t>(row));
    }
    return words.w[feature % 4] >= threshold;
  }
};

uint64_t read_seed(const std::optional<at::Tensor>& seed, const StepParams& p) {
  if (p.dropout_p == 0.0) return 0;
  TORCH_CHECK_VALUE(seed->device().is_cpu(), "define_ops::hgt_step (CPU): the seed must be a CPU tensor, got ",
                    seed->device());
  return static_cast<uint64_t>(seed->item<int64_t>());
}

// x_j [T, a/g] @ W_j [a/g, b/g] → y_j for every group, written through strided views.
void grouped_gemm(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, const StepParams& p) {
  for (int64_t j = 0; j < p.groups; ++j) {
    auto y_j = y.narrow(1, j * p.out_group, p.out_group);
    at::mm_out(y_j, x.narrow(1, j * p.in_group, p.in_group), weight.select(0, j));
  }
}

template <typename scalar_t>
void forward_epilogue(const StepParams& p, const scalar_t* x, scalar_t* y, const scalar_t* bias,
                      const scalar_t* gamma, const scalar_t* beta, scalar_t* out, at::opmath_type<scalar_t>* mean,
                      at::opmath_type<scalar_t>* rstd, bool keep_saved) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = p.out_h, s = p.out_group, g = p.groups;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const acc_t keep_scale = p.dropout_p > 0 ? acc_t(1) / (acc_t(1) - acc_t(p.dropout_p)) : acc_t(1);
  at::parallel_for(0, p.tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gemm_order(b), z(b);
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* y_row = y + t * b;
      for (int64_t q = 0; q < b; ++q) {
        acc_t v = static_cast<acc_t>(y_row[q]) + (bias ? static_cast<acc_t>(bias[q]) : acc_t(0));
        if (keep_saved) {  // the backward recomputes from the stored (rounded) value
          y_row[q] = static_cast<scalar_t>(v);
          v = static_cast<acc_t>(y_row[q]);
        }
        gemm_order[q] = v;
      }
      for (int64_t f = 0; f < b; ++f) z[f] = gemm_order[p.src(f)];
      if (p.norm) {
        for (int64_t i = 0; i < g; ++i) {
          acc_t* zg = z.data() + i * s;
          acc_t sum = 0;
          for (int64_t u = 0; u < s; ++u) sum += zg[u];
          const acc_t mu = sum / acc_t(s);
          acc_t sq = 0;
          for (int64_t u = 0; u < s; ++u) sq += (zg[u] - mu) * (zg[u] - mu);
          const acc_t rs = acc_t(1) / std::sqrt(sq / acc_t(s) + acc_t(p.norm_eps));
          mean[t * g + i] = mu;
          rstd[t * g + i] = rs;
          for (int64_t u = 0; u < s; ++u)
            zg[u] = (zg[u] - mu) * rs * static_cast<acc_t>(gamma[u]) + static_cast<acc_t>(beta[u]);
        }
      }
      scalar_t* out_row = out + t * p.out_width;
      RowDropout dropout{p.seed, threshold, t};
      for (int64_t f = 0; f < b; ++f) {
        acc_t v = activation_forward(p.activation, z[f]);
        if (p.dropout_p > 0) v = dropout.keep(f) ? v * keep_scale : acc_t(0);
        out_row[p.out_pos(f)] = static_cast<scalar_t>(v);
      }
      if (p.carry_e) {
        const scalar_t* x_row = x + t * p.in_width;
        for (int64_t q = 0; q < p.e_width; ++q) out_row[p.out_layout.e_pos(q)] = x_row[p.in_layout.e_pos(q)];
      }
    }
  });
}

// Builds dY (GEMM order) from grad_out and sums the bias / norm gradients per row chunk (in
// double: these are sums over every token, and cost nothing next to the GEMMs).
template <typename scalar_t>
void backward_epilogue(const StepParams& p, const scalar_t* grad_out, const scalar_t* saved, const scalar_t* gamma,
                       const scalar_t* beta, const at::opmath_type<scalar_t>* mean,
                       const at::opmath_type<scalar_t>* rstd, scalar_t* dy, double* partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t b = p.out_h, s = p.out_group, g = p.groups;
  const int64_t partial_width = b + 2 * s;  // [d bias (GEMM order) | d gamma | d beta]
  const int64_t chunks = (p.tokens + kRowsPerChunk - 1) / kRowsPerChunk;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const acc_t keep_scale = p.dropout_p > 0 ? acc_t(1) / (acc_t(1) - acc_t(p.dropout_p)) : acc_t(1);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> d_act(b), x_hat(b);
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      double* part = partials + c * partial_width;
      std::fill(part, part + partial_width, 0.0);
      double *d_bias = part, *d_gamma = part + b, *d_beta = part + b + s;
      const int64_t row_end = std::min(p.tokens, (c + 1) * kRowsPerChunk);
      for (int64_t t = c * kRowsPerChunk; t < row_end; ++t) {
        const scalar_t* g_row = grad_out + t * p.out_width;
        const scalar_t* saved_row = saved ? saved + t * b : nullptr;
        RowDropout dropout{p.seed, threshold, t};
        for (int64_t f = 0; f < b; ++f) {
          acc_t d = static_cast<acc_t>(g_row[p.out_pos(f)]);
          if (p.dropout_p > 0) d = dropout.keep(f) ? d * keep_scale : acc_t(0);
          if (saved_row) {
            acc_t pre = static_cast<acc_t>(saved_row[p.src(f)]);
            if (p.norm) {
              const int64_t i = f / s;
              x_hat[f] = (pre - mean[t * g + i]) * rstd[t * g + i];
              pre = x_hat[f] * static_cast<acc_t>(gamma[f % s]) + static_cast<acc_t>(beta[f % s]);
            }
            if (p.activation != Activation::kNone) d *= activation_grad(p.activation, pre);
          }
          d_act[f] = d;
        }
        scalar_t* dy_row = dy + t * b;
        if (p.norm) {
          for (int64_t i = 0; i < g; ++i) {
            const acc_t rs = rstd[t * g + i];
            acc_t sum_dxh = 0, sum_dxh_xh = 0;
            for (int64_t u = 0; u < s; ++u) {
              const int64_t f = i * s + u;
              const acc_t dxh = d_act[f] * static_cast<acc_t>(gamma[u]);
              sum_dxh += dxh;
              sum_dxh_xh += dxh * x_hat[f];
              d_gamma[u] += d_act[f] * x_hat[f];
              d_beta[u] += d_act[f];
            }
            const acc_t mean_dxh = sum_dxh / acc_t(s), mean_dxh_xh = sum_dxh_xh / acc_t(s);
            for (int64_t u = 0; u < s; ++u) {
              const int64_t f = i * s + u;
              const acc_t dz = rs * (d_act[f] * static_cast<acc_t>(gamma[u]) - mean_dxh - x_hat[f] * mean_dxh_xh);
              dy_row[p.src(f)] = static_cast<scalar_t>(dz);
              d_bias[p.src(f)] += dz;
            }
          }
        } else {
          for (int64_t f = 0; f < b; ++f) {
            dy_row[p.src(f)] = static_cast<scalar_t>(d_act[f]);
            d_bias[p.src(f)] += d_act[f];
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hgt_step_cpu(
    const at::Tensor& x,                           // [T, a]
    const at::Tensor& weight,                      // [g, a/g, b/g]
    const std::optional<at::Tensor>& bias,         // [b]
    const std::optional<at::Tensor>& norm_weight,  // [b/g]
    const std::optional<at::Tensor>& norm_bias,    // [b/g]
    const std::optional<at::Tensor>& seed,         // [] int64
    int64_t e_width, int64_t e_in_chunks, int64_t e_out_chunks, bool shuffle, c10::string_view activation,
    double dropout_p, double norm_eps) {
  StepParams p = make_step_params(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks, e_out_chunks,
                                  shuffle, std::string_view(activation.data(), activation.size()), dropout_p,
                                  norm_eps);
  p.seed = read_seed(seed, p);
  const at::Tensor x_c = x.contiguous();
  const auto stats_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto empty = [&](at::ScalarType dtype) { return at::empty({0}, x.options().dtype(dtype)); };
  at::Tensor out = at::empty({p.tokens, p.out_width}, x.options());

  if (p.plain()) {  // the Reduce layer: one GEMM with the bias folded in, straight into out
    for (int64_t j = 0; j < p.groups; ++j) {
      auto out_j = out.narrow(1, j * p.out_group, p.out_group);
      auto x_j = x_c.narrow(1, j * p.in_group, p.in_group);
      if (p.bias) {
        at::addmm_out(out_j, bias->narrow(0, j * p.out_group, p.out_group), x_j, weight.select(0, j));
      } else {
        at::mm_out(out_j, x_j, weight.select(0, j));
      }
    }
    return {out, empty(x.scalar_type()), empty(stats_dtype), empty(stats_dtype)};
  }

  at::Tensor y = at::empty({p.tokens, p.out_h}, x.options());  // GEMM order; becomes `saved`
  grouped_gemm(x_c, weight, y, p);
  at::Tensor mean = p.norm ? at::empty({p.tokens, p.groups}, x.options().dtype(stats_dtype)) : empty(stats_dtype);
  at::Tensor rstd = p.norm ? at::empty({p.tokens, p.groups}, x.options().dtype(stats_dtype)) : empty(stats_dtype);
  const at::Tensor bias_c = p.bias ? bias->contiguous() : at::Tensor();
  const at::Tensor gamma_c = p.norm ? norm_weight->contiguous() : at::Tensor();
  const at::Tensor beta_c = p.norm ? norm_bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hgt_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_epilogue<scalar_t>(p, x_c.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                               p.bias ? bias_c.const_data_ptr<scalar_t>() : nullptr,
                               p.norm ? gamma_c.const_data_ptr<scalar_t>() : nullptr,
                               p.norm ? beta_c.const_data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
                               p.norm ? mean.data_ptr<acc_t>() : nullptr, p.norm ? rstd.data_ptr<acc_t>() : nullptr,
                               p.needs_saved());
  });
  at::Tensor saved = p.needs_saved() ? y : empty(x.scalar_type());
  return {out, saved, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hgt_step_backward_cpu(
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
  StepParams p = make_step_params(x, weight, bias, norm_weight, norm_bias, seed, e_width, e_in_chunks, e_out_chunks,
                                  shuffle, std::string_view(activation.data(), activation.size()), dropout_p,
                                  norm_eps);
  p.seed = read_seed(seed, p);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == p.tokens && grad_out.size(1) == p.out_width,
                    "define_ops::hgt_step_backward: grad_out must be [", p.tokens, ", ", p.out_width, "], got ",
                    grad_out.sizes());
  if (p.needs_saved()) {
    TORCH_CHECK_VALUE(saved.dim() == 2 && saved.size(0) == p.tokens && saved.size(1) == p.out_h,
                      "define_ops::hgt_step_backward: saved must be [", p.tokens, ", ", p.out_h, "]");
  }
  if (p.norm) {
    TORCH_CHECK_VALUE(mean.numel() == p.tokens * p.groups && rstd.numel() == p.tokens * p.groups,
                      "define_ops::hgt_step_backward: mean and rstd must be [", p.tokens, ", ", p.groups, "]");
  }
  const at::Tensor x_c = x.contiguous();
  const at::Tensor g_c = grad_out.contiguous();
  const auto opts = x.options();

  at::Tensor dy, grad_bias, grad_gamma, grad_beta;
  if (p.plain()) {
    dy = g_c;
    grad_bias = p.bias ? g_c.sum(0) : at::empty({0}, opts);
    grad_gamma = at::empty({0}, opts);
    grad_beta = at::empty({0}, opts);
  } else {
    dy = at::empty({p.tokens, p.out_h}, opts);
    const int64_t chunks = (p.tokens + kRowsPerChunk - 1) / kRowsPerChunk;
    const int64_t partial_width = p.out_h + 2 * p.out_group;
    at::Tensor partials = at::empty({chunks, partial_width}, opts.dtype(at::kDouble));
    const at::Tensor saved_c = p.needs_saved() ? saved.contiguous() : at::Tensor();
    const at::Tensor gamma_c = p.norm ? norm_weight->contiguous() : at::Tensor();
    const at::Tensor beta_c = p.norm ? norm_bias->contiguous() : at::Tensor();
    const at::Tensor mean_c = p.norm ? mean.contiguous() : at::Tensor();
    const at::Tensor rstd_c = p.norm ? rstd.contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hgt_step_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_epilogue<scalar_t>(p, g_c.const_data_ptr<scalar_t>(),
                                  p.needs_saved() ? saved_c.const_data_ptr<scalar_t>() : nullptr,
                                  p.norm ? gamma_c.const_data_ptr<scalar_t>() : nullptr,
                                  p.norm ? beta_c.const_data_ptr<scalar_t>() : nullptr,
                                  p.norm ? mean_c.const_data_ptr<acc_t>() : nullptr,
                                  p.norm ? rstd_c.const_data_ptr<acc_t>() : nullptr, dy.data_ptr<scalar_t>(),
                                  partials.data_ptr<double>());
    });
    // Chunk partial sums, added in chunk order (deterministic).
    at::Tensor totals = at::zeros({partial_width}, opts.dtype(at::kDouble));
    for (int64_t c = 0; c < chunks; ++c) totals.add_(partials[c]);
    // Separate copies: the three gradients must not alias one buffer.
    auto take = [&](int64_t offset, int64_t size) {
      return totals.narrow(0, offset, size).to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    };
    grad_bias = p.bias ? take(0, p.out_h) : at::empty({0}, opts);
    grad_gamma = p.norm ? take(p.out_h, p.out_group) : at::empty({0}, opts);
    grad_beta = p.norm ? take(p.out_h + p.out_group, p.out_group) : at::empty({0}, opts);
  }

  at::Tensor grad_x = at::empty({p.tokens, p.in_width}, opts);
  // Same layout as the weight (the Reduce layer passes a transposed view of nn.Linear's weight).
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Preserve);
  for (int64_t j = 0; j < p.groups; ++j) {
    const auto dy_j = dy.narrow(1, j * p.out_group, p.out_group);
    auto dx_j = grad_x.narrow(1, j * p.in_group, p.in_group);
    at::mm_out(dx_j, dy_j, weight.select(0, j).t());
    auto dw_j = grad_weight.select(0, j);
    at::mm_out(dw_j, x_c.narrow(1, j * p.in_group, p.in_group).t(), dy_j);
  }
  if (p.carry_e) {  // the e copy in the output passes its gradient straight back to e's place in x
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hgt_step_e_grad_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* g = g_c.const_data_ptr<scalar_t>();
      scalar_t* dx = grad_x.data_ptr<scalar_t>();
      at::parallel_for(0, p.tokens, 64, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          for (int64_t q = 0; q < p.e_width; ++q) {
            scalar_t& dst = dx[t * p.in_width + p.in_layout.e_pos(q)];
            dst = static_cast<scalar_t>(static_cast<acc_t>(dst) +
                                        static_cast<acc_t>(g[t * p.out_width + p.out_layout.e_pos(q)]));
          }
        }
      });
    });
  }
  return {grad_x, grad_weight, grad_bias, grad_gamma, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(define_ops, CPU, m) {
  m.impl("hgt_step", &hgt_step_cpu);
  m.impl("hgt_step_backward", &hgt_step_backward_cpu);
}

}  // namespace define_ops
