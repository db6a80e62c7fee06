// Helpers for the CUDA backend's tests (tests/cuda).
//
// Every test starts with FL_SKIP_WITHOUT_GPU(): where the cuda backend is not
// built or finds no GPU (CI), the test is skipped and ctest reports it so.
// Results are read back the way a user would: copy_bytes from device memory
// into pinned host memory on the same stream, then synchronize.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "flotilla/flotilla.h"

namespace flotilla::test {

inline bool have_cuda_gpu() {
  const auto b = Device::backends();
  if (std::find(b.begin(), b.end(), "cuda") == b.end()) return false;
  return Device::count("cuda") > 0;
}

#define FL_SKIP_WITHOUT_GPU()                                                            \
  do {                                                                                   \
    if (!::flotilla::test::have_cuda_gpu())                                              \
      GTEST_SKIP() << "no CUDA device here (or the cuda backend is not built): skipped"; \
  } while (0)

// A seed per test, printed so a failure can be replayed (FLOTILLA_TEST_SEED).
inline uint64_t cuda_test_seed() {
  uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("FLOTILLA_TEST_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::printf("[ seed     ] FLOTILLA_TEST_SEED=%llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Device memory plus a pinned host mirror for uploads and read-backs.
class Mirrored {
 public:
  Mirrored(Device& dev, size_t bytes)
      : bytes_(bytes),
        device_(dev.driver().allocate(bytes)),
        host_(dev.driver().allocate_host(bytes)) {}
  void* dev() const { return device_->device_ptr(); }
  template <typename T = float>
  T* host() const {
    return static_cast<T*>(host_->host_ptr());
  }
  size_t bytes() const { return bytes_; }
  // Encodes host -> device.
  void upload(Stream s) const {
    s.dispatch("copy_bytes", backend::KernelArgs().ptr(dev()).ptr(host_->host_ptr()).size(bytes_));
  }
  // Waits for `s` (an upload encoded before may still read the host copy),
  // poisons the host copy, encodes device -> host, synchronizes `s`.
  void download(Stream s) const {
    s.synchronize();
    std::memset(host_->host_ptr(), 0xA5, bytes_);
    s.dispatch("copy_bytes", backend::KernelArgs().ptr(host_->host_ptr()).ptr(dev()).size(bytes_));
    s.synchronize();
  }

 private:
  size_t bytes_;
  std::unique_ptr<backend::Buffer> device_;
  std::unique_ptr<backend::Buffer> host_;
};

}  // namespace flotilla::test
