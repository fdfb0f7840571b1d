// Counter-based Philox4x32-10, shared by the CPU and CUDA kernels and mirrored bit for bit by
// define_ops/reference.py and the Triton kernels (tl.philox), so that every backend draws the
// same dropout mask from the same seed and the backward regenerates it instead of storing it.
//
// Element (row t, feature p) of a layer's output uses word p % 4 of
// philox(key = (seed_lo, seed_hi), counter = (p / 4, t, 0, 0)); it is kept when word >= threshold.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace define_ops {

struct PhiloxWords {
  uint32_t w[4];
};

// a · b as (high, low) 32-bit halves. On the GPU one mul.wide (a single IMAD.WIDE.U32 that yields
// both halves); nvcc emits a second multiply for the low half when the two are written apart.
struct WideProduct {
  uint32_t hi;
  uint32_t lo;
};

C10_HOST_DEVICE inline WideProduct mul_wide_u32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  uint32_t lo, hi;
  asm("{\n\t.reg .b64 product;\n\tmul.wide.u32 product, %2, %3;\n\tmov.b64 {%0, %1}, product;\n\t}"
      : "=r"(lo), "=r"(hi)
      : "r"(a), "r"(b));
  return WideProduct{hi, lo};
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  return WideProduct{static_cast<uint32_t>(product >> 32), static_cast<uint32_t>(product)};
#endif
}

C10_HOST_DEVICE inline PhiloxWords philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c2 = 0, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const WideProduct product_a = mul_wide_u32(kRoundA, c0), product_b = mul_wide_u32(kRoundB, c2);
    c0 = product_b.hi ^ c1 ^ k0;
    c2 = product_a.hi ^ c3 ^ k1;
    c1 = product_b.lo;
    c3 = product_a.lo;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// A word below the threshold drops the element: P(drop) = p to within 2^-32.
inline uint32_t dropout_threshold(double p) {
  const double scaled = std::floor(p * 4294967296.0);
  return scaled >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(scaled);
}

// What a kept element is multiplied by, 1 / (1 - p), taken in double (in float it is 1.3 % off at
// p = 0.999999) and 1 without dropout.
template <typename acc_t>
acc_t dropout_keep_scale(double p) {
  return p > 0.0 ? static_cast<acc_t>(1.0 / (1.0 - p)) : acc_t(1);
}

}  // namespace define_ops
