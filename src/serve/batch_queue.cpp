#include "flotilla/serve/batch_queue.h"

#include <cmath>
#include <cstring>

#include "flotilla/common/error.h"
#include "flotilla/runtime/device.h"
#include "serve/queue_core.h"

namespace flotilla::serve {

// ---- Names and options ---------------------------------------------------------------

const char* to_string(RequestStatus s) noexcept {
  switch (s) {
    case RequestStatus::kQueued: return "queued";
    case RequestStatus::kRunning: return "running";
    case RequestStatus::kCompleted: return "completed";
    case RequestStatus::kFailed: return "failed";
    case RequestStatus::kExpired: return "expired";
    case RequestStatus::kCancelled: return "cancelled";
    case RequestStatus::kRejected: return "rejected";
    case RequestStatus::kShutDown: return "shut_down";
  }
  return "?";
}

const char* to_string(OverflowPolicy p) noexcept {
  return p == OverflowPolicy::kReject ? "reject" : "block";
}

const char* to_string(ShutdownMode m) noexcept {
  return m == ShutdownMode::kDrain ? "drain" : "cancel";
}

OverflowPolicy parse_overflow_policy(const std::string& s) {
  if (s == "reject") return OverflowPolicy::kReject;
  if (s == "block") return OverflowPolicy::kBlock;
  throw InvalidArgument(::flotilla::detail::str_cat("[parse_overflow_policy] unknown policy '", s,
                                                    "'; use reject or block"));
}

void BatchQueueOptions::validate() const {
  FL_CHECK_ARG(max_batch >= 1, "[BatchQueueOptions] max_batch is ", max_batch,
               "; it must be at least 1");
  FL_CHECK_ARG(max_delay.count() >= 0, "[BatchQueueOptions] max_delay is ", max_delay.count(),
               " us; it must be >= 0");
  FL_CHECK_ARG(capacity >= 1, "[BatchQueueOptions] capacity is 0; it must be at least 1");
  FL_CHECK_ARG(workers >= 0 && workers <= 256, "[BatchQueueOptions] workers is ", workers,
               "; use 0 (manual mode, step()) to 256");
  FL_CHECK_ARG(default_deadline.count() >= 0, "[BatchQueueOptions] default_deadline is ",
               default_deadline.count(), " us; use 0 (none) or a positive time");
  FL_CHECK_ARG(metrics_window >= 1, "[BatchQueueOptions] metrics_window is 0; it must be >= 1");
}

// ---- RequestHandle -------------------------------------------------------------------

namespace {

detail::Request& need(const std::shared_ptr<detail::Request>& r, const char* api) {
  FL_CHECK_STATE(r != nullptr, "[", api,
                 "] the handle is empty (default-made or moved from); use the handle submit() "
                 "returned");
  return *r;
}

}  // namespace

uint64_t RequestHandle::id() const { return need(req_, "RequestHandle::id").id; }

RequestStatus RequestHandle::status() const {
  return need(req_, "RequestHandle::status").status.load(std::memory_order_acquire);
}

bool RequestHandle::done() const {
  detail::Request& r = need(req_, "RequestHandle::done");
  MutexLock lock(r.mu);
  return r.done;
}

void RequestHandle::wait() const {
  detail::Request& r = need(req_, "RequestHandle::wait");
  MutexLock lock(r.mu);
  r.done_cv.wait(r.mu, [&]() FL_REQUIRES(r.mu) { return r.done; });
}

bool RequestHandle::wait_for(std::chrono::steady_clock::duration timeout) const {
  detail::Request& r = need(req_, "RequestHandle::wait_for");
  MutexLock lock(r.mu);
  return r.done_cv.wait_for(r.mu, timeout, [&]() FL_REQUIRES(r.mu) { return r.done; });
}

std::vector<float> RequestHandle::get() {
  detail::Request& r = need(req_, "RequestHandle::get");
  MutexLock lock(r.mu);
  r.done_cv.wait(r.mu, [&]() FL_REQUIRES(r.mu) { return r.done; });
  FL_CHECK_STATE(!r.taken, "[RequestHandle::get] called twice on request ", r.id,
                 "; get() hands the result over once, as std::future does");
  r.taken = true;
  if (r.error) std::rethrow_exception(r.error);
  return std::move(r.output);
}

bool RequestHandle::cancel() {
  detail::Request& r = need(req_, "RequestHandle::cancel");
  std::shared_ptr<detail::QueueCore> core = r.core.lock();
  return core && core->cancel(r);
}

// ---- BatchQueue ----------------------------------------------------------------------

namespace detail {

// What one worker owns: its stream and its pinned staging buffers, sized for
// max_batch rows and reused by every batch (the stream is synchronized
// before the next batch writes them).
struct Lane {
  Stream stream;
  std::unique_ptr<backend::Buffer> input;   // [max_batch, in] f32, host-visible
  std::unique_ptr<backend::Buffer> output;  // [max_batch, out] f32, host-visible
  const backend::Pipeline* copy = nullptr;  // the driver's "copy_bytes"
};

}  // namespace detail

BatchQueue::BatchQueue(Device& device, int64_t in_features, int64_t out_features, Model model,
                       BatchQueueOptions options)
    : device_(device),
      in_(in_features),
      out_(out_features),
      model_(std::move(model)),
      options_(std::move(options)),
      clock_(options_.clock ? options_.clock : SteadyClock::instance()) {
  options_.validate();
  FL_CHECK_ARG(in_ >= 1 && out_ >= 1, "[BatchQueue] in_features ", in_, " and out_features ", out_,
               " must both be at least 1");
  FL_CHECK_ARG(model_ != nullptr, "[BatchQueue] the model function is empty");
  device_.check_usable("BatchQueue");
  core_ = std::make_shared<detail::QueueCore>(options_, clock_);

  backend::Driver& driver = device_.driver("BatchQueue");
  const auto rows = static_cast<size_t>(options_.max_batch);
  for (int i = 0; i < std::max(1, options_.workers); ++i) {
    auto lane = std::make_unique<detail::Lane>(
        detail::Lane{device_.streams().acquire_round_robin(),
                     driver.allocate_host(rows * static_cast<size_t>(in_) * sizeof(float)),
                     driver.allocate_host(rows * static_cast<size_t>(out_) * sizeof(float)),
                     &device_.pipeline("copy_bytes")});
    FL_INTERNAL_CHECK(lane->input->host_ptr() && lane->output->host_ptr(),
                      "the driver's host staging memory is not host-visible");
    lanes_.push_back(std::move(lane));
  }

  listener_key_ = clock_->add_listener([core = core_.get()] { core->wake(); });
  try {
    for (int i = 0; i < options_.workers; ++i)
      threads_.emplace_back(
          [this, lane = lanes_[static_cast<size_t>(i)].get()] { worker_loop(*lane); });
  } catch (...) {  // a thread could not start: stop the ones that did
    core_->stop(ShutdownMode::kCancel);
    for (auto& t : threads_) t.join();
    clock_->remove_listener(listener_key_);
    throw;
  }
}

BatchQueue::~BatchQueue() {
  shutdown(ShutdownMode::kDrain);
  clock_->remove_listener(listener_key_);
}

RequestHandle BatchQueue::submit(std::span<const float> input,
                                 std::optional<Clock::time_point> deadline) {
  if (static_cast<int64_t>(input.size()) != in_) {
    core_->recorder().invalid();
    throw InvalidArgument(::flotilla::detail::str_cat(
        "[BatchQueue::submit] the input has ", input.size(), " values but the model takes ", in_,
        "; pass exactly in_features values (one sample)"));
  }
  if (options_.reject_nan) {
    for (size_t i = 0; i < input.size(); ++i) {
      if (std::isnan(input[i])) {
        core_->recorder().invalid();
        throw InvalidArgument(::flotilla::detail::str_cat(
            "[BatchQueue::submit] input value ", i,
            " is NaN and the queue rejects NaN (reject_nan); clean the input"));
      }
    }
  }
  Clock::time_point d = Clock::kNever;
  if (deadline)
    d = *deadline;
  else if (options_.default_deadline.count() > 0)
    d = clock_->now() + options_.default_deadline;
  return RequestHandle(core_->submit(std::vector<float>(input.begin(), input.end()), d));
}

Clock::time_point BatchQueue::deadline_in(Clock::duration d) const { return clock_->now() + d; }

size_t BatchQueue::step() {
  FL_CHECK_STATE(options_.workers == 0, "[BatchQueue::step] the queue has ", options_.workers,
                 " worker threads; step() is for manual mode (workers = 0)");
  MutexLock lock(step_mu_);
  detail::Batch batch;
  core_->take_ready(batch, /*force=*/false);
  const size_t n = batch.requests.size();
  if (n > 0) run_batch(*lanes_.front(), batch);
  return n;
}

void BatchQueue::worker_loop(detail::Lane& lane) {
  detail::Batch batch;
  while (core_->next_batch(batch)) run_batch(lane, batch);
}

// Note [One batch]
// Pack every input into the lane's pinned staging buffer, one asynchronous
// copy into one [B, in] tensor, one forward, one asynchronous copy of
// [B, out] back into pinned staging, one synchronize, then scatter rows.
// Any error (the model threw, a wrong output, a device failure) fails just
// these requests; the stream is synchronized again, errors swallowed, so
// the next batch starts clean.
void BatchQueue::run_batch(detail::Lane& lane, detail::Batch& batch) {
  auto& reqs = batch.requests;
  const auto b = static_cast<int64_t>(reqs.size());
  const size_t in_row = static_cast<size_t>(in_) * sizeof(float);
  const size_t out_row = static_cast<size_t>(out_) * sizeof(float);
  Stream stream = lane.stream;
  std::exception_ptr error;
  try {
    auto* packed = static_cast<char*>(lane.input->host_ptr());
    for (int64_t i = 0; i < b; ++i)
      std::memcpy(packed + static_cast<size_t>(i) * in_row,
                  reqs[static_cast<size_t>(i)]->input.data(), in_row);
    Tensor x = Tensor::empty({b, in_}, DType::kF32, stream);
    stream.dispatch(*lane.copy, backend::KernelArgs()
                                    .ptr(x.data())
                                    .ptr(lane.input->device_ptr())
                                    .size(static_cast<uint64_t>(b) * in_row));
    Tensor y = model_(stream, x);
    FL_CHECK_STATE(y.defined() && y.dtype() == DType::kF32 && y.rank() == 2 && y.dim(0) == b &&
                       y.dim(1) == out_ && &y.device() == &device_,
                   "[BatchQueue] the model returned ", y.to_string(), " for x ", x.to_string(),
                   "; it must return f32[", b, ", ", out_, "] on ", device_.name());
    y.record_stream(stream);
    stream.dispatch(*lane.copy, backend::KernelArgs()
                                    .ptr(lane.output->device_ptr())
                                    .ptr(y.data())
                                    .size(static_cast<uint64_t>(b) * out_row));
    stream.synchronize();
  } catch (...) {
    error = std::current_exception();
    try {
      stream.synchronize();
    } catch (...) {  // the batch's own error again, or the device's: already reported
    }
  }
  const Clock::time_point end = clock_->now();

  try {  // metrics are best effort: never a reason to lose a result
    std::vector<std::chrono::nanoseconds> waits;
    waits.reserve(reqs.size());
    for (const auto& r : reqs)
      waits.push_back(
          std::chrono::duration_cast<std::chrono::nanoseconds>(batch.picked_at - r->enqueued));
    core_->recorder().batch(
        std::chrono::duration_cast<std::chrono::nanoseconds>(end - batch.picked_at), waits);
  } catch (...) {
  }

  const auto* rows = static_cast<const float*>(lane.output->host_ptr());
  for (size_t i = 0; i < reqs.size(); ++i) {
    std::exception_ptr e = error;
    std::vector<float> y;
    if (!e) {
      try {
        const float* row = rows + i * static_cast<size_t>(out_);
        y.assign(row, row + out_);
      } catch (...) {  // out of host memory for this one output
        e = std::current_exception();
      }
    }
    core_->complete(*reqs[i], e ? RequestStatus::kFailed : RequestStatus::kCompleted, std::move(y),
                    e);
  }
  reqs.clear();
}

void BatchQueue::shutdown(ShutdownMode mode) {
  core_->stop(mode);  // first, outside shutdown_mu_: a kCancel cuts a running drain short
  MutexLock lock(shutdown_mu_);
  if (joined_) return;
  if (options_.workers == 0) {
    MutexLock step_lock(step_mu_);
    detail::Batch batch;
    for (;;) {
      core_->take_ready(batch, /*force=*/true);
      if (batch.requests.empty()) break;
      run_batch(*lanes_.front(), batch);
    }
  }
  for (auto& t : threads_) t.join();
  joined_ = true;
}

bool BatchQueue::is_shut_down() const { return core_->stopping(); }

BatchQueueMetrics BatchQueue::metrics() const {
  BatchQueueMetrics m;
  core_->fill(m);
  return m;
}

std::vector<Stream> BatchQueue::streams() const {
  std::vector<Stream> out;
  for (const auto& l : lanes_) out.push_back(l->stream);
  return out;
}

}  // namespace flotilla::serve
