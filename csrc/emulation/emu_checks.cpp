// Test-only (tests/test_cuda_emulation.py): checks of the CUDA helpers' host-side arithmetic that
// the kernels' tests cannot reach exhaustively.
#include "cuda_emulation.h"

#include <ATen/core/Tensor.h>

#include "../cuda/cuda_utils.cuh"

namespace define_ops {
namespace {

// How many (d, n) pairs FastDivmod(d) gets wrong against / and %: divisors [D], numerators [N],
// both int64 holding values in [1, 2^31) and [0, 2^31).
int64_t fast_divmod_mismatches(const at::Tensor& divisors, const at::Tensor& numerators) {
  TORCH_CHECK(divisors.scalar_type() == at::kLong && numerators.scalar_type() == at::kLong, "int64 tensors expected");
  const at::Tensor d_c = divisors.contiguous(), n_c = numerators.contiguous();
  const int64_t* ds = d_c.const_data_ptr<int64_t>();
  const int64_t* ns = n_c.const_data_ptr<int64_t>();
  int64_t wrong = 0;
  for (int64_t i = 0; i < d_c.numel(); ++i) {
    const int d = static_cast<int>(ds[i]);
    const cuda::FastDivmod by_d(d);
    for (int64_t j = 0; j < n_c.numel(); ++j) {
      const int n = static_cast<int>(ns[j]);
      wrong += by_d.div(n) != n / d || by_d.mod(n) != n % d;
    }
  }
  return wrong;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(define_ops_emu, m) {
  m.def("fast_divmod_mismatches(Tensor divisors, Tensor numerators) -> int", &fast_divmod_mismatches);
  m.def("launch_count(str kernel) -> int",
        [](c10::string_view kernel) { return cuda::launch_count(std::string(kernel.data(), kernel.size())); });
}

}  // namespace define_ops
