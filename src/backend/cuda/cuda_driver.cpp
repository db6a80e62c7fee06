#include "backend/cuda/cuda_driver.h"

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <set>
#include <thread>

#include "backend/cuda/command_buffer.h"
#include "backend/cuda/completion.h"
#include "backend/cuda/cuda_env.h"
#include "backend/cuda/device_core.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/shared_event.h"
#include "flotilla/common/error.h"

namespace flotilla::backend::cuda {

namespace {

class CudaDriver;

// ---- Exit drain (cuda_driver.h, "Process exit") ---------------------------------------

struct LiveDrivers {
  Mutex mu;
  std::set<CudaDriver*> drivers FL_GUARDED_BY(mu);
  bool hook_registered FL_GUARDED_BY(mu) = false;
};
// Never destroyed: the exit hook may run after static destructors began.
LiveDrivers& live_drivers() {
  static auto* d = new LiveDrivers;
  return *d;
}
void drain_live_drivers();

// ---- Buffers ------------------------------------------------------------------------------

class CudaBuffer final : public Buffer {
 public:
  CudaBuffer(std::shared_ptr<DeviceCore> device, void* p, size_t n, bool host)
      : device_(std::move(device)), p_(p), n_(n), host_(host) {}
  ~CudaBuffer() override {
    // Errors are ignored: a lost device cannot free anything, and CUDA frees
    // everything at process exit anyway.
    DeviceGuard guard(device_->index());
    if (host_)
      (void)cudaFreeHost(p_);
    else
      (void)cudaFree(p_);
  }
  size_t size() const override { return n_; }
  void* device_ptr() const override { return p_; }
  void* host_ptr() const override { return host_ ? p_ : nullptr; }

 private:
  std::shared_ptr<DeviceCore> device_;
  void* p_;
  size_t n_;
  bool host_;
};

std::string gib(size_t bytes) {
  return detail::str_cat(static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0), " GiB");
}

// ---- The driver ----------------------------------------------------------------------------

int completion_threads(const Config& c) {
  if (c.cuda_completion_threads > 0) return c.cuda_completion_threads;
  return std::thread::hardware_concurrency() >= 8 ? 2 : 1;
}

class CudaDriver final : public Driver {
 public:
  CudaDriver(int index, const Config& config);
  ~CudaDriver() override;

  const DeviceInfo& info() const override { return info_; }
  bool encoding_thread_safe() const override { return true; }
  std::unique_ptr<Queue> new_queue() override;
  std::unique_ptr<SharedEvent> new_shared_event() override {
    dev_->check_usable("Driver::new_shared_event");
    return std::make_unique<CudaSharedEvent>(dev_);
  }
  std::unique_ptr<Buffer> allocate(size_t bytes) override { return alloc(bytes, false); }
  std::unique_ptr<Buffer> allocate_host(size_t bytes) override { return alloc(bytes, true); }
  const Pipeline& pipeline(std::string_view name) override;
  std::vector<std::string> pipeline_names() const override;
  DriverStats stats() const override;
  std::exception_ptr device_error() const override {
    return dev_->lost() ? dev_->error() : nullptr;
  }
  void shutdown() override FL_EXCLUDES(mu_);

 private:
  std::unique_ptr<Buffer> alloc(size_t bytes, bool host);

  std::shared_ptr<DeviceCore> dev_;
  DeviceInfo info_;
  std::map<std::string, std::unique_ptr<CudaPipeline>, std::less<>> pipelines_;  // const after ctor
  std::vector<std::unique_ptr<CompletionThread>> completion_;  // written by ctor and shutdown only
  const pid_t pid_;  // the process that made the driver (fork children never drain it)

