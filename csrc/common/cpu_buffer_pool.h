// Large CPU buffers from the blocks that earlier calls freed: the stack's values/stats/grads/scratch,
// the dense [V, n] table gradient, per-step outputs of a wide layer.
//
// Why: glibc serves every allocation above its largest mmap threshold (32 MiB) with a fresh mmap
// and unmaps it on free. A training step allocates the same large buffers every step, so each
// step faulted all their pages in again, 4 KiB at a time, each zeroed by the kernel: on a 2-core
// VM the CPU backend's training step ran 8-18 % slower through the fused stack op (one buffer per
// dtype, well above 32 MiB) than through the per-step ops (smaller buffers that glibc's heap
// reuses), and the 274 MB table gradient at lstm_wt103 took 97 ms to zero from fresh pages, 10 ms
// in memory already mapped. Blocks of at least min_bytes (8 MiB) come from here instead: freed blocks are
// kept (up to DEFINE_OPS_CPU_CACHE_MB of them, oldest released first) and handed to a later request
// of about the same size, as PyTorch's CUDA caching allocator does on the GPU. A buffer's contents
// are never assumed: every user writes (or zero-fills) what it reads.
//
// Header-only: the main extension and the CUDA emulation build (csrc/emulation) each get their own
// pool. define_ops::cpu_cache_stats / empty_cpu_cache report and release it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <pthread.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string_view>
#include <vector>

namespace define_ops {
namespace cpu_pool {

constexpr size_t kMinBytesDefault = size_t{8} << 20;  // smaller blocks: glibc's heap reuses them itself
constexpr size_t kGranule = size_t{2} << 20;   // requests round up to this: sizes that vary a little share blocks

struct Block {
  void* data;
  size_t bytes;
};

struct Pool {
  std::mutex mutex;
  std::vector<Block> cached;  // freed blocks, oldest first
  size_t cached_bytes = 0;
  int64_t hits = 0, misses = 0;
  size_t limit_bytes = 0;     // DEFINE_OPS_CPU_CACHE_MB; 0: every block goes back to the system at once
  bool poison = false;        // DEFINE_OPS_CPU_CACHE_POISON=1: hand out every block filled with NaN (tests)
  size_t min_bytes = kMinBytesDefault;  // DEFINE_OPS_CPU_CACHE_MIN_BYTES (tests: 0 pools every buffer)
};

// A non-negative integer environment variable (at most 2^40), or `fallback` where it is unset.
inline size_t read_size(const char* name, size_t fallback, const char* meaning) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && value >= 0 && value <= (int64_t{1} << 40), name, " must be an integer >= 0 (",
                    meaning, "), got '", env, "'");
  return static_cast<size_t>(value);
}

inline Pool& pool();

// fork() while another thread holds the pool's mutex would leave it locked in the child for good
// (a DataLoader worker, say): the mutex is held across the fork and released on both sides.
inline void lock_before_fork() { pool().mutex.lock(); }
inline void unlock_after_fork() { pool().mutex.unlock(); }

inline Pool& pool() {
  static Pool* instance = [] {
    auto* p = new Pool();  // never destroyed: buffers may be freed during interpreter shutdown
    p->limit_bytes = read_size("DEFINE_OPS_CPU_CACHE_MB", 2048, "MiB of freed buffers kept for reuse") << 20;
    p->min_bytes = read_size("DEFINE_OPS_CPU_CACHE_MIN_BYTES", kMinBytesDefault, "the smallest buffer pooled");
    const char* poison = std::getenv("DEFINE_OPS_CPU_CACHE_POISON");
    p->poison = poison != nullptr && std::string_view(poison) == "1";
    return p;
  }();
  static const bool fork_handlers = [] {
    pthread_atfork(&lock_before_fork, &unlock_after_fork, &unlock_after_fork);
    return true;
  }();
  (void)fork_handlers;
  return *instance;
}

// Releases blocks, oldest first, until at most `keep_bytes` stay cached. Caller holds the mutex.
inline void trim_locked(Pool& p, size_t keep_bytes) {
  size_t drop = 0;
  while (drop < p.cached.size() && p.cached_bytes > keep_bytes) {
    c10::free_cpu(p.cached[drop].data);
    p.cached_bytes -= p.cached[drop].bytes;
    ++drop;
  }
  p.cached.erase(p.cached.begin(), p.cached.begin() + static_cast<std::ptrdiff_t>(drop));
}

// The tensor's deleter: its block goes back to the pool (or to the system past the limit).
inline void give_back(void* context) {
  auto* block = static_cast<Block*>(context);
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    if (block->bytes <= p.limit_bytes) {
      p.cached.push_back(*block);
      p.cached_bytes += block->bytes;
      trim_locked(p, p.limit_bytes);
      delete block;
      return;
    }
  }
  c10::free_cpu(block->data);
  delete block;
}

// A block of at least `bytes`: the smallest cached one that wastes at most a quarter, else a new one.
inline Block take_unfilled(size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    size_t best = p.cached.size();
    for (size_t i = 0; i < p.cached.size(); ++i) {
      const size_t have = p.cached[i].bytes;
      if (have >= bytes && have - bytes <= bytes / 4 && (best == p.cached.size() || have < p.cached[best].bytes)) {
        best = i;
      }
    }
    if (best != p.cached.size()) {
      const Block block = p.cached[best];
      p.cached.erase(p.cached.begin() + static_cast<std::ptrdiff_t>(best));
      p.cached_bytes -= block.bytes;
      ++p.hits;
      return block;
    }
    ++p.misses;
  }
  return Block{c10::alloc_cpu(bytes), bytes};
}

// take_unfilled, with the poison fill where asked: all-ones bytes are NaN in every float dtype, so a
// kernel that reads what it has not written shows up in the tests' comparisons.
inline Block take(size_t bytes) {
  const Block block = take_unfilled(bytes);
  if (pool().poison) std::memset(block.data, 0xFF, block.bytes);
  return block;
}

}  // namespace cpu_pool

// at::empty(sizes, options), from the pool where it is a CPU buffer of at least 8 MiB (min_bytes).
inline at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().type() != c10::DeviceType::CPU) return at::empty(sizes, options);
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  const cpu_pool::Pool& p = cpu_pool::pool();
  if (bytes < p.min_bytes || bytes == 0 || p.limit_bytes == 0) return at::empty(sizes, options);
  // Small blocks (tests) round to 64 bytes, pooled ones to 2 MiB: sizes that vary a little share blocks.
  const size_t granule = bytes < cpu_pool::kGranule ? 64 : cpu_pool::kGranule;
  const size_t rounded = (bytes + granule - 1) / granule * granule;
  auto* block = new cpu_pool::Block(cpu_pool::take(rounded));
  return at::for_blob(block->data, sizes).context(block, &cpu_pool::give_back).options(options).make_tensor();
}

// (cached bytes, cached blocks, hits, misses) of this library's pool.
inline std::vector<int64_t> cpu_cache_stats() {
  cpu_pool::Pool& p = cpu_pool::pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return {static_cast<int64_t>(p.cached_bytes), static_cast<int64_t>(p.cached.size()), p.hits, p.misses};
}

// Returns every cached block to the system (buffers in use are not touched).
inline void empty_cpu_cache() {
  cpu_pool::Pool& p = cpu_pool::pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  cpu_pool::trim_locked(p, 0);
}

}  // namespace define_ops
