// ATen multiplies float16/bfloat16 matrices with oneDNN where the CPU has the instructions for it
// (AVX512-FP16 / AMX-FP16 / AVX-NE-CONVERT for float16; AVX-512 core, AVX-NE-CONVERT or AMX-BF16
// for bfloat16) and otherwise with a generic loop: float16 on a 2-core AMD EPYC VM (AVX512-BF16
// but no AVX512-FP16) ran at ~1 GFLOP/s, 80x slower than the same GEMM in float32. There the GEMM
// runs in float32 instead: operands converted, one float32 GEMM, the result rounded once into
// `out`. Both ways accumulate in float32, so the results agree to rounding.
//
// DEFINE_OPS_CPU_GEMM_UPCAST (read at every call, so tests can switch it): unset or empty, the
// rule above; 1, every float16/bfloat16 GEMM in float32; 0, never.
#include "gemm.h"

#include <ATen/ATen.h>
#include <cpuinfo.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

namespace define_ops {
namespace cpu_gemm {

namespace {
// Whether this CPU has the instructions ATen's oneDNN GEMM needs for `dtype` (cpuinfo: the CPU
// feature table torch itself uses). True on other architectures, whose fast paths are not modelled here.
bool has_fast_half_gemm(at::ScalarType dtype) {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool ready = cpuinfo_initialize();
  if (!ready) return false;
  if (dtype == at::kHalf) {
    return cpuinfo_has_x86_avx512fp16() || cpuinfo_has_x86_amx_fp16() || cpuinfo_has_x86_avx_ne_convert();
  }
  const bool avx512_core = cpuinfo_has_x86_avx512f() && cpuinfo_has_x86_avx512bw() && cpuinfo_has_x86_avx512vl() &&
                           cpuinfo_has_x86_avx512dq();
  return avx512_core || cpuinfo_has_x86_avx_ne_convert() || cpuinfo_has_x86_amx_bf16();
#else
  (void)dtype;
  return true;
#endif
}
}  // namespace

bool in_float32(at::ScalarType dtype) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const char* env = std::getenv("DEFINE_OPS_CPU_GEMM_UPCAST");
  if (env != nullptr && *env != '\0') {
    const std::string value(env);
    TORCH_CHECK_VALUE(value == "0" || value == "1", "DEFINE_OPS_CPU_GEMM_UPCAST must be 0 or 1, got '", value, "'");
    return value == "1";
  }
  return !has_fast_half_gemm(dtype);
}

at::Tensor operand(const at::Tensor& t) { return in_float32(t.scalar_type()) ? t.to(at::kFloat) : t; }

void mm_out(at::Tensor out, const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias) {
  if (!in_float32(out.scalar_type())) {
    if (bias.has_value()) {
      at::addmm_out(out, *bias, a, b);
    } else {
      at::mm_out(out, a, b);
    }
    return;
  }
  const at::Tensor a32 = a.to(at::kFloat), b32 = b.to(at::kFloat);
  out.copy_(bias.has_value() ? at::addmm(bias->to(at::kFloat), a32, b32) : at::mm(a32, b32));
}

}  // namespace cpu_gemm

// Whether the CPU kernels run their GEMMs in `dtype` in float32 on this machine, for tests and
// users' diagnostics; declared here, with the rule, rather than among the kernels' schemas.
TORCH_LIBRARY_FRAGMENT(define_ops, m) {
  m.def("cpu_gemm_in_float32(ScalarType dtype) -> bool",
        [](at::ScalarType dtype) { return cpu_gemm::in_float32(dtype); });
}

}  // namespace define_ops
