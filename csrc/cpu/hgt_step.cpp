// CPU forward and backward of one HGT layer step (define_ops::hgt_step).
//
// The grouped GEMM goes to ATen's GEMM (MKL/oneDNN) on strided views, one call per group, so no
// input or output is ever transposed or concatenated (float16/bfloat16 in float32 where the CPU
// lacks a fast GEMM for them: gemm.cpp). Everything around it (bias, shuffle,
// per-group LayerNorm, activation, dropout, the write into the next layer's mix(e, h) layout and
// the copy of e) is one pass over the GEMM output, parallel over tokens. The backward mirrors
// it: one pass builds the GEMM-order gradient dY (and the bias/norm partial sums), then two
// GEMMs per group give dx and dW.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/epilogue_math.h"
#include "../common/philox.h"
#include "../common/hgt_stack.h"
#include "../common/step_params.h"
#include "convert.h"
#include "fast_math.h"
#include "gemm.h"

// The ISA levels of the x86-64 psABI (GCC 12+ takes them in target_clones): x86-64-v4 is AVX-512
// F+BW+DQ+VL+CD, v3 AVX2+FMA+F16C. For plain "avx512f" (no BW) GCC 12 left convert.h's 16-bit
// conversions scalar.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 12
#define DEFINE_OPS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DEFINE_OPS_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DEFINE_OPS_CPU_CLONES
#endif

namespace define_ops {
namespace {

// Rows per reduction chunk: the bias/norm gradients are summed per fixed chunk and then in
// chunk order, so results do not depend on the number of threads.
constexpr int64_t kRowsPerChunk = 32;

// ----------------------------------------------------------------------------- row kernels
// Small always-inline loops over one token's row, each simple enough for GCC to vectorize; they
// are compiled once per ISA inside the target_clones entry points further down.

template <typename acc_t>
DEFINE_OPS_INLINE void activation_forward(Activation act, acc_t* __restrict v, int64_t n) {
  switch (act) {
    case Activation::kGelu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i)
        v[i] = acc_t(0.5) * v[i] * (acc_t(1) + cpu_math::erf(v[i] * acc_t(cpu_math::kInvSqrt2)));
      break;
    case Activation::kRelu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) v[i] = v[i] < acc_t(0) ? acc_t(0) : v[i];  // NaN stays NaN, as in F.relu
      break;
    case Activation::kSwish:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) v[i] = v[i] / (acc_t(1) + cpu_math::exp(-v[i]));
      break;
    default:
      break;
  }
}

// d[i] *= f'(a[i]) at the pre-activation values a.
template <typename acc_t>
DEFINE_OPS_INLINE void activation_backward(Activation act, const acc_t* __restrict a, acc_t* __restrict d,
                                           int64_t n) {
  switch (act) {
    case Activation::kGelu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        acc_t gauss;  // e^(-a²/2), shared by the CDF's erf and the density
        const acc_t cdf = acc_t(0.5) * (acc_t(1) + cpu_math::erf_and_gauss(a[i] * acc_t(cpu_math::kInvSqrt2), &gauss));
        const acc_t pdf = gauss * acc_t(cpu_math::kInvSqrt2Pi);
        d[i] *= cdf + a[i] * pdf;
      }
      break;
    case Activation::kRelu:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) d[i] = a[i] <= acc_t(0) ? acc_t(0) : d[i];
      break;
    case Activation::kSwish:
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const acc_t sig = acc_t(1) / (acc_t(1) + cpu_math::exp(-a[i]));
        d[i] *= sig * (acc_t(1) + a[i] * (acc_t(1) - sig));
      }
      break;
    default:
      break;
  }
}

