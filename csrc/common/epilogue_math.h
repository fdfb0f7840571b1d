// Per-element math of the HGT epilogue in the accumulation type (float for half/bf16/float,
// double for double), C10_HOST_DEVICE so that host and device code compute the same formulas.
// The CPU kernels use vectorized forms of the same formulas (csrc/cpu/fast_math.h); the CUDA
// kernels call these directly.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

#include "step_params.h"

namespace define_ops {
namespace epilogue {

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

C10_HOST_DEVICE inline float erf_acc(float x) { return erff(x); }
C10_HOST_DEVICE inline double erf_acc(double x) { return erf(x); }
C10_HOST_DEVICE inline float exp_acc(float x) { return expf(x); }
C10_HOST_DEVICE inline double exp_acc(double x) { return exp(x); }
C10_HOST_DEVICE inline float sqrt_acc(float x) { return sqrtf(x); }
C10_HOST_DEVICE inline double sqrt_acc(double x) { return sqrt(x); }

// f(v): exact-erf GELU, ReLU, swish (x·σ(x)) or the identity.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t activation_forward(Activation act, acc_t v) {
  switch (act) {
    case Activation::kGelu:
      return acc_t(0.5) * v * (acc_t(1) + erf_acc(v * acc_t(kInvSqrt2)));
    case Activation::kRelu:  // NaN stays NaN, as in F.relu (a NaN row flags a bad id, see layer.py)
      return v < acc_t(0) ? acc_t(0) : v;
    case Activation::kSwish:
      return v / (acc_t(1) + exp_acc(-v));
    default:
      return v;
  }
}

// d · f'(a): the gradient through the activation at its input a.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t activation_backward(Activation act, acc_t a, acc_t d) {
  switch (act) {
    case Activation::kGelu: {
      const acc_t cdf = acc_t(0.5) * (acc_t(1) + erf_acc(a * acc_t(kInvSqrt2)));
      const acc_t pdf = exp_acc(acc_t(-0.5) * a * a) * acc_t(kInvSqrt2Pi);
      return d * (cdf + a * pdf);
    }
    case Activation::kRelu:  // F.relu's backward: zero where the output is <= 0 (a NaN passes d)
      return a <= acc_t(0) ? acc_t(0) : d;
    case Activation::kSwish: {
      const acc_t sig = acc_t(1) / (acc_t(1) + exp_acc(-a));
      return d * (sig * (acc_t(1) + a * (acc_t(1) - sig)));
    }
    default:
      return d;
  }
}

// Inverted dropout as the reference computes it, v · (kept ? 1/(1−p) : 0): a dropped NaN or inf
// gives NaN, as in F.dropout, where a select would give 0 (and could hide a bad id's NaN row).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t dropout_apply(bool keep, acc_t v, acc_t keep_scale) {
  return v * (keep ? keep_scale : acc_t(0));
}

}  // namespace epilogue
}  // namespace define_ops
