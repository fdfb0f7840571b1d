// CUDA forward and backward of one HGT layer step (define_ops::hgt_step), same semantics as
// csrc/cpu/hgt_step.cpp.
//
// Forward, 2 launches per layer: the grouped GEMM is ONE cuBLAS strided-batched call through ATen
// (at::bmm_out) on strided views (x as [g, T, a/g] with strides (a/g, a, 1), y as [g, T, b/g] with
// strides (b/g, b, 1)), so nothing is transposed or copied; cuBLAS accumulates bf16/fp16 in fp32
// and follows torch.backends.cuda.matmul.allow_tf32 for fp32. Then one epilogue kernel: bias →
// shuffle → per-group LayerNorm → activation → dropout, each result stored at its place in the next
// layer's mix(e, h) layout, plus the copy of e. The Reduce layer (StepParams::plain) is one
// at::addmm_out with the bias folded in.
//
// With DEFINE_OPS_CUDA_DENSE_GROUPS (off by default; see use_dense_groups) a grouped layer whose
// group widths are not 16-byte multiples runs its GEMMs as one dense GEMM against the [a, b]
// block-diagonal weight instead: built per call (2 launches more forward, 3 more backward with the
// copy of the weight gradient's diagonal blocks).
//
// Backward, 3 launches per layer: one epilogue-backward kernel (the dropout mask regenerated from
// the seed, activation and LayerNorm backward, the shuffle undone as addressing, dY written in GEMM
// order, the bias/γ/β gradients, grad_x prefilled with e's pass-through gradient), then the dgrad
// GEMM accumulating into grad_x (baddbmm with beta = 1) and the wgrad GEMM.
//
// Determinism: no float atomics. Bias/γ/β gradients are summed per block over a fixed set of rows,
// written to a partials buffer, and after a grid-wide barrier (cooperative launch, so the whole
// reduction stays inside the one kernel) every column is summed over the blocks in block order.
// Results are bitwise reproducible for a given device and shape.
// Per-operator ATen headers only (not ATen/ATen.h): they halve this file's compile time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "../common/epilogue_math.h"
#include "../common/hgt_stack.h"
#include "../common/philox.h"
#include "../common/step_params.h"
#include "cuda_utils.cuh"

namespace define_ops {
namespace {

using cuda::FastDivmod;
using cuda::RowCursor;
using cuda::Vec;

// Threads per row block: up to a quad per thread, at most kMaxThreads. Wide rows get 512 because
// their stage caps the resident blocks (on an H100, txl_wt103's 4096-wide backward ran 2 blocks of
// 256 threads per SM: 25 % occupancy, latency-bound); a row's threads are what keeps the SM busy
// there. DEFINE_OPS_CUDA_MAX_THREADS (a multiple of 32 in 64..512, read once) lowers the cap for
// a GPU session's sweep.
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;

int row_threads_cap() {
  static const int cap =
      static_cast<int>(cuda::env_integer("DEFINE_OPS_CUDA_MAX_THREADS", kMaxThreads, 64, kMaxThreads, 32));
  return cap;
}

// Cap on resident backward blocks per SM: more blocks keep more rows in flight (the kernel waits
// on memory between its phases), and each adds one row of partial sums to the final reduction.
// 4 until measured otherwise; DEFINE_OPS_CUDA_BWD_BLOCKS_PER_SM (1..32, read once) overrides it
// so a GPU session can sweep it without a rebuild (scripts/gpu_session.sh does).
constexpr int kBackwardBlocksPerSmDefault = 4;

int backward_blocks_per_sm_cap() {
  static const int cap =
      static_cast<int>(cuda::env_integer("DEFINE_OPS_CUDA_BWD_BLOCKS_PER_SM", kBackwardBlocksPerSmDefault, 1, 32));
  return cap;
}

// Shared memory ahead of the row stage: warp partial sums of the norm reductions.
constexpr int kForwardReduceSlots = 2 * kMaxWarps;   // red_sum | red_sq
constexpr int kBackwardReduceSlots = 4 * kMaxWarps;  // red_dxh[2] | red_dxh_xh[2] (double-buffered)

// The row geometry of one layer in 32-bit ints (widths are checked to be < 2^30 on the host), so
// the kernels never divide 64-bit numbers per element.
struct RowShape {
  int b;           // out_h: GEMM output width
  int s;           // out_group = b / g: shuffle and norm group size
  int g;           // groups
  int a;           // in_width
  int out_width;   // b, or n + b with the skip
  int n;           // e_width
  int ec_in;       // e chunk inside x (carry_e)
  int hc_in;       // h chunk inside x (carry_e)
  int ec_out;      // e chunk inside out; 0 without the skip
  int hc_out;      // h chunk inside out; b without the skip (then h position p is p)
  bool carry_e;
  bool shuffle;
  bool norm;
  bool dropout;
  Activation activation;
  // the divisors of the layout arithmetic, as multiply-shifts
  FastDivmod by_s, by_g, by_hc_out, by_ec_in, by_ec_out, by_chunk_in;  // chunk_in = ec_in + hc_in
};

RowShape make_row_shape(const StepParams& p) {
  TORCH_CHECK_VALUE(p.in_width < (int64_t{1} << 30) && p.out_width < (int64_t{1} << 30),
                    "define_ops::hgt_step (CUDA): rows wider than 2^30 features are not supported");
  RowShape r;
  r.b = static_cast<int>(p.out_h);
  r.s = static_cast<int>(p.out_group);
  r.g = static_cast<int>(p.groups);
  r.a = static_cast<int>(p.in_width);
  r.out_width = static_cast<int>(p.out_width);
  r.n = static_cast<int>(p.e_width);
  r.carry_e = p.carry_e;
  r.ec_in = p.carry_e ? static_cast<int>(p.in_layout.e_chunk) : 0;
  r.hc_in = p.carry_e ? static_cast<int>(p.in_layout.h_chunk) : r.a;
  r.ec_out = p.carry_e ? static_cast<int>(p.out_layout.e_chunk) : 0;
  r.hc_out = p.carry_e ? static_cast<int>(p.out_layout.h_chunk) : r.b;
  r.shuffle = p.shuffle;
  r.norm = p.norm;
  r.dropout = p.dropout_p > 0.0;
  r.activation = p.activation;
  r.by_s = FastDivmod(r.s);
  r.by_g = FastDivmod(r.g);
  r.by_hc_out = FastDivmod(r.hc_out);
  r.by_ec_in = FastDivmod(r.ec_in);
  r.by_ec_out = FastDivmod(r.ec_out);
  r.by_chunk_in = FastDivmod(r.ec_in + r.hc_in);
  return r;
}

// Position of e feature q inside a mix(e, h) row with chunks (ec, hc); `by_ec` divides by ec.
__device__ __forceinline__ int e_position(int q, const FastDivmod& by_ec, int hc) {
  const int chunk = by_ec.div(q);
  return chunk * (by_ec.divisor + hc) + q - chunk * by_ec.divisor;
}

// Position of h feature cursor (chunk, offset) inside the output row.
__device__ __forceinline__ int h_position(const RowShape& R, const RowCursor& c) {
  return c.group * (R.ec_out + R.hc_out) + R.ec_out + c.offset;
}

__device__ __forceinline__ uint64_t load_seed(const int64_t* seed_ptr, uint64_t seed) {
  return seed_ptr != nullptr ? static_cast<uint64_t>(*seed_ptr) : seed;
}

// f and d·f' over a quad of values, the activation's branch taken once for the four (inside the
// quad loop a per-value switch costs a few uniform branches per value).
template <typename acc_t>
__device__ __forceinline__ void activation_forward4(Activation act, acc_t (&v)[4]) {
  switch (act) {
    case Activation::kGelu:
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = epilogue::activation_forward(Activation::kGelu, v[k]);
      break;
    case Activation::kRelu:
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = epilogue::activation_forward(Activation::kRelu, v[k]);
      break;
    case Activation::kSwish:
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = epilogue::activation_forward(Activation::kSwish, v[k]);
      break;
    default:
      break;
  }
}

template <typename acc_t>
__device__ __forceinline__ void activation_backward4(Activation act, const acc_t (&a)[4], acc_t (&d)[4]) {
  switch (act) {
    case Activation::kGelu:
#pragma unroll
      for (int k = 0; k < 4; ++k) d[k] = epilogue::activation_backward(Activation::kGelu, a[k], d[k]);
      break;
    case Activation::kRelu:
#pragma unroll
      for (int k = 0; k < 4; ++k) d[k] = epilogue::activation_backward(Activation::kRelu, a[k], d[k]);
      break;
    case Activation::kSwish:
#pragma unroll
      for (int k = 0; k < 4; ++k) d[k] = epilogue::activation_backward(Activation::kSwish, a[k], d[k]);
      break;
    default:
      break;
  }
}

// Four consecutive values as one aligned access (the caller guarantees the alignment).
template <typename T, typename U>
__device__ __forceinline__ void load4(const U* ptr, T (&v)[4]) {
  const Vec<U, 4> packed = *reinterpret_cast<const Vec<U, 4>*>(ptr);
#pragma unroll
  for (int k = 0; k < 4; ++k) v[k] = static_cast<T>(packed.v[k]);
}

template <typename U, typename T>
__device__ __forceinline__ void store4(U* ptr, const T (&v)[4]) {
  Vec<U, 4> packed;
#pragma unroll
  for (int k = 0; k < 4; ++k) packed.v[k] = static_cast<U>(v[k]);
  *reinterpret_cast<Vec<U, 4>*>(ptr) = packed;
}

// N consecutive stage values, four per access where N allows it (the pointer is then 4-aligned).
template <int N, typename T>
__device__ __forceinline__ void load_run(const T* ptr, T (&v)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 4) {
      const Vec<T, 4> packed = *reinterpret_cast<const Vec<T, 4>*>(ptr + k);
#pragma unroll
      for (int j = 0; j < 4; ++j) v[k + j] = packed.v[j];
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = ptr[k];
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_run(T* ptr, const T (&v)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 4) {
      Vec<T, 4> packed;
#pragma unroll
      for (int j = 0; j < 4; ++j) packed.v[j] = v[k + j];
      *reinterpret_cast<Vec<T, 4>*>(ptr + k) = packed;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) ptr[k] = v[k];
  }
}

// V consecutive values of dY: added to the block's bias column sums (null without a bias), then
// stored V-wide.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_dy_run(scalar_t* dy, acc_t* bias_sums, const acc_t (&dz)[V]) {
  if (bias_sums != nullptr) {
    acc_t sums[V];
    load_run(bias_sums, sums);
#pragma unroll
    for (int k = 0; k < V; ++k) sums[k] += dz[k];
    store_run(bias_sums, sums);
  }
  Vec<scalar_t, V> packed;
#pragma unroll
  for (int k = 0; k < V; ++k) packed.v[k] = static_cast<scalar_t>(dz[k]);
  *reinterpret_cast<Vec<scalar_t, V>*>(dy) = packed;
}

