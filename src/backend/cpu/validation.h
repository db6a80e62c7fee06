// The CPU driver's validation layer: rule violations become ValidationError.
//
// Note [Threading checker]
// In the manner of Vulkan's validation layer, each single-threaded driver
// object (command buffer, encoder) records the thread inside it. A second
// thread entering while the first is inside is reported with both thread ids;
// the second call does nothing else, so the object is never corrupted. A
// thread may re-enter an object it is already inside (a handler that queries
// its own buffer). The check is a compare-and-swap on one atomic: it costs a
// few nanoseconds and catches overlaps only while both threads are inside, so
// the stress tool repeats many times to see a race.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>

#include "flotilla/common/error.h"

namespace flotilla::backend::cpu {

std::string thread_name(std::thread::id id);

// Counts violations and builds the error. Shared by a driver's objects.
class ViolationSink {
 public:
  [[noreturn]] void raise(const char* rule, const std::string& message);
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }

 private:
  // Relaxed: a statistic, read for reports only.
  std::atomic<uint64_t> count_{0};
};

class ObjectUseChecker {
 public:
  // RAII: marks the calling thread inside `checker` for the scope.
  class Scope {
   public:
    Scope(ObjectUseChecker& checker, ViolationSink& sink, const char* object, uint64_t object_id,
          const char* call);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    ObjectUseChecker& checker_;
    bool owner_ = false;
  };

 private:
  // acq_rel on entry / release on exit: a thread entering after another left
  // sees everything the other did inside.
  std::atomic<std::thread::id> user_{};
};

// The AGX model: any two encoding calls at once anywhere on the device are a
// violation. Only active when the driver declares its encoding path unsafe.
class EncodingChecker {
 public:
  class Scope {
   public:
    Scope(EncodingChecker& checker, ViolationSink& sink, const char* call);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    EncodingChecker* checker_ = nullptr;
  };
  explicit EncodingChecker(bool enabled) : enabled_(enabled) {}
  bool enabled() const { return enabled_; }

 private:
  const bool enabled_;
  // The thread encoding now, or none. acq_rel on entry (a compare-and-swap),
  // release on exit, as in ObjectUseChecker; a failed swap also yields the
  // thread inside, so the message names the right one.
  std::atomic<std::thread::id> encoding_{};
};

// Busy-waits `cost` to model a driver's encoding work (see Config).
void simulate_cost(std::chrono::nanoseconds cost);

}  // namespace flotilla::backend::cpu