// Σ term(u) over u < n in kSumLanes interleaved partial sums, added in lane order at the end.
// GCC vectorizes the fixed-width lane loop at every ISA level (an `omp simd reduction` over two
// sums stayed scalar in the x86-64-v4 clone: a serial FMA chain, a third of the backward's row
// time). The order of additions is the same on every clone; only FMA contraction of a product
// term (v3/v4 clones, not baseline) can still change the last bit.
constexpr int kSumLanes = 16;
template <typename acc_t, typename Term>
DEFINE_OPS_INLINE acc_t lane_sum(int64_t n, Term term) {
  acc_t lanes[kSumLanes] = {};
  int64_t u = 0;
  for (; u + kSumLanes <= n; u += kSumLanes) {
#pragma omp simd
    for (int l = 0; l < kSumLanes; ++l) lanes[l] += term(u + l);
  }
  for (int l = 0; u < n; ++u, ++l) lanes[l] += term(u);
  acc_t total = 0;
  for (int l = 0; l < kSumLanes; ++l) total += lanes[l];
  return total;
}

// Philox words of one row: word f decides feature f (4 features per counter).
DEFINE_OPS_INLINE void philox_row(uint64_t seed, int64_t row, int64_t quads, uint32_t* __restrict words) {
#pragma omp simd
  for (int64_t q = 0; q < quads; ++q) {
    const PhiloxWords w = philox4x32_10(seed, static_cast<uint32_t>(q), static_cast<uint32_t>(row));
    words[4 * q] = w.w[0];
    words[4 * q + 1] = w.w[1];
    words[4 * q + 2] = w.w[2];
    words[4 * q + 3] = w.w[3];
  }
}

template <typename acc_t>
DEFINE_OPS_INLINE void apply_dropout(const uint32_t* __restrict words, uint32_t threshold, acc_t scale,
                                     acc_t* __restrict v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) v[i] = epilogue::dropout_apply(words[i] >= threshold, v[i], scale);
}

// Channel shuffle as addressing: z[t·g + i] = y[i·s + t], and its inverse for gradients.
template <typename T>
DEFINE_OPS_INLINE void shuffle_gather(const T* __restrict y, T* __restrict z, int64_t g, int64_t s) {
  for (int64_t i = 0; i < g; ++i)
    for (int64_t t = 0; t < s; ++t) z[t * g + i] = y[i * s + t];
}
template <typename T>
DEFINE_OPS_INLINE void shuffle_scatter(const T* __restrict z, T* __restrict y, int64_t g, int64_t s) {
  for (int64_t i = 0; i < g; ++i)
    for (int64_t t = 0; t < s; ++t) y[i * s + t] = z[t * g + i];
}

// Per-group LayerNorm in place over g groups of s features; writes mean/rstd per group.
template <typename acc_t>
DEFINE_OPS_INLINE void group_norm_forward(acc_t* __restrict z, int64_t g, int64_t s, const acc_t* __restrict gamma,
                                          const acc_t* __restrict beta, acc_t eps, acc_t* __restrict mean,
                                          acc_t* __restrict rstd) {
  for (int64_t i = 0; i < g; ++i) {
    acc_t* zg = z + i * s;
    const acc_t mu = lane_sum<acc_t>(s, [&](int64_t u) { return zg[u]; }) / acc_t(s);
    const acc_t sq = lane_sum<acc_t>(s, [&](int64_t u) { return (zg[u] - mu) * (zg[u] - mu); });
    const acc_t rs = acc_t(1) / std::sqrt(sq / acc_t(s) + eps);
    mean[i] = mu;
    rstd[i] = rs;
#pragma omp simd
    for (int64_t u = 0; u < s; ++u) zg[u] = (zg[u] - mu) * rs * gamma[u] + beta[u];
  }
}

// out_row gets h (acc) at its place in the output: contiguous, or chunk j of mix(e, h, c).
template <typename scalar_t, typename acc_t>
DEFINE_OPS_INLINE void store_h(const StepParams& p, const acc_t* __restrict h, scalar_t* __restrict out_row) {
  if (!p.carry_e) {
#pragma omp simd
    for (int64_t f = 0; f < p.out_h; ++f) out_row[f] = cpu_convert::from_acc<scalar_t>(h[f]);
    return;
  }
  const int64_t alpha = p.out_layout.e_chunk, beta = p.out_layout.h_chunk;
  for (int64_t j = 0; j < p.out_h / beta; ++j) {
    scalar_t* dst = out_row + j * (alpha + beta) + alpha;
    const acc_t* src = h + j * beta;
#pragma omp simd
    for (int64_t r = 0; r < beta; ++r) dst[r] = cpu_convert::from_acc<scalar_t>(src[r]);
  }
}

