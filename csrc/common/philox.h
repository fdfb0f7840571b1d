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

C10_HOST_DEVICE inline uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

C10_HOST_DEVICE inline PhiloxWords philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c2 = 0, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t old_c0 = c0, old_c2 = c2;
    c0 = mul_hi_u32(kRoundB, old_c2) ^ c1 ^ k0;
    c2 = mul_hi_u32(kRoundA, old_c0) ^ c3 ^ k1;
    c1 = kRoundB * old_c2;
    c3 = kRoundA * old_c0;
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

}  // namespace define_ops