  Mutex mu_;  // serialises shutdown() callers
  bool shut_down_ FL_GUARDED_BY(mu_) = false;
};

CudaDriver::CudaDriver(int index, const Config& config) : pid_(getpid()) {
  const int connections = apply_max_connections(config.cuda_max_connections);
  dev_ = std::make_shared<DeviceCore>(index, config);
  cudaDeviceProp prop{};
  FL_CUDA_CHECK_DEV(*dev_, cudaGetDeviceProperties(&prop, index));
  info_.backend = "cuda";
  info_.index = index;
  const bool refused =
      config.cuda_max_connections > 0 && config.cuda_max_connections != connections;
  info_.name = detail::str_cat(prop.name, " (sm_", prop.major, prop.minor,
                               ", CUDA_DEVICE_MAX_CONNECTIONS=", connections,
                               refused ? detail::str_cat("; ", config.cuda_max_connections,
                                                         " was asked after CUDA had initialised")
                                       : std::string(),
                               ")");
  info_.memory_bytes = prop.totalGlobalMem;
  info_.compute_units = prop.multiProcessorCount;
  info_.encoding_thread_safe = true;
  for (const auto& [name, fn] : kernel_table())
    pipelines_.emplace(name, std::make_unique<CudaPipeline>(name, fn));
  std::vector<CompletionThread*> raw;
  for (int i = 0; i < completion_threads(config); ++i) {
    completion_.push_back(
        std::make_unique<CompletionThread>(*dev_, i, config.cuda_completion_sleep));
    raw.push_back(completion_.back().get());
  }
  dev_->set_completion_threads(std::move(raw));

  auto& live = live_drivers();
  MutexLock lock(live.mu);
  live.drivers.insert(this);
  if (!live.hook_registered) {
    // Registered after CUDA initialised (above), so it runs before CUDA's
    // own exit-time teardown (exit handlers run in reverse order).
    live.hook_registered = true;
    std::atexit(&drain_live_drivers);
  }
}

CudaDriver::~CudaDriver() {
  {
    auto& live = live_drivers();
    MutexLock lock(live.mu);
    live.drivers.erase(this);
  }
  if (getpid() != pid_) {
    // A fork() child: the completion threads do not exist here and the
    // parent's CUDA context is unusable. Leak on purpose (joining would hang).
    for (auto& t : completion_) (void)t.release();
    return;
  }
  shutdown();
}

std::unique_ptr<Queue> CudaDriver::new_queue() {
  dev_->check_usable("Driver::new_queue");
  const int id = dev_->next_queue_id.fetch_add(1, std::memory_order_relaxed);
  auto core = std::make_shared<QueueCore>(dev_, id, dev_->completion_thread_for(id));
  dev_->register_queue(core);
  return std::make_unique<CudaQueue>(std::move(core));
}

std::unique_ptr<Buffer> CudaDriver::alloc(size_t bytes, bool host) {
  const char* api = host ? "Driver::allocate_host" : "Driver::allocate";
  dev_->check_usable(api);
  FL_CHECK_ARG(bytes > 0, "[", api, "] asked for 0 bytes; ask for at least 1");
  DeviceGuard guard(dev_->index());
  void* p = nullptr;
  // Host memory is mapped: kernels may read and write it (copy_pinned); under
  // unified addressing its device address is its host address.
  const cudaError_t r = host ? cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable)
                             : cudaMalloc(&p, bytes);
  if (r == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();  // not sticky: clear it
    size_t free = 0, total = 0;
    if (host) {
      const long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
      free = pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) : 0;
      const long all = sysconf(_SC_PHYS_PAGES);
      total = all > 0 && page > 0 ? static_cast<size_t>(all) * static_cast<size_t>(page) : 0;
    } else if (cudaMemGetInfo(&free, &total) != cudaSuccess) {
      (void)cudaGetLastError();
    }
    throw OutOfMemory(detail::str_cat(
        "[", api, "] ", dev_->label(), " (", info_.name, "): asked for ", bytes, " bytes (",
        gib(bytes), ") with ", free, " bytes (", gib(free), ") free of ", total, " (", gib(total),
        ")", host ? " in host memory" : "",
        "; free tensors, use smaller batches, or let the caching allocator release its cache"));
  }
  if (r != cudaSuccess)
    dev_->fail(r, host ? "cudaHostAlloc(&p, bytes, mapped)" : "cudaMalloc(&p, bytes)", __FILE__,
               __LINE__);
  auto buffer = std::make_unique<CudaBuffer>(dev_, p, bytes, host);
  if (host) {
    void* dp = nullptr;
    FL_CUDA_CHECK_DEV(*dev_, cudaHostGetDevicePointer(&dp, p, 0));
    FL_CHECK_STATE(dp == p, "[", api, "] ", dev_->label(),
                   " maps pinned host memory at a different device address; flotilla needs "
                   "unified addressing (a 64-bit process on a current GPU)");
  }
  return buffer;
}

