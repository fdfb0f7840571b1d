// Small helpers shared by the CUDA kernels: vector types for 16-byte accesses, warp sums, a walker
// over (group, offset) pairs of a row, shared memory, launches and launch sizing.
//
// Everything the kernels need from the CUDA runtime goes through this header, so that the test
// build (DEFINE_OPS_CUDA_EMULATION, csrc/emulation/) can run the very same kernel code on CPU
// threads: see csrc/emulation/cuda_emulation.h.
#pragma once

#ifdef DEFINE_OPS_CUDA_EMULATION
#include "../emulation/cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace define_ops {
namespace cuda {

// N scalars loaded or stored as one aligned access (16 bytes for N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

inline bool is_aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Sum over the 32 lanes of a warp; every lane gets the same, deterministically ordered result.
template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Index of the lowest set bit of a non-zero mask.
__device__ __forceinline__ int lowest_set_bit(unsigned mask) {
#ifdef __CUDA_ARCH__
  return __ffs(static_cast<int>(mask)) - 1;
#else
  return __builtin_ctz(mask);
#endif
}

// n / d and n % d for a divisor d fixed for a launch, as a multiply-high, an add and a shift
// instead of a runtime integer division (~20 instructions on the GPU; the epilogues' layout
// arithmetic needs a few per quad of features). Granlund & Montgomery (PLDI 1994) with
// l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1: q = (mulhi(m, n) + n) >> l, exact for every
// 0 <= n < 2^31 (mulhi(m, n) < n there, so the add cannot overflow 32 bits). Built on the host.
struct FastDivmod {
  int divisor = 1;
  uint32_t multiplier = 0;
  uint32_t shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(int d) : divisor(d < 1 ? 1 : d) {
    const uint64_t dd = static_cast<uint64_t>(divisor);
    while ((uint64_t{1} << shift) < dd) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - dd)) / dd + 1);
  }
  __host__ __device__ __forceinline__ int div(int n) const {
    const uint32_t un = static_cast<uint32_t>(n);
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(un) * multiplier) >> 32);
    return static_cast<int>((hi + un) >> shift);
  }
  __host__ __device__ __forceinline__ int mod(int n) const { return n - div(n) * divisor; }
};

// Position p of a row split into groups of `period`: group = p / period, offset = p % period,
// advanced one element at a time without a division.
struct RowCursor {
  int group;
  int offset;
  __device__ __forceinline__ RowCursor(int p, const FastDivmod& period)
      : group(period.div(p)), offset(p - group * period.divisor) {}
  __device__ __forceinline__ void next(int period) {
    if (++offset == period) {
      offset = 0;
      ++group;
    }
  }
};

// An integer tuning setting from the environment (callers read it once): `fallback` when unset or
// empty, else the value, which must lie in [lo, hi] and be a multiple of `multiple`; anything else
// is a clear error naming the variable and the value.
inline int64_t env_integer(const char* name, int64_t fallback, int64_t lo, int64_t hi, int64_t multiple = 1) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  const bool ok = *end == '\0' && value >= lo && value <= hi && value % multiple == 0;
  if (multiple == 1) {
    TORCH_CHECK_VALUE(ok, name, " must be an integer in ", lo, "..", hi, ", got '", env, "'");
  } else {
    TORCH_CHECK_VALUE(ok, name, " must be a multiple of ", multiple, " in ", lo, "..", hi, ", got '", env, "'");
  }
  return static_cast<int64_t>(value);
}

// Threads per block for a row of `width` features handled four at a time: a multiple of 32 in
// [64, max_threads].
inline int row_block_threads(int64_t width, int max_threads) {
  const int64_t quads = (width + 3) / 4;
  const int64_t rounded = (quads + 31) / 32 * 32;
  return static_cast<int>(rounded < 64 ? 64 : (rounded > max_threads ? max_threads : rounded));
}

#ifndef DEFINE_OPS_CUDA_EMULATION
constexpr bool kEmulated = false;

using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// The block's dynamic shared memory.
template <typename T>
__device__ __forceinline__ T* shared_memory() {
  extern __shared__ __align__(32) unsigned char smem_raw[];  // 32: the kernels load 4 doubles at once
  return reinterpret_cast<T*>(smem_raw);
}

// Barrier over the whole grid (cooperative launches only).
__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }

// A load that bypasses L1: reads what other blocks wrote before a grid barrier.
template <typename T>
__device__ __forceinline__ T load_uncached(const T* ptr) {
  return __ldcg(ptr);
}

// Test hook: the emulation counts launches per kernel name, so tests can see which path ran.
inline void count_launch(const char* /*kernel*/) {}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int64_t grid, int threads, size_t smem, Args&&... args) {
  kernel<<<static_cast<unsigned>(grid), threads, smem, current_stream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// All blocks resident at once (needed by grid_sync); `grid` must not exceed what fits.
template <typename Param>
void launch_cooperative(void (*kernel)(Param), int64_t grid, int threads, size_t smem, Param param) {
  void* params[] = {&param};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(static_cast<unsigned>(grid)),
                                             dim3(threads), params, smem, current_stream()));
}

// A device attribute of the current device, read once per device.
inline int device_attribute(cudaDeviceAttr attribute) {
  static std::mutex mutex;
  static auto* cache = new std::map<std::pair<int, int>, int>();  // never freed: used until exit
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_pair(device, static_cast<int>(attribute));
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache->find(key);
  if (found != cache->end()) return found->second;
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  cache->emplace(key, value);
  return value;
}

inline int num_sms() { return device_attribute(cudaDevAttrMultiProcessorCount); }

// Largest dynamic shared memory one block may ask for (after opting in).
inline size_t max_dynamic_smem() {
  return static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

inline bool supports_cooperative_launch() { return device_attribute(cudaDevAttrCooperativeLaunch) != 0; }

// Resident blocks per SM of `kernel` at this block size and dynamic shared memory, cached per
// device. Kernels that need more than the default 48 KB get their limit raised to the device's
// opt-in maximum first, so that any smaller size launches as well.
template <typename Kernel>
int blocks_per_sm(Kernel* kernel, int threads, size_t smem_bytes) {
  static std::mutex mutex;
  static auto* cache = new std::map<std::tuple<const void*, int, size_t, int>, int>();  // never freed
  const void* entry = reinterpret_cast<const void*>(kernel);
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(entry, threads, smem_bytes, device);
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = cache->find(key);
    if (found != cache->end()) return found->second;
  }
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(entry, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(max_dynamic_smem())));
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, entry, threads, smem_bytes));
  std::lock_guard<std::mutex> lock(mutex);
  cache->emplace(key, blocks);
  return blocks;
}
#endif  // DEFINE_OPS_CUDA_EMULATION

}  // namespace cuda
}  // namespace define_ops
