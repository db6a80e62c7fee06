#include "backend/cuda/cuda_env.h"

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "backend/cuda/cuda_driver.h"
#include "flotilla/common/config.h"
#include "flotilla/common/sync.h"

namespace flotilla::backend::cuda {

namespace {

constexpr const char* kVar = "CUDA_DEVICE_MAX_CONNECTIONS";

struct ConnectionsState {
  Mutex mu;
  bool applied FL_GUARDED_BY(mu) = false;
  int effective FL_GUARDED_BY(mu) = 8;  // CUDA's own default
};

// Never destroyed: devices may be created and counted during static
// destruction of other objects.
ConnectionsState& state() {
  static auto* s = new ConnectionsState;
  return *s;
}

// The process that first initialised CUDA (relaxed: written once, before
// any device exists, by the thread that counts first).
std::atomic<pid_t> g_cuda_pid{0};

}  // namespace

int apply_max_connections(int requested) {
  auto& s = state();
  MutexLock lock(s.mu);
  if (!s.applied) {
    s.applied = true;
    if (const char* v = std::getenv(kVar)) {
      s.effective = std::atoi(v);
    } else {
      s.effective = requested > 0 ? requested : kDefaultMaxConnections;
      // setenv races only with getenv on other threads; CUDA is not
      // initialised yet, so nothing of ours reads it now.
      ::setenv(kVar, std::to_string(s.effective).c_str(), 0);
    }
  }
  return s.effective;
}

bool cuda_initialised_before_fork() {
  const pid_t p = g_cuda_pid.load(std::memory_order_relaxed);
  return p != 0 && p != getpid();
}

int cuda_device_count() {
  // Counted once: the number of GPUs does not change while a process runs,
  // and a machine without a driver (no libcuda.so.1) answers an error, which
  // means none. The variable is applied first (the note in cuda_env.h).
  static const int count = [] {
    int requested = 0;
    try {
      requested = Config::from_env().cuda_max_connections;
    } catch (...) {
      // A malformed FLOTILLA_* variable is reported when a device is made.
    }
    apply_max_connections(requested);
    g_cuda_pid.store(getpid(), std::memory_order_relaxed);
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      (void)cudaGetLastError();
      n = 0;
    }
    return n;
  }();
  return count;
}

}  // namespace flotilla::backend::cuda
