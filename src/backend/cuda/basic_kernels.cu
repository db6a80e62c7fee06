// The basic kernels on CUDA, with the CPU driver's names and argument
// layouts (src/backend/cpu/kernels.cpp):
//
//   name          ptrs                 scalars     n
//   fill_f32      out                  value (f)   elements
//   copy_bytes    dst, src             -           bytes (cudaMemcpyAsync, any direction;
//                                                  the ranges must not overlap)
//   copy_pinned   dst, src             -           bytes (a kernel: each side device memory
//                                                  or allocate_host memory, which is mapped;
//                                                  no overlap). Note [Pinned copies]
//   gather_rows   dst, table           row bytes   rows: row i of dst = row_bytes bytes at
//                                      (i)         table[i]; the table and the rows may be
//                                                  device or allocate_host memory. Note
//                                                  [Gathered rows]
//   add_f32       a, b, out            -           elements
//   scale_f32     a, out               factor (f)  elements
//   checksum_u32  a, out (uint64)      -           32-bit words; out = wrapping sum
//   sleep_us      -                    micros (i)  -
//   trap          -                    -           -   (faults the device: it is lost)
//
// checksum_u32 sums in 64-bit integers, so the result is exact and the same
// whatever the order of the additions: deterministic, and equal to the CPU's.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "backend/cuda/kernels.h"
#include "flotilla/common/error.h"

namespace flotilla::backend::cuda {

namespace {

constexpr int kThreads = 256;

void need(const KernelArgs& a, const char* name, int ptrs, int scalars) {
  FL_CHECK_ARG(a.num_ptrs >= ptrs && a.num_scalars >= scalars, "[kernel ", name, "] needs ", ptrs,
               " pointers and ", scalars, " scalars, got ", a.num_ptrs, " and ", a.num_scalars);
  for (int i = 0; i < ptrs; ++i)
    FL_CHECK_ARG(a.ptrs[static_cast<size_t>(i)] != nullptr || a.n == 0, "[kernel ", name,
                 "] pointer argument ", i, " is null");
}

// A grid-stride grid: one thread per element up to 8 blocks per SM.
unsigned blocks_for(uint64_t n, const LaunchContext& ctx) {
  const uint64_t want = (n + kThreads - 1) / kThreads;
  const uint64_t cap = static_cast<uint64_t>(std::max(1, ctx.sm_count())) * 8;
  return static_cast<unsigned>(std::max<uint64_t>(1, std::min(want, cap)));
}

__global__ void fill_f32_kernel(float* out, float v, uint64_t n) {
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x)
    out[i] = v;
}

__global__ void add_f32_kernel(const float* a, const float* b, float* out, uint64_t n) {
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x)
    out[i] = a[i] + b[i];
}

__global__ void scale_f32_kernel(const float* a, float* out, float s, uint64_t n) {
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x)
    out[i] = a[i] * s;
}

// The sum of this block's threads' `v`, valid in thread 0.
__device__ unsigned long long block_sum(unsigned long long v) {
  __shared__ unsigned long long warp_sums[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x + 31) / 32 ? warp_sums[lane] : 0;
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// One block: writes the sum (no zeroing launch needed). For small inputs.
__global__ void checksum_one_block(const uint32_t* a, uint64_t n, unsigned long long* out) {
  unsigned long long s = 0;
  for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) s += a[i];
  s = block_sum(s);
  if (threadIdx.x == 0) *out = s;
}

// Many blocks: each adds its sum into *out, zeroed before (integer atomics
// commute, so the result does not depend on the order).
__global__ void checksum_many_blocks(const uint32_t* a, uint64_t n, unsigned long long* out) {
  unsigned long long s = 0;
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x)
    s += a[i];
  s = block_sum(s);
  if (threadIdx.x == 0) atomicAdd(out, s);
}

__device__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void sleep_kernel(uint64_t ns) {
  const uint64_t start = global_ns();
  while (global_ns() - start < ns) __nanosleep(1000);
}

__global__ void trap_kernel() { __trap(); }

// Note [Pinned copies]
// A memcpy to or from host memory costs the host about 4 us to issue on an
// H100 host, as a call or as a node of a replayed graph, which is most of a
// small batch's launch. A kernel reading or writing mapped pinned memory
// directly over PCIe costs a kernel launch (well under a microsecond as a
// graph node) and moves small copies as fast; large ones are better left to
// the copy engines (copy_bytes). BatchQueue picks by size.
__global__ void copy16_kernel(uint4* dst, const uint4* src, uint64_t n) {
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x)
    dst[i] = src[i];
}
__global__ void copy1_kernel(unsigned char* dst, const unsigned char* src, uint64_t n) {
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x)
    dst[i] = src[i];
}

