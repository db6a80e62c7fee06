// The backend registry: the backends compiled into this binary.
#include <string>

#include "backend/cpu/cpu_driver.h"
#include "flotilla/backend/driver.h"
#include "flotilla/common/error.h"

#ifdef FLOTILLA_HAVE_CUDA
namespace flotilla::backend::cuda {
// Defined by the flotilla_cuda target (src/backend/cuda), which the core
// reaches only through these two functions: no CUDA header here.
std::unique_ptr<Driver> make_cuda_driver(int index, const Config& config);
int cuda_device_count();
}  // namespace flotilla::backend::cuda
#endif

namespace flotilla::backend {

const char* to_string(CommandBufferStatus s) noexcept {
  switch (s) {
    case CommandBufferStatus::kNotEnqueued: return "not enqueued";
    case CommandBufferStatus::kCommitted: return "committed";
    case CommandBufferStatus::kScheduled: return "scheduled";
    case CommandBufferStatus::kCompleted: return "completed";
    case CommandBufferStatus::kError: return "error";
  }
  return "?";
}

const std::vector<BackendEntry>& backends() {
  static const std::vector<BackendEntry> list = {
      {"cpu", &cpu::make_cpu_driver, &cpu::cpu_device_count},
#ifdef FLOTILLA_HAVE_CUDA
      {"cuda", &cuda::make_cuda_driver, &cuda::cuda_device_count},
#endif
  };
  return list;
}

const BackendEntry& find_backend(std::string_view name) {
  std::string known;
  for (const auto& b : backends()) {
    if (name == b.name) return b;
    known += (known.empty() ? "" : ", ") + std::string(b.name);
  }
  throw InvalidArgument(detail::str_cat("[backend] unknown backend '", name, "'; this build has: ",
                                        known, " (build with FLOTILLA_CUDA=ON for cuda)"));
}

}  // namespace flotilla::backend
