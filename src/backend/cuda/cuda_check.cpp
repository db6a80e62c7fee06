#include "backend/cuda/cuda_check.h"

#include <cstring>

#include "flotilla/common/error.h"

namespace flotilla::backend::cuda {

bool is_sticky(cudaError_t e) noexcept {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorHardwareStackError:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorContextIsDestroyed:
    case cudaErrorDevicesUnavailable:
    case cudaErrorDeviceUninitialized:
    case cudaErrorUnknown: return true;
    default: return false;
  }
}

namespace {
// The path from the repository root: "src/backend/cuda/x.cpp".
const char* short_path(const char* file) {
  const char* p = std::strstr(file, "src/backend/cuda/");
  return p ? p : file;
}
}  // namespace

std::string describe_cuda_error(cudaError_t e, const char* call, const char* file, int line) {
  return detail::str_cat("CUDA call ", call, " failed at ", short_path(file), ":", line, ": ",
                         cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

void throw_cuda_error(cudaError_t e, const char* where, const char* call, const char* file,
                      int line) {
  const std::string what = describe_cuda_error(e, call, file, line);
  if (is_sticky(e))
    throw DeviceLost(detail::str_cat(
        where, " ", what,
        "; the device's CUDA context is unusable for the rest of this process: restart it"));
  (void)cudaGetLastError();  // not sticky: clear it so the next launch does not report it
  switch (e) {
    case cudaErrorMemoryAllocation:
      throw OutOfMemory(detail::str_cat(where, " ", what, "; free memory or ask for less"));
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidResourceHandle:
    case cudaErrorInvalidDevice:
    case cudaErrorInvalidSymbol:
    case cudaErrorInvalidDeviceFunction: throw InvalidArgument(detail::str_cat(where, " ", what));
    case cudaErrorCudartUnloading:
      throw ShutDown(
          detail::str_cat(where, " ", what, "; the process is exiting and CUDA has shut down"));
    default: throw InvalidState(detail::str_cat(where, " ", what));
  }
}

DeviceGuard::DeviceGuard(int device) noexcept : device_(device) {
  // Errors are left to the CUDA calls that follow: on the wrong device they
  // fail with an error of their own, which is checked.
  if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
  if (previous_ != device_) (void)cudaSetDevice(device_);
}

DeviceGuard::~DeviceGuard() {
  // Restoring cannot fail in a way anyone could act on; ignore the result.
  if (previous_ != device_ && previous_ >= 0) (void)cudaSetDevice(previous_);
}

}  // namespace flotilla::backend::cuda
