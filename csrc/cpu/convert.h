// Conversions between the 16-bit float storage types and their float accumulation type for the
// CPU epilogues, on the raw bits and without branches, so that GCC vectorizes them inside
// `#pragma omp simd` loops. c10::BFloat16's and c10::Half's own conversions did not vectorize
// there: the float→bfloat16 rounding branches on NaN, c10::Half's uses scalar F16C or a branchy
// bit form, and both go through a temporary object; the epilogue of a bfloat16 layer ran at ~1.6x
// and a float16 one at ~2.9x the float32 time. Results are bit-identical to torch's conversions
// (round to nearest even; float16 subnormals, overflow to infinity and NaN included): checked for
// every float32 input against c10's scalar conversion and for a sample against ATen's vectorized
// one (tests/test_cpu_convert.py).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <cstdint>
#include <type_traits>

#include "fast_math.h"

namespace define_ops {
namespace cpu_convert {

// bfloat16 is float32's upper half: widening is a shift.
DEFINE_OPS_INLINE float bfloat16_to_float(uint16_t h) { return c10::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

// Round to nearest even on the 16 dropped bits; any NaN becomes the quiet NaN 0x7FC0 (as c10's).
DEFINE_OPS_INLINE uint16_t float_to_bfloat16(float f) {
  const uint32_t u = c10::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// float16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. Exact.
DEFINE_OPS_INLINE float float16_to_float(uint16_t h) {
  const uint32_t magnitude = h & 0x7FFFu;
  // Normal numbers: re-bias the exponent (127 - 15 = 112) and widen the mantissa.
  const uint32_t normal = (magnitude << 13) + (112u << 23);
  // Subnormals (and zero): mantissa · 2^-24, exact in float.
  const uint32_t subnormal = c10::bit_cast<uint32_t>(static_cast<float>(magnitude) * 0x1p-24f);
  // Infinity, and NaN with its payload, made quiet (as a float conversion does).
  const uint32_t special = 0x7F800000u | ((magnitude & 0x3FFu) << 13) | (magnitude > 0x7C00u ? 0x400000u : 0u);
  uint32_t out = magnitude < 0x400u ? subnormal : normal;
  out = magnitude >= 0x7C00u ? special : out;
  return c10::bit_cast<float>(out | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// Round to nearest even, to a float16 subnormal below 2^-14 and to infinity from 65520 up; a NaN
// becomes the quiet NaN 0x7E00 with the input's sign.
DEFINE_OPS_INLINE uint16_t float_to_float16(float f) {
  const uint32_t u = c10::bit_cast<uint32_t>(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  // Normal results: drop 13 mantissa bits rounding to even (a carry moves into the exponent),
  // then re-bias the exponent.
  const uint32_t normal = ((magnitude + 0xFFFu + ((magnitude >> 13) & 1u)) >> 13) - (112u << 10);
  // Below 2^-14: adding 0.5 (whose ulp is 2^-24, a float16 subnormal's step) rounds |f| to a
  // multiple of 2^-24 in the FPU's round-to-nearest-even; the low bits are then the mantissa.
  const uint32_t subnormal = c10::bit_cast<uint32_t>(c10::bit_cast<float>(magnitude) + 0.5f) - 0x3F000000u;
  uint32_t out = magnitude < 0x38800000u ? subnormal : normal;
  out = magnitude >= 0x477FF000u ? 0x7C00u : out;  // 65520 and up (and infinity) round to infinity
  out = magnitude > 0x7F800000u ? 0x7E00u : out;
  return static_cast<uint16_t>(out | sign);
}

// scalar_t → its accumulation type (float for the 16-bit types; the identity otherwise).
template <typename scalar_t>
DEFINE_OPS_INLINE at::opmath_type<scalar_t> to_acc(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return bfloat16_to_float(v.x);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return float16_to_float(v.x);
  } else {
    return v;
  }
}

// The accumulation type → scalar_t, rounded to nearest even.
template <typename scalar_t, typename acc_t>
DEFINE_OPS_INLINE scalar_t from_acc(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return c10::BFloat16(float_to_bfloat16(v), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return c10::Half(float_to_float16(v), c10::Half::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

}  // namespace cpu_convert
}  // namespace define_ops
