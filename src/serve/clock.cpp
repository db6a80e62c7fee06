#include "flotilla/serve/clock.h"

#include "flotilla/common/error.h"

namespace flotilla::serve {

std::shared_ptr<SteadyClock> SteadyClock::instance() {
  // Never destroyed: queues may be torn down during static destruction.
  static auto* clock = new std::shared_ptr<SteadyClock>(std::make_shared<SteadyClock>());
  return *clock;
}

bool SteadyClock::wait_until(Mutex& mu, CondVar& cv, time_point deadline,
                             const std::function<bool()>& pred) {
  // An untimed wait for kNever: a wait_until on time_point::max() overflows
  // inside some standard libraries and returns at once.
  if (deadline == kNever) {
    cv.wait(mu, pred);
    return true;
  }
  return cv.wait_until(mu, deadline, pred);
}

ManualClock::ManualClock(time_point start) : now_ns_(start.time_since_epoch().count()) {}

Clock::time_point ManualClock::now() const {
  return time_point(duration(now_ns_.load(std::memory_order_acquire)));
}

bool ManualClock::wait_until(Mutex& mu, CondVar& cv, time_point deadline,
                             const std::function<bool()>& pred) {
  // Only advance() makes time pass; it notifies through the listeners, which
  // take `mu` first (Note [Clock waits without lost wake-ups]).
  cv.wait(mu, [&] { return pred() || now() >= deadline; });
  return pred();
}

uint64_t ManualClock::add_listener(std::function<void()> listener) {
  MutexLock lock(listeners_mu_);
  const uint64_t key = next_key_++;
  listeners_.emplace(key, std::move(listener));
  return key;
}

void ManualClock::remove_listener(uint64_t key) {
  MutexLock lock(listeners_mu_);
  listeners_.erase(key);
}

void ManualClock::advance(duration d) {
  FL_CHECK_ARG(d >= duration::zero(), "[ManualClock::advance] cannot go back in time (", d.count(),
               " ns); pass a duration >= 0");
  {
    MutexLock lock(advance_mu_);
    now_ns_.fetch_add(d.count(), std::memory_order_acq_rel);
  }
  notify_listeners();
}

void ManualClock::set(time_point t) {
  {
    MutexLock lock(advance_mu_);
    const int64_t target = t.time_since_epoch().count();
    FL_CHECK_ARG(target >= now_ns_.load(std::memory_order_acquire),
                 "[ManualClock::set] cannot go back in time; pass a time >= now()");
    now_ns_.store(target, std::memory_order_release);
  }
  notify_listeners();
}

void ManualClock::notify_listeners() {
  MutexLock lock(listeners_mu_);
  for (auto& [key, fn] : listeners_) fn();
}

}  // namespace flotilla::serve
