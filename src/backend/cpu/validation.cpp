#include "backend/cpu/validation.h"

#include <sstream>

namespace flotilla::backend::cpu {

std::string thread_name(std::thread::id id) {
  std::ostringstream out;
  out << "thread " << id;
  return out.str();
}

void ViolationSink::raise(const char* rule, const std::string& message) {
  count_.fetch_add(1, std::memory_order_relaxed);
  throw ValidationError(rule, message + " [rule: " + rule + "]");
}

ObjectUseChecker::Scope::Scope(ObjectUseChecker& checker, ViolationSink& sink, const char* object,
                               uint64_t object_id, const char* call)
    : checker_(checker) {
  const auto me = std::this_thread::get_id();
  std::thread::id expected{};
  if (checker.user_.compare_exchange_strong(expected, me, std::memory_order_acq_rel)) {
    owner_ = true;
    return;
  }
  if (expected == me) return;  // re-entry by the same thread
  sink.raise(
      "concurrent-object-use",
      detail::str_cat("[", object, "::", call, "] ", thread_name(me), " entered ", object, " #",
                      object_id, " while ", thread_name(expected), " is inside it; a ", object,
                      " is single-threaded: give each thread its own (a stream each), "
                      "or serialise the callers"));
}

ObjectUseChecker::Scope::~Scope() {
  if (owner_) checker_.user_.store(std::thread::id{}, std::memory_order_release);
}

EncodingChecker::Scope::Scope(EncodingChecker& checker, ViolationSink& sink, const char* call) {
  if (!checker.enabled_) return;
  const auto me = std::this_thread::get_id();
  std::thread::id other{};
  if (!checker.encoding_.compare_exchange_strong(other, me, std::memory_order_acq_rel)) {
    sink.raise("concurrent-encoding",
               detail::str_cat("[ComputeEncoder::", call, "] ", thread_name(me),
                               " made an encoding call while ", thread_name(other),
                               " was encoding; this driver's encoding path is not thread-safe "
                               "(AGX model): take the device's EncodingLock around encoding"));
  }
  checker_ = &checker;
}

EncodingChecker::Scope::~Scope() {
  if (checker_) checker_->encoding_.store(std::thread::id{}, std::memory_order_release);
}

void simulate_cost(std::chrono::nanoseconds cost) {
  if (cost.count() <= 0) return;
  const auto end = std::chrono::steady_clock::now() + cost;
  while (std::chrono::steady_clock::now() < end) {
  }
}

}  // namespace flotilla::backend::cpu
