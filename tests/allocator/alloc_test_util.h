// Helpers for the allocator tests (CPU backend: its memory is host-visible
// and its memory limit is configurable, which the out-of-memory tests need).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <latch>
#include <memory>
#include <random>

#include "flotilla/flotilla.h"
#include "flotilla/runtime/allocator.h"

namespace flotilla::test {

inline Config alloc_config(bool caching, size_t memory_limit = 0) {
  Config c;
  c.allocator_caching = caching;
  c.cpu_memory_limit = memory_limit;
  c.cpu_exec_threads = 6;  // a gated stream holds one thread; the others keep running
  c.pool_size = 8;
  return c;
}

// The seed of a randomised test: FLOTILLA_TEST_SEED or random; printed.
inline uint64_t alloc_test_seed() {
  uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("FLOTILLA_TEST_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::cout << "[ seed     ] " << seed << " (replay with FLOTILLA_TEST_SEED=" << seed << ")\n";
  return seed;
}

// Holds `s`: work encoded on `s` after the gate runs only after open() (a
// completion handler blocks one execution thread on a latch, which on the
// cpu backend is exact). Destroying the gate opens it.
class Gate {
 public:
  explicit Gate(Stream s) : latch_(std::make_shared<std::latch>(1)) {
    auto l = latch_;
    s.add_callback([l] { l->wait(); });
  }
  ~Gate() { open(); }
  Gate(const Gate&) = delete;
  Gate& operator=(const Gate&) = delete;
  void open() {
    if (!opened_) {
      opened_ = true;
      latch_->count_down();
    }
  }

 private:
  std::shared_ptr<std::latch> latch_;
  bool opened_ = false;
};

// Encodes a fill of `count` floats at `p` with `value` on `s`.
inline void fill(Stream s, void* p, size_t count, float value) {
  s.dispatch("fill_f32", backend::KernelArgs().ptr(p).f64(value).size(count));
}

}  // namespace flotilla::test
