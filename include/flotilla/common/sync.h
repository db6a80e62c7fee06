// Annotated synchronisation wrappers (Abseil's style).
//
// clang checks the annotations with -Wthread-safety; other compilers ignore
// them. Every mutable field guarded by a Mutex says so with FL_GUARDED_BY, and
// every function that expects a lock held says so with FL_REQUIRES.
// There is no recursive mutex: re-entry is a design bug to remove.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "flotilla/common/spin.h"

#if defined(__clang__)
#define FL_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define FL_THREAD_ANNOTATION(x)
#endif

#define FL_CAPABILITY(x) FL_THREAD_ANNOTATION(capability(x))
#define FL_SCOPED_CAPABILITY FL_THREAD_ANNOTATION(scoped_lockable)
#define FL_GUARDED_BY(x) FL_THREAD_ANNOTATION(guarded_by(x))
#define FL_PT_GUARDED_BY(x) FL_THREAD_ANNOTATION(pt_guarded_by(x))
#define FL_ACQUIRED_AFTER(...) FL_THREAD_ANNOTATION(acquired_after(__VA_ARGS__))
#define FL_REQUIRES(...) FL_THREAD_ANNOTATION(requires_capability(__VA_ARGS__))
#define FL_EXCLUDES(...) FL_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
#define FL_ACQUIRE(...) FL_THREAD_ANNOTATION(acquire_capability(__VA_ARGS__))
#define FL_TRY_ACQUIRE(...) FL_THREAD_ANNOTATION(try_acquire_capability(__VA_ARGS__))
#define FL_RELEASE(...) FL_THREAD_ANNOTATION(release_capability(__VA_ARGS__))
#define FL_RETURN_CAPABILITY(x) FL_THREAD_ANNOTATION(lock_returned(x))
#define FL_NO_THREAD_SAFETY_ANALYSIS FL_THREAD_ANNOTATION(no_thread_safety_analysis)

namespace flotilla {

// Asks a lock to try without sleeping for a moment first (see
// Mutex::lock(SpinFirst)).
struct SpinFirst {};
inline constexpr SpinFirst kSpinFirst{};

// A plain, non-recursive mutex that clang's analysis understands.
class FL_CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() FL_ACQUIRE() { mu_.lock(); }
  // Tries for about a microsecond before it sleeps: for a lock that many
  // threads take for a few hundred nanoseconds each (a BatchQueue's FIFO),
  // where a futex sleep and wake-up per hand-over costs more than the hold
  // and caps the lock at about a million hand-overs a second.
  void lock(SpinFirst) FL_ACQUIRE() FL_NO_THREAD_SAFETY_ANALYSIS {
    for (int i = 0; i < 64; ++i) {
      if (mu_.try_lock()) return;
      detail::cpu_relax();
    }
    mu_.lock();
  }
  void unlock() FL_RELEASE() { mu_.unlock(); }
  bool try_lock() FL_TRY_ACQUIRE(true) { return mu_.try_lock(); }

  std::mutex& native() { return mu_; }

 private:
  std::mutex mu_;
};

// Scoped lock on a Mutex. No default constructor, no copy.
// unlock() and lock() let a scope let go of the mutex for a while (a
// bounded spin) and take it back; the destructor unlocks only if held.
class FL_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) FL_ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  MutexLock(Mutex& mu, SpinFirst how) FL_ACQUIRE(mu) : mu_(mu) { mu_.lock(how); }
  ~MutexLock() FL_RELEASE() {
    if (held_) mu_.unlock();
  }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

  void unlock() FL_RELEASE() {
    held_ = false;
    mu_.unlock();
  }
  void lock() FL_ACQUIRE() {
    mu_.lock();
    held_ = true;
  }

 private:
  Mutex& mu_;
  bool held_ = true;
};

// Condition variable bound to a Mutex the caller already holds.
class CondVar {
 public:
  void notify_one() noexcept { cv_.notify_one(); }
  void notify_all() noexcept { cv_.notify_all(); }

  // Waits until pred() holds. `mu` must be held (by a MutexLock).
  template <typename Pred>
  void wait(Mutex& mu, Pred pred) FL_REQUIRES(mu) {
    std::unique_lock<std::mutex> lk(mu.native(), std::adopt_lock);
    cv_.wait(lk, pred);
    lk.release();
  }

  // Waits until pred() holds or the deadline passes; returns pred().
  template <typename Clock, typename Duration, typename Pred>
  bool wait_until(Mutex& mu, const std::chrono::time_point<Clock, Duration>& deadline, Pred pred)
      FL_REQUIRES(mu) {
    std::unique_lock<std::mutex> lk(mu.native(), std::adopt_lock);
    bool ok = cv_.wait_until(lk, deadline, pred);
    lk.release();
    return ok;
  }

  template <typename Rep, typename Period, typename Pred>
  bool wait_for(Mutex& mu, std::chrono::duration<Rep, Period> timeout, Pred pred) FL_REQUIRES(mu) {
    return wait_until(mu, std::chrono::steady_clock::now() + timeout, pred);
  }

 private:
  std::condition_variable cv_;
};

}  // namespace flotilla