// ============================================================================ forward epilogue
// Accumulator slots of the forward's row stage: the row [b] then mean and rstd [g] each, rounded up to
// a multiple of 4 so that every workspace row starts 4-aligned (the quad path loads 4 at a time).
__host__ __device__ __forceinline__ int forward_stage(const RowShape& R) { return (R.b + 2 * R.g + 3) / 4 * 4; }

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  RowShape R;
  int64_t tokens;           // T
  const scalar_t* x;        // [T, a] the layer input (e is copied from it)
  scalar_t* y;              // [T, b] GEMM output in GEMM order; becomes y + bias (`saved`) when kept
  scalar_t* out;            // [T, out_width]
  const scalar_t* bias;     // [b] or null
  const scalar_t* gamma;    // [s] or null
  const scalar_t* beta;     // [s] or null
  acc_t* mean;              // [T, g] or null
  acc_t* rstd;              // [T, g] or null
  const int64_t* seed_ptr;  // [1] seed on the device, or null (then `seed` holds it)
  uint64_t seed;
  uint32_t threshold;       // a Philox word below it drops the element
  acc_t keep_scale;         // 1 / (1 - p)
  acc_t eps;
  acc_t* workspace;         // [gridDim.x, b + 2g] row stage when it does not fit in shared memory, else null
  bool keep_saved;          // write y + bias back, rounded; the rest of the row uses the rounded values
  bool vec_in;              // y and bias rows can be read 16 bytes at a time
  bool vec_out;             // the four outputs of a quad are contiguous and 4-aligned in out
  bool quads_in_group;      // vec_out, s % 4 == 0 and γ/β 4-aligned: a quad is 4 features of one norm group
  bool vec_e;               // e's chunks are 4-aligned in x and in out: e is copied 4 features at a time
};

// Quad qd of row t (4 features of one norm group, the first at feature u of the group), from
// y + bias in h to the output: norm with the group's statistics, activation, dropout (Philox
// counters (quad, row), the same on every backend), store at its place in the output.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void finish_forward_quad(const ForwardArgs<scalar_t>& A, uint64_t seed, int64_t t, int qd,
                                                    int u, acc_t mu, acc_t rs, acc_t (&h)[4], scalar_t* out_row) {
  const RowShape& R = A.R;
  if (R.norm) {
    acc_t gamma[4], beta[4];
    load4(A.gamma + u, gamma);
    load4(A.beta + u, beta);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = (h[k] - mu) * rs * gamma[k] + beta[k];
  }
  activation_forward4(R.activation, h);
  if (R.dropout) {
    const PhiloxWords words = philox4x32_10(seed, static_cast<uint32_t>(qd), static_cast<uint32_t>(t));
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = epilogue::dropout_apply(words.w[k] >= A.threshold, h[k], A.keep_scale);
  }
  store4(out_row + h_position(R, RowCursor(4 * qd, R.by_hc_out)), h);
}

// e of row t: from its places in x to its places in the output; threads `first`, `first + stride`,
// ... share it.
template <typename scalar_t>
__device__ __forceinline__ void copy_e_row(const ForwardArgs<scalar_t>& A, int64_t t, scalar_t* out_row, int first,
                                           int stride) {
  const RowShape& R = A.R;
  const scalar_t* x_row = A.x + t * R.a;
  if (A.vec_e) {  // four e features at a time: contiguous and 4-aligned on both sides
    for (int q = 4 * first; q < R.n; q += 4 * stride) {
      *reinterpret_cast<Vec<scalar_t, 4>*>(out_row + e_position(q, R.by_ec_out, R.hc_out)) =
          *reinterpret_cast<const Vec<scalar_t, 4>*>(x_row + e_position(q, R.by_ec_in, R.hc_in));
    }
  } else {
    for (int q = first; q < R.n; q += stride) {
      out_row[e_position(q, R.by_ec_out, R.hc_out)] = x_row[e_position(q, R.by_ec_in, R.hc_in)];
    }
  }
}

// One block per row at a time (grid-stride over rows). Per row:
//   1. v = y + bias in GEMM order, staged in shared memory at its shuffled position;
//   2. LayerNorm statistics per group: `wpg` warps per group, two passes (mean, then variance);
//   3. per quad of 4 output features (one Philox call): norm, activation, dropout, store;
//   4. copy of e from x into its places in the output.
template <typename scalar_t>
// At least 3 blocks of 512 threads per SM, i.e. <= 40 registers: ptxas gave the kernel 64 (bf16) and
// 110 (fp32) registers otherwise, halving the resident warps of a latency-bound kernel.
__global__ void __launch_bounds__(kMaxThreads, 3) hgt_step_forward_kernel(const ForwardArgs<scalar_t> A) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = 16 / sizeof(scalar_t);
  acc_t* smem = cuda::shared_memory<acc_t>();
  acc_t* red_sum = smem;             // [kMaxWarps]
  acc_t* red_sq = smem + kMaxWarps;  // [kMaxWarps]
  const RowShape& R = A.R;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  acc_t* z = A.workspace != nullptr ? A.workspace + static_cast<int64_t>(blockIdx.x) * forward_stage(R)
                                    : smem + kForwardReduceSlots;  // [b] the row, shuffled order
  acc_t* mean_s = z + R.b;                                                // [g]
  acc_t* rstd_s = mean_s + R.g;                                           // [g]
  // Norm teams: `wpg` consecutive warps reduce one group; the teams take the groups round-robin.
  const int wpg = R.g >= nwarps ? 1 : nwarps / R.g;
  const int nteams = nwarps / wpg, team = warp / wpg, rank = warp % wpg;
  const int rounds = (R.g + nteams - 1) / nteams;
  const uint64_t seed = R.dropout ? load_seed(A.seed_ptr, A.seed) : 0;
  const int quads = (R.b + 3) / 4;
  // One norm group on the V-wide and quad paths (most layers): step 1 makes the mean's sum, and
  // every thread keeps the row's statistics in registers (two barriers fewer per row).
  const bool one_group = R.norm && R.g == 1 && A.vec_in && A.quads_in_group;

  for (int64_t t = blockIdx.x; t < A.tokens; t += gridDim.x) {
    acc_t row_sum = 0;  // one group: this thread's share of the row sum
    // ---- 1. bias, `saved`, stage in shuffled order: z[u·g + i] = v[i·s + u]
    scalar_t* y_row = A.y + t * R.b;
    if (A.vec_in) {
      for (int q0 = tid * V; q0 < R.b; q0 += nthreads * V) {
        Vec<scalar_t, V> yv = *reinterpret_cast<const Vec<scalar_t, V>*>(y_row + q0);
        Vec<scalar_t, V> bv = yv;
        if (A.bias != nullptr) bv = *reinterpret_cast<const Vec<scalar_t, V>*>(A.bias + q0);
        acc_t v[V];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          v[k] = static_cast<acc_t>(yv.v[k]);
          if (A.bias != nullptr) v[k] += static_cast<acc_t>(bv.v[k]);
          if (A.keep_saved) {
            yv.v[k] = static_cast<scalar_t>(v[k]);
            v[k] = static_cast<acc_t>(yv.v[k]);
          }
        }
        if (A.keep_saved) *reinterpret_cast<Vec<scalar_t, V>*>(y_row + q0) = yv;
        if (one_group) {
#pragma unroll
          for (int k = 0; k < V; ++k) row_sum += v[k];
        }
        if (R.shuffle) {
          RowCursor zc(q0, R.by_s);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            z[zc.offset * R.g + zc.group] = v[k];
            zc.next(R.s);
          }
        } else {
          store_run(z + q0, v);
        }
      }
    } else {
      for (int q = tid; q < R.b; q += nthreads) {
        acc_t v = static_cast<acc_t>(y_row[q]);
        if (A.bias != nullptr) v += static_cast<acc_t>(A.bias[q]);
        if (A.keep_saved) {
          const scalar_t rounded = static_cast<scalar_t>(v);
          y_row[q] = rounded;
          v = static_cast<acc_t>(rounded);
        }
        const RowCursor zc(q, R.by_s);
        z[R.shuffle ? zc.offset * R.g + zc.group : q] = v;
      }
    }
    if (one_group) {  // the mean's sum, made on the way in
      row_sum = cuda::warp_sum(row_sum);
      if (lane == 0) red_sum[warp] = row_sum;
    }
    __syncthreads();

    // ---- 2. per-group mean and rstd (two passes over the staged row)
    acc_t row_mu = 0, row_rs = 0;  // one group: every thread holds the row's statistics
    if (one_group) {
      acc_t total = 0;
      for (int k = 0; k < nwarps; ++k) total += red_sum[k];
      row_mu = total / acc_t(R.s);
      acc_t sq = 0;
      for (int u = tid; u < R.s; u += nthreads) {
        const acc_t dev = z[u] - row_mu;
        sq += dev * dev;
      }
      sq = cuda::warp_sum(sq);
      if (lane == 0) red_sq[warp] = sq;
      __syncthreads();  // red_sum and red_sq are rewritten by the next row only after its first barrier
      acc_t total_sq = 0;
      for (int k = 0; k < nwarps; ++k) total_sq += red_sq[k];
      row_rs = acc_t(1) / epilogue::sqrt_acc(total_sq / acc_t(R.s) + A.eps);
      if (tid == 0) {
        A.mean[t] = row_mu;
        A.rstd[t] = row_rs;
      }
    } else if (R.norm) {
      for (int r = 0; r < rounds; ++r) {
        const int i = team + r * nteams;
        const bool active = team < nteams && i < R.g;
        const acc_t* zg = z + (active ? i * R.s : 0);
        acc_t sum = 0;
        if (active) {
          for (int u = rank * 32 + lane; u < R.s; u += wpg * 32) sum += zg[u];
        }
        sum = cuda::warp_sum(sum);
        if (lane == 0) red_sum[warp] = sum;
        __syncthreads();
        acc_t mu = 0;
        if (active) {
          acc_t total = 0;
          for (int k = 0; k < wpg; ++k) total += red_sum[team * wpg + k];
          mu = total / acc_t(R.s);
        }
        acc_t sq = 0;
        if (active) {
          for (int u = rank * 32 + lane; u < R.s; u += wpg * 32) {
            const acc_t dev = zg[u] - mu;
            sq += dev * dev;
          }
        }
        sq = cuda::warp_sum(sq);
        if (lane == 0) red_sq[warp] = sq;
        __syncthreads();  // red_sum is rewritten next round only after this barrier
        if (active && rank == 0 && lane == 0) {
          acc_t total = 0;
          for (int k = 0; k < wpg; ++k) total += red_sq[team * wpg + k];
          const acc_t rs = acc_t(1) / epilogue::sqrt_acc(total / acc_t(R.s) + A.eps);
          mean_s[i] = mu;
          rstd_s[i] = rs;
          A.mean[t * R.g + i] = mu;
          A.rstd[t * R.g + i] = rs;
        }
      }
      __syncthreads();
    }

    // ---- 3. norm → activation → dropout → store, four features (one Philox call) per thread
    scalar_t* out_row = A.out + t * R.out_width;
    if (A.quads_in_group) {  // every preset: one group's statistics, 4-wide γ/β, stage and output
      for (int qd = tid; qd < quads; qd += nthreads) {
        const int p0 = 4 * qd;
        acc_t h[4];
        load4(z + p0, h);
        const int group = R.norm ? R.by_s.div(p0) : 0;
        const acc_t mu = !R.norm ? acc_t(0) : one_group ? row_mu : mean_s[group];
        const acc_t rs = !R.norm ? acc_t(0) : one_group ? row_rs : rstd_s[group];
        finish_forward_quad(A, seed, t, qd, p0 - group * R.s, mu, rs, h, out_row);
      }
    }
    for (int qd = A.quads_in_group ? quads : tid; qd < quads; qd += nthreads) {  // the general case
      const int p0 = 4 * qd;
      PhiloxWords words{{0u, 0u, 0u, 0u}};
      if (R.dropout) words = philox4x32_10(seed, static_cast<uint32_t>(qd), static_cast<uint32_t>(t));
      RowCursor nc(p0, R.by_s);
      RowCursor hc(p0, R.by_hc_out);
      const int first_pos = h_position(R, hc);
      acc_t h[4];
      int stats_group = -1;  // the group's statistics are read once per group the quad touches
      acc_t mu = 0, rs = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int pp = p0 + k;
        acc_t v = pp < R.b ? z[pp] : acc_t(0);
        if (R.norm && pp < R.b) {
          if (nc.group != stats_group) {
            stats_group = nc.group;
            mu = mean_s[nc.group];
            rs = rstd_s[nc.group];
          }
          v = (v - mu) * rs * static_cast<acc_t>(A.gamma[nc.offset]) + static_cast<acc_t>(A.beta[nc.offset]);
        }
        v = epilogue::activation_forward(R.activation, v);
        if (R.dropout) v = epilogue::dropout_apply(words.w[k] >= A.threshold, v, A.keep_scale);
        h[k] = v;
        if (!A.vec_out && pp < R.b) out_row[h_position(R, hc)] = static_cast<scalar_t>(v);
        nc.next(R.s);
        hc.next(R.hc_out);
      }
      if (A.vec_out) {  // b % 4 == 0 here, so the quad is whole
        Vec<scalar_t, 4> packed;
#pragma unroll
        for (int k = 0; k < 4; ++k) packed.v[k] = static_cast<scalar_t>(h[k]);
        *reinterpret_cast<Vec<scalar_t, 4>*>(out_row + first_pos) = packed;
      }
    }

    // ---- 4. e: from its places in x to its places in the output
    if (R.carry_e) copy_e_row(A, t, out_row, tid, nthreads);
    __syncthreads();  // the stage is rewritten by the next row
  }
}

