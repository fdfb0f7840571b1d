// Test-only ops over csrc/cpu/convert.h (built by tests/test_cpu_convert.py): the CPU epilogues'
// 16-bit float conversions applied to whole tensors, so that Python can compare them with ATen's
// conversions on every input.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/convert.h"

namespace {

// values [N] float32 → [N] int16: the float16 (`half`) or bfloat16 bits of each, rounded.
at::Tensor round_to_bits(const at::Tensor& values, bool half) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.is_contiguous(), "float32 contiguous values expected");
  at::Tensor out = at::empty(values.sizes(), values.options().dtype(at::kShort));
  const float* in = values.const_data_ptr<float>();
  auto* bits = reinterpret_cast<uint16_t*>(out.data_ptr<int16_t>());
  at::parallel_for(0, values.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    if (half) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) bits[i] = define_ops::cpu_convert::float_to_float16(in[i]);
    } else {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) bits[i] = define_ops::cpu_convert::float_to_bfloat16(in[i]);
    }
  });
  return out;
}

// bits [N] int16 (float16 if `half`, else bfloat16) → [N] float32, exact.
at::Tensor widen_bits(const at::Tensor& bits, bool half) {
  TORCH_CHECK(bits.scalar_type() == at::kShort && bits.is_contiguous(), "int16 contiguous bits expected");
  at::Tensor out = at::empty(bits.sizes(), bits.options().dtype(at::kFloat));
  const auto* in = reinterpret_cast<const uint16_t*>(bits.const_data_ptr<int16_t>());
  float* values = out.data_ptr<float>();
  for (int64_t i = 0; i < bits.numel(); ++i) {
    values[i] = half ? define_ops::cpu_convert::float16_to_float(in[i]) : define_ops::cpu_convert::bfloat16_to_float(in[i]);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(define_ops_convert_test, m) {
  m.def("round_to_bits(Tensor values, bool half) -> Tensor");
  m.def("widen_bits(Tensor bits, bool half) -> Tensor");
}

TORCH_LIBRARY_IMPL(define_ops_convert_test, CPU, m) {
  m.impl("round_to_bits", &round_to_bits);
  m.impl("widen_bits", &widen_bits);
}
