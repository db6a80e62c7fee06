#include "backend/cuda/device_core.h"

#include <cmath>

#include "backend/cuda/command_buffer.h"
#include "backend/cuda/completion.h"
#include "backend/cuda/cuda_env.h"
#include "backend/cuda/kernels.h"
#include "flotilla/common/error.h"

namespace flotilla::backend::cuda {

namespace {
int64_t steady_ns(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}
}  // namespace

// ---- EventPool ------------------------------------------------------------------

EventPool::~EventPool() {
  MutexLock lock(mu_);
  for (cudaEvent_t e : free_) EventTraits::destroy(e);
}

cudaEvent_t EventPool::take(DeviceCore& device) {
  {
    MutexLock lock(mu_);
    if (!free_.empty()) {
      cudaEvent_t e = free_.back();
      free_.pop_back();
      return e;
    }
  }
  cudaEvent_t e = nullptr;
  FL_CUDA_CHECK_DEV(device, cudaEventCreateWithFlags(&e, flags_));
  return e;
}

void EventPool::give(cudaEvent_t e) noexcept {
  if (!e) return;
  try {
    MutexLock lock(mu_);
    free_.push_back(e);
  } catch (...) {
    EventTraits::destroy(e);  // out of memory growing the list: just free it
  }
}

void EventPool::prefill(DeviceCore& device, int n) {
  std::vector<cudaEvent_t> made;
  made.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    cudaEvent_t e = nullptr;
    FL_CUDA_CHECK_DEV(device, cudaEventCreateWithFlags(&e, flags_));
    made.push_back(e);
  }
  MutexLock lock(mu_);
  free_.insert(free_.end(), made.begin(), made.end());
}

// ---- TimeBase (Note [Device clock]) ------------------------------------------------

void TimeBase::init(DeviceCore& device) {
  MutexLock lock(mu_);
  cudaStream_t s = nullptr;
  FL_CUDA_CHECK_DEV(device, cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  stream_ = StreamHandle(s);
  cudaEvent_t e = nullptr;
  FL_CUDA_CHECK_DEV(device, cudaEventCreate(&e));
  anchor_ = EventHandle(e);
  FL_CUDA_CHECK_DEV(device, cudaEventRecord(e, s));
  FL_CUDA_CHECK_DEV(device, cudaEventSynchronize(e));
  anchor_host_ = std::chrono::steady_clock::now();
  anchor_ns_ = steady_ns(anchor_host_);
}

void TimeBase::rebase(DeviceCore& device) {
  cudaEvent_t e = nullptr;
  FL_CUDA_CHECK_DEV(device, cudaEventCreate(&e));
  EventHandle fresh(e);
  FL_CUDA_CHECK_DEV(device, cudaEventRecord(e, stream_.get()));
  FL_CUDA_CHECK_DEV(device, cudaEventSynchronize(e));
  float ms = 0;
  FL_CUDA_CHECK_DEV(device, cudaEventElapsedTime(&ms, anchor_.get(), e));
  anchor_ns_ += std::llround(static_cast<double>(ms) * 1e6);
  anchor_ = std::move(fresh);
  anchor_host_ = std::chrono::steady_clock::now();
}

cudaStream_t TimeBase::stream() {
  MutexLock lock(mu_);
  return stream_.get();
}

int64_t TimeBase::time_ns(DeviceCore& device, cudaEvent_t e) {
  DeviceGuard guard(device.index());
  MutexLock lock(mu_);
  if (std::chrono::steady_clock::now() - anchor_host_ > std::chrono::seconds(1)) rebase(device);
  float ms = 0;
  FL_CUDA_CHECK_DEV(device, cudaEventElapsedTime(&ms, anchor_.get(), e));
  return anchor_ns_ + std::llround(static_cast<double>(ms) * 1e6);
}

// ---- CompletionWords (Note [Completion words]) -------------------------------------------

namespace {
constexpr size_t kWordStride = 64;  // one cache line per word: no false sharing
constexpr size_t kWordsPerSlab = 256;
}  // namespace

CompletionWords::~CompletionWords() {
  MutexLock lock(mu_);
  for (void* p : slabs_) (void)cudaFreeHost(p);
}

bool CompletionWords::init(DeviceCore& device, cudaStream_t stream) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion("cuStreamWriteValue64", &fn, 12000, cudaEnableDefault,
                                       &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess || fn == nullptr) {
    (void)cudaGetLastError();
    return false;
  }
  auto write = reinterpret_cast<WriteFn>(fn);
  // Try it once: a driver or device without 64-bit memory operations
  // refuses, and completion falls back to events.
  Word w = take(device);
  const bool ok = write(stream, w.device, 42, 0) == CUDA_SUCCESS &&
                  cudaStreamSynchronize(stream) == cudaSuccess &&
                  __atomic_load_n(w.host, __ATOMIC_ACQUIRE) == 42;
  (void)cudaGetLastError();
  give(w);
  if (ok) write_ = write;
  return ok;
}

