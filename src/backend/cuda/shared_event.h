// Shared events on CUDA: Metal's MTLSharedEvent over pooled CUDA events.
// Internal to the CUDA backend.
//
// Note [Shared events on CUDA]
// A value that only grows. encode_signal(v) records a pooled timing event on
// the queue's stream and files it under v as "pending". encode_wait(v) on
// another stream becomes cudaStreamWaitEvent on the pending event of the
// smallest value >= v: a wait on the GPU, visible to CUDA's scheduler (so it
// cannot deadlock on shared hardware queues, as a stream memory operation
// could), costing no host thread. When the command buffer holding the signal
// completes, its completion thread marks v reached: the host value grows to
// max(value, v), waiters wake, listeners run (on that thread), and the event
// moves to a ring of the last 8 reached values, whose times signal_time_ns()
// computes on demand (Note [Device clock]).
//
// A wait for a value that no signal has been encoded for yet (legal on
// Metal) cannot be expressed with CUDA events: it throws InvalidState saying
// to encode the signal first. The runtime never does this (Event::wait waits
// only for recorded values).
//
// Thread safety: all members may be called from any thread.
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "backend/cuda/device_core.h"
#include "flotilla/backend/driver.h"
#include "flotilla/common/sync.h"

namespace flotilla::backend::cuda {

class EventCore {
 public:
  explicit EventCore(std::shared_ptr<DeviceCore> device) : device_(std::move(device)) {}
  ~EventCore();
  EventCore(const EventCore&) = delete;
  EventCore& operator=(const EventCore&) = delete;

  DeviceCore& device() const { return *device_; }
  uint64_t value() const { return fast_value_.load(std::memory_order_acquire); }

  // Encoding side (device current): files `e`, already recorded, under `v`.
  void add_pending(uint64_t v, cudaEvent_t e) FL_EXCLUDES(mu_);
  // Makes `stream` wait for `v` on the GPU; a no-op if already reached.
  void encode_wait(cudaStream_t stream, uint64_t v, uint64_t buffer_id) FL_EXCLUDES(mu_);

  // Completion side: the signal of `v`, recorded as `e`, has run.
  void reach(uint64_t v, cudaEvent_t e) FL_EXCLUDES(mu_);

  bool wait_until(uint64_t v, std::chrono::steady_clock::time_point deadline) FL_EXCLUDES(mu_);
  void notify(uint64_t v, std::function<void()> fn) FL_EXCLUDES(mu_);
  int64_t time_of(uint64_t v) FL_EXCLUDES(mu_);

 private:
  std::shared_ptr<DeviceCore> device_;
  mutable Mutex mu_;
  CondVar cv_;
  uint64_t value_ FL_GUARDED_BY(mu_) = 0;
  // Signals encoded but not yet seen complete, in encoding order.
  std::vector<std::pair<uint64_t, cudaEvent_t>> pending_ FL_GUARDED_BY(mu_);
  // The last reached values and their (completed) events.
  std::array<std::pair<uint64_t, cudaEvent_t>, 8> ring_ FL_GUARDED_BY(mu_){};
  size_t next_ring_ FL_GUARDED_BY(mu_) = 0;
  std::multimap<uint64_t, std::function<void()>> listeners_ FL_GUARDED_BY(mu_);
  // release: a reader that sees the value sees the work before the signal.
  std::atomic<uint64_t> fast_value_{0};
};

class CudaSharedEvent final : public SharedEvent {
 public:
  explicit CudaSharedEvent(std::shared_ptr<DeviceCore> device)
      : core_(std::make_shared<EventCore>(std::move(device))) {}
  uint64_t signaled_value() const override { return core_->value(); }
  bool wait_until(uint64_t value, std::chrono::steady_clock::time_point deadline) override {
    return core_->wait_until(value, deadline);
  }
  void notify(uint64_t value, std::function<void()> listener) override {
    core_->notify(value, std::move(listener));
  }
  int64_t signal_time_ns(uint64_t value) const override { return core_->time_of(value); }
  const std::shared_ptr<EventCore>& core() const { return core_; }

 private:
  std::shared_ptr<EventCore> core_;
};

}  // namespace flotilla::backend::cuda