// ---- Host side: validate, then launch onto the queue's stream ------------------------------

void fill_f32(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "fill_f32", 1, 1);
  if (a.n == 0) return;
  fill_f32_kernel<<<blocks_for(a.n, ctx), kThreads, 0, ctx.stream()>>>(
      static_cast<float*>(a.ptrs[0]), static_cast<float>(a.scalars[0].f), a.n);
  FL_CUDA_CHECK_LAUNCH(ctx);
}

void copy_bytes(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "copy_bytes", 2, 0);
  if (a.n == 0) return;
  FL_CUDA_CHECK_CTX(ctx,
                    cudaMemcpyAsync(a.ptrs[0], a.ptrs[1], a.n, cudaMemcpyDefault, ctx.stream()));
}

void copy_pinned(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "copy_pinned", 2, 0);
  if (a.n == 0) return;
  const auto d = reinterpret_cast<uintptr_t>(a.ptrs[0]), s = reinterpret_cast<uintptr_t>(a.ptrs[1]);
  if (d % 16 == 0 && s % 16 == 0 && a.n % 16 == 0) {
    copy16_kernel<<<blocks_for(a.n / 16, ctx), kThreads, 0, ctx.stream()>>>(
        static_cast<uint4*>(a.ptrs[0]), static_cast<const uint4*>(a.ptrs[1]), a.n / 16);
  } else {
    copy1_kernel<<<blocks_for(a.n, ctx), kThreads, 0, ctx.stream()>>>(
        static_cast<unsigned char*>(a.ptrs[0]), static_cast<const unsigned char*>(a.ptrs[1]), a.n);
  }
  FL_CUDA_CHECK_LAUNCH(ctx);
}

// Note [Gathered rows]
// Rows read from pinned host memory wait a PCIe round trip, and a block
// waiting for one holds its SM: GEMM blocks of the other streams, which
// need most of an SM's registers, cannot start there meanwhile. What the
// gather costs the device is about its blocks times the round trips each
// waits, so the kernel keeps many rows in flight per block and few round
// trips per row:
//  - a block is 16 warps, and a warp copies a row: each lane loads its
//    share, up to four 16-byte pieces, all before it stores any (2 KiB in
//    flight a warp; a byte a lane where the source, the destination or the
//    length is not 16-byte aligned);
//  - the grid has one block per 16 rows, at most Config::cuda_gather_blocks
//    (32 by default), grid-striding over the rest;
//  - the table (often mapped host memory too) is read 32 entries at a time,
//    one a lane, for the warp's next 32 rows, and each row's address is
//    passed round the warp: one round trip for 32 rows' addresses instead of
//    one before every row.
// History, on 8 streams of recorded batches of the seed's MLP (micro_batch,
// docs/PERF.md): one block a row on every SM ran 22 % slower than the copy
// engines' copy at 256 rows; 32 blocks of 8 warps, each reading its row's
// address before its row (two round trips a row), 20 % slower at 256 rows
// and 18 % at 512 on the nineteenth session's machine; this kernel 15 % and
// 18 %. BatchQueueOptions::read_in_place_max_bytes sends a queue's large
// batches to the copy engines instead.
constexpr unsigned kGatherThreads = 512;

__device__ inline void gather_one_row(char* out, const char* src, uint64_t row_bytes,
                                      unsigned lane) {
  if (((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(out) | row_bytes) & 15) ==
      0) {
    const auto* s = reinterpret_cast<const uint4*>(src);
    auto* d = reinterpret_cast<uint4*>(out);
    const uint64_t n = row_bytes / 16;
    for (uint64_t base = 0; base < n; base += 4 * 32) {
      uint4 v[4];
#pragma unroll
      for (unsigned k = 0; k < 4; ++k) {
        const uint64_t i = base + k * 32 + lane;
        if (i < n) v[k] = s[i];
      }
#pragma unroll
      for (unsigned k = 0; k < 4; ++k) {
        const uint64_t i = base + k * 32 + lane;
        if (i < n) d[i] = v[k];
      }
    }
  } else {
    for (uint64_t i = lane; i < row_bytes; i += 32) out[i] = src[i];
  }
}