// The inverse: h (acc) from its place in a grad_out row.
template <typename scalar_t, typename acc_t>
DEFINE_OPS_INLINE void load_h(const StepParams& p, const scalar_t* __restrict row, acc_t* __restrict h) {
  if (!p.carry_e) {
#pragma omp simd
    for (int64_t f = 0; f < p.out_h; ++f) h[f] = cpu_convert::to_acc(row[f]);
    return;
  }
  const int64_t alpha = p.out_layout.e_chunk, beta = p.out_layout.h_chunk;
  for (int64_t j = 0; j < p.out_h / beta; ++j) {
    const scalar_t* src = row + j * (alpha + beta) + alpha;
    acc_t* dst = h + j * beta;
#pragma omp simd
    for (int64_t r = 0; r < beta; ++r) dst[r] = cpu_convert::to_acc(src[r]);
  }
}

// Contiguous e (n values) from / to its chunks inside a mix(e, h, c) row.
template <typename T>
DEFINE_OPS_INLINE void gather_e(const MixLayout& layout, int64_t n, const T* __restrict row, T* __restrict e) {
  const int64_t alpha = layout.e_chunk, stride = layout.e_chunk + layout.h_chunk;
  for (int64_t j = 0; j < n / alpha; ++j)
    for (int64_t r = 0; r < alpha; ++r) e[j * alpha + r] = row[j * stride + r];
}
template <typename T>
DEFINE_OPS_INLINE void scatter_e(const MixLayout& layout, int64_t n, const T* __restrict e, T* __restrict row) {
  const int64_t alpha = layout.e_chunk, stride = layout.e_chunk + layout.h_chunk;
  for (int64_t j = 0; j < n / alpha; ++j)
    for (int64_t r = 0; r < alpha; ++r) row[j * stride + r] = e[j * alpha + r];
}

// ----------------------------------------------------------------------------- forward rows
template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  StepParams p;
  const scalar_t* x;   // [T, a]
  scalar_t* y;         // [T, b] GEMM output in GEMM order; gets the bias when it is the saved tensor
  scalar_t* out;       // [T, out_width]
  const acc_t* bias;   // [b] or null
  const acc_t* gamma;  // [s] or null
  const acc_t* beta;   // [s] or null
  acc_t* mean;         // [T, g] or null
  acc_t* rstd;         // [T, g] or null
  bool keep_saved;
};

template <typename scalar_t>
DEFINE_OPS_INLINE void forward_rows(const ForwardArgs<scalar_t>& A, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const StepParams& p = A.p;
  const int64_t b = p.out_h, s = p.out_group, g = p.groups, quads = (b + 3) / 4;
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const acc_t keep_scale = dropout_keep_scale<acc_t>(p.dropout_p);
  std::vector<acc_t> gemm_order(b), shuffled(p.shuffle ? b : 0);
  std::vector<uint32_t> words(dropout ? 4 * quads : 0);
  std::vector<scalar_t> e_buf(p.carry_e ? p.e_width : 0);
  acc_t* __restrict v = gemm_order.data();
  for (int64_t t = begin; t < end; ++t) {
    scalar_t* __restrict y_row = A.y + t * b;
    if (A.bias) {
#pragma omp simd
      for (int64_t q = 0; q < b; ++q) v[q] = cpu_convert::to_acc(y_row[q]) + A.bias[q];
    } else {
#pragma omp simd
      for (int64_t q = 0; q < b; ++q) v[q] = cpu_convert::to_acc(y_row[q]);
    }
    if (A.keep_saved) {  // saved = y + bias; the backward recomputes from these (rounded) values
#pragma omp simd
      for (int64_t q = 0; q < b; ++q) y_row[q] = cpu_convert::from_acc<scalar_t>(v[q]);
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
#pragma omp simd
        for (int64_t q = 0; q < b; ++q) v[q] = cpu_convert::to_acc(y_row[q]);
      }
    }
    acc_t* z = v;
    if (p.shuffle) {
      shuffle_gather(v, shuffled.data(), g, s);
      z = shuffled.data();
    }
    if (p.norm) group_norm_forward(z, g, s, A.gamma, A.beta, acc_t(p.norm_eps), A.mean + t * g, A.rstd + t * g);
    activation_forward(p.activation, z, b);
    if (dropout) {
      philox_row(p.seed, t, quads, words.data());
      apply_dropout(words.data(), threshold, keep_scale, z, b);
    }
    scalar_t* out_row = A.out + t * p.out_width;
    store_h(p, z, out_row);
    if (p.carry_e) {
      gather_e(p.in_layout, p.e_width, A.x + t * p.in_width, e_buf.data());
      scatter_e(p.out_layout, p.e_width, e_buf.data(), out_row);
    }
  }
}