template <typename scalar_t>
void launch_forward(ForwardArgs<scalar_t> args, const at::TensorOptions& options) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowShape& R = args.R;
  const int threads = cuda::row_block_threads(R.b, row_threads_cap());
  const int64_t stage = forward_stage(R);
  const size_t reduce_bytes = kForwardReduceSlots * sizeof(acc_t);
  size_t smem = reduce_bytes + static_cast<size_t>(stage) * sizeof(acc_t);
  const bool stage_in_global = smem > cuda::max_dynamic_smem();
  if (stage_in_global) smem = reduce_bytes;  // the row stage goes to a global workspace instead
  auto* kernel = &hgt_step_forward_kernel<scalar_t>;
  const int per_sm = cuda::blocks_per_sm(kernel, threads, smem);
  TORCH_CHECK(per_sm > 0, "define_ops::hgt_step (CUDA): the epilogue kernel does not fit on this device");
  const int64_t grid = std::min<int64_t>(args.tokens, static_cast<int64_t>(per_sm) * cuda::num_sms());
  at::Tensor workspace;
  if (stage_in_global) {
    workspace = at::empty({grid, stage}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
    args.workspace = workspace.data_ptr<acc_t>();
  }
  cuda::launch_kernel(kernel, grid, threads, smem, args);
}

// ============================================================================ column sums over blocks
// After a grid barrier: partials [gridDim.x, columns] (one row per block) summed over the blocks
// for every column, store(c, total) writing column c's total. The order is fixed by the grid size
// alone (deterministic) and the latency short: a warp takes kColumnsPerWarp adjacent columns (one
// contiguous load per block row), its lanes make kBlockWalks strided walks over the blocks in
// double precision, and a fixed shuffle tree adds the walks. (One thread walking every block in
// turn took ~45 us per call on an H200 whatever the token count: gridDim.x dependent L2 round trips.)
template <typename acc_t, typename Store>
__device__ __forceinline__ void sum_columns_over_blocks(const acc_t* partials, int64_t columns, Store store) {
  constexpr int kColumnsPerWarp = 4, kBlockWalks = 32 / kColumnsPerWarp;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int column_in_tile = lane % kColumnsPerWarp, walk = lane / kColumnsPerWarp;
  const int64_t tiles = (columns + kColumnsPerWarp - 1) / kColumnsPerWarp;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * nwarps;
  // `tile` is the same for every lane of a warp, so all 32 lanes reach the shuffles.
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * nwarps + warp; tile < tiles; tile += warps_in_grid) {
    const int64_t c = tile * kColumnsPerWarp + column_in_tile;
    double total = 0.0;
    if (c < columns) {
#pragma unroll 8
      for (unsigned blk = walk; blk < gridDim.x; blk += kBlockWalks) {
        total += static_cast<double>(cuda::load_uncached(partials + static_cast<int64_t>(blk) * columns + c));
      }
    }
#pragma unroll
    for (int offset = kColumnsPerWarp; offset < 32; offset <<= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
    if (walk == 0 && c < columns) store(c, static_cast<acc_t>(total));
  }
}

// ============================================================================ backward epilogue
// Accumulator slots of the backward's stage: d [b], x̂ [b] with the norm, this block's column sums,
// rounded up to a multiple of 4 (workspace rows start 4-aligned for the quad path's 4-wide accesses).
__host__ __device__ __forceinline__ int backward_stage(const RowShape& R, int sum_slots) {
  return (R.b + (R.norm ? R.b : 0) + sum_slots + 3) / 4 * 4;
}

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  RowShape R;
  int64_t tokens;             // T
  const scalar_t* grad_out;   // [T, out_width]
  const scalar_t* saved;      // [T, b] y + bias in GEMM order, or null (no norm, no activation)
  const scalar_t* gamma;      // [s] or null
  const scalar_t* beta;       // [s] or null
  const acc_t* mean;          // [T, g] or null
  const acc_t* rstd;          // [T, g] or null
  const int64_t* seed_ptr;    // [1] seed on the device, or null (then `seed` holds it)
  uint64_t seed;
  uint32_t threshold;
  acc_t keep_scale;
  scalar_t* dy;               // [T, b] gradient of the GEMM output, GEMM order
  scalar_t* grad_x;           // [T, a] e's gradient at e's places, zeros elsewhere (carry_e), else null
  acc_t* partials;            // [gridDim.x, num_partials] per-block sums: d bias | d γ | d β
  int num_partials;           // (bias ? b : 0) + (norm ? 2s : 0)
  int gamma_offset;           // column of d γ in partials (d β follows at + s)
  int sum_slots;              // this block's sums in the stage: d bias [b] | d γ, d β: [g, s] each when
                              // step 1 makes them (fold_gamma_beta), else [s] each
  bool fold_gamma_beta;       // quads_in_group and norm: step 1 adds d γ / d β per (group, feature)
  scalar_t* grad_bias;        // [b] or null
  scalar_t* grad_gamma;       // [s] or null
  scalar_t* grad_beta;        // [s] or null
  acc_t* workspace;           // [gridDim.x, stage] when the stage does not fit in shared memory, else null
  bool vec_dy;                // dy rows can be written 16 bytes at a time
  bool vec_go;                // a quad's four grad_out values are contiguous and 4-aligned
  bool vec_saved;             // a quad's four saved values are contiguous (no shuffle) and 4-aligned
  bool quads_in_group;        // vec_go, vec_saved (or no saved), s % 4 == 0, γ/β 4-aligned: a quad is 4
                              // features of one norm group
  bool vec_gx;                // x's e and h chunks and grad_x 4-aligned, grad_out as for vec_go: grad_x is
                              // prefilled 4 features at a time
};

