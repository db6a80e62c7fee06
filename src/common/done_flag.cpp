#include "flotilla/common/done_flag.h"

#include <ctime>

#include "flotilla/common/futex.h"

namespace flotilla {

void DoneFlag::set() noexcept {
  if (word_.exchange(kSet, std::memory_order_acq_rel) == kSleeping) detail::futex_wake_all(word_);
}

void DoneFlag::sleep(const std::chrono::steady_clock::time_point* deadline) const noexcept {
  timespec ts{};
  timespec* timeout = nullptr;
  if (deadline) {
    const auto left = *deadline - std::chrono::steady_clock::now();
    if (left <= std::chrono::steady_clock::duration::zero()) return;
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
    ts.tv_sec = static_cast<time_t>(ns / 1000000000);
    ts.tv_nsec = static_cast<long>(ns % 1000000000);
    timeout = &ts;
  }
  // Relative timeout; EAGAIN (the word changed), EINTR and ETIMEDOUT all
  // just return: the caller looks at the word again.
  detail::futex_wait(word_, kSleeping, timeout);
}

bool DoneFlag::wait_until(const std::chrono::steady_clock::time_point* deadline) const noexcept {
  uint32_t w = word_.load(std::memory_order_acquire);
  while (w != kSet) {
    if (deadline && std::chrono::steady_clock::now() >= *deadline) return false;
    // Note [DoneFlag states]: announce the sleep, then sleep on kSleeping.
    if (w == kClear && !word_.compare_exchange_weak(w, kSleeping, std::memory_order_acquire,
                                                    std::memory_order_acquire))
      continue;
    sleep(deadline);
    w = word_.load(std::memory_order_acquire);
  }
  return true;
}

void DoneFlag::wait() const noexcept { (void)wait_until(nullptr); }

bool DoneFlag::wait_for(std::chrono::steady_clock::duration timeout) const noexcept {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  return wait_until(&deadline);
}

}  // namespace flotilla