// ----------------------------------------------------------------------------- backward rows
template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  StepParams p;
  const scalar_t* grad_out;  // [T, out_width]
  const scalar_t* saved;     // [T, b] pre-norm values in GEMM order, or null
  const acc_t* gamma;        // [s] or null
  const acc_t* beta;         // [s] or null
  const acc_t* mean;         // [T, g] or null
  const acc_t* rstd;         // [T, g] or null
  scalar_t* dy;              // [T, b] gradient of the GEMM output, GEMM order
  acc_t* partials;           // [chunks, b + 2s]: d bias (GEMM order) | d gamma | d beta
};

// Builds dY from grad_out and sums the bias / norm gradients per chunk of kRowsPerChunk rows, in
// the accumulation type (float for float32/16-bit: 32 terms; the chunks are then summed in double).
template <typename scalar_t>
DEFINE_OPS_INLINE void backward_chunks(const BackwardArgs<scalar_t>& A, int64_t chunk_begin, int64_t chunk_end) {
  using acc_t = at::opmath_type<scalar_t>;
  const StepParams& p = A.p;
  const int64_t b = p.out_h, s = p.out_group, g = p.groups, quads = (b + 3) / 4;
  const int64_t partial_width = b + 2 * s;
  const bool dropout = p.dropout_p > 0.0;
  const uint32_t threshold = dropout_threshold(p.dropout_p);
  const acc_t keep_scale = dropout_keep_scale<acc_t>(p.dropout_p);
  std::vector<acc_t> grad(b), pre(b), x_hat(b), gemm_order(p.shuffle ? b : 0);
  std::vector<uint32_t> words(dropout ? 4 * quads : 0);
  acc_t* __restrict d = grad.data();
  acc_t* __restrict a = pre.data();
  acc_t* __restrict xh = x_hat.data();
  for (int64_t c = chunk_begin; c < chunk_end; ++c) {
    acc_t* __restrict part = A.partials + c * partial_width;
    for (int64_t i = 0; i < partial_width; ++i) part[i] = 0.0;
    acc_t* __restrict d_bias = part;
    acc_t* __restrict d_gamma = part + b;
    acc_t* __restrict d_beta = part + b + s;
    const int64_t row_end = std::min(p.tokens, (c + 1) * kRowsPerChunk);
    for (int64_t t = c * kRowsPerChunk; t < row_end; ++t) {
      load_h(p, A.grad_out + t * p.out_width, d);
      if (dropout) {
        philox_row(p.seed, t, quads, words.data());
        apply_dropout(words.data(), threshold, keep_scale, d, b);
      }
      if (A.saved) {
        const scalar_t* saved_row = A.saved + t * b;
        if (p.shuffle) {
          for (int64_t i = 0; i < g; ++i)
            for (int64_t u = 0; u < s; ++u) a[u * g + i] = cpu_convert::to_acc(saved_row[i * s + u]);
        } else {
#pragma omp simd
          for (int64_t f = 0; f < b; ++f) a[f] = cpu_convert::to_acc(saved_row[f]);
        }
        if (p.norm) {  // recompute x̂ and the affine output (the activation's input)
          for (int64_t i = 0; i < g; ++i) {
            const acc_t mu = A.mean[t * g + i], rs = A.rstd[t * g + i];
#pragma omp simd
            for (int64_t u = 0; u < s; ++u) {
              xh[i * s + u] = (a[i * s + u] - mu) * rs;
              a[i * s + u] = xh[i * s + u] * A.gamma[u] + A.beta[u];
            }
          }
        }
        activation_backward(p.activation, a, d, b);
      }
      if (p.norm) {
        const acc_t* __restrict gamma = A.gamma;
        for (int64_t i = 0; i < g; ++i) {
          acc_t* __restrict dg = d + i * s;
          const acc_t* __restrict xg = xh + i * s;
          const acc_t sum_dxh = lane_sum<acc_t>(s, [&](int64_t u) { return dg[u] * gamma[u]; });
          const acc_t sum_dxh_xh = lane_sum<acc_t>(s, [&](int64_t u) { return dg[u] * gamma[u] * xg[u]; });
#pragma omp simd
          for (int64_t u = 0; u < s; ++u) {
            d_gamma[u] += dg[u] * xg[u];
            d_beta[u] += dg[u];
          }
          const acc_t rs = A.rstd[t * g + i];
          const acc_t mean_dxh = sum_dxh / acc_t(s), mean_dxh_xh = sum_dxh_xh / acc_t(s);
#pragma omp simd
          for (int64_t u = 0; u < s; ++u) dg[u] = rs * (dg[u] * gamma[u] - mean_dxh - xg[u] * mean_dxh_xh);
        }
      }
      acc_t* dz = d;
      if (p.shuffle) {
        shuffle_scatter(d, gemm_order.data(), g, s);
        dz = gemm_order.data();
      }
      scalar_t* __restrict dy_row = A.dy + t * b;
#pragma omp simd
      for (int64_t q = 0; q < b; ++q) {
        dy_row[q] = cpu_convert::from_acc<scalar_t>(dz[q]);
        d_bias[q] += dz[q];
      }
    }
  }
}

