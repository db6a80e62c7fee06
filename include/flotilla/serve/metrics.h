// BatchQueueMetrics: what a BatchQueue has done, as one snapshot value,
// rendered as JSON or as Prometheus text exposition.
//
// Counts are since the queue was made. Every submit() that returned (a
// handle, or an id for a callback) ends in exactly one of completed, rejected, expired, cancelled,
// failed or shut_down, so once the queue is idle
//   submitted == completed + rejected + expired + cancelled + failed + shut_down.
// Inputs refused at submit (InvalidArgument) get no handle or callback: they are
// counted in `invalid` only.
//
// Times are by the queue's clock (a ManualClock makes them deterministic).
// Percentiles are over a bounded window of the latest samples
// (BatchQueueOptions::metrics_window); counts and sums are over all time.
//
// Thread safety: a plain value. Taken while requests flow, the counts are
// read one by one (each exact, the set not one instant: a request may show
// as submitted and not yet completed); taken once the queue is idle, they
// agree exactly, as above.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace flotilla::serve {

// A latency distribution: count and sum over all time, percentiles and the
// maximum over the latest samples.
struct LatencySummary {
  uint64_t count = 0;
  double sum_us = 0;
  double p50_us = 0, p90_us = 0, p99_us = 0, max_us = 0;
  double mean_us() const { return count ? sum_us / static_cast<double>(count) : 0; }
};

struct BatchQueueMetrics {
  // Configuration, to read the rest against.
  size_t capacity = 0;
  int max_batch = 0;
  int workers = 0;

  size_t depth = 0;      // requests queued now
  size_t max_depth = 0;  // the most queued at once; never above capacity

  // Outcomes (see above).
  uint64_t submitted = 0;
  uint64_t completed = 0;  // ran; the handle has the output
  uint64_t rejected = 0;   // QueueFull (policy kReject)
  uint64_t expired = 0;    // Timeout: the deadline passed before the request ran
  uint64_t cancelled = 0;  // Cancelled: by the handle, or by shutdown(kCancel)
  uint64_t failed = 0;     // the error of its batch
  uint64_t shut_down = 0;  // ShutDown: submitted after shutdown began
  uint64_t invalid = 0;    // refused at submit with InvalidArgument
  // Completion callbacks that threw (caught; their requests still count
  // once above, by their status).
  uint64_t callback_exceptions = 0;
  // Requests that ran whose input the device read in place (rows of an
  // InputBuffer of the queue's device); the workers packed the others.
  uint64_t read_in_place = 0;

  // batch_sizes[b] = batches that ran with b requests (index 0 unused).
  std::vector<uint64_t> batch_sizes;
  uint64_t batches = 0;
  uint64_t batched_requests = 0;  // requests that ran (completed + failed)
  double mean_batch() const {
    return batches ? static_cast<double>(batched_requests) / static_cast<double>(batches) : 0;
  }

  LatencySummary queue_wait;  // submit -> picked into a batch, per request that ran
  LatencySummary compute;     // pack, copy in, forward, copy out, synchronize: per batch

  // Every field above, plus mean_batch.
  nlohmann::json to_json() const;
  // Prometheus text exposition (format 0.0.4): # HELP and # TYPE lines;
  // gauges for depth, a counter by outcome, the batch size as a histogram
  // (buckets at powers of two up to max_batch), the two latencies as
  // summaries in seconds (quantiles 0.5, 0.9, 0.99 over the window).
  std::string to_prometheus(std::string_view prefix = "flotilla_batch_queue") const;
};

}  // namespace flotilla::serve
