// A futex on a 32-bit atomic word (Linux): the sleep and wake-up under
// DoneFlag and the bench's request windows. Internal to Flotilla and its
// tools.
#pragma once

#include <atomic>
#include <cstdint>
#include <ctime>

namespace flotilla::detail {

// Sleeps while `*word` holds `expected`, until woken or `timeout` (relative;
// null: none) passes; returns at once if the word holds something else.
// May return spuriously (a signal, a stray wake-up): callers look again.
void futex_wait(const void* word, uint32_t expected, const timespec* timeout = nullptr) noexcept;
// Wakes every thread asleep on `word`.
void futex_wake_all(const void* word) noexcept;

// The same on an atomic of 32 bits (std::atomic<int>, std::atomic<uint32_t>).
template <typename T>
void futex_wait(const std::atomic<T>& word, T expected,
                const timespec* timeout = nullptr) noexcept {
  static_assert(sizeof(std::atomic<T>) == 4 && std::atomic<T>::is_always_lock_free,
                "a futex needs the atomic to be a plain 32-bit word");
  futex_wait(static_cast<const void*>(&word), static_cast<uint32_t>(expected), timeout);
}
template <typename T>
void futex_wake_all(const std::atomic<T>& word) noexcept {
  static_assert(sizeof(std::atomic<T>) == 4 && std::atomic<T>::is_always_lock_free,
                "a futex needs the atomic to be a plain 32-bit word");
  futex_wake_all(static_cast<const void*>(&word));
}

}  // namespace flotilla::detail