// grad_x[e positions] += grad_out[e positions]: e's copy in the output hands its gradient back.
template <typename scalar_t>
DEFINE_OPS_INLINE void add_e_grad_rows(const StepParams& p, const scalar_t* grad_out, scalar_t* grad_x, int64_t begin,
                                       int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<scalar_t> from_out(p.e_width), in_x(p.e_width);
  for (int64_t t = begin; t < end; ++t) {
    gather_e(p.out_layout, p.e_width, grad_out + t * p.out_width, from_out.data());
    gather_e(p.in_layout, p.e_width, grad_x + t * p.in_width, in_x.data());
#pragma omp simd
    for (int64_t q = 0; q < p.e_width; ++q)
      in_x[q] = cpu_convert::from_acc<scalar_t>(cpu_convert::to_acc(in_x[q]) + cpu_convert::to_acc(from_out[q]));
    scatter_e(p.in_layout, p.e_width, in_x.data(), grad_x + t * p.in_width);
  }
}

// One entry point per dtype, compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
// time (GCC function multi-versioning), so the loops above vectorize for the running CPU.
#define DEFINE_OPS_ROW_ENTRIES(scalar_t)                                                                     \
  DEFINE_OPS_CPU_CLONES void run_forward_rows(const ForwardArgs<scalar_t>& args, int64_t begin, int64_t end) { \
    forward_rows<scalar_t>(args, begin, end);                                                              \
  }                                                                                                        \
  DEFINE_OPS_CPU_CLONES void run_backward_chunks(const BackwardArgs<scalar_t>& args, int64_t begin,          \
                                                 int64_t end) {                                            \
    backward_chunks<scalar_t>(args, begin, end);                                                           \
  }                                                                                                        \
  DEFINE_OPS_CPU_CLONES void run_add_e_grad(const StepParams& p, const scalar_t* grad_out, scalar_t* grad_x, \
                                            int64_t begin, int64_t end) {                                  \
    add_e_grad_rows<scalar_t>(p, grad_out, grad_x, begin, end);                                            \
  }
