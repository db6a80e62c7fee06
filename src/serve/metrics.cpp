#include <algorithm>
#include <charconv>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "serve/metrics_recorder.h"

namespace flotilla::serve {

namespace detail {

// ---- LatencyWindow -----------------------------------------------------------------

void LatencyWindow::add(double us) {
  ++count_;
  sum_ += us;
  if (samples_.size() < capacity_) {
    samples_.push_back(us);
  } else {
    samples_[next_] = us;
    next_ = (next_ + 1) % capacity_;
  }
}

LatencySummary LatencyWindow::summary() const {
  LatencySummary s;
  s.count = count_;
  s.sum_us = sum_;
  if (samples_.empty()) return s;
  std::vector<double> sorted = samples_;
  std::sort(sorted.begin(), sorted.end());
  // Nearest rank: the smallest sample with at least p of them at or below it.
  const auto rank = [&](double p) {
    const auto n = static_cast<double>(sorted.size());
    const auto i = static_cast<size_t>(std::max(1.0, std::ceil(p * n))) - 1;
    return sorted[std::min(i, sorted.size() - 1)];
  };
  s.p50_us = rank(0.50);
  s.p90_us = rank(0.90);
  s.p99_us = rank(0.99);
  s.max_us = sorted.back();
  return s;
}

// ---- MetricsRecorder ---------------------------------------------------------------

MetricsRecorder::MetricsRecorder(size_t window, int max_batch)
    : batch_sizes_(static_cast<size_t>(max_batch) + 1, 0), queue_wait_(window), compute_(window) {}

void MetricsRecorder::outcome(RequestStatus status, uint64_t n) {
  std::atomic<uint64_t>* counter = nullptr;
  switch (status) {
    case RequestStatus::kCompleted: counter = &completed_; break;
    case RequestStatus::kFailed: counter = &failed_; break;
    case RequestStatus::kExpired: counter = &expired_; break;
    case RequestStatus::kCancelled: counter = &cancelled_; break;
    case RequestStatus::kRejected: counter = &rejected_; break;
    case RequestStatus::kShutDown: counter = &shut_down_; break;
    case RequestStatus::kQueued:
    case RequestStatus::kRunning: return;  // not final: never passed here
  }
  counter->fetch_add(n, std::memory_order_relaxed);
}

void MetricsRecorder::batch(std::chrono::nanoseconds compute,
                            std::span<const std::chrono::nanoseconds> waits) {
  const auto us = [](std::chrono::nanoseconds d) { return static_cast<double>(d.count()) / 1e3; };
  MutexLock lock(mu_);
  const size_t b = std::min(waits.size(), batch_sizes_.size() - 1);
  ++batch_sizes_[b];
  ++batches_;
  batched_requests_ += waits.size();
  compute_.add(us(compute));
  for (auto w : waits) queue_wait_.add(us(w));
}

void MetricsRecorder::fill(BatchQueueMetrics& m) const {
  constexpr auto relaxed = std::memory_order_relaxed;
  m.invalid = invalid_.load(relaxed);
  m.callback_exceptions = callback_exceptions_.load(relaxed);
  m.read_in_place = read_in_place_.load(relaxed);
  m.completed = completed_.load(relaxed);
  m.rejected = rejected_.load(relaxed);
  m.expired = expired_.load(relaxed);
  m.cancelled = cancelled_.load(relaxed);
  m.failed = failed_.load(relaxed);
  m.shut_down = shut_down_.load(relaxed);
  MutexLock lock(mu_);
  m.batch_sizes = batch_sizes_;
  m.batches = batches_;
  m.batched_requests = batched_requests_;
  m.queue_wait = queue_wait_.summary();
  m.compute = compute_.summary();
}

}  // namespace detail

// ---- Rendering -----------------------------------------------------------------------

namespace {

nlohmann::json latency_json(const LatencySummary& s) {
  return {{"count", s.count},   {"sum_us", s.sum_us}, {"mean_us", s.mean_us()},
          {"p50_us", s.p50_us}, {"p90_us", s.p90_us}, {"p99_us", s.p99_us},
          {"max_us", s.max_us}};
}

// Prometheus sample values in the shortest form that reads back exactly.
std::string num(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

void header(std::ostringstream& o, const std::string& name, const char* type, const char* help) {
  o << "# HELP " << name << ' ' << help << '\n' << "# TYPE " << name << ' ' << type << '\n';
}

void summary(std::ostringstream& o, const std::string& name, const char* help,
             const LatencySummary& s) {
  header(o, name, "summary", help);
  const std::pair<const char*, double> qs[] = {
      {"0.5", s.p50_us}, {"0.9", s.p90_us}, {"0.99", s.p99_us}};
  for (const auto& [q, us] : qs)
    o << name << "{quantile=\"" << q << "\"} " << num(us / 1e6) << '\n';
  o << name << "_sum " << num(s.sum_us / 1e6) << '\n' << name << "_count " << s.count << '\n';
}

}  // namespace

nlohmann::json BatchQueueMetrics::to_json() const {
  nlohmann::json sizes = nlohmann::json::object();
  for (size_t b = 1; b < batch_sizes.size(); ++b)
    if (batch_sizes[b]) sizes[std::to_string(b)] = batch_sizes[b];
  return {{"capacity", capacity},
          {"max_batch", max_batch},
          {"workers", workers},
          {"depth", depth},
          {"max_depth", max_depth},
          {"submitted", submitted},
          {"completed", completed},
          {"rejected", rejected},
          {"expired", expired},
          {"cancelled", cancelled},
          {"failed", failed},
          {"shut_down", shut_down},
          {"invalid", invalid},
          {"callback_exceptions", callback_exceptions},
          {"read_in_place", read_in_place},
          {"batches", batches},
          {"batched_requests", batched_requests},
          {"mean_batch", mean_batch()},
          {"batch_sizes", sizes},
          {"queue_wait", latency_json(queue_wait)},
          {"compute", latency_json(compute)}};
}

std::string BatchQueueMetrics::to_prometheus(std::string_view prefix_view) const {
  const std::string p(prefix_view);
  std::ostringstream o;
  header(o, p + "_depth", "gauge", "Requests queued now.");
  o << p << "_depth " << depth << '\n';
  header(o, p + "_max_depth", "gauge", "The most requests queued at once.");
  o << p << "_max_depth " << max_depth << '\n';
  header(o, p + "_capacity", "gauge", "Requests the queue holds at most.");
  o << p << "_capacity " << capacity << '\n';

  header(o, p + "_submitted_total", "counter",
         "Requests submitted (given a handle or a callback).");
  o << p << "_submitted_total " << submitted << '\n';
  header(o, p + "_invalid_total", "counter", "Inputs refused at submit (InvalidArgument).");
  o << p << "_invalid_total " << invalid << '\n';
  header(o, p + "_callback_exceptions_total", "counter",
         "Completion callbacks that threw (caught).");
  o << p << "_callback_exceptions_total " << callback_exceptions << '\n';
  header(o, p + "_read_in_place_total", "counter",
         "Requests whose input the device read in place (InputBuffer rows).");
  o << p << "_read_in_place_total " << read_in_place << '\n';
  header(o, p + "_requests_total", "counter", "Requests completed, by outcome.");
  const std::pair<const char*, uint64_t> outcomes[] = {
      {"completed", completed}, {"rejected", rejected}, {"expired", expired},
      {"cancelled", cancelled}, {"failed", failed},     {"shut_down", shut_down}};
  for (const auto& [name, n] : outcomes)
    o << p << "_requests_total{outcome=\"" << name << "\"} " << n << '\n';

  // Batch sizes: buckets at powers of two, and at max_batch.
  const std::string h = p + "_batch_size";
  header(o, h, "histogram", "Requests per batch.");
  std::vector<size_t> bounds;
  for (size_t b = 1; b < static_cast<size_t>(max_batch); b *= 2) bounds.push_back(b);
  if (max_batch > 0) bounds.push_back(static_cast<size_t>(max_batch));
  uint64_t cumulative = 0;
  size_t next = 1;
  for (size_t le : bounds) {
    for (; next <= le && next < batch_sizes.size(); ++next) cumulative += batch_sizes[next];
    o << h << "_bucket{le=\"" << le << "\"} " << cumulative << '\n';
  }
  o << h << "_bucket{le=\"+Inf\"} " << batches << '\n';
  o << h << "_sum " << batched_requests << '\n' << h << "_count " << batches << '\n';

  summary(o, p + "_queue_wait_seconds",
          "Time from submit to being picked into a batch (window quantiles).", queue_wait);
  summary(o, p + "_compute_seconds",
          "Time to run one batch: copy in, forward, copy out (window quantiles).", compute);
  return o.str();
}

}  // namespace flotilla::serve
