// Clock: the time source of a BatchQueue (deadlines, max_delay, metrics),
// injectable so tests decide when time passes.
//
//  - SteadyClock: std::chrono::steady_clock; waits are ordinary timed
//    condition-variable waits. What real use takes (BatchQueueOptions'
//    default).
//  - ManualClock: time moves only when a test calls advance() or set(). A
//    wait by this clock blocks until its predicate holds or advance() moves
//    the time past its deadline: advance() calls every listener (a queue
//    registers one that notifies its condition variables under its mutex),
//    so a deadline or a max_delay fires exactly when the test says and never
//    by itself, however slow the machine.
//
// Note [Clock waits without lost wake-ups]
// The waiter holds its mutex from its last look at the time to the moment
// it blocks (the condition variable releases it atomically). A listener
// takes that same mutex before it notifies, so an advance() cannot slip
// between the look and the block. Lock order: a ManualClock's listener
// mutex before the queue's mutex; a queue never calls into its clock's
// listener list while holding its own mutex (it registers in its
// constructor and unregisters in its destructor, outside every lock).
//
// Thread safety: all members may be called from any thread. Lifetime: a
// clock must outlive the queues that use it (they hold a shared_ptr).
// What blocks: wait_until(); ManualClock::advance() and remove_listener()
// wait for listeners that are running.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>

#include "flotilla/common/sync.h"

namespace flotilla::serve {

class Clock {
 public:
  using duration = std::chrono::steady_clock::duration;
  using time_point = std::chrono::steady_clock::time_point;
  // "No deadline".
  static constexpr time_point kNever = time_point::max();

  virtual ~Clock() = default;
  virtual time_point now() const = 0;

  // Blocks on `cv` (with `mu` held, as CondVar::wait) until `pred()` holds or
  // this clock reaches `deadline` (kNever: no deadline); returns pred().
  // `pred` is called with `mu` held.
  virtual bool wait_until(Mutex& mu, CondVar& cv, time_point deadline,
                          const std::function<bool()>& pred) FL_REQUIRES(mu) = 0;

  // Listeners run after the time jumps (ManualClock); a SteadyClock never
  // calls them. add_listener returns a key for remove_listener, which
  // returns only once the listener is not running (so its captures may die).
  virtual uint64_t add_listener(std::function<void()> listener) = 0;
  virtual void remove_listener(uint64_t key) = 0;
};

class SteadyClock final : public Clock {
 public:
  // The process-wide instance.
  static std::shared_ptr<SteadyClock> instance();

  time_point now() const override { return std::chrono::steady_clock::now(); }
  bool wait_until(Mutex& mu, CondVar& cv, time_point deadline,
                  const std::function<bool()>& pred) override FL_REQUIRES(mu);
  uint64_t add_listener(std::function<void()>) override { return 0; }
  void remove_listener(uint64_t) override {}
};

class ManualClock final : public Clock {
 public:
  // Starts at `start` (an arbitrary, fixed point by default).
  explicit ManualClock(time_point start = time_point(std::chrono::hours(1)));

  time_point now() const override;
  bool wait_until(Mutex& mu, CondVar& cv, time_point deadline,
                  const std::function<bool()>& pred) override FL_REQUIRES(mu);
  uint64_t add_listener(std::function<void()> listener) override FL_EXCLUDES(listeners_mu_);
  void remove_listener(uint64_t key) override FL_EXCLUDES(listeners_mu_);

  // Moves the time forward by `d` (>= 0), then wakes every waiter.
  void advance(duration d) FL_EXCLUDES(listeners_mu_);
  // Moves the time to `t`, which must not be earlier than now().
  void set(time_point t) FL_EXCLUDES(listeners_mu_);

 private:
  void notify_listeners() FL_EXCLUDES(listeners_mu_);

  // Nanoseconds since the steady clock's epoch. release/acquire: a waiter
  // that reads the new time also sees what the advancing thread wrote before.
  std::atomic<int64_t> now_ns_;
  // Guards the listener list; held while listeners run, so remove_listener
  // waits for a running one (Note [Clock waits without lost wake-ups]).
  Mutex listeners_mu_;
  std::map<uint64_t, std::function<void()>> listeners_ FL_GUARDED_BY(listeners_mu_);
  uint64_t next_key_ FL_GUARDED_BY(listeners_mu_) = 1;
  // Serialises advance()/set() so the time only grows.
  Mutex advance_mu_;
};

}  // namespace flotilla::serve
