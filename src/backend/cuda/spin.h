// Short bounded spins, for waits that usually end within microseconds
// (a small op's round trip), where a futex sleep and wake-up costs more than
// the wait itself. Internal to the CUDA backend.
#pragma once

#include <chrono>

namespace flotilla::backend::cuda {

// Tells the core this is a spin loop (frees the sibling hyper-thread).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until pred() or `limit` passes; returns pred()'s last value.
template <typename Pred>
bool spin_until(Pred pred, std::chrono::nanoseconds limit) {
  using Clock = std::chrono::steady_clock;
  const auto end = Clock::now() + limit;
  for (;;) {
    for (int i = 0; i < 16; ++i) {
      if (pred()) return true;
      cpu_relax();
    }
    if (Clock::now() >= end) return pred();
  }
}

}  // namespace flotilla::backend::cuda