__global__ void gather_rows_kernel(char* dst, const void* const* table, uint64_t rows,
                                   uint64_t row_bytes) {
  const unsigned lane = threadIdx.x % 32;
  const uint64_t warps = uint64_t{gridDim.x} * blockDim.x / 32;
  const uint64_t warp = (uint64_t{blockIdx.x} * blockDim.x + threadIdx.x) / 32;
  // The warp's rows are warp, warp + warps, ...; 32 of them per round.
  for (uint64_t first = warp; first < rows; first += 32 * warps) {
    const uint64_t mine = first + lane * warps;
    const auto addr = mine < rows ? reinterpret_cast<uintptr_t>(table[mine]) : uintptr_t{0};
    for (unsigned k = 0; k < 32; ++k) {
      const uint64_t row = first + k * warps;
      if (row >= rows) break;  // the same for every lane
      const auto src = static_cast<uintptr_t>(
          __shfl_sync(0xffffffffu, static_cast<unsigned long long>(addr), static_cast<int>(k)));
      gather_one_row(dst + row * row_bytes, reinterpret_cast<const char*>(src), row_bytes, lane);
    }
  }
}

void gather_rows(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "gather_rows", 2, 1);
  FL_CHECK_ARG(a.scalars[0].i >= 0, "[kernel gather_rows] row_bytes is ", a.scalars[0].i,
               "; it must not be negative");
  const auto row = static_cast<uint64_t>(a.scalars[0].i);
  if (a.n == 0 || row == 0) return;
  const uint64_t warps_per_block = kGatherThreads / 32;
  const auto blocks = static_cast<unsigned>(std::min<uint64_t>(
      static_cast<uint64_t>(ctx.gather_blocks()), (a.n + warps_per_block - 1) / warps_per_block));
  gather_rows_kernel<<<blocks, kGatherThreads, 0, ctx.stream()>>>(
      static_cast<char*>(a.ptrs[0]), static_cast<const void* const*>(a.ptrs[1]), a.n, row);
  FL_CUDA_CHECK_LAUNCH(ctx);
}

void add_f32(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "add_f32", 3, 0);
  if (a.n == 0) return;
  add_f32_kernel<<<blocks_for(a.n, ctx), kThreads, 0, ctx.stream()>>>(
      static_cast<const float*>(a.ptrs[0]), static_cast<const float*>(a.ptrs[1]),
      static_cast<float*>(a.ptrs[2]), a.n);
  FL_CUDA_CHECK_LAUNCH(ctx);
}

void scale_f32(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "scale_f32", 2, 1);
  if (a.n == 0) return;
  scale_f32_kernel<<<blocks_for(a.n, ctx), kThreads, 0, ctx.stream()>>>(
      static_cast<const float*>(a.ptrs[0]), static_cast<float*>(a.ptrs[1]),
      static_cast<float>(a.scalars[0].f), a.n);
  FL_CUDA_CHECK_LAUNCH(ctx);
}

void checksum_u32(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "checksum_u32", 2, 0);
  auto* x = static_cast<const uint32_t*>(a.ptrs[0]);
  auto* out = static_cast<unsigned long long*>(a.ptrs[1]);
  FL_CHECK_ARG(out != nullptr, "[kernel checksum_u32] pointer argument 1 (out) is null");
  // Up to 256K words one block reads fast enough and needs no zeroing.
  constexpr uint64_t kOneBlock = uint64_t{1} << 18;
  if (a.n <= kOneBlock) {
    checksum_one_block<<<1, 1024, 0, ctx.stream()>>>(x, a.n, out);
    FL_CUDA_CHECK_LAUNCH(ctx);
    return;
  }
  FL_CUDA_CHECK_CTX(ctx, cudaMemsetAsync(out, 0, sizeof(uint64_t), ctx.stream()));
  checksum_many_blocks<<<blocks_for(a.n, ctx), kThreads, 0, ctx.stream()>>>(x, a.n, out);
  FL_CUDA_CHECK_LAUNCH(ctx);
}

void sleep_us(const KernelArgs& a, LaunchContext& ctx) {
  need(a, "sleep_us", 0, 1);
  const int64_t us = a.scalars[0].i;
  if (us <= 0) return;
  sleep_kernel<<<1, 1, 0, ctx.stream()>>>(static_cast<uint64_t>(us) * 1000);
  FL_CUDA_CHECK_LAUNCH(ctx);
}

void trap(const KernelArgs&, LaunchContext& ctx) {
  trap_kernel<<<1, 1, 0, ctx.stream()>>>();
  FL_CUDA_CHECK_LAUNCH(ctx);
}

}  // namespace

void add_basic_kernels(KernelTable& table) {
  table.emplace("fill_f32", &fill_f32);
  table.emplace("copy_bytes", &copy_bytes);
  table.emplace("copy_pinned", &copy_pinned);
  table.emplace("gather_rows", &gather_rows);
  table.emplace("add_f32", &add_f32);
  table.emplace("scale_f32", &scale_f32);
  table.emplace("checksum_u32", &checksum_u32);
  table.emplace("sleep_us", &sleep_us);
  table.emplace("trap", &trap);
}

}  // namespace flotilla::backend::cuda