CompletionWords::Word CompletionWords::take(DeviceCore& device) {
  MutexLock lock(mu_);
  if (free_.empty()) {
    void* p = nullptr;
    FL_CUDA_CHECK_DEV(device, cudaHostAlloc(&p, kWordStride * kWordsPerSlab,
                                            cudaHostAllocMapped | cudaHostAllocPortable));
    void* d = nullptr;
    const cudaError_t r = cudaHostGetDevicePointer(&d, p, 0);
    if (r != cudaSuccess) {
      (void)cudaFreeHost(p);
      device.fail(r, "cudaHostGetDevicePointer(&d, p, 0)", __FILE__, __LINE__);
    }
    slabs_.push_back(p);
    for (size_t i = 0; i < kWordsPerSlab; ++i)
      free_.push_back(Word{reinterpret_cast<uint64_t*>(static_cast<char*>(p) + i * kWordStride),
                           reinterpret_cast<CUdeviceptr>(d) + i * kWordStride});
  }
  Word w = free_.back();
  free_.pop_back();
  __atomic_store_n(w.host, 0, __ATOMIC_RELEASE);
  return w;
}

void CompletionWords::give(Word w) noexcept {
  if (!w.host) return;
  try {
    MutexLock lock(mu_);
    free_.push_back(w);
  } catch (...) {
    // Out of memory growing the list: the word stays unused until the slab goes.
  }
}

// ---- DeviceCore -----------------------------------------------------------------------

DeviceCore::DeviceCore(int index, const Config& config)
    : index_(index),
      label_(detail::str_cat("cuda:", index)),
      wait_spin_(config.cuda_wait_spin),
      gather_blocks_(config.cuda_gather_blocks),
      tune_gemm_(config.cuda_tune_gemm) {
  DeviceGuard guard(index_);
  // Creates the primary context now rather than at the first launch.
  FL_CUDA_CHECK_DEV(*this, cudaFree(nullptr));
  FL_CUDA_CHECK_DEV(*this,
                    cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, index_));
  clock_.init(*this);
  words_.init(*this, clock_.stream());
  sync_events_.prefill(*this, 64);
  timing_events_.prefill(*this, 16);
}

DeviceCore::~DeviceCore() = default;

std::exception_ptr DeviceCore::error() const {
  MutexLock lock(mu_);
  return error_;
}

void DeviceCore::mark_lost(std::exception_ptr e) {
  std::vector<CompletionThread*> threads;
  {
    MutexLock lock(mu_);
    if (error_) return;
    error_ = std::move(e);
    lost_.store(true, std::memory_order_release);
    threads = completion_;
  }
  for (auto* t : threads) t->wake();
}

std::exception_ptr DeviceCore::lost_error(cudaError_t e, const char* call, const char* file,
                                          int line) {
  return std::make_exception_ptr(DeviceLost(detail::str_cat(
      "[", label_, "] the device is lost: ", describe_cuda_error(e, call, file, line),
      ". A kernel faulted (illegal address, trap, ...) and CUDA cannot recover its context in "
      "this process; every later call fails the same way: restart the process")));
}