// grad_x's row t: e's gradient at e's places (e's copy in the output hands its gradient straight
// back), zeros elsewhere (the dgrad GEMM adds onto it); threads `first`, `first + stride`, ... share it.
template <typename scalar_t>
__device__ __forceinline__ void prefill_grad_x_row(const BackwardArgs<scalar_t>& A, int64_t t, const scalar_t* go_row,
                                                   int first, int stride) {
  const RowShape& R = A.R;
  scalar_t* gx_row = A.grad_x + t * R.a;
  if (A.vec_gx) {  // a quad of x lies in one e or one h part; its e gradient is 4 contiguous values
    for (int c = 4 * first; c < R.a; c += 4 * stride) {
      const RowCursor cc(c, R.by_chunk_in);
      Vec<scalar_t, 4> quad{};
      if (cc.offset < R.ec_in) {
        quad = *reinterpret_cast<const Vec<scalar_t, 4>*>(
            go_row + e_position(cc.group * R.ec_in + cc.offset, R.by_ec_out, R.hc_out));
      }
      *reinterpret_cast<Vec<scalar_t, 4>*>(gx_row + c) = quad;
    }
  } else {
    for (int c = first; c < R.a; c += stride) {
      const RowCursor cc(c, R.by_chunk_in);
      gx_row[c] = cc.offset < R.ec_in ? go_row[e_position(cc.group * R.ec_in + cc.offset, R.by_ec_out, R.hc_out)]
                                      : scalar_t(0);
    }
  }
}

// After every block of a cooperative backward launch has written its row of `partials`: the grid
// barrier, then each column summed over the blocks into d bias | d γ | d β.
template <typename scalar_t>
__device__ __forceinline__ void grads_from_block_partials(const BackwardArgs<scalar_t>& A) {
  using acc_t = at::opmath_type<scalar_t>;
  cuda::grid_sync();
  sum_columns_over_blocks(A.partials, A.num_partials, [&](int64_t c, acc_t total) {
    const scalar_t value = static_cast<scalar_t>(total);
    if (c < A.gamma_offset) {
      A.grad_bias[c] = value;
    } else if (c < A.gamma_offset + A.R.s) {
      A.grad_gamma[c - A.gamma_offset] = value;
    } else {
      A.grad_beta[c - A.gamma_offset - A.R.s] = value;
    }
  });
}

// One block per row at a time (grid-stride over rows). Per row, with d the gradient in the
// output's feature order (shuffled) and x̂ the normalized values:
//   1. d = dropout(grad_out's h part), x̂ and the activation input recomputed from `saved`,
//      d ·= f'(a);
//   2. d γ += d·x̂ and d β += d (per u, summed over groups in order);
//   3. LayerNorm backward per group: d = rstd·(d·γ − mean(d·γ) − x̂·mean(d·γ·x̂));
//   4. dY[q] = d[zpos(q)] in GEMM order, d bias += dY;
//   5. grad_x = e's gradient at e's places, zeros elsewhere (the dgrad GEMM adds onto it).
// Then the per-block sums go to `partials`, the grid synchronizes, and every column is summed
// over the blocks in block order.
template <typename scalar_t>
// At least 2 blocks of 512 threads per SM, i.e. <= 64 registers (ptxas otherwise takes ~100 for
// bf16, halving the resident warps of a latency-bound kernel).
__global__ void __launch_bounds__(kMaxThreads, 2) hgt_step_backward_kernel(const BackwardArgs<scalar_t> A) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = 16 / sizeof(scalar_t);
  acc_t* smem = cuda::shared_memory<acc_t>();
  acc_t* red_dxh = smem;                     // [2][kMaxWarps]
  acc_t* red_dxh_xh = smem + 2 * kMaxWarps;  // [2][kMaxWarps]
  const RowShape& R = A.R;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nthreads >> 5;
  const int stage = backward_stage(R, A.sum_slots);
  acc_t* d = A.workspace != nullptr ? A.workspace + static_cast<int64_t>(blockIdx.x) * stage
                                    : smem + kBackwardReduceSlots;  // [b] gradient, shuffled order
  acc_t* xh = d + R.b;                                                    // [b] x̂ (norm only)
  acc_t* sums = d + R.b + (R.norm ? R.b : 0);                             // [sum_slots] this block's sums
  acc_t* sum_bias = sums;                                                 // [b]
  acc_t* sum_gamma = sums + A.gamma_offset;                               // [g, s] or [s]
  acc_t* sum_beta = sum_gamma + (A.fold_gamma_beta ? R.b : R.s);          // [g, s] or [s]
  for (int c = tid; c < A.sum_slots; c += nthreads) sums[c] = acc_t(0);
  __syncthreads();  // step 1 may add to the sums (one group) before the first barrier of a row
  const int wpg = R.g >= nwarps ? 1 : nwarps / R.g;
  const int nteams = nwarps / wpg, team = warp / wpg, rank = warp % wpg;
  const int rounds = (R.g + nteams - 1) / nteams;
  const uint64_t seed = R.dropout ? load_seed(A.seed_ptr, A.seed) : 0;
  const int quads = (R.b + 3) / 4;
  // On the quad path step 1 also adds this row's d γ / d β per (group, feature), which the thread
  // owns in every row (summed over the groups once per block, at the end); with one norm group (most
  // layers) and dY written V-wide, also step 3's two sums, whose formula step 4 applies.
  const bool fold_gamma_beta = A.fold_gamma_beta;
  const bool fuse_norm = fold_gamma_beta && R.g == 1 && A.vec_dy;

  for (int64_t t = blockIdx.x; t < A.tokens; t += gridDim.x) {
    const scalar_t* go_row = A.grad_out + t * R.out_width;
    const scalar_t* saved_row = A.saved != nullptr ? A.saved + t * R.b : nullptr;
    // ---- 1. dropout, activation backward (x̂ recomputed on the way)
    acc_t norm_s1 = 0, norm_s2 = 0;  // Σ d·γ and Σ d·γ·x̂ over this thread's features (one group)
    if (A.quads_in_group) {  // every preset: 4-wide loads and stores, one group's statistics per quad
      for (int qd = tid; qd < quads; qd += nthreads) {
        const int p0 = 4 * qd;
        acc_t dv[4];
        load4(go_row + h_position(R, RowCursor(p0, R.by_hc_out)), dv);
        if (R.dropout) {
          const PhiloxWords words = philox4x32_10(seed, static_cast<uint32_t>(qd), static_cast<uint32_t>(t));
#pragma unroll
          for (int k = 0; k < 4; ++k) dv[k] = epilogue::dropout_apply(words.w[k] >= A.threshold, dv[k], A.keep_scale);
        }
        acc_t xv[4], gamma[4];  // x̂ and γ (norm only)
        if (saved_row != nullptr) {
          acc_t av[4];
          load4(saved_row + p0, av);
          if (R.norm) {
            const int group = R.by_s.div(p0), u = p0 - group * R.s;
            const acc_t mu = A.mean[t * R.g + group], rs = A.rstd[t * R.g + group];
            acc_t beta[4];
            load4(A.gamma + u, gamma);
            load4(A.beta + u, beta);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              xv[k] = (av[k] - mu) * rs;
              av[k] = xv[k] * gamma[k] + beta[k];
            }
            store4(xh + p0, xv);
          }
          activation_backward4(R.activation, av, dv);
        }
        store4(d + p0, dv);
        if (fold_gamma_beta) {  // step 2 here: this thread owns (group, features) p0..p0+3 in every row
          acc_t sum_g[4], sum_b[4];
          load_run(sum_gamma + p0, sum_g);
          load_run(sum_beta + p0, sum_b);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            sum_g[k] += dv[k] * xv[k];
            sum_b[k] += dv[k];
            if (fuse_norm) {  // step 3's two sums, this thread's share
              const acc_t dxh = dv[k] * gamma[k];
              norm_s1 += dxh;
              norm_s2 += dxh * xv[k];
            }
          }
          store_run(sum_gamma + p0, sum_g);
          store_run(sum_beta + p0, sum_b);
        }
      }
      if (fuse_norm) {  // every warp's share of step 3's sums, added up after the barrier below
        norm_s1 = cuda::warp_sum(norm_s1);
        norm_s2 = cuda::warp_sum(norm_s2);
        if (lane == 0) {
          red_dxh[warp] = norm_s1;
          red_dxh_xh[warp] = norm_s2;
        }
      }
    }
    for (int qd = A.quads_in_group ? quads : tid; qd < quads; qd += nthreads) {  // the general case
      const int p0 = 4 * qd;
      PhiloxWords words{{0u, 0u, 0u, 0u}};
      if (R.dropout) words = philox4x32_10(seed, static_cast<uint32_t>(qd), static_cast<uint32_t>(t));
      RowCursor hc(p0, R.by_hc_out);
      RowCursor nc(p0, R.by_s);
      RowCursor sc(p0, R.by_g);  // shuffled feature p comes from GEMM column (p % g)·s + p / g
      // the quad's incoming gradient and saved values: one 4-wide load each where contiguous
      acc_t go[4], sv[4];
      if (A.vec_go) {
        const auto packed = *reinterpret_cast<const Vec<scalar_t, 4>*>(go_row + h_position(R, hc));
#pragma unroll
        for (int k = 0; k < 4; ++k) go[k] = static_cast<acc_t>(packed.v[k]);
      } else {
        RowCursor c = hc;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          go[k] = p0 + k < R.b ? static_cast<acc_t>(go_row[h_position(R, c)]) : acc_t(0);
          c.next(R.hc_out);
        }
      }
      if (saved_row != nullptr && A.vec_saved) {
        const auto packed = *reinterpret_cast<const Vec<scalar_t, 4>*>(saved_row + p0);
#pragma unroll
        for (int k = 0; k < 4; ++k) sv[k] = static_cast<acc_t>(packed.v[k]);
      } else if (saved_row != nullptr) {
        RowCursor c = sc;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int column = R.shuffle ? c.offset * R.s + c.group : p0 + k;
          sv[k] = p0 + k < R.b ? static_cast<acc_t>(saved_row[column]) : acc_t(0);
          c.next(R.g);
        }
      }
      int stats_group = -1;  // the norm statistics are read once per group the quad touches
      acc_t mu = 0, rs = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int pp = p0 + k;
        if (pp < R.b) {
          acc_t dv = go[k];
          if (R.dropout) dv = epilogue::dropout_apply(words.w[k] >= A.threshold, dv, A.keep_scale);
          if (saved_row != nullptr) {
            acc_t av = sv[k];
            if (R.norm) {
              if (nc.group != stats_group) {
                stats_group = nc.group;
                mu = A.mean[t * R.g + nc.group];
                rs = A.rstd[t * R.g + nc.group];
              }
              const acc_t xv = (av - mu) * rs;
              xh[pp] = xv;
              av = xv * static_cast<acc_t>(A.gamma[nc.offset]) + static_cast<acc_t>(A.beta[nc.offset]);
            }
            dv = epilogue::activation_backward(R.activation, av, dv);
          }
          d[pp] = dv;
        }
        nc.next(R.s);
      }
    }
    __syncthreads();

    if (R.norm) {
      // ---- 2. d γ, d β for this row: per feature u of a group, over the groups in order (on the
      // quad path, step 1 did it)
      for (int u = fold_gamma_beta ? R.s : tid; u < R.s; u += nthreads) {
        acc_t dg = 0, db = 0;
        for (int i = 0; i < R.g; ++i) {
          const int pp = i * R.s + u;
          dg += d[pp] * xh[pp];
          db += d[pp];
        }
        sum_gamma[u] += dg;
        sum_beta[u] += db;
      }
      // ---- 3. LayerNorm backward, one group per team; reads of d above end before the first
      // barrier below, and every write to d comes after one. (With one group, step 1 made the
      // sums and step 4 applies the formula.)
      for (int r = 0; r < (fuse_norm ? 0 : rounds); ++r) {
        const int i = team + r * nteams;
        const bool active = team < nteams && i < R.g;
        const int base = active ? i * R.s : 0;
        acc_t s1 = 0, s2 = 0;
        if (active) {
          for (int u = rank * 32 + lane; u < R.s; u += wpg * 32) {
            const acc_t dxh = d[base + u] * static_cast<acc_t>(A.gamma[u]);
            s1 += dxh;
            s2 += dxh * xh[base + u];
          }
        }
        s1 = cuda::warp_sum(s1);
        s2 = cuda::warp_sum(s2);
        if (lane == 0) {  // double-buffered: round r + 1 writes the other half
          red_dxh[(r & 1) * kMaxWarps + warp] = s1;
          red_dxh_xh[(r & 1) * kMaxWarps + warp] = s2;
        }
        __syncthreads();
        if (active) {
          acc_t t1 = 0, t2 = 0;
          for (int k = 0; k < wpg; ++k) {
            t1 += red_dxh[(r & 1) * kMaxWarps + team * wpg + k];
            t2 += red_dxh_xh[(r & 1) * kMaxWarps + team * wpg + k];
          }
          const acc_t rs = A.rstd[t * R.g + i];
          const acc_t mean_dxh = t1 / acc_t(R.s), mean_dxh_xh = t2 / acc_t(R.s);
          for (int u = rank * 32 + lane; u < R.s; u += wpg * 32) {
            const int pp = base + u;
            d[pp] = rs * (d[pp] * static_cast<acc_t>(A.gamma[u]) - mean_dxh - xh[pp] * mean_dxh_xh);
          }
        }
      }
      if (!fuse_norm) __syncthreads();
    }

    // ---- 4. dY in GEMM order (the shuffle undone as addressing), d bias
    scalar_t* dy_row = A.dy + t * R.b;
    const bool bias = A.grad_bias != nullptr;
    if (fuse_norm) {  // one group: step 3's formula applied here, on the way out
      acc_t total_s1 = 0, total_s2 = 0;
      for (int k = 0; k < nwarps; ++k) {
        total_s1 += red_dxh[k];
        total_s2 += red_dxh_xh[k];
      }
      const acc_t rs = A.rstd[t], mean_dxh = total_s1 / acc_t(R.s), mean_dxh_xh = total_s2 / acc_t(R.s);
      for (int q0 = tid * V; q0 < R.b; q0 += nthreads * V) {
        acc_t dz[V], xv[V], gamma[V];
        load_run(d + q0, dz);
        load_run(xh + q0, xv);
        if constexpr (V % 4 == 0) {
#pragma unroll
          for (int k = 0; k < V; k += 4) {
            acc_t four[4];
            load4(A.gamma + q0 + k, four);
#pragma unroll
            for (int j = 0; j < 4; ++j) gamma[k + j] = four[j];
          }
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) gamma[k] = static_cast<acc_t>(A.gamma[q0 + k]);
        }
#pragma unroll
        for (int k = 0; k < V; ++k) dz[k] = rs * (dz[k] * gamma[k] - mean_dxh - xv[k] * mean_dxh_xh);
        store_dy_run(dy_row + q0, bias ? sum_bias + q0 : nullptr, dz);
      }
    } else if (A.vec_dy) {
      for (int q0 = tid * V; q0 < R.b; q0 += nthreads * V) {
        acc_t dz[V];
        if (R.shuffle) {
          RowCursor zc(q0, R.by_s);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            dz[k] = d[zc.offset * R.g + zc.group];
            zc.next(R.s);
          }
        } else {
          load_run(d + q0, dz);
        }
        store_dy_run(dy_row + q0, bias ? sum_bias + q0 : nullptr, dz);
      }
    } else {
      for (int q = tid; q < R.b; q += nthreads) {
        const RowCursor zc(q, R.by_s);
        const acc_t dz = d[R.shuffle ? zc.offset * R.g + zc.group : q];
        dy_row[q] = static_cast<scalar_t>(dz);
        if (bias) sum_bias[q] += dz;
      }
    }

    // ---- 5. grad_x prefill: e's copy in the output hands its gradient straight back
    if (A.grad_x != nullptr) prefill_grad_x_row(A, t, go_row, tid, nthreads);
    __syncthreads();  // d and x̂ are rewritten by the next row
  }

  if (A.num_partials > 0) {  // launched cooperatively: every block reaches the grid barrier
    acc_t* mine = A.partials + static_cast<int64_t>(blockIdx.x) * A.num_partials;
    for (int c = tid; c < A.num_partials; c += nthreads) {
      if (!fold_gamma_beta || R.g == 1 || c < A.gamma_offset) {  // the same layout in the stage
        mine[c] = sums[c];
      } else {  // d γ or d β of feature u: this block's sums per group, added in group order
        const bool gamma = c < A.gamma_offset + R.s;
        const int u = c - A.gamma_offset - (gamma ? 0 : R.s);
        const acc_t* per_group = gamma ? sum_gamma : sum_beta;
        acc_t total = 0;
        for (int i = 0; i < R.g; ++i) total += per_group[i * R.s + u];
        mine[c] = total;
      }
    }
    grads_from_block_partials(A);
  }
}

