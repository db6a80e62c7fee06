#include "flotilla/runtime/event.h"

#include <utility>

#include "flotilla/common/error.h"
#include "flotilla/runtime/device.h"
#include "runtime/event_state.h"
#include "runtime/stream_state.h"

namespace flotilla {

namespace detail {

void EventState::reset_for_reuse() {
  recorded.store(0, std::memory_order_relaxed);
  MutexLock lock(mu);
  pending_callbacks = 0;
  error = nullptr;
}

EventPool::EventPool(Device& device, int keep) : device_(device), core_(std::make_shared<Core>()) {
  core_->keep = static_cast<size_t>(keep);
}

EventPool::~EventPool() = default;

size_t EventPool::cached() const {
  MutexLock lock(core_->mu);
  return core_->free.size();
}

std::shared_ptr<EventState> EventPool::acquire() {
  std::unique_ptr<EventState> state;
  {
    MutexLock lock(core_->mu);
    if (!core_->free.empty()) {
      state = std::move(core_->free.back());
      core_->free.pop_back();
    }
  }
  if (!state)
    state =
        std::make_unique<EventState>(device_, device_.driver("Event::Event").new_shared_event());
  std::weak_ptr<Core> weak = core_;
  return std::shared_ptr<EventState>(state.release(), [weak](EventState* s) {
    std::unique_ptr<EventState> owned(s);
    auto core = weak.lock();
    if (!core) return;  // the pool is gone: just free it
    owned->reset_for_reuse();
    MutexLock lock(core->mu);
    if (core->free.size() < core->keep) core->free.push_back(std::move(owned));
  });
}

}  // namespace detail

Event::Event(Device& device) : state_(device.events().acquire()) {}
Event::~Event() = default;

uint64_t Event::recorded_value() const { return state_->recorded.load(std::memory_order_acquire); }

void Event::record(const Stream& stream) {
  FL_CHECK_ARG(&stream.device() == &state_->device, "[Event::record] the stream is on ",
               stream.device().name(), " but the event belongs to ", state_->device.name(),
               "; record an event on a stream of its own device");
  stream.device().check_usable("Event::record");
  uint64_t value = 0;
  {
    MutexLock lock(state_->mu);
    value = ++state_->next_value;
  }
  stream.state().encode_signal(*state_->shared, value);
  state_->recorded.store(value, std::memory_order_release);
}

void Event::wait(const Stream& stream) const {
  FL_CHECK_ARG(&stream.device() == &state_->device, "[Event::wait] the stream is on ",
               stream.device().name(), " but the event belongs to ", state_->device.name(),
               "; to order work across devices, synchronize the event on the host");
  stream.device().check_usable("Event::wait");
  const uint64_t v = recorded_value();
  if (v == 0) return;
  stream.state().encode_wait(*state_->shared, v);
}

bool Event::query() const {
  const uint64_t v = recorded_value();
  return v == 0 || state_->shared->signaled_value() >= v;
}

bool Event::synchronize_for(std::chrono::milliseconds timeout) const {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const uint64_t v = recorded_value();
  if (v != 0) {
    state_->device.check_usable("Event::synchronize");
    if (!state_->shared->wait_until(v, deadline)) return false;
  }
  std::exception_ptr error;
  {
    MutexLock lock(state_->mu);
    if (!state_->callbacks_done.wait_until(state_->mu, deadline, [&]() FL_REQUIRES(state_->mu) {
          return state_->pending_callbacks == 0;
        }))
      return false;
    error = std::exchange(state_->error, nullptr);
  }
  if (error) std::rethrow_exception(error);
  return true;
}

void Event::synchronize() const {
  // A day is "forever" without overflowing the clock arithmetic.
  synchronize_for(std::chrono::hours(24));
}

double Event::elapsed_ms(const Event& end) const {
  const uint64_t a = recorded_value();
  const uint64_t b = end.recorded_value();
  FL_CHECK_STATE(a != 0 && b != 0,
                 "[Event::elapsed_ms] both events must be recorded first; record() each on a "
                 "stream, then synchronize() the later one");
  FL_CHECK_STATE(query() && end.query(),
                 "[Event::elapsed_ms] an event has not been reached yet; synchronize() it first");
  const int64_t t0 = state_->shared->signal_time_ns(a);
  const int64_t t1 = end.state_->shared->signal_time_ns(b);
  return static_cast<double>(t1 - t0) / 1e6;
}

void Event::then(std::function<void()> fn) {
  const uint64_t v = recorded_value();
  FL_CHECK_STATE(v != 0,
                 "[Event::then] the event has not been recorded; record() it on a stream first");
  {
    MutexLock lock(state_->mu);
    ++state_->pending_callbacks;
  }
  // The listener owns a reference to the state: dropping every Event handle
  // while it is pending is safe (Note in event.h).
  state_->shared->notify(v, [state = state_, fn = std::move(fn)] {
    std::exception_ptr error;
    try {
      fn();
    } catch (...) {
      error = std::current_exception();  // never let it kill the driver thread
    }
    {
      MutexLock lock(state->mu);
      if (error && !state->error) state->error = error;
      --state->pending_callbacks;
    }
    state->callbacks_done.notify_all();
  });
}

}  // namespace flotilla