void DeviceCore::fail(cudaError_t e, const char* call, const char* file, int line) {
  if (is_sticky(e)) {
    mark_lost(lost_error(e, call, file, line));
    std::rethrow_exception(error());  // the first loss, which may be another thread's
  }
  throw_cuda_error(e, detail::str_cat("[", label_, "]").c_str(), call, file, line);
}

void DeviceCore::throw_shut_down(const char* api) const {
  throw ShutDown(detail::str_cat("[", api, "] ", label_,
                                 " (cuda driver) has been shut down; create a new device to run "
                                 "more work"));
}

void DeviceCore::violation(const char* rule, const std::string& message) {
  violations.fetch_add(1, std::memory_order_relaxed);
  throw ValidationError(rule, detail::str_cat(message, " [rule: ", rule, "]"));
}

void DeviceCore::begin_commit(const char* api) {
  in_flight_.fetch_add(1, std::memory_order_seq_cst);
  if (stopped_.load(std::memory_order_seq_cst)) [[unlikely]] {
    in_flight_.fetch_sub(1, std::memory_order_seq_cst);
    throw_shut_down(api);
  }
}

void DeviceCore::abort_commit() noexcept { in_flight_.fetch_sub(1, std::memory_order_seq_cst); }

void DeviceCore::end_commit(bool ok, uint64_t n) noexcept {
  completed.fetch_add(1, std::memory_order_relaxed);
  if (ok) kernels.fetch_add(n, std::memory_order_relaxed);
  in_flight_.fetch_sub(1, std::memory_order_seq_cst);
}

void DeviceCore::set_completion_threads(std::vector<CompletionThread*> threads) {
  MutexLock lock(mu_);
  completion_ = std::move(threads);
}

CompletionThread* DeviceCore::completion_thread_for(int queue_id) {
  MutexLock lock(mu_);
  if (completion_.empty()) return nullptr;
  return completion_[static_cast<size_t>(queue_id) % completion_.size()];
}

void DeviceCore::register_queue(const std::shared_ptr<QueueCore>& q) {
  MutexLock lock(mu_);
  std::erase_if(queues_, [](const std::weak_ptr<QueueCore>& w) { return w.expired(); });
  queues_.push_back(q);
}

void DeviceCore::synchronize_queues() {
  std::vector<std::shared_ptr<QueueCore>> live;
  {
    MutexLock lock(mu_);
    for (auto& w : queues_)
      if (auto q = w.lock()) live.push_back(std::move(q));
  }
  if (lost()) return;
  DeviceGuard guard(index_);
  for (auto& q : live) (void)cudaStreamSynchronize(q->stream());
}

// ---- Kernel support (kernels.h) ------------------------------------------------------

int LaunchContext::gather_blocks() const { return device_.gather_blocks(); }
bool LaunchContext::tune_gemm() const { return device_.tune_gemm(); }

void LaunchContext::count_gemm_plan() const {
  device_.gemm_plans.fetch_add(1, std::memory_order_relaxed);
}
void LaunchContext::count_gemm_tuning() const {
  device_.gemm_tunings.fetch_add(1, std::memory_order_relaxed);
}

void LaunchContext::fail(cudaError_t e, const char* call, const char* file, int line) const {
  device_.fail(e, call, file, line);
}

QueueResources::~QueueResources() { clear(); }

void QueueResources::clear() {
  MutexLock lock(mu_);
  for (size_t i = 0; i < owned_.size(); ++i) {
    slots_[i].store(nullptr, std::memory_order_release);
    owned_[i].reset();
  }
}

int QueueResources::next_kind() {
  // Relaxed: only uniqueness matters.
  static std::atomic<int> next{0};
  const int k = next.fetch_add(1, std::memory_order_relaxed);
  FL_INTERNAL_CHECK(k < kMaxKinds, "more than ", kMaxKinds,
                    " kinds of per-queue CUDA resources; raise QueueResources::kMaxKinds");
  return k;
}

}  // namespace flotilla::backend::cuda