template <typename scalar_t>
void launch_backward(BackwardArgs<scalar_t> args, const at::TensorOptions& options) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowShape& R = args.R;
  const int threads = cuda::row_block_threads(R.b, row_threads_cap());
  const int64_t stage = backward_stage(R, args.sum_slots);
  const size_t reduce_bytes = kBackwardReduceSlots * sizeof(acc_t);
  size_t smem = reduce_bytes + static_cast<size_t>(stage) * sizeof(acc_t);
  const bool stage_in_global = smem > cuda::max_dynamic_smem();
  if (stage_in_global) smem = reduce_bytes;  // the stage goes to a global workspace instead
  auto* kernel = &hgt_step_backward_kernel<scalar_t>;
  const int per_sm = std::min(cuda::blocks_per_sm(kernel, threads, smem), backward_blocks_per_sm_cap());
  TORCH_CHECK(per_sm > 0, "define_ops::hgt_step_backward (CUDA): the epilogue kernel does not fit on this device");
  // Cooperative launch: the grid must be co-resident, which this occupancy-derived size is.
  const int64_t grid = std::min<int64_t>(args.tokens, static_cast<int64_t>(per_sm) * cuda::num_sms());
  const auto acc_options = options.dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor workspace, partials;
  if (stage_in_global) {
    workspace = at::empty({grid, stage}, acc_options);
    args.workspace = workspace.data_ptr<acc_t>();
  }
  if (args.num_partials > 0) {
    TORCH_CHECK(cuda::supports_cooperative_launch(),
                "define_ops::hgt_step_backward (CUDA): the device does not support cooperative launches");
    partials = at::empty({grid, args.num_partials}, acc_options);
    args.partials = partials.data_ptr<acc_t>();
    cuda::launch_cooperative(kernel, grid, threads, smem, args);
  } else {
    cuda::launch_kernel(kernel, grid, threads, smem, args);
  }
}

// ============================================================================ warp-per-row epilogues
// The block-per-row kernels above take ~6x (forward) and ~7x (backward) the time their bytes need
// at lstm_wt103 on an H200 (h200-9c44359-profile-bf16.json). Part of that is instructions (an H100
// Nsight run had the SMs 66-69 % busy, since cut), part is structure: one row per block is in
// flight, and a row is a chain of dependent steps (load, stage, norm reductions across warps through
// shared memory, store) with block barriers between them. Here one warp owns a row: the row lives in its lanes' registers (lane l holds quads l, l + 32,
// ...), the per-group norm sums are warp shuffles, and no step of a row waits for another warp, so
// an SM keeps as many rows in flight as it has resident warps. For rows of at most 1024 features
// without the shuffle, at most kWarpRowMaxGroups norm groups and the quad layout (quads_in_group),
// behind DEFINE_OPS_CUDA_WARP_ROWS=1 until a GPU session has timed it against the kernels above.
constexpr int kWarpRowQuads = 8;  // quads per lane: rows of up to 32 · 4 · 8 = 1024 features
constexpr int kWarpRowMaxFeatures = 32 * 4 * kWarpRowQuads;
constexpr int kWarpRowMaxGroups = 8;
constexpr int kWarpRowForwardThreads = 256;
constexpr int kWarpRowBackwardThreads = 128;  // its warps' column sums take shared memory each
constexpr int kWarpRowMinRowsPerWarp = 2;     // backward: fewer blocks, fewer partial sums to add

// DEFINE_OPS_CUDA_WARP_ROWS (read at every call, so tests and A/B runs can switch it): 0 (default)
// the block-per-row kernels only; 1 the warp-per-row kernels wherever a layer qualifies.
bool warp_rows_enabled() { return cuda::env_integer("DEFINE_OPS_CUDA_WARP_ROWS", 0, 0, 1) == 1; }

// (b % 4 == 0, the quads, comes with quads_in_group, which both launchers also require.)
bool warp_rows_shape(const RowShape& R) {
  return !R.shuffle && R.b <= kWarpRowMaxFeatures && (!R.norm || R.g <= kWarpRowMaxGroups);
}

