// Checking CUDA calls, and the move-only handle for native CUDA resources.
//
// Every CUDA runtime call the backend makes goes through FL_CUDA_CHECK (no
// device at hand) or FL_CUDA_CHECK_DEV (a DeviceCore at hand). A failure
// becomes a flotilla::Error whose message names the call's text, the file and
// the line, and the CUDA error's name and description:
//   cudaErrorMemoryAllocation            -> OutOfMemory
//   a sticky error (Note [Sticky errors]) -> DeviceLost, and with
//                                           FL_CUDA_CHECK_DEV the device is
//                                           marked lost first
//   cudaErrorInvalidValue and friends    -> InvalidArgument
//   anything else                        -> InvalidState
// A non-sticky error is cleared from CUDA's per-thread "last error" before
// the throw, so it is not reported again by the next kernel launch.
//
// Note [Sticky errors]
// A kernel that faults (illegal address, __trap(), misaligned access, ...)
// corrupts the CUDA context of its device: every later call on that device
// fails with the same error, and only a new process recovers. The backend
// turns the first such error into the device's DeviceLost (device_error()),
// fails every pending command buffer once with it, and makes every later
// call throw it at once instead of reaching CUDA.
#pragma once

#include <cuda_runtime_api.h>

#include <string>
#include <utility>

namespace flotilla::backend::cuda {

// True for errors that leave the device's context unusable.
bool is_sticky(cudaError_t e) noexcept;

// "cudaMalloc(&p, n) failed at src/backend/cuda/cuda_driver.cpp:120:
// cudaErrorMemoryAllocation (out of memory)"
std::string describe_cuda_error(cudaError_t e, const char* call, const char* file, int line);

// Throws the Error that `e` maps to (see above), prefixed with `where`.
[[noreturn]] void throw_cuda_error(cudaError_t e, const char* where, const char* call,
                                   const char* file, int line);

// A move-only owner of one native resource (DESIGN.md §7): `Traits` gives
// the type, the empty value and the release function, which must not throw.
template <typename Traits>
class CudaHandle {
 public:
  using T = typename Traits::Type;
  CudaHandle() = default;
  explicit CudaHandle(T h) : h_(h) {}
  ~CudaHandle() { reset(); }
  CudaHandle(CudaHandle&& o) noexcept : h_(std::exchange(o.h_, Traits::empty())) {}
  CudaHandle& operator=(CudaHandle&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, Traits::empty());
    }
    return *this;
  }
  CudaHandle(const CudaHandle&) = delete;
  CudaHandle& operator=(const CudaHandle&) = delete;

  T get() const { return h_; }
  explicit operator bool() const { return h_ != Traits::empty(); }
  T release() { return std::exchange(h_, Traits::empty()); }
  void reset() noexcept {
    if (h_ != Traits::empty()) Traits::destroy(std::exchange(h_, Traits::empty()));
  }

 private:
  T h_ = Traits::empty();
};

struct StreamTraits {
  using Type = cudaStream_t;
  static Type empty() { return nullptr; }
  // Errors are ignored: a lost device cannot destroy anything, and a handle
  // release has no one to report to.
  static void destroy(Type s) noexcept { (void)cudaStreamDestroy(s); }
};
struct EventTraits {
  using Type = cudaEvent_t;
  static Type empty() { return nullptr; }
  static void destroy(Type e) noexcept { (void)cudaEventDestroy(e); }
};
using StreamHandle = CudaHandle<StreamTraits>;
using EventHandle = CudaHandle<EventTraits>;

// Makes `device` current on the calling thread for the scope and restores the
// previous one. Costs one cudaGetDevice (a thread-local read) when the device
// is already current, which it always is on a one-GPU machine.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) noexcept;
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  int device_;
};

}  // namespace flotilla::backend::cuda

#define FL_CUDA_CHECK(call)                                                                \
  do {                                                                                     \
    const cudaError_t fl_cuda_err_ = (call);                                               \
    if (fl_cuda_err_ != cudaSuccess) [[unlikely]]                                          \
      ::flotilla::backend::cuda::throw_cuda_error(fl_cuda_err_, "[cuda]", #call, __FILE__, \
                                                  __LINE__);                               \
  } while (0)

// `core` is a DeviceCore: a sticky error marks it lost before throwing.
#define FL_CUDA_CHECK_DEV(core, call)                       \
  do {                                                      \
    const cudaError_t fl_cuda_err_ = (call);                \
    if (fl_cuda_err_ != cudaSuccess) [[unlikely]]           \
      (core).fail(fl_cuda_err_, #call, __FILE__, __LINE__); \
  } while (0)
