#include "flotilla/runtime/encoding_lock.h"

namespace flotilla {

EncodingLock::Stats EncodingLock::stats() const {
  Stats s;
  s.acquisitions = acquisitions_.load(std::memory_order_relaxed);
  s.contended = contended_.load(std::memory_order_relaxed);
  s.wait = std::chrono::nanoseconds(wait_ns_.load(std::memory_order_relaxed));
  return s;
}

void EncodingLock::reset_stats() {
  acquisitions_.store(0, std::memory_order_relaxed);
  contended_.store(0, std::memory_order_relaxed);
  wait_ns_.store(0, std::memory_order_relaxed);
}

void EncodingLock::lock() {
  acquisitions_.fetch_add(1, std::memory_order_relaxed);
  if (mu_.try_lock()) return;  // uncontended: no clock read
  const auto start = std::chrono::steady_clock::now();
  mu_.lock();
  const auto waited = std::chrono::steady_clock::now() - start;
  contended_.fetch_add(1, std::memory_order_relaxed);
  wait_ns_.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(waited).count(),
                     std::memory_order_relaxed);
}

void EncodingLock::unlock() { mu_.unlock(); }

// The analysis cannot follow a conditional acquisition; the guard's contract
// (held for the scope when enabled) is stated in the header.
EncodingLock::Guard::Guard(EncodingLock& lock) FL_NO_THREAD_SAFETY_ANALYSIS {
  if (lock.enabled_) {
    lock.lock();
    held_ = &lock;
  }
}

EncodingLock::Guard::~Guard() FL_NO_THREAD_SAFETY_ANALYSIS {
  if (held_) held_->unlock();
}

}  // namespace flotilla