// Per-group sums over a warp's row: lane value part[j] belongs to group grp[j] (-1: past the row's
// end). Afterwards total[j] holds the sum of group grp[j], the same on every lane; the order of the
// additions is fixed (lane-local in j order, then the shuffle tree), so results are reproducible.
template <typename acc_t>
__device__ __forceinline__ void warp_group_sums(int groups, const int (&grp)[kWarpRowQuads],
                                                const acc_t (&part)[kWarpRowQuads], acc_t (&total)[kWarpRowQuads]) {
  for (int i = 0; i < groups; ++i) {  // `groups` is the same on every lane: all of them shuffle
    acc_t sum = 0;
#pragma unroll
    for (int j = 0; j < kWarpRowQuads; ++j) sum += grp[j] == i ? part[j] : acc_t(0);
    sum = cuda::warp_sum(sum);
#pragma unroll
    for (int j = 0; j < kWarpRowQuads; ++j) total[j] = grp[j] == i ? sum : total[j];
  }
}

// Group of each of this lane's quads (0 without the norm), -1 past the row's end.
__device__ __forceinline__ void warp_row_groups(const RowShape& R, int lane, int (&grp)[kWarpRowQuads]) {
  const int quads = R.b / 4;
#pragma unroll
  for (int j = 0; j < kWarpRowQuads; ++j) {
    const int qd = lane + 32 * j;
    grp[j] = qd >= quads ? -1 : (R.norm ? R.by_s.div(4 * qd) : 0);
  }
}

// One warp per row (grid-stride over rows). Per row: v = y + bias (and `saved`), the group
// statistics by shuffles, then norm → activation → dropout → store per quad, then e's copy.
// At least 3 blocks per SM, i.e. <= 85 registers (ptxas took 90 for bf16 otherwise: 2 blocks, 16 warps).
template <typename scalar_t>
__global__ void __launch_bounds__(kWarpRowForwardThreads, 3) hgt_step_forward_warp_kernel(const ForwardArgs<scalar_t> A) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowShape& R = A.R;
  const int lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * nwarps;
  const uint64_t seed = R.dropout ? load_seed(A.seed_ptr, A.seed) : 0;
  int grp[kWarpRowQuads];
  warp_row_groups(R, lane, grp);

  for (int64_t t = static_cast<int64_t>(blockIdx.x) * nwarps + (threadIdx.x >> 5); t < A.tokens; t += warps_in_grid) {
    scalar_t* y_row = A.y + t * R.b;
    acc_t v[kWarpRowQuads][4];
#pragma unroll
    for (int j = 0; j < kWarpRowQuads; ++j) {
      const int p0 = 4 * (lane + 32 * j);
#pragma unroll
      for (int k = 0; k < 4; ++k) v[j][k] = acc_t(0);
      if (grp[j] < 0) continue;
      load4(y_row + p0, v[j]);
      if (A.bias != nullptr) {
        acc_t bias[4];
        load4(A.bias + p0, bias);
#pragma unroll
        for (int k = 0; k < 4; ++k) v[j][k] += bias[k];
      }
      if (A.keep_saved) {  // the rest of the row uses the rounded values, as the backward will
        Vec<scalar_t, 4> rounded;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          rounded.v[k] = static_cast<scalar_t>(v[j][k]);
          v[j][k] = static_cast<acc_t>(rounded.v[k]);
        }
        *reinterpret_cast<Vec<scalar_t, 4>*>(y_row + p0) = rounded;
      }
    }

    acc_t mu[kWarpRowQuads], rs[kWarpRowQuads];
#pragma unroll
    for (int j = 0; j < kWarpRowQuads; ++j) mu[j] = rs[j] = acc_t(0);
    if (R.norm) {  // two passes, as the other kernels: the mean, then the squared deviations
      acc_t part[kWarpRowQuads];
#pragma unroll
      for (int j = 0; j < kWarpRowQuads; ++j) part[j] = (v[j][0] + v[j][1]) + (v[j][2] + v[j][3]);
      warp_group_sums(R.g, grp, part, mu);
#pragma unroll
      for (int j = 0; j < kWarpRowQuads; ++j) {
        mu[j] /= acc_t(R.s);
        acc_t sq = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const acc_t dev = v[j][k] - mu[j];
          sq += grp[j] >= 0 ? dev * dev : acc_t(0);
        }
        part[j] = sq;
      }
      warp_group_sums(R.g, grp, part, rs);
#pragma unroll
      for (int j = 0; j < kWarpRowQuads; ++j) {
        rs[j] = acc_t(1) / epilogue::sqrt_acc(rs[j] / acc_t(R.s) + A.eps);
        const int qd = lane + 32 * j;
        if (grp[j] >= 0 && 4 * qd == grp[j] * R.s) {  // the lane holding a group's first quad
          A.mean[t * R.g + grp[j]] = mu[j];
          A.rstd[t * R.g + grp[j]] = rs[j];
        }
      }
    }

    scalar_t* out_row = A.out + t * R.out_width;
#pragma unroll
    for (int j = 0; j < kWarpRowQuads; ++j) {
      if (grp[j] < 0) continue;
      const int qd = lane + 32 * j, p0 = 4 * qd;
      finish_forward_quad(A, seed, t, qd, p0 - grp[j] * R.s, mu[j], rs[j], v[j], out_row);
    }

    if (R.carry_e) copy_e_row(A, t, out_row, lane, 32);
  }
}

template <typename scalar_t>
bool warp_rows_forward_qualifies(const ForwardArgs<scalar_t>& A) {
  return warp_rows_enabled() && warp_rows_shape(A.R) && A.quads_in_group && cuda::is_aligned(A.y, 4 * sizeof(scalar_t)) &&
         (A.bias == nullptr || cuda::is_aligned(A.bias, 4 * sizeof(scalar_t)));
}

template <typename scalar_t>
void launch_forward_warp_rows(const ForwardArgs<scalar_t>& args) {
  constexpr int threads = kWarpRowForwardThreads, warps = threads / 32;
  auto* kernel = &hgt_step_forward_warp_kernel<scalar_t>;
  const int per_sm = cuda::blocks_per_sm(kernel, threads, 0);
  TORCH_CHECK(per_sm > 0, "define_ops::hgt_step (CUDA): the warp-row epilogue kernel does not fit on this device");
  const int64_t grid = std::min<int64_t>((args.tokens + warps - 1) / warps, static_cast<int64_t>(per_sm) * cuda::num_sms());
  cuda::count_launch("hgt_step_forward_warp_kernel");
  cuda::launch_kernel(kernel, grid, threads, 0, args);
}

// One warp per row (grid-stride over rows), with d the incoming gradient of the h part:
//   1. d = dropout(grad_out's h part); x̂ and the activation input recomputed from `saved`;
//      d ·= f'(a); this warp's d γ += d·x̂ and d β += d, per (group, feature);
//   2. LayerNorm backward per group, its two sums by shuffles: d = rstd·(d·γ − mean(d·γ) − x̂·mean(d·γ·x̂));
//   3. dY = d (GEMM order: no shuffle here), this warp's d bias += dY; grad_x prefilled with e's gradient.
// Every lane adds to its own columns of its warp's sums in shared memory (no atomics, no barrier);
// at the end the block adds its warps' sums in warp order (and d γ / d β over the groups in group
// order) into `partials`, the grid synchronizes, and every column is summed over the blocks in
// block order, as in the block-per-row kernel.
// At least 4 blocks per SM, i.e. <= 128 registers (ptxas took 146 for bf16 otherwise: 12 warps per SM).
template <typename scalar_t>
__global__ void __launch_bounds__(kWarpRowBackwardThreads, 4) hgt_step_backward_warp_kernel(const BackwardArgs<scalar_t> A) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowShape& R = A.R;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int64_t warps_in_grid = static_cast<int64_t>(gridDim.x) * nwarps;
  const uint64_t seed = R.dropout ? load_seed(A.seed_ptr, A.seed) : 0;
  const bool bias = A.grad_bias != nullptr;
  acc_t* block_sums = cuda::shared_memory<acc_t>();            // [nwarps, sum_slots]
  acc_t* sum_bias = block_sums + warp * A.sum_slots;           // [b]
  acc_t* sum_gamma = sum_bias + A.gamma_offset;                // [g, s] (norm)
  acc_t* sum_beta = sum_gamma + R.b;                           // [g, s] (norm)
  int grp[kWarpRowQuads];
  warp_row_groups(R, lane, grp);
#pragma unroll
  for (int j = 0; j < kWarpRowQuads; ++j) {  // this lane's columns, which no other thread touches
    if (grp[j] < 0) continue;
    const int p0 = 4 * (lane + 32 * j);
    const acc_t zeros[4] = {0, 0, 0, 0};
    if (bias) store_run(sum_bias + p0, zeros);
    if (R.norm) {
      store_run(sum_gamma + p0, zeros);
      store_run(sum_beta + p0, zeros);
    }
  }

  for (int64_t t = static_cast<int64_t>(blockIdx.x) * nwarps + warp; t < A.tokens; t += warps_in_grid) {
    const scalar_t* go_row = A.grad_out + t * R.out_width;
    const scalar_t* saved_row = A.saved != nullptr ? A.saved + t * R.b : nullptr;
    acc_t dv[kWarpRowQuads][4], xv[kWarpRowQuads][4], rs[kWarpRowQuads];
#pragma unroll
    for (int j = 0; j < kWarpRowQuads; ++j) {
      rs[j] = acc_t(0);
#pragma unroll
      for (int k = 0; k < 4; ++k) dv[j][k] = xv[j][k] = acc_t(0);
      if (grp[j] < 0) continue;
      const int qd = lane + 32 * j, p0 = 4 * qd;
      load4(go_row + h_position(R, RowCursor(p0, R.by_hc_out)), dv[j]);
      if (R.dropout) {
        const PhiloxWords words = philox4x32_10(seed, static_cast<uint32_t>(qd), static_cast<uint32_t>(t));
#pragma unroll
        for (int k = 0; k < 4; ++k) dv[j][k] = epilogue::dropout_apply(words.w[k] >= A.threshold, dv[j][k], A.keep_scale);
      }
      if (saved_row == nullptr) continue;
      acc_t av[4];
      load4(saved_row + p0, av);
      if (R.norm) {
        const int u = p0 - grp[j] * R.s;
        const acc_t mu = A.mean[t * R.g + grp[j]];
        rs[j] = A.rstd[t * R.g + grp[j]];
        acc_t gamma[4], beta[4];
        load4(A.gamma + u, gamma);
        load4(A.beta + u, beta);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          xv[j][k] = (av[k] - mu) * rs[j];
          av[k] = xv[j][k] * gamma[k] + beta[k];
        }
      }
      activation_backward4(R.activation, av, dv[j]);
      if (R.norm) {
        acc_t sum_g[4], sum_b[4];
        load_run(sum_gamma + p0, sum_g);
        load_run(sum_beta + p0, sum_b);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          sum_g[k] += dv[j][k] * xv[j][k];
          sum_b[k] += dv[j][k];
        }
        store_run(sum_gamma + p0, sum_g);
        store_run(sum_beta + p0, sum_b);
      }
    }

    if (R.norm) {
      acc_t part1[kWarpRowQuads], part2[kWarpRowQuads], mean_dxh[kWarpRowQuads], mean_dxh_xh[kWarpRowQuads];
#pragma unroll
      for (int j = 0; j < kWarpRowQuads; ++j) {
        part1[j] = part2[j] = mean_dxh[j] = mean_dxh_xh[j] = acc_t(0);
        if (grp[j] < 0) continue;
        acc_t gamma[4];
        load4(A.gamma + 4 * (lane + 32 * j) - grp[j] * R.s, gamma);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          dv[j][k] *= gamma[k];  // d·γ from here on
          part1[j] += dv[j][k];
          part2[j] += dv[j][k] * xv[j][k];
        }
      }
      warp_group_sums(R.g, grp, part1, mean_dxh);
      warp_group_sums(R.g, grp, part2, mean_dxh_xh);
