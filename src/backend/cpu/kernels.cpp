// The basic kernels, shared in meaning with the CUDA backend's:
//
//   name          ptrs                 scalars     n
//   fill_f32      out                  value (f)   elements
//   copy_bytes    dst, src             -           bytes
//   copy_pinned   dst, src             -           bytes (the same here; on CUDA a kernel)
//   gather_rows   dst, table           row bytes   rows: row i of dst = row_bytes bytes at
//                                      (i)         table[i] (an array of n addresses)
//   add_f32       a, b, out            -           elements
//   scale_f32     a, out               factor (f)  elements
//   checksum_u32  a, out (uint64)      -           32-bit words; out = wrapping sum
//   sleep_us      -                    micros (i)  -
//   trap          -                    -           -   (fails its command buffer)
#include "backend/cpu/kernels.h"

#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>

#include "flotilla/common/error.h"

namespace flotilla::backend::cpu {

namespace {

void need(const KernelArgs& a, const char* name, int ptrs, int scalars) {
  FL_CHECK_ARG(a.num_ptrs >= ptrs && a.num_scalars >= scalars, "[kernel ", name, "] needs ", ptrs,
               " pointers and ", scalars, " scalars, got ", a.num_ptrs, " and ", a.num_scalars);
  for (int i = 0; i < ptrs; ++i)
    FL_CHECK_ARG(a.ptrs[static_cast<size_t>(i)] != nullptr || a.n == 0, "[kernel ", name,
                 "] pointer argument ", i, " is null");
}

void fill_f32(const KernelArgs& a) {
  need(a, "fill_f32", 1, 1);
  auto* out = static_cast<float*>(a.ptrs[0]);
  const auto v = static_cast<float>(a.scalars[0].f);
  for (uint64_t i = 0; i < a.n; ++i) out[i] = v;
}

void copy_bytes(const KernelArgs& a) {
  need(a, "copy_bytes", 2, 0);
  if (a.n) std::memmove(a.ptrs[0], a.ptrs[1], a.n);
}

void gather_rows(const KernelArgs& a) {
  need(a, "gather_rows", 2, 1);
  FL_CHECK_ARG(a.scalars[0].i >= 0, "[kernel gather_rows] row_bytes is ", a.scalars[0].i,
               "; it must not be negative");
  auto* dst = static_cast<char*>(a.ptrs[0]);
  auto* const* table = static_cast<const void* const*>(a.ptrs[1]);
  const auto row = static_cast<size_t>(a.scalars[0].i);
  for (uint64_t i = 0; i < a.n; ++i) std::memcpy(dst + i * row, table[i], row);
}

void add_f32(const KernelArgs& a) {
  need(a, "add_f32", 3, 0);
  auto* x = static_cast<const float*>(a.ptrs[0]);
  auto* y = static_cast<const float*>(a.ptrs[1]);
  auto* out = static_cast<float*>(a.ptrs[2]);
  for (uint64_t i = 0; i < a.n; ++i) out[i] = x[i] + y[i];
}

void scale_f32(const KernelArgs& a) {
  need(a, "scale_f32", 2, 1);
  auto* x = static_cast<const float*>(a.ptrs[0]);
  auto* out = static_cast<float*>(a.ptrs[1]);
  const auto s = static_cast<float>(a.scalars[0].f);
  for (uint64_t i = 0; i < a.n; ++i) out[i] = x[i] * s;
}

void checksum_u32(const KernelArgs& a) {
  need(a, "checksum_u32", 2, 0);
  auto* x = static_cast<const uint32_t*>(a.ptrs[0]);
  uint64_t sum = 0;
  for (uint64_t i = 0; i < a.n; ++i) sum += x[i];
  *static_cast<uint64_t*>(a.ptrs[1]) = sum;
}

void sleep_us(const KernelArgs& a) {
  need(a, "sleep_us", 0, 1);
  std::this_thread::sleep_for(std::chrono::microseconds(a.scalars[0].i));
}

void trap(const KernelArgs&) {
  throw InvalidState("[kernel trap] the trap kernel ran: it fails its command buffer on purpose");
}

}  // namespace

void add_basic_kernels(KernelTable& table) {
  table.emplace("fill_f32", &fill_f32);
  table.emplace("copy_bytes", &copy_bytes);
  table.emplace("copy_pinned", &copy_bytes);
  table.emplace("gather_rows", &gather_rows);
  table.emplace("add_f32", &add_f32);
  table.emplace("scale_f32", &scale_f32);
  table.emplace("checksum_u32", &checksum_u32);
  table.emplace("sleep_us", &sleep_us);
  table.emplace("trap", &trap);
}

const KernelTable& kernel_table() {
  static const KernelTable table = [] {
    KernelTable t;
    add_basic_kernels(t);
    add_nn_kernels(t);
    return t;
  }();
  return table;
}

}  // namespace flotilla::backend::cpu