DEFINE_OPS_ROW_ENTRIES(float)
DEFINE_OPS_ROW_ENTRIES(double)
DEFINE_OPS_ROW_ENTRIES(c10::BFloat16)
DEFINE_OPS_ROW_ENTRIES(c10::Half)
#undef DEFINE_OPS_ROW_ENTRIES

// ----------------------------------------------------------------------------- op bodies
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
    cpu_gemm::mm_out(y_j, x.narrow(1, j * p.in_group, p.in_group), weight.select(0, j));
  }
}

// A small parameter vector in the accumulation dtype (float for half/bf16/float).
at::Tensor as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc_dtype) {
  return t.has_value() ? t->to(acc_dtype).contiguous() : at::Tensor();
}

// The step bodies, writing into tensors the caller allocated (the single-step ops and the stack).
struct CpuStep {
  static void forward(const StepParams& params, const StepTensors& t, const StepOutputs& o) {
    StepParams p = params;
    p.seed = read_seed(t.seed, p);
    if (p.tokens == 0) return;
    const at::Tensor x_c = t.x.contiguous();
    at::Tensor out = o.out;
    if (p.plain()) {  // the Reduce layer: one GEMM with the bias folded in, straight into out
      for (int64_t j = 0; j < p.groups; ++j) {
        auto out_j = out.narrow(1, j * p.out_group, p.out_group);
        auto x_j = x_c.narrow(1, j * p.in_group, p.in_group);
        const auto bias_j = p.bias ? std::optional(t.bias->narrow(0, j * p.out_group, p.out_group)) : std::nullopt;
        cpu_gemm::mm_out(out_j, x_j, t.weight.select(0, j), bias_j);
      }
      return;
    }
    // GEMM order; it is what the backward needs saved when there is a norm or an activation
    at::Tensor y = p.needs_saved() ? o.saved : empty_buffer({p.tokens, p.out_h}, t.x.options());
    grouped_gemm(x_c, t.weight, y, p);
    const auto stats_dtype = stats_dtype_of(t.x.scalar_type());
    const at::Tensor bias_acc = as_acc(t.bias, stats_dtype);
    const at::Tensor gamma_acc = as_acc(t.norm_weight, stats_dtype);
    const at::Tensor beta_acc = as_acc(t.norm_bias, stats_dtype);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.x.scalar_type(), "hgt_step_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const ForwardArgs<scalar_t> args{p,
                                       x_c.const_data_ptr<scalar_t>(),
                                       y.data_ptr<scalar_t>(),
                                       out.data_ptr<scalar_t>(),
                                       p.bias ? bias_acc.const_data_ptr<acc_t>() : nullptr,
                                       p.norm ? gamma_acc.const_data_ptr<acc_t>() : nullptr,
                                       p.norm ? beta_acc.const_data_ptr<acc_t>() : nullptr,
                                       p.norm ? o.mean.data_ptr<acc_t>() : nullptr,
                                       p.norm ? o.rstd.data_ptr<acc_t>() : nullptr,
                                       p.needs_saved()};
      at::parallel_for(0, p.tokens, 16, [&](int64_t begin, int64_t end) { run_forward_rows(args, begin, end); });
    });
  }

  static void backward(const StepParams& params, const at::Tensor& grad_out, const StepTensors& t,
                       const StepOutputs& saved_by_forward, const StepGrads& g) {
    StepParams p = params;
    p.seed = read_seed(t.seed, p);
    if (p.tokens == 0) return zero_parameter_grads(g);
    const at::Tensor x_c = t.x.contiguous();
    const at::Tensor g_c = grad_out.contiguous();
    const auto opts = t.x.options();

    at::Tensor dy;
    if (p.plain()) {
      dy = g_c;
      if (p.bias) {
        at::Tensor grad_bias = g.grad_bias;
        at::sum_out(grad_bias, g_c, 0);
      }
    } else {
      dy = g.dy.defined() ? g.dy : empty_buffer({p.tokens, p.out_h}, opts);
      const int64_t chunks = (p.tokens + kRowsPerChunk - 1) / kRowsPerChunk;
      const int64_t partial_width = p.out_h + 2 * p.out_group;
      const auto stats_dtype = stats_dtype_of(t.x.scalar_type());
      at::Tensor partials = at::empty({chunks, partial_width}, opts.dtype(stats_dtype));
      at::Tensor totals = at::zeros({partial_width}, opts.dtype(at::kDouble));
      const at::Tensor saved_c = p.needs_saved() ? saved_by_forward.saved.contiguous() : at::Tensor();
      const at::Tensor gamma_acc = as_acc(t.norm_weight, stats_dtype);
      const at::Tensor beta_acc = as_acc(t.norm_bias, stats_dtype);
      const at::Tensor mean_c = p.norm ? saved_by_forward.mean.contiguous() : at::Tensor();
      const at::Tensor rstd_c = p.norm ? saved_by_forward.rstd.contiguous() : at::Tensor();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.x.scalar_type(), "hgt_step_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const BackwardArgs<scalar_t> args{p,
                                          g_c.const_data_ptr<scalar_t>(),
                                          p.needs_saved() ? saved_c.const_data_ptr<scalar_t>() : nullptr,
                                          p.norm ? gamma_acc.const_data_ptr<acc_t>() : nullptr,
                                          p.norm ? beta_acc.const_data_ptr<acc_t>() : nullptr,
                                          p.norm ? mean_c.const_data_ptr<acc_t>() : nullptr,
                                          p.norm ? rstd_c.const_data_ptr<acc_t>() : nullptr,
                                          dy.data_ptr<scalar_t>(),
                                          partials.data_ptr<acc_t>()};
        at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) { run_backward_chunks(args, begin, end); });
        // The chunks' sums, added in double in chunk order (deterministic): one loop, not an op call
        // per chunk (8,400 tokens are 263 chunks a layer).
        double* __restrict total = totals.data_ptr<double>();
        const acc_t* __restrict part = partials.const_data_ptr<acc_t>();
        for (int64_t c = 0; c < chunks; ++c) {
          for (int64_t i = 0; i < partial_width; ++i) total[i] += static_cast<double>(part[c * partial_width + i]);
        }
      });
      if (p.bias) g.grad_bias.copy_(totals.narrow(0, 0, p.out_h));
      if (p.norm) {
        g.grad_gamma.copy_(totals.narrow(0, p.out_h, p.out_group));
        g.grad_beta.copy_(totals.narrow(0, p.out_h + p.out_group, p.out_group));
      }
    }

    // dY feeds two GEMMs per group: on the float32 route converted once, not once per GEMM.
    const at::Tensor dy_operand = cpu_gemm::operand(dy);
    for (int64_t j = 0; j < p.groups; ++j) {
      const auto dy_j = dy_operand.narrow(1, j * p.out_group, p.out_group);
      auto dx_j = g.grad_x.narrow(1, j * p.in_group, p.in_group);
      cpu_gemm::mm_out(dx_j, dy_j, t.weight.select(0, j).t());
      auto dw_j = g.grad_weight.select(0, j);
      cpu_gemm::mm_out(dw_j, x_c.narrow(1, j * p.in_group, p.in_group).t(), dy_j);
    }
    if (p.carry_e) {  // the e copy in the output passes its gradient straight back to e's place in x
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.x.scalar_type(), "hgt_step_e_grad_cpu", [&] {
        const scalar_t* go = g_c.const_data_ptr<scalar_t>();
        scalar_t* dx = g.grad_x.data_ptr<scalar_t>();
        at::parallel_for(0, p.tokens, 64, [&](int64_t begin, int64_t end) { run_add_e_grad(p, go, dx, begin, end); });
      });
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(define_ops, CPU, m) {
  m.impl("hgt_step", &StepOps<CpuStep>::forward);
  m.impl("hgt_step_backward", &StepOps<CpuStep>::backward);
  m.impl("hgt_stack", &StackOps<CpuStep>::forward);
  m.impl("hgt_stack_backward", &StackOps<CpuStep>::backward);
}

}  // namespace define_ops