#pragma unroll
      for (int j = 0; j < kWarpRowQuads; ++j) {
        const acc_t m1 = mean_dxh[j] / acc_t(R.s), m2 = mean_dxh_xh[j] / acc_t(R.s);
#pragma unroll
        for (int k = 0; k < 4; ++k) dv[j][k] = rs[j] * (dv[j][k] - m1 - xv[j][k] * m2);
      }
    }

    scalar_t* dy_row = A.dy + t * R.b;
#pragma unroll
    for (int j = 0; j < kWarpRowQuads; ++j) {
      if (grp[j] < 0) continue;
      const int p0 = 4 * (lane + 32 * j);
      store4(dy_row + p0, dv[j]);
      if (bias) {
        acc_t sums[4];
        load_run(sum_bias + p0, sums);
#pragma unroll
        for (int k = 0; k < 4; ++k) sums[k] += dv[j][k];
        store_run(sum_bias + p0, sums);
      }
    }

    if (A.grad_x != nullptr) prefill_grad_x_row(A, t, go_row, lane, 32);
  }

  if (A.num_partials > 0) {  // launched cooperatively: every block reaches the grid barrier
    __syncthreads();         // every warp's sums are complete
    acc_t* mine = A.partials + static_cast<int64_t>(blockIdx.x) * A.num_partials;
    for (int c = tid; c < A.num_partials; c += blockDim.x) {
      const bool is_bias = c < A.gamma_offset;
      const bool gamma = !is_bias && c < A.gamma_offset + R.s;
      const int u = is_bias ? c : c - A.gamma_offset - (gamma ? 0 : R.s);
      const int column = is_bias ? c : A.gamma_offset + (gamma ? 0 : R.b) + u;  // group 0's slot
      const int groups = is_bias ? 1 : R.g;
      acc_t total = 0;
      for (int w = 0; w < nwarps; ++w) {
        const acc_t* sums = block_sums + w * A.sum_slots + column;
        for (int i = 0; i < groups; ++i) total += sums[i * R.s];
      }
      mine[c] = total;
    }
    grads_from_block_partials(A);
  }
}

// This warp-row layer's column sums per warp: d bias [b] | d γ [g, s] | d β [g, s].
inline int warp_rows_sum_slots(const RowShape& R, bool bias) { return (bias ? R.b : 0) + (R.norm ? 2 * R.b : 0); }

template <typename scalar_t>
size_t warp_rows_backward_smem(const BackwardArgs<scalar_t>& A) {
  using acc_t = at::opmath_type<scalar_t>;
  return static_cast<size_t>(kWarpRowBackwardThreads / 32) *
         warp_rows_sum_slots(A.R, A.grad_bias != nullptr) * sizeof(acc_t);
}

template <typename scalar_t>
bool warp_rows_backward_qualifies(const BackwardArgs<scalar_t>& A) {
  return warp_rows_enabled() && warp_rows_shape(A.R) && A.quads_in_group &&
         cuda::is_aligned(A.dy, 4 * sizeof(scalar_t)) && warp_rows_backward_smem(A) <= cuda::max_dynamic_smem();
}

template <typename scalar_t>
void launch_backward_warp_rows(BackwardArgs<scalar_t> args, const at::TensorOptions& options) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int threads = kWarpRowBackwardThreads, warps = threads / 32;
  args.sum_slots = warp_rows_sum_slots(args.R, args.grad_bias != nullptr);
  const size_t smem = warp_rows_backward_smem(args);
  auto* kernel = &hgt_step_backward_warp_kernel<scalar_t>;
  const int per_sm = cuda::blocks_per_sm(kernel, threads, smem);
  TORCH_CHECK(per_sm > 0, "define_ops::hgt_step_backward (CUDA): the warp-row epilogue kernel does not fit on this device");
  // Cooperative launch: the grid must be co-resident, which this occupancy-derived size is.
  const int64_t rows_per_block = static_cast<int64_t>(warps) * kWarpRowMinRowsPerWarp;
  const int64_t grid = std::min<int64_t>((args.tokens + rows_per_block - 1) / rows_per_block,
                                         static_cast<int64_t>(per_sm) * cuda::num_sms());
  at::Tensor partials;
  cuda::count_launch("hgt_step_backward_warp_kernel");
  if (args.num_partials > 0) {
    TORCH_CHECK(cuda::supports_cooperative_launch(),
                "define_ops::hgt_step_backward (CUDA): the device does not support cooperative launches");
    partials = at::empty({grid, args.num_partials}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
    args.partials = partials.data_ptr<acc_t>();
    cuda::launch_cooperative(kernel, grid, threads, smem, args);
  } else {
    cuda::launch_kernel(kernel, grid, threads, smem, args);
  }
}

// ============================================================================ op bodies
// The device seed pointer (read inside the kernels: no host synchronisation) or, for a CPU seed
// tensor, its value.
void bind_seed(const std::optional<at::Tensor>& seed, const StepParams& p, const at::Tensor& x,
               const int64_t** seed_ptr, uint64_t* seed_value) {
  *seed_ptr = nullptr;
  *seed_value = 0;
  if (p.dropout_p == 0.0) return;
  if (seed->device().is_cpu() && !cuda::kEmulated) {
    *seed_value = static_cast<uint64_t>(seed->item<int64_t>());
    return;
  }
  TORCH_CHECK_VALUE(seed->device() == x.device(), "define_ops::hgt_step (CUDA): the seed is on ", seed->device(),
                    " but x is on ", x.device());
  *seed_ptr = seed->const_data_ptr<int64_t>();
}

// [T, width] viewed as g groups of `width / g` columns: [g, T, width / g], strides (width / g, width, 1).
at::Tensor group_view(const at::Tensor& t2d, int64_t groups) {
  const int64_t tokens = t2d.size(0), width = t2d.size(1), per_group = width / groups;
  return t2d.as_strided({groups, tokens, per_group}, {per_group, width, 1});
}

// Dense block-diagonal GEMMs for grouped layers (DEFINE_OPS_CUDA_DENSE_GROUPS, read at every call):
// where a group's width is not a multiple of 16 bytes, the strided views of the grouped GEMMs start
// off 16-byte boundaries and cuBLAS falls back to CUTLASS `align2` kernels (an H100 ran the
// txl_wt103 layer-2 forward at 184 TFLOP/s, 602 on an aligned copy; nmt_wmt14's two unaligned
// layers spend ~140 us of their ~540 us step in them on an H200). The alternative is the whole
// layer as ONE GEMM against the [a, b] block-diagonal weight: g times the FLOPs, every operand
// aligned when a and b are multiples of 8. 0 (default, until a GPU session measures it against
// scripts/gemm_census.py's numbers): never; 1: the grouped layers with an unaligned group width;
// 2: every grouped layer (tests).
int dense_groups_mode() { return static_cast<int>(cuda::env_integer("DEFINE_OPS_CUDA_DENSE_GROUPS", 0, 0, 2)); }

bool use_dense_groups(const StepParams& p, const at::Tensor& x) {
  if (p.groups == 1) return false;
  const int mode = dense_groups_mode();
  if (mode != 1) return mode == 2;
  const int64_t per_16_bytes = 16 / static_cast<int64_t>(x.element_size());
  const bool groups_aligned = p.in_group % per_16_bytes == 0 && p.out_group % per_16_bytes == 0;
  return !groups_aligned && p.in_width % per_16_bytes == 0 && p.out_h % per_16_bytes == 0;
}

// The g diagonal [a/g, b/g] blocks of a [a, b] matrix, as a [g, a/g, b/g] view.
at::Tensor diagonal_blocks(const at::Tensor& dense, int64_t groups) {
  const int64_t a = dense.size(0), b = dense.size(1), a_g = a / groups, b_g = b / groups;
  return dense.as_strided({groups, a_g, b_g}, {a_g * b + b_g, b, 1});
}

// weight [g, a/g, b/g] → the [a, b] block-diagonal matrix with W_j as its j-th block.
at::Tensor block_diagonal(const at::Tensor& weight) {
  const int64_t groups = weight.size(0);
  at::Tensor dense = at::zeros({groups * weight.size(1), groups * weight.size(2)}, weight.options());
  diagonal_blocks(dense, groups).copy_(weight);
  return dense;
}

// x_j [T, a/g] @ W_j [a/g, b/g] → y_j for every group: one strided-batched GEMM, no copies (or, with
// `dense`, x @ the block-diagonal weight).
void grouped_gemm(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y, int64_t groups, bool dense) {
  if (dense) {
    at::mm_out(y, x, block_diagonal(weight));
    return;
  }
  at::Tensor y3 = group_view(y, groups);
  at::bmm_out(y3, group_view(x, groups), weight);
}

