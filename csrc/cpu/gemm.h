// The CPU kernels' GEMMs: ATen's, except for a half-precision dtype this CPU has no fast GEMM for
// (gemm.cpp says why and how).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace define_ops {
namespace cpu_gemm {

// Whether the CPU kernels run a GEMM in `dtype` in float32 on this machine, now.
bool in_float32(at::ScalarType dtype);

// `t` as a GEMM in its dtype takes it: in float32 on the float32 route, else `t` itself. For an
// operand that several GEMMs read (mm_out converts the others per call; a float32 one is kept as is).
at::Tensor operand(const at::Tensor& t);

// out [M, N] (any strides, e.g. a group's columns of a wider output) = a [M, K] @ b [K, N]
// (+ bias [N] on every row).
void mm_out(at::Tensor out, const at::Tensor& a, const at::Tensor& b,
            const std::optional<at::Tensor>& bias = std::nullopt);

}  // namespace cpu_gemm
}  // namespace define_ops
