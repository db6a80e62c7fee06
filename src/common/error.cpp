#include "flotilla/common/error.h"

namespace flotilla {

const char* to_string(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "InvalidArgument";
    case ErrorCode::kInvalidState: return "InvalidState";
    case ErrorCode::kOutOfMemory: return "OutOfMemory";
    case ErrorCode::kDeviceLost: return "DeviceLost";
    case ErrorCode::kShutDown: return "ShutDown";
    case ErrorCode::kTimeout: return "Timeout";
    case ErrorCode::kCancelled: return "Cancelled";
    case ErrorCode::kQueueFull: return "QueueFull";
    case ErrorCode::kInternal: return "Internal";
  }
  return "Unknown";
}

namespace detail {
void throw_internal(const char* cond, const char* file, int line, const std::string& message) {
  throw InternalError(str_cat("[internal] invariant '", cond, "' failed at ", file, ":", line,
                              message.empty() ? "" : ": ", message,
                              "; this is a Flotilla bug, please report it"));
}
}  // namespace detail

}  // namespace flotilla
