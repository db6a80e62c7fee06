// Short bounded spins, for waits that usually end within microseconds
// (a small op's round trip, a request completing in the next batch), where
// a futex sleep and wake-up costs more than the wait itself.
#pragma once

#include <chrono>

namespace flotilla::detail {

// Tells the core this is a spin loop (frees the sibling hyper-thread).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until pred() or `limit` passes; returns pred()'s last value. A zero
// limit tests pred() once.
template <typename Pred>
bool spin_until(Pred pred, std::chrono::nanoseconds limit) {
  using Clock = std::chrono::steady_clock;
  if (limit.count() <= 0) return pred();
  const auto end = Clock::now() + limit;
  for (;;) {
    for (int i = 0; i < 16; ++i) {
      if (pred()) return true;
      cpu_relax();
    }
    if (Clock::now() >= end) return pred();
  }
}

}  // namespace flotilla::detail
