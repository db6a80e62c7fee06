// Flotilla's error family and check macros.
//
// Every error Flotilla raises derives from flotilla::Error. Messages start with
// the API name in brackets and say what to do: "[StreamPool::acquire] all 31
// exclusive streams are bound; raise pool_size or use exclusive_when_full=share".
//
// Thread safety: the types are immutable values; throwing is always safe.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace flotilla {

// What kind of failure, for code that switches on errors without RTTI.
enum class ErrorCode {
  kInvalidArgument,  // the caller passed something wrong
  kInvalidState,     // the call is wrong at this point in the object's life
  kOutOfMemory,
  kDeviceLost,  // the device failed; every later call fails the same way
  kShutDown,    // the device or queue has been shut down
  kTimeout,
  kCancelled,
  kQueueFull,
  kInternal,  // a Flotilla bug: an internal invariant failed
};

const char* to_string(ErrorCode code) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

#define FLOTILLA_DEFINE_ERROR(Name, Code)                                          \
  class Name : public Error {                                                      \
   public:                                                                         \
    explicit Name(const std::string& message) : Error(ErrorCode::Code, message) {} \
  }

FLOTILLA_DEFINE_ERROR(InvalidArgument, kInvalidArgument);
FLOTILLA_DEFINE_ERROR(InvalidState, kInvalidState);
FLOTILLA_DEFINE_ERROR(OutOfMemory, kOutOfMemory);
FLOTILLA_DEFINE_ERROR(DeviceLost, kDeviceLost);
FLOTILLA_DEFINE_ERROR(ShutDown, kShutDown);
FLOTILLA_DEFINE_ERROR(Timeout, kTimeout);
FLOTILLA_DEFINE_ERROR(Cancelled, kCancelled);
FLOTILLA_DEFINE_ERROR(QueueFull, kQueueFull);
FLOTILLA_DEFINE_ERROR(InternalError, kInternal);
#undef FLOTILLA_DEFINE_ERROR

// A broken driver rule, raised by a driver's validation layer. `rule()` names
// it (e.g. "commit-twice", "concurrent-object-use", "concurrent-encoding") so
// tests and the stress tool can count violations by kind. It is an
// InvalidState: the call was wrong for the object's state at that moment.
class ValidationError : public InvalidState {
 public:
  ValidationError(std::string rule, const std::string& message)
      : InvalidState(message), rule_(std::move(rule)) {}
  const std::string& rule() const noexcept { return rule_; }

 private:
  std::string rule_;
};

namespace detail {
// Joins the streamable arguments into one string.
template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
[[noreturn]] void throw_internal(const char* cond, const char* file, int line,
                                 const std::string& message);
}  // namespace detail

}  // namespace flotilla

// FL_CHECK_ARG: a caller mistake. Throws InvalidArgument with the message.
#define FL_CHECK_ARG(cond, ...)                                                    \
  do {                                                                             \
    if (!(cond)) [[unlikely]]                                                      \
      throw ::flotilla::InvalidArgument(::flotilla::detail::str_cat(__VA_ARGS__)); \
  } while (0)

// FL_CHECK_STATE: a call at the wrong time. Throws InvalidState.
#define FL_CHECK_STATE(cond, ...)                                               \
  do {                                                                          \
    if (!(cond)) [[unlikely]]                                                   \
      throw ::flotilla::InvalidState(::flotilla::detail::str_cat(__VA_ARGS__)); \
  } while (0)

// FL_INTERNAL_CHECK: an invariant of Flotilla itself. Throws InternalError
// naming the condition, file and line: seeing one is a Flotilla bug.
#define FL_INTERNAL_CHECK(cond, ...)                                                              \
  do {                                                                                            \
    if (!(cond)) [[unlikely]]                                                                     \
      ::flotilla::detail::throw_internal(                                                         \
          #cond, __FILE__, __LINE__, ::flotilla::detail::str_cat("" __VA_OPT__(, ) __VA_ARGS__)); \
  } while (0)
