// The CUDA driver: the driver contract (backend/driver.h) on NVIDIA GPUs.
//
// - Queues are non-blocking CUDA streams, created once; command buffers
//   launch their kernels as they are encoded and complete through pooled
//   CUDA events watched by completion threads (Note [Command buffers on
//   CUDA], Note [Completion threads]).
// - Shared events are pooled CUDA events with GPU-side cross-stream waits
//   (Note [Shared events on CUDA]); elapsed times come from the device clock.
// - Buffers: allocate() is cudaMalloc (the caching allocator above reuses
//   them; the driver never allocates device memory on a launch path),
//   allocate_host() is pinned memory (cudaMallocHost), usable by copy_bytes
//   in both directions. OutOfMemory says how much was asked and is free.
// - Kernels: the CPU driver's, by name and argument layout (kernels.h).
// - Errors: every CUDA call checked (cuda_check.h); a fault makes the device
//   lost for good (Note [Sticky errors]): device_error() returns DeviceLost,
//   every later call throws it, pending buffers complete with it.
// - Thread-safe: encoding_thread_safe() is true, so the runtime takes no
//   EncodingLock unless told to (Config::encoding_lock = on), which works too.
// - One driver per device index; every call makes its device current
//   (DeviceGuard), so any number of GPUs can be driven from any thread.
//
// Process exit: CUDA's runtime tears itself down in an exit handler, after
// which no CUDA call works. The first driver registers an exit handler of
// its own that runs before CUDA's and drains every live CUDA driver, so work
// committed before exit() finishes; a fork() child never drains its parent's
// drivers.
#pragma once

#include <memory>

#include "flotilla/backend/driver.h"

namespace flotilla::backend::cuda {

// Throws InvalidArgument for an index with no device.
std::unique_ptr<Driver> make_cuda_driver(int index, const Config& config);
// GPUs visible to this process; 0, quietly, without a driver or GPU.
int cuda_device_count();

}  // namespace flotilla::backend::cuda
