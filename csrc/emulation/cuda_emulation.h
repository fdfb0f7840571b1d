// Test-only CPU stand-in for the CUDA features that csrc/cuda/ uses, so that the kernels' own code
// (index math, barriers, warp and block reductions, the grid barrier, the host launchers around
// them) runs on a machine without a GPU. Every thread of a launch is a std::thread; __syncthreads
// is a per-block std::barrier, a warp shuffle an exchange through a per-warp slot array between two
// per-warp barriers, grid_sync a barrier over the whole grid (cooperative launches run all blocks at
// once, plain launches one block at a time). Shared memory starts filled with 0xFF bytes (NaN), so
// a read before a write shows up. The ops register under define_ops_emu on the CPU key.
//
// Built only by tests/test_cuda_emulation.py (with -DDEFINE_OPS_CUDA_EMULATION); never part of
// define_ops._C. What it cannot show: real warp scheduling, memory-model effects, speed.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// The schemas and implementations go to a library of their own, on the CPU key.
#undef TORCH_LIBRARY
#define TORCH_LIBRARY(ns, m) TORCH_LIBRARY_FRAGMENT(define_ops_emu, m)
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(define_ops_emu, CPU, m, C10_UID)

namespace define_ops {
namespace cuda {
namespace emu {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

struct Warp {
  std::barrier<> barrier{32};
  alignas(16) unsigned char slots[32][16];
};

struct Block {
  // Shared memory starts 64-byte aligned, as the device's does (kernels load 4 doubles at once).
  static constexpr size_t kSmemAlign = 64;
  Block(int threads, size_t smem_bytes)
      : barrier(threads), warps(threads / 32), smem_storage(new unsigned char[smem_bytes + 16 + kSmemAlign]) {
    const auto address = reinterpret_cast<uintptr_t>(smem_storage.get());
    smem = smem_storage.get() + (kSmemAlign - address % kSmemAlign) % kSmemAlign;
    std::memset(smem, 0xFF, smem_bytes + 16);
  }
  std::barrier<> barrier;
  std::vector<Warp> warps;
  std::unique_ptr<unsigned char[]> smem_storage;
  unsigned char* smem;
};

struct ThreadState {
  Index thread, block, block_dim, grid_dim;
  Block* block_state = nullptr;
  std::barrier<>* grid_barrier = nullptr;
};

inline thread_local ThreadState current;

// Runs body() once per thread of a grid x threads launch.
inline void run(int64_t grid, int threads, size_t smem_bytes, bool cooperative, const std::function<void()>& body) {
  TORCH_CHECK(grid >= 1 && threads >= 32 && threads <= 1024 && threads % 32 == 0,
              "emulated launch: bad configuration grid=", grid, " threads=", threads);
  std::barrier<> grid_barrier(cooperative ? grid * threads : 1);
  auto start_block = [&](int64_t b, Block& block, std::vector<std::thread>& pool) {
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        current.thread = Index{static_cast<unsigned>(t)};
        current.block = Index{static_cast<unsigned>(b)};
        current.block_dim = Index{static_cast<unsigned>(threads), 1, 1};
        current.grid_dim = Index{static_cast<unsigned>(grid), 1, 1};
        current.block_state = &block;
        current.grid_barrier = cooperative ? &grid_barrier : nullptr;
        body();
      });
    }
  };
  if (cooperative) {  // every block at once: the grid barrier needs them all
    std::vector<std::unique_ptr<Block>> blocks;
    std::vector<std::thread> pool;
    for (int64_t b = 0; b < grid; ++b) blocks.push_back(std::make_unique<Block>(threads, smem_bytes));
    for (int64_t b = 0; b < grid; ++b) start_block(b, *blocks[b], pool);
    for (auto& thread : pool) thread.join();
  } else {
    for (int64_t b = 0; b < grid; ++b) {
      Block block(threads, smem_bytes);
      std::vector<std::thread> pool;
      start_block(b, block, pool);
      for (auto& thread : pool) thread.join();
    }
  }
}

}  // namespace emu

constexpr bool kEmulated = true;

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline int current_stream() { return 0; }

template <typename T>
T* shared_memory() {
  return reinterpret_cast<T*>(emu::current.block_state->smem);
}

inline void grid_sync() {
  TORCH_CHECK(emu::current.grid_barrier != nullptr, "grid_sync outside a cooperative launch");
  emu::current.grid_barrier->arrive_and_wait();
}

template <typename T>
T load_uncached(const T* ptr) {
  return *ptr;
}

// The emulated device: 2 SMs with 2 resident blocks each, so grids are small and every block
// walks several rows. DEFINE_OPS_EMU_SMEM lowers the shared memory per block to force the
// global-workspace fallback.
inline int num_sms() { return 2; }
inline size_t max_dynamic_smem() {
  const char* env = std::getenv("DEFINE_OPS_EMU_SMEM");
  return env != nullptr ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : size_t{48 * 1024};
}
inline bool supports_cooperative_launch() { return true; }
template <typename Kernel>
int blocks_per_sm(Kernel*, int, size_t) {
  return 2;
}

// Launches per kernel name (csrc/cuda calls count_launch where a test must see which kernel ran).
inline std::mutex launch_counts_mutex;
inline std::map<std::string, int64_t> launch_counts;

inline void count_launch(const char* kernel) {
  const std::lock_guard<std::mutex> lock(launch_counts_mutex);
  ++launch_counts[kernel];
}

inline int64_t launch_count(const std::string& kernel) {
  const std::lock_guard<std::mutex> lock(launch_counts_mutex);
  const auto found = launch_counts.find(kernel);
  return found == launch_counts.end() ? 0 : found->second;
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int64_t grid, int threads, size_t smem, Args&&... args) {
  TORCH_CHECK(smem <= max_dynamic_smem(), "emulated launch: ", smem, " bytes of shared memory asked, ",
              max_dynamic_smem(), " available");
  const std::tuple<Params...> params(std::forward<Args>(args)...);  // copied, as kernel parameters are
  emu::run(grid, threads, smem, /*cooperative=*/false, [&] { std::apply(kernel, params); });
}

template <typename Param>
void launch_cooperative(void (*kernel)(Param), int64_t grid, int threads, size_t smem, Param param) {
  TORCH_CHECK(smem <= max_dynamic_smem(), "emulated launch: ", smem, " bytes of shared memory asked, ",
              max_dynamic_smem(), " available");
  TORCH_CHECK(grid <= static_cast<int64_t>(num_sms()) * blocks_per_sm(kernel, threads, smem),
              "emulated cooperative launch: grid ", grid, " is larger than what fits at once");
  emu::run(grid, threads, smem, /*cooperative=*/true, [&] { kernel(param); });
}

}  // namespace cuda
}  // namespace define_ops

#define threadIdx (::define_ops::cuda::emu::current.thread)
#define blockIdx (::define_ops::cuda::emu::current.block)
#define blockDim (::define_ops::cuda::emu::current.block_dim)
#define gridDim (::define_ops::cuda::emu::current.grid_dim)

inline void __syncthreads() { ::define_ops::cuda::emu::current.block_state->barrier.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= 16, "emulated shuffle of a type wider than 16 bytes");
  auto& state = ::define_ops::cuda::emu::current;
  auto& warp = state.block_state->warps[state.thread.x / 32];
  const unsigned lane = state.thread.x % 32;
  std::memcpy(warp.slots[lane], &value, sizeof(T));
  warp.barrier.arrive_and_wait();
  T other;
  std::memcpy(&other, warp.slots[lane ^ static_cast<unsigned>(lane_mask)], sizeof(T));
  warp.barrier.arrive_and_wait();
  return other;
}
