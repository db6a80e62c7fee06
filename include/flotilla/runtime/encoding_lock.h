// EncodingLock: the seed's "encoding mutex" (AGX driver workaround).
//
// One per device. The runtime takes it around driver encoding calls only
// when the driver says its encoding path is not thread-safe (or when forced
// on by Config::encoding_lock). It counts acquisitions and the time spent
// waiting for it, so "GPU-bound, not mutex-bound" is a measured claim.
//
// Thread safety: all members may be called from any thread.
// Blocking: Guard blocks while another thread encodes.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#include "flotilla/common/sync.h"

namespace flotilla {

class FL_CAPABILITY("encoding lock") EncodingLock {
 public:
  explicit EncodingLock(bool enabled) : enabled_(enabled) {}
  EncodingLock(const EncodingLock&) = delete;
  EncodingLock& operator=(const EncodingLock&) = delete;

  bool enabled() const { return enabled_; }

  struct Stats {
    uint64_t acquisitions = 0;
    uint64_t contended = 0;            // acquisitions that had to wait
    std::chrono::nanoseconds wait{0};  // total time spent waiting
  };
  Stats stats() const;
  void reset_stats();

  // Holds the lock for its scope if it is enabled; a no-op otherwise.
  class FL_SCOPED_CAPABILITY Guard {
   public:
    explicit Guard(EncodingLock& lock) FL_ACQUIRE(lock);
    ~Guard() FL_RELEASE();
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;

   private:
    EncodingLock* held_ = nullptr;
  };

 private:
  void lock() FL_ACQUIRE();
  void unlock() FL_RELEASE();

  const bool enabled_;
  Mutex mu_;  // guards the driver's encoding path (it protects no field here)
  // Relaxed: statistics, read for reports only.
  std::atomic<uint64_t> acquisitions_{0};
  std::atomic<uint64_t> contended_{0};
  std::atomic<int64_t> wait_ns_{0};
};

}  // namespace flotilla
