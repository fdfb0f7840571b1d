// Test-only ops over csrc/cpu/convert.h (built by tests/test_cpu_convert.py): the CPU epilogues'
// 16-bit float conversions applied to whole tensors, so that Python can compare them with ATen's
// conversions on every input.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/convert.h"

#include <cmath>
#include <vector>

namespace {

// in [n] float32 → out [n]: the float16 (`half`) or bfloat16 bits of each, as the CPU kernels round.
void round_into(const float* in, uint16_t* out, int64_t n, bool half) {
  if (half) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = define_ops::cpu_convert::float_to_float16(in[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = define_ops::cpu_convert::float_to_bfloat16(in[i]);
  }
}

// values [N] float32 → [N] int16: the float16 (`half`) or bfloat16 bits of each, rounded.
at::Tensor round_to_bits(const at::Tensor& values, bool half) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.is_contiguous(), "float32 contiguous values expected");
  at::Tensor out = at::empty(values.sizes(), values.options().dtype(at::kShort));
  const float* in = values.const_data_ptr<float>();
  auto* bits = reinterpret_cast<uint16_t*>(out.data_ptr<int16_t>());
  at::parallel_for(0, values.numel(), 1 << 16,
                   [&](int64_t begin, int64_t end) { round_into(in + begin, bits + begin, end - begin, half); });
  return out;
}

// bits [N] int16 (float16 if `half`, else bfloat16) → [N] float32, exact.
at::Tensor widen_bits(const at::Tensor& bits, bool half) {
  TORCH_CHECK(bits.scalar_type() == at::kShort && bits.is_contiguous(), "int16 contiguous bits expected");
  at::Tensor out = at::empty(bits.sizes(), bits.options().dtype(at::kFloat));
  const auto* in = reinterpret_cast<const uint16_t*>(bits.const_data_ptr<int16_t>());
  float* values = out.data_ptr<float>();
  for (int64_t i = 0; i < bits.numel(); ++i) {
    values[i] = half ? define_ops::cpu_convert::float16_to_float(in[i])
                     : define_ops::cpu_convert::bfloat16_to_float(in[i]);
  }
  return out;
}

// Every float32 bit pattern rounded by convert.h and by c10's scalar conversion (IEEE round to
// nearest even, in software here: this library is built without F16C): [mismatches, the first
// mismatching input's bits, ours, c10's] as int64 [4]. A NaN input only needs a NaN output.
at::Tensor compare_every_float32(bool half) {
  constexpr int64_t kBlock = int64_t{1} << 16;
  constexpr int64_t kBlocks = (int64_t{1} << 32) / kBlock;
  std::vector<int64_t> mismatches(kBlocks, 0), first(kBlocks, -1), ours_at(kBlocks, 0), theirs_at(kBlocks, 0);
  at::parallel_for(0, kBlocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> values(kBlock);
    std::vector<uint16_t> ours(kBlock);
    for (int64_t block = begin; block < end; ++block) {
      for (int64_t i = 0; i < kBlock; ++i) {
        values[i] = c10::bit_cast<float>(static_cast<uint32_t>(block * kBlock + i));
      }
      round_into(values.data(), ours.data(), kBlock, half);
      for (int64_t i = 0; i < kBlock; ++i) {
        const uint16_t theirs = half ? c10::Half(values[i]).x : c10::BFloat16(values[i]).x;
        const bool ok = std::isnan(values[i]) ? ((ours[i] & 0x7FFF) > (half ? 0x7C00 : 0x7F80)) : ours[i] == theirs;
        if (!ok && mismatches[block]++ == 0) {
          first[block] = block * kBlock + i;
          ours_at[block] = ours[i];
          theirs_at[block] = theirs;
        }
      }
    }
  });
  int64_t total = 0, report = -1;
  for (int64_t block = 0; block < kBlocks; ++block) {
    if (mismatches[block] > 0 && report < 0) report = block;
    total += mismatches[block];
  }
  at::Tensor out = at::zeros({4}, at::kLong);
  out[0] = total;
  if (report >= 0) {
    out[1] = first[report];
    out[2] = ours_at[report];
    out[3] = theirs_at[report];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(define_ops_convert_test, m) {
  m.def("round_to_bits(Tensor values, bool half) -> Tensor");
  m.def("widen_bits(Tensor bits, bool half) -> Tensor");
  m.def("compare_every_float32(bool half) -> Tensor", &compare_every_float32);  // no tensor inputs: catch-all
}

TORCH_LIBRARY_IMPL(define_ops_convert_test, CPU, m) {
  m.impl("round_to_bits", &round_to_bits);
  m.impl("widen_bits", &widen_bits);
}
