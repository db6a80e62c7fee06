// MetricsRecorder: the counters and windows behind BatchQueueMetrics.
// Internal to the serve layer.
//
// Thread safety: all members may be called from any thread. The counters
// are relaxed atomics (one per request would make a mutex the queue's
// busiest lock); one short leaf Mutex guards the batch statistics (a queue
// takes it after its own mutex, never before).
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "flotilla/common/sync.h"
#include "flotilla/serve/batch_queue.h"
#include "flotilla/serve/metrics.h"

namespace flotilla::serve::detail {

// The latest `capacity` samples (microseconds) in a ring, plus all-time
// count, sum and max.
class LatencyWindow {
 public:
  explicit LatencyWindow(size_t capacity) : capacity_(capacity) { samples_.reserve(capacity); }
  void add(double us);
  LatencySummary summary() const;

 private:
  size_t capacity_;
  std::vector<double> samples_;
  size_t next_ = 0;  // where the next sample goes once the ring is full
  uint64_t count_ = 0;
  double sum_ = 0;
};

class MetricsRecorder {
 public:
  MetricsRecorder(size_t window, int max_batch);

  void invalid() { invalid_.fetch_add(1, std::memory_order_relaxed); }
  void callback_exception() { callback_exceptions_.fetch_add(1, std::memory_order_relaxed); }
  // A batch ran `n` requests whose input the device read in place.
  void read_in_place(uint64_t n) { read_in_place_.fetch_add(n, std::memory_order_relaxed); }
  // `n` requests reached a final status (not kQueued / kRunning).
  void outcome(RequestStatus status, uint64_t n = 1);
  // A batch of `waits.size()` requests ran (or failed) in `compute`.
  void batch(std::chrono::nanoseconds compute, std::span<const std::chrono::nanoseconds> waits)
      FL_EXCLUDES(mu_);
  // Fills every field of `m` but the configuration, depth and submitted ones
  // (the queue counts submits under its own lock).
  void fill(BatchQueueMetrics& m) const FL_EXCLUDES(mu_);

 private:
  // Relaxed: counts, read by fill() (a reader that has seen a request
  // complete, through its handle, also sees it counted).
  std::atomic<uint64_t> invalid_{0}, completed_{0}, rejected_{0}, expired_{0}, cancelled_{0},
      failed_{0}, shut_down_{0}, callback_exceptions_{0}, read_in_place_{0};

  mutable Mutex mu_;  // guards the batch statistics below
  std::vector<uint64_t> batch_sizes_ FL_GUARDED_BY(mu_);
  uint64_t batches_ FL_GUARDED_BY(mu_) = 0;
  uint64_t batched_requests_ FL_GUARDED_BY(mu_) = 0;
  LatencyWindow queue_wait_ FL_GUARDED_BY(mu_);
  LatencyWindow compute_ FL_GUARDED_BY(mu_);
};

}  // namespace flotilla::serve::detail
