// CPU kernels, looked up by name by the CPU driver.
//
// Each kernel reads its arguments from KernelArgs (see the table in
// kernels.cpp for the layout of each) and throws InvalidArgument on a bad
// argument, which fails its command buffer.
#pragma once

#include <functional>
#include <string>
#include <unordered_map>

#include "flotilla/backend/driver.h"

namespace flotilla::backend::cpu {

using KernelFn = void (*)(const KernelArgs& args);
using KernelTable = std::unordered_map<std::string, KernelFn>;

// fill_f32, copy_bytes, copy_pinned, gather_rows, add_f32, scale_f32, checksum_u32, sleep_us,
// trap.
void add_basic_kernels(KernelTable& table);
// The ops' kernels (linear_f32, add_bcast_f32, ...: kernels_nn.cpp).
void add_nn_kernels(KernelTable& table);

// Every CPU kernel of this build.
const KernelTable& kernel_table();

}  // namespace flotilla::backend::cpu