// The step bodies, writing into tensors the caller allocated (the single-step ops and the stack).
struct CudaStep {
  static void forward(const StepParams& p, const StepTensors& t, const StepOutputs& o) {
    if (p.tokens == 0) return;
    const cuda::DeviceGuard guard(t.x.device());
    const RowShape shape = make_row_shape(p);
    const at::Tensor x_c = t.x.contiguous();
    at::Tensor out = o.out;

    if (p.plain()) {  // the Reduce layer: one GEMM with the bias folded in, straight into out
      if (p.groups == 1) {
        if (p.bias) {
          at::addmm_out(out, *t.bias, x_c, t.weight.select(0, 0));
        } else {
          at::mm_out(out, x_c, t.weight.select(0, 0));
        }
      } else {
        grouped_gemm(x_c, t.weight, out, p.groups, use_dense_groups(p, t.x));
        if (p.bias) out.add_(*t.bias);
      }
      return;
    }

    at::Tensor y = p.needs_saved() ? o.saved : at::empty({p.tokens, p.out_h}, t.x.options());  // GEMM order
    grouped_gemm(x_c, t.weight, y, p.groups, use_dense_groups(p, t.x));
    const at::Tensor bias_c = p.bias ? t.bias->contiguous() : at::Tensor();
    const at::Tensor gamma_c = p.norm ? t.norm_weight->contiguous() : at::Tensor();
    const at::Tensor beta_c = p.norm ? t.norm_bias->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.x.scalar_type(), "hgt_step_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      constexpr int V = 16 / sizeof(scalar_t);
      ForwardArgs<scalar_t> args{};
      args.R = shape;
      args.tokens = p.tokens;
      args.x = x_c.const_data_ptr<scalar_t>();
      args.y = y.data_ptr<scalar_t>();
      args.out = out.data_ptr<scalar_t>();
      args.bias = p.bias ? bias_c.const_data_ptr<scalar_t>() : nullptr;
      args.gamma = p.norm ? gamma_c.const_data_ptr<scalar_t>() : nullptr;
      args.beta = p.norm ? beta_c.const_data_ptr<scalar_t>() : nullptr;
      args.mean = p.norm ? o.mean.data_ptr<acc_t>() : nullptr;
      args.rstd = p.norm ? o.rstd.data_ptr<acc_t>() : nullptr;
      bind_seed(t.seed, p, t.x, &args.seed_ptr, &args.seed);
      args.threshold = p.dropout_p > 0.0 ? dropout_threshold(p.dropout_p) : 0u;
      args.keep_scale = dropout_keep_scale<acc_t>(p.dropout_p);
      args.eps = acc_t(p.norm_eps);
      args.workspace = nullptr;
      args.keep_saved = p.needs_saved();
      args.vec_in = shape.b % V == 0 && cuda::is_aligned(args.y, 16) &&
                    (args.bias == nullptr || cuda::is_aligned(args.bias, 16));
      args.vec_out = shape.b % 4 == 0 && shape.hc_out % 4 == 0 && shape.ec_out % 4 == 0 &&
                     shape.out_width % 4 == 0 && cuda::is_aligned(args.out, 4 * sizeof(scalar_t));
      args.vec_e = shape.carry_e && shape.ec_in % 4 == 0 && shape.hc_in % 4 == 0 && shape.ec_out % 4 == 0 &&
                   shape.hc_out % 4 == 0 && shape.a % 4 == 0 && shape.out_width % 4 == 0 &&
                   cuda::is_aligned(args.x, 4 * sizeof(scalar_t)) && cuda::is_aligned(args.out, 4 * sizeof(scalar_t));
      args.quads_in_group = args.vec_out && shape.s % 4 == 0 &&
                            (!p.norm || (cuda::is_aligned(args.gamma, 4 * sizeof(scalar_t)) &&
                                         cuda::is_aligned(args.beta, 4 * sizeof(scalar_t))));
      if (warp_rows_forward_qualifies(args)) {
        launch_forward_warp_rows(args);
      } else {
        launch_forward<scalar_t>(args, t.x.options());
      }
    });
  }

  static void backward(const StepParams& p, const at::Tensor& grad_out, const StepTensors& t,
                       const StepOutputs& saved_by_forward, const StepGrads& g) {
    const cuda::DeviceGuard guard(t.x.device());
    if (p.tokens == 0) return zero_parameter_grads(g);
    const RowShape shape = make_row_shape(p);
    const auto opts = t.x.options();
    const at::Tensor x_c = t.x.contiguous();
    const at::Tensor g_c = grad_out.contiguous();

    at::Tensor dy;
    if (p.plain()) {
      dy = g_c;
      // The Reduce layer's bias gradient: ATen's sum over the tokens (deterministic: a fixed order
      // for a shape and device). Our own cooperative column-sum kernel took 31-34 us per step on an
      // H200 at the presets, ATen's 11-17 us (benchmarks/results/h200-9c44359-profile-bf16.json
      // against h200-profile-bf16.json).
      if (p.bias) {
        at::Tensor grad_bias = g.grad_bias;
        at::sum_out(grad_bias, g_c, 0);
      }
    } else {
      dy = g.dy.defined() ? g.dy : at::empty({p.tokens, p.out_h}, opts);
      const at::Tensor saved_c = p.needs_saved() ? saved_by_forward.saved.contiguous() : at::Tensor();
      const at::Tensor mean_c = p.norm ? saved_by_forward.mean.contiguous() : at::Tensor();
      const at::Tensor rstd_c = p.norm ? saved_by_forward.rstd.contiguous() : at::Tensor();
      const at::Tensor gamma_c = p.norm ? t.norm_weight->contiguous() : at::Tensor();
      const at::Tensor beta_c = p.norm ? t.norm_bias->contiguous() : at::Tensor();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.x.scalar_type(), "hgt_step_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int V = 16 / sizeof(scalar_t);
        BackwardArgs<scalar_t> args{};
        args.R = shape;
        args.tokens = p.tokens;
        args.grad_out = g_c.const_data_ptr<scalar_t>();
        args.saved = p.needs_saved() ? saved_c.const_data_ptr<scalar_t>() : nullptr;
        args.gamma = p.norm ? gamma_c.const_data_ptr<scalar_t>() : nullptr;
        args.beta = p.norm ? beta_c.const_data_ptr<scalar_t>() : nullptr;
        args.mean = p.norm ? mean_c.const_data_ptr<acc_t>() : nullptr;
        args.rstd = p.norm ? rstd_c.const_data_ptr<acc_t>() : nullptr;
        bind_seed(t.seed, p, t.x, &args.seed_ptr, &args.seed);
        args.threshold = p.dropout_p > 0.0 ? dropout_threshold(p.dropout_p) : 0u;
        args.keep_scale = dropout_keep_scale<acc_t>(p.dropout_p);
        args.dy = dy.data_ptr<scalar_t>();
        args.grad_x = p.carry_e ? g.grad_x.data_ptr<scalar_t>() : nullptr;
        args.partials = nullptr;
        args.num_partials = static_cast<int>((p.bias ? p.out_h : 0) + (p.norm ? 2 * p.out_group : 0));
        args.gamma_offset = static_cast<int>(p.bias ? p.out_h : 0);
        args.grad_bias = p.bias ? g.grad_bias.data_ptr<scalar_t>() : nullptr;
        args.grad_gamma = p.norm ? g.grad_gamma.data_ptr<scalar_t>() : nullptr;
        args.grad_beta = p.norm ? g.grad_beta.data_ptr<scalar_t>() : nullptr;
        args.workspace = nullptr;
        args.vec_dy = shape.b % V == 0 && cuda::is_aligned(args.dy, 16);
        args.vec_go = shape.b % 4 == 0 && shape.hc_out % 4 == 0 && shape.ec_out % 4 == 0 &&
                      shape.out_width % 4 == 0 && cuda::is_aligned(args.grad_out, 4 * sizeof(scalar_t));
        args.vec_saved = !shape.shuffle && shape.b % 4 == 0 && args.saved != nullptr &&
                         cuda::is_aligned(args.saved, 4 * sizeof(scalar_t));
        args.vec_gx = shape.carry_e && args.vec_go && shape.ec_in % 4 == 0 && shape.hc_in % 4 == 0 &&
                      shape.a % 4 == 0 && cuda::is_aligned(args.grad_x, 4 * sizeof(scalar_t));
        args.quads_in_group = args.vec_go && shape.s % 4 == 0 && (args.saved == nullptr || args.vec_saved) &&
                              (!p.norm || (cuda::is_aligned(args.gamma, 4 * sizeof(scalar_t)) &&
                                           cuda::is_aligned(args.beta, 4 * sizeof(scalar_t))));
        args.fold_gamma_beta = args.quads_in_group && p.norm;
        args.sum_slots = static_cast<int>((p.bias ? p.out_h : 0) +
                                          (p.norm ? 2 * (args.fold_gamma_beta ? p.out_h : p.out_group) : 0));
        if (warp_rows_backward_qualifies(args)) {
          launch_backward_warp_rows(args, opts);
        } else {
          launch_backward<scalar_t>(args, opts);
        }
      });
    }

    at::Tensor grad_weight = g.grad_weight;
    if (use_dense_groups(p, t.x)) {  // the same two GEMMs against the block-diagonal weight
      at::Tensor grad_x = g.grad_x;
      const at::Tensor weight_t = block_diagonal(t.weight).t();
      if (p.carry_e) {
        grad_x.addmm_(dy, weight_t);
      } else {
        at::mm_out(grad_x, dy, weight_t);
      }
      grad_weight.copy_(diagonal_blocks(at::mm(x_c.t(), dy), p.groups));
      return;
    }
    // dgrad: grad_x_j (+)= dY_j @ W_jᵀ, one strided-batched GEMM; with the skip it accumulates onto
    // the e gradient the epilogue kernel put in place (beta = 1).
    const at::Tensor dy3 = group_view(dy, p.groups);
    at::Tensor grad_x3 = group_view(g.grad_x, p.groups);
    if (p.carry_e) {
      grad_x3.baddbmm_(dy3, t.weight.transpose(1, 2));
    } else {
      at::bmm_out(grad_x3, dy3, t.weight.transpose(1, 2));
    }
    // wgrad: dW_j = x_jᵀ @ dY_j, one strided-batched GEMM.
    at::bmm_out(grad_weight, group_view(x_c, p.groups).transpose(1, 2), dy3);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(define_ops, CUDA, m) {
  m.impl("hgt_step", &StepOps<CudaStep>::forward);
  m.impl("hgt_step_backward", &StepOps<CudaStep>::backward);
  m.impl("hgt_stack", &StackOps<CudaStep>::forward);
  m.impl("hgt_stack_backward", &StackOps<CudaStep>::backward);
}

}  // namespace define_ops
