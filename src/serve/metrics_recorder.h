// MetricsRecorder: the counters and windows behind BatchQueueMetrics.
// Internal to the serve layer.
//
// Thread safety: all members may be called from any thread; one short leaf
// Mutex guards everything (a queue takes it after its own mutex, never
// before).
#pragma once

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

  void submitted() FL_EXCLUDES(mu_);
  void invalid() FL_EXCLUDES(mu_);
  // A request reached a final status (not kQueued / kRunning).
  void outcome(RequestStatus status) FL_EXCLUDES(mu_);
  // A batch of `waits.size()` requests ran (or failed) in `compute`.
  void batch(std::chrono::nanoseconds compute, std::span<const std::chrono::nanoseconds> waits)
      FL_EXCLUDES(mu_);
  // Fills every field of `m` but the configuration and depth ones.
  void fill(BatchQueueMetrics& m) const FL_EXCLUDES(mu_);

 private:
  mutable Mutex mu_;  // guards every field below
  uint64_t submitted_ FL_GUARDED_BY(mu_) = 0;
  uint64_t invalid_ FL_GUARDED_BY(mu_) = 0;
  uint64_t completed_ FL_GUARDED_BY(mu_) = 0;
  uint64_t rejected_ FL_GUARDED_BY(mu_) = 0;
  uint64_t expired_ FL_GUARDED_BY(mu_) = 0;
  uint64_t cancelled_ FL_GUARDED_BY(mu_) = 0;
  uint64_t failed_ FL_GUARDED_BY(mu_) = 0;
  uint64_t shut_down_ FL_GUARDED_BY(mu_) = 0;
  std::vector<uint64_t> batch_sizes_ FL_GUARDED_BY(mu_);
  uint64_t batches_ FL_GUARDED_BY(mu_) = 0;
  uint64_t batched_requests_ FL_GUARDED_BY(mu_) = 0;
  LatencyWindow queue_wait_ FL_GUARDED_BY(mu_);
  LatencyWindow compute_ FL_GUARDED_BY(mu_);
};

}  // namespace flotilla::serve::detail
