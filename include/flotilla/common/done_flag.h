// DoneFlag: a one-shot "done" signal for one setter and any number of
// waiters, without a mutex: set() is one atomic exchange, plus a futex
// wake-up only when a waiter is asleep; is_set() is one load.
//
// For state that is written once and then read by others (a request's
// result): write it, then set(); a waiter that saw is_set() or returned from
// wait() sees every write made before set() (release / acquire).
//
// Note [DoneFlag states]
// 0: not set, nobody asleep; 1: not set, a waiter is (about to be) asleep on
// the word; 2: set. A waiter moves 0 -> 1 before it sleeps on 1; set()
// exchanges in 2 and wakes sleepers only if it took 1 out. A waiter that
// moves 0 -> 1 after set() fails its compare-and-swap (the word is 2); one
// that sleeps on 1 after set() is refused by the futex (the word is no
// longer 1). So no wake-up is lost and a set() with nobody asleep makes no
// system call.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace flotilla {

class DoneFlag {
 public:
  DoneFlag() = default;
  DoneFlag(const DoneFlag&) = delete;
  DoneFlag& operator=(const DoneFlag&) = delete;

  bool is_set() const noexcept { return word_.load(std::memory_order_acquire) == kSet; }
  // Sets the flag and wakes every waiter. Once: a second set() is harmless.
  void set() noexcept;
  // Blocks until set.
  void wait() const noexcept;
  // Blocks until set or `timeout` of real (steady) time passes; returns is_set().
  bool wait_for(std::chrono::steady_clock::duration timeout) const noexcept;

 private:
  static constexpr uint32_t kClear = 0, kSleeping = 1, kSet = 2;
  // wait() and wait_for(): until set, or until `deadline` (nullptr: none).
  bool wait_until(const std::chrono::steady_clock::time_point* deadline) const noexcept;
  // Returns when woken, when the word is not kSleeping, or at `deadline`
  // (nullptr: none); may return spuriously.
  void sleep(const std::chrono::steady_clock::time_point* deadline) const noexcept;
  mutable std::atomic<uint32_t> word_{kClear};
};

}  // namespace flotilla
