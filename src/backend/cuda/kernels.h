// CUDA kernels, looked up by name by the CUDA driver: how to add one.
//
// A kernel is a host function `void fn(const KernelArgs&, LaunchContext&)`
// that validates its arguments and launches its work onto ctx.stream(). It
// runs on the encoding thread, inside ComputeEncoder::dispatch, with the
// queue's device current; the work it launches is ordered on the queue's
// stream like every other command of the command buffer. Argument layouts are
// the CPU driver's (src/backend/cpu/kernels.cpp), so both backends give the
// same answers to the same KernelArgs.
//
// Adding kernels: put them in a file of this folder named <x>_kernels.cu (or
// .cpp) that defines
//     void flotilla::backend::cuda::add_<x>_kernels(KernelTable& table);
// CMake finds the file, builds it into flotilla_cuda and generates the call
// (src/backend/cuda/CMakeLists.txt); nothing else needs editing.
//
// Errors, as on the CPU:
//  - a bad argument: throw InvalidArgument (FL_CHECK_ARG). The driver
//    records it as the command buffer's error (it completes in kError) and
//    skips the buffer's remaining kernels; the caller's dispatch does not throw.
//  - a failed CUDA call: check it with FL_CUDA_CHECK_CTX(ctx, call) (and a
//    launch with FL_CUDA_CHECK_LAUNCH(ctx)). A sticky error marks the device
//    lost (Note [Sticky errors] in cuda_check.h) and throws DeviceLost to the
//    caller.
//
// Per-queue resources (a cuBLASLt handle, a workspace): ctx.resource<T>(make)
// returns this queue's T, calling make() the first time (with the device
// current); T derives from QueueResource and is destroyed with the queue,
// after its stream has finished. Resources are made lazily once per queue,
// never per launch: allocate workspaces there, never on the launch path.
//
// Thread safety: kernels of one queue may be launched from several threads at
// once (different command buffers of one queue), so a kernel must not keep
// unguarded mutable state of its own; resource() itself is thread-safe.
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <memory>
#include <string>
#include <unordered_map>

#include "backend/cuda/cuda_check.h"
#include "flotilla/backend/driver.h"
#include "flotilla/common/sync.h"

namespace flotilla::backend::cuda {

class DeviceCore;

// Base of a per-queue resource; see above.
class QueueResource {
 public:
  virtual ~QueueResource() = default;
};

// The resources of one queue. Internal to the driver; kernels use
// LaunchContext::resource().
class QueueResources {
 public:
  static constexpr int kMaxKinds = 16;
  QueueResources() = default;
  ~QueueResources();
  QueueResources(const QueueResources&) = delete;
  QueueResources& operator=(const QueueResources&) = delete;

  QueueResource* get(int kind) const {
    // acquire: pairs with the release in set(); a reader sees a whole object.
    return slots_[static_cast<size_t>(kind)].load(std::memory_order_acquire);
  }
  // Calls make() and stores the result unless another thread got there first.
  template <typename Make>
  QueueResource* get_or_make(int kind, Make&& make) FL_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    if (auto* r = get(kind)) return r;
    std::unique_ptr<QueueResource> made = make();
    QueueResource* raw = made.get();
    owned_[static_cast<size_t>(kind)] = std::move(made);
    slots_[static_cast<size_t>(kind)].store(raw, std::memory_order_release);
    return raw;
  }
  // Destroys every resource (the stream must have finished).
  void clear() FL_EXCLUDES(mu_);

  // A process-unique small number per resource type.
  static int next_kind();

 private:
  Mutex mu_;  // serialises creation; lookups are lock-free
  std::array<std::unique_ptr<QueueResource>, kMaxKinds> owned_ FL_GUARDED_BY(mu_);
  std::array<std::atomic<QueueResource*>, kMaxKinds> slots_{};
};

// What a kernel launch gets besides its arguments.
class LaunchContext {
 public:
  LaunchContext(DeviceCore& device, cudaStream_t stream, int device_index, int sm_count,
                QueueResources& resources)
      : device_(device),
        stream_(stream),
        device_index_(device_index),
        sm_count_(sm_count),
        resources_(resources) {}

  // The queue's stream: launch everything onto it.
  cudaStream_t stream() const { return stream_; }
  // The CUDA device index (current while the kernel function runs).
  int device() const { return device_index_; }
  // Streaming multiprocessors of the device, for sizing grids.
  int sm_count() const { return sm_count_; }
  DeviceCore& device_core() const { return device_; }
  // Queue::set_device_share's hint: how many queues run at once, this one
  // included (>= 1). relaxed: a hint, read when a kernel plans its launch.
  int device_share() const { return device_share_.load(std::memory_order_relaxed); }
  void set_device_share(int queues) { device_share_.store(queues, std::memory_order_relaxed); }

  // This queue's T (see the header comment); `make` returns unique_ptr<T>.
  template <typename T, typename Make>
  T& resource(Make&& make) {
    const int kind = kind_of<T>();
    if (auto* r = resources_.get(kind)) return static_cast<T&>(*r);
    return static_cast<T&>(*resources_.get_or_make(
        kind, [&]() -> std::unique_ptr<QueueResource> { return std::forward<Make>(make)(); }));
  }

  // One kind number per resource type T (not per call site).
  template <typename T>
  static int kind_of() {
    static const int kind = QueueResources::next_kind();
    return kind;
  }

  // Counts a GEMM plan made (DriverStats::gemm_plans).
  void count_gemm_plan() const;
  // Counts a GEMM shape timed (DriverStats::gemm_tunings).
  void count_gemm_tuning() const;
  // Config::cuda_gather_blocks: the most blocks a gather_rows launch uses.
  int gather_blocks() const;
  // Config::cuda_tune_gemm (Note [Tuned GEMMs for a share of the device]).
  bool tune_gemm() const;

  // Throws the error for a failed CUDA call (marks the device lost if sticky).
  [[noreturn]] void fail(cudaError_t e, const char* call, const char* file, int line) const;

 private:
  DeviceCore& device_;
  cudaStream_t stream_;
  int device_index_;
  int sm_count_;
  QueueResources& resources_;
  std::atomic<int> device_share_{1};
};

using KernelFn = void (*)(const KernelArgs& args, LaunchContext& ctx);
using KernelTable = std::unordered_map<std::string, KernelFn>;

// fill_f32, copy_bytes, copy_pinned, gather_rows, add_f32, scale_f32, checksum_u32, sleep_us, trap
// (basic_kernels.cu). On CUDA, `trap` faults the device: it becomes lost for
// the rest of the process (Note [Sticky errors]); run it in a child process.
void add_basic_kernels(KernelTable& table);

// Every CUDA kernel of this build: each <x>_kernels file's add_<x>_kernels,
// called once (the generated kernel_registry.cpp).
const KernelTable& kernel_table();

}  // namespace flotilla::backend::cuda

// Checks a CUDA call made by a kernel function.
#define FL_CUDA_CHECK_CTX(ctx, call)                       \
  do {                                                     \
    const cudaError_t fl_cuda_err_ = (call);               \
    if (fl_cuda_err_ != cudaSuccess) [[unlikely]]          \
      (ctx).fail(fl_cuda_err_, #call, __FILE__, __LINE__); \
  } while (0)

// Checks the launch just made with <<<...>>> (reads and clears CUDA's
// per-thread last error).
#define FL_CUDA_CHECK_LAUNCH(ctx) FL_CUDA_CHECK_CTX(ctx, cudaGetLastError())
