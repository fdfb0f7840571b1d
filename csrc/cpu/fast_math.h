// Elementwise math for the CPU epilogues, written so that GCC vectorizes it inside
// `#pragma omp simd` loops (no libm calls, no branches). float uses short polynomial forms whose
// error is of the order of float rounding (the same erf form ATen's vectorized GELU uses);
// double uses libm, so float64 results stay exact to ~1e-15 for the parity tests.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define DEFINE_OPS_INLINE inline __attribute__((always_inline))

namespace define_ops {
namespace cpu_math {

// e^x: x = n·ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative error
// about 1e-7), 2^n assembled in the exponent bits. Inputs are clamped to the normal range.
DEFINE_OPS_INLINE float exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;   // Cody-Waite ln2
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (0.16666667f + r * (0.041666668f + r * (0.0083333338f + r * 0.0013888889f)))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), with e^(-x²) in *gauss: GELU's
// backward needs both at x = a/√2 (its density is e^(-a²/2)/√(2π)), and the polynomial computes
// that exponential anyway: one exp, not two.
DEFINE_OPS_INLINE float erf_and_gauss(float x, float* gauss) {
  const float ax = x < 0.0f ? -x : x;
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  *gauss = exp(-ax * ax);
  const float y = 1.0f - poly * *gauss;
  return x < 0.0f ? -y : y;
}

DEFINE_OPS_INLINE float erf(float x) {
  float gauss;
  return erf_and_gauss(x, &gauss);
}

DEFINE_OPS_INLINE double exp(double x) { return std::exp(x); }
DEFINE_OPS_INLINE double erf(double x) { return std::erf(x); }
DEFINE_OPS_INLINE double erf_and_gauss(double x, double* gauss) {
  *gauss = std::exp(-x * x);
  return std::erf(x);
}

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

}  // namespace cpu_math
}  // namespace define_ops