const Pipeline& CudaDriver::pipeline(std::string_view name) {
  auto it = pipelines_.find(name);
  if (it == pipelines_.end()) {
    std::string known;
    for (const auto& [n, p] : pipelines_) known += (known.empty() ? "" : ", ") + n;
    throw InvalidArgument(detail::str_cat("[Driver::pipeline] the cuda driver has no kernel '",
                                          name, "'; it has: ", known));
  }
  return *it->second;
}

std::vector<std::string> CudaDriver::pipeline_names() const {
  std::vector<std::string> out;
  for (const auto& [n, p] : pipelines_) out.push_back(n);
  return out;
}

DriverStats CudaDriver::stats() const {
  DriverStats s;
  s.command_buffers_committed = dev_->committed.load(std::memory_order_relaxed);
  s.command_buffers_completed = dev_->completed.load(std::memory_order_relaxed);
  s.kernels_executed = dev_->kernels.load(std::memory_order_relaxed);
  s.violations = dev_->violations.load(std::memory_order_relaxed);
  s.handler_errors = dev_->handler_errors.load(std::memory_order_relaxed);
  s.gemm_plans = dev_->gemm_plans.load(std::memory_order_relaxed);
  s.gemm_tunings = dev_->gemm_tunings.load(std::memory_order_relaxed);
  return s;
}

void CudaDriver::shutdown() {
  {
    MutexLock lock(mu_);
    if (shut_down_) return;
    shut_down_ = true;
  }
  if (getpid() != pid_) return;  // a fork() child (see the destructor)
  dev_->stop_commits();
  for (const auto& t : completion_) {
    if (t->is_this_thread()) {
      // Called from a completion handler: it cannot wait for itself. New
      // work is refused; the threads are joined when the driver is destroyed.
      return;
    }
  }
  // Drain: committed buffers complete (or fail, if the device is lost), and
  // work launched by buffers never committed finishes too.
  while (dev_->in_flight() > 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
  dev_->synchronize_queues();
  dev_->set_completion_threads({});
  for (auto& t : completion_) t->stop();
}

void drain_live_drivers() {
  std::vector<CudaDriver*> drivers;
  {
    auto& live = live_drivers();
    MutexLock lock(live.mu);
    drivers.assign(live.drivers.begin(), live.drivers.end());
  }
  for (auto* d : drivers) {
    try {
      d->shutdown();  // returns at once in a fork() child
    } catch (...) {
      // At exit there is no one to report to.
    }
  }
}

}  // namespace

std::unique_ptr<Driver> make_cuda_driver(int index, const Config& config) {
  const int n = cuda_device_count();
  if (cuda_initialised_before_fork())
    throw InvalidState(detail::str_cat(
        "[Device] cuda:", index,
        ": this process is a fork() child of one that had initialised CUDA, and CUDA cannot be "
        "used after fork(); create CUDA devices in a process started with exec (posix_spawn) or "
        "fork before any CUDA use"));
  FL_CHECK_ARG(index >= 0 && index < n, "[Device] cuda:", index,
               " does not exist; this machine has ", n, " CUDA device(s)",
               n == 0 ? " (no NVIDIA driver or GPU was found)" : "");
  return std::make_unique<CudaDriver>(index, config);
}

}  // namespace flotilla::backend::cuda
