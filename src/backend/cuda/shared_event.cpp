#include "backend/cuda/shared_event.h"

#include <algorithm>

#include "flotilla/common/error.h"

namespace flotilla::backend::cuda {

namespace {
// Waiters re-check the device's health this often, so a device lost while
// a host thread waits for a value that will never come wakes it.
constexpr auto kLostCheck = std::chrono::milliseconds(10);
constexpr auto kSpin = std::chrono::microseconds(50);
}  // namespace

EventCore::~EventCore() {
  // The events go back to the device's pool (which the shared_ptr keeps).
  MutexLock lock(mu_);
  for (auto& [v, e] : pending_) device_->timing_events().give(e);
  for (auto& [v, e] : ring_) device_->timing_events().give(e);
}

void EventCore::add_pending(uint64_t v, cudaEvent_t e) {
  MutexLock lock(mu_);
  pending_.emplace_back(v, e);
}

void EventCore::encode_wait(cudaStream_t stream, uint64_t v, uint64_t buffer_id) {
  MutexLock lock(mu_);
  if (value_ >= v) return;  // reached: nothing to wait for
  // The smallest pending value >= v: its event follows every signal of a
  // smaller value encoded on the same stream, and is the earliest that
  // reaches v. Holding mu_ keeps it from being reused meanwhile.
  const std::pair<uint64_t, cudaEvent_t>* best = nullptr;
  for (const auto& p : pending_)
    if (p.first >= v && (!best || p.first < best->first)) best = &p;
  if (!best)
    throw InvalidState(detail::str_cat(
        "[CommandBuffer::encode_wait] command buffer #", buffer_id, " on ", device_->label(),
        " waits for event value ", v, " but no signal of a value >= ", v,
        " has been encoded yet (the value is ", value_,
        "); the CUDA backend orders streams with CUDA events, which must be recorded before "
        "they are waited on: encode the signal (Event::record) before the wait"));
  FL_CUDA_CHECK_DEV(*device_, cudaStreamWaitEvent(stream, best->second, 0));
}

void EventCore::reach(uint64_t v, cudaEvent_t e) {
  std::vector<std::function<void()>> ready;
  {
    MutexLock lock(mu_);
    auto it = std::find_if(pending_.begin(), pending_.end(),
                           [&](const auto& p) { return p.first == v && p.second == e; });
    if (it != pending_.end()) {
      // Into the ring of reached values; the one it replaces goes back.
      auto& slot = ring_[next_ring_ % ring_.size()];
      ++next_ring_;
      device_->timing_events().give(slot.second);
      slot = *it;
      pending_.erase(it);
    }
    if (v > value_) {
      value_ = v;
      fast_value_.store(v, std::memory_order_release);
    }
    auto end = listeners_.upper_bound(value_);
    for (auto l = listeners_.begin(); l != end; ++l) ready.push_back(std::move(l->second));
    listeners_.erase(listeners_.begin(), end);
  }
  cv_.notify_all();
  // Listeners run here, on the completion thread, outside the lock. The
  // completion thread catches what they throw (Note [Completion threads]).
  for (auto& fn : ready) {
    try {
      fn();
    } catch (...) {
      device_->handler_errors.fetch_add(1, std::memory_order_relaxed);
    }
  }
}

bool EventCore::wait_until(uint64_t v, std::chrono::steady_clock::time_point deadline) {
  using Clock = std::chrono::steady_clock;
  if (value() >= v) return true;
  // A short spin first: a signal a few microseconds away is common (record,
  // then synchronize) and a sleep would cost more than the wait.
  const auto spin_end = std::min(deadline, Clock::now() + kSpin);
  while (Clock::now() < spin_end) {
    if (value() >= v) return true;
  }
  MutexLock lock(mu_);
  for (;;) {
    if (value_ >= v) return true;
    if (device_->lost()) std::rethrow_exception(device_->error());
    const auto now = Clock::now();
    if (now >= deadline) return false;
    cv_.wait_until(mu_, std::min(deadline, now + kLostCheck),
                   [&]() FL_REQUIRES(mu_) { return value_ >= v; });
  }
}

void EventCore::notify(uint64_t v, std::function<void()> fn) {
  {
    MutexLock lock(mu_);
    if (value_ < v) {
      listeners_.emplace(v, std::move(fn));
      return;
    }
  }
  fn();  // already reached: at once, on the calling thread (the contract)
}

int64_t EventCore::time_of(uint64_t v) {
  cudaEvent_t e = nullptr;
  MutexLock lock(mu_);
  if (value_ >= v)
    for (const auto& [value, ev] : ring_)
      if (value == v && ev) e = ev;
  if (!e)
    throw InvalidState(detail::str_cat("[SharedEvent::signal_time_ns] value ", v,
                                       " has not been signaled (or was signaled too long ago); "
                                       "synchronize the event before asking for its time"));
  // Under mu_: the ring's event cannot be given back while it is timed.
  return device_->clock().time_ns(*device_, e);
}

}  // namespace flotilla::backend::cuda
