// The state of one CUDA device that the driver's objects share: the lost
// flag, the pooled CUDA events, the device clock, commit bookkeeping and
// statistics. Internal to the CUDA backend.
//
// Lifetime: held by shared_ptr by the driver, its queues, command buffers,
// shared events and buffers, so whichever is released last (possibly on a
// completion thread) frees it. It owns no thread.
// Thread safety: all members may be called from any thread.
#pragma once

#include <cuda.h>  // types only: the driver API is reached through entry points
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "flotilla/common/config.h"
#include "flotilla/common/sync.h"

namespace flotilla::backend::cuda {

class DeviceCore;
class CompletionThread;
class QueueCore;

// CUDA events kept for reuse: creating one costs microseconds and takes a
// driver lock, so a command buffer takes one from here instead.
class EventPool {
 public:
  explicit EventPool(unsigned flags) : flags_(flags) {}
  ~EventPool();
  EventPool(const EventPool&) = delete;
  EventPool& operator=(const EventPool&) = delete;

  // The device must be current on the calling thread.
  cudaEvent_t take(DeviceCore& device) FL_EXCLUDES(mu_);
  void give(cudaEvent_t e) noexcept FL_EXCLUDES(mu_);
  void prefill(DeviceCore& device, int n) FL_EXCLUDES(mu_);

 private:
  const unsigned flags_;
  Mutex mu_;
  std::vector<cudaEvent_t> free_ FL_GUARDED_BY(mu_);
};

// Turns completed timing events into nanoseconds on one clock per device.
//
// Note [Device clock]
// cudaEventElapsedTime gives float milliseconds between two events, so times
// are measured from an anchor event whose time is known. A float keeps about
// 0.1 us of precision a second away from its anchor, so the anchor is moved
// forward (a fresh event, timed against the old one) once it is a second old.
// The clock starts at the host's steady_clock at driver creation.
class TimeBase {
 public:
  void init(DeviceCore& device) FL_EXCLUDES(mu_);
  // A private stream (for set-up work such as CompletionWords::init).
  cudaStream_t stream() FL_EXCLUDES(mu_);
  // `e` must have been recorded with timing and have completed.
  int64_t time_ns(DeviceCore& device, cudaEvent_t e) FL_EXCLUDES(mu_);

 private:
  void rebase(DeviceCore& device) FL_REQUIRES(mu_);

  Mutex mu_;
  StreamHandle stream_ FL_GUARDED_BY(mu_);
  EventHandle anchor_ FL_GUARDED_BY(mu_);
  int64_t anchor_ns_ FL_GUARDED_BY(mu_) = 0;
  std::chrono::steady_clock::time_point anchor_host_ FL_GUARDED_BY(mu_);
};

// Note [Completion words]
// How a completion thread learns that a command buffer finished, without a
// CUDA call: each queue owns one 64-bit word of pinned, device-mapped host
// memory, and commit() appends a stream memory operation (cuStreamWriteValue64,
// reached through cudaGetDriverEntryPoint, so nothing links libcuda) that
// writes the buffer's sequence number there once everything before it on the
// stream has run. Completion is then a plain load of host memory: the
// completion thread polls without taking CUDA's locks, which launching
// threads need (polling with cudaEventQuery slowed launches down), and it
// sees completion within a few hundred nanoseconds. Only writes are used,
// never stream waits on memory, which CUDA's scheduler cannot see and which
// can deadlock streams sharing a hardware queue.
// A buffer whose word does not move for 200 us is checked with
// cudaStreamQuery: that reports a fault (the device is lost), or an idle
// stream, which is believed only if it stays so for 5 ms with the word still
// unmoved (after a fault on an H100, the query on a stream whose work was
// killed said "idle" while queries on other streams reported the fault).
// Where the memory operation is unavailable (checked once per device),
// completion falls back to a pooled CUDA event per buffer.
class CompletionWords {
 public:
  using WriteFn = CUresult (*)(CUstream stream, CUdeviceptr addr, cuuint64_t value,
                               unsigned int flags);
  struct Word {
    uint64_t* host = nullptr;  // read by the completion thread
    CUdeviceptr device = 0;    // written by the GPU
  };
  ~CompletionWords();
  // Finds cuStreamWriteValue64 and checks it works on `stream`; false if not.
  bool init(DeviceCore& device, cudaStream_t stream) FL_EXCLUDES(mu_);
  bool enabled() const { return write_ != nullptr; }
  WriteFn write() const { return write_; }
  // A zeroed word (pinned memory is taken in slabs, never on a launch path).
  Word take(DeviceCore& device) FL_EXCLUDES(mu_);
  void give(Word w) noexcept FL_EXCLUDES(mu_);

 private:
  WriteFn write_ = nullptr;  // set once by init(), before any queue exists
  Mutex mu_;
  std::vector<void*> slabs_ FL_GUARDED_BY(mu_);
  std::vector<Word> free_ FL_GUARDED_BY(mu_);
};

class DeviceCore {
 public:
  // Makes the device's primary context current and reads its properties.
  DeviceCore(int index, const Config& config);
  ~DeviceCore();
  DeviceCore(const DeviceCore&) = delete;
  DeviceCore& operator=(const DeviceCore&) = delete;

  int index() const { return index_; }
  const std::string& label() const { return label_; }  // "cuda:0"
  int sm_count() const { return sm_count_; }
  // Config::cuda_wait_spin: how long a command buffer's waiter spins.
  std::chrono::microseconds wait_spin() const { return wait_spin_; }
  // Config::cuda_gather_blocks: the most blocks a gather_rows launch uses.
  int gather_blocks() const { return gather_blocks_; }
  // Config::cuda_tune_gemm.
  bool tune_gemm() const { return tune_gemm_; }

  // ---- Failure ----------------------------------------------------------------
  bool lost() const { return lost_.load(std::memory_order_acquire); }
  std::exception_ptr error() const FL_EXCLUDES(mu_);
  // Records the device's sticky failure (first one wins) and wakes the
  // completion threads, which fail every pending command buffer.
  void mark_lost(std::exception_ptr e) FL_EXCLUDES(mu_);
  // The error for a failed CUDA call (cuda_check.h); marks the device lost
  // first if the error is sticky.
  [[noreturn]] void fail(cudaError_t e, const char* call, const char* file, int line);
  // The DeviceLost for `e` without throwing (completion threads).
  std::exception_ptr lost_error(cudaError_t e, const char* call, const char* file, int line);
  // Throws the device's DeviceLost, or ShutDown once shutdown began.
  void check_usable(const char* api) const {
    if (lost()) [[unlikely]]
      std::rethrow_exception(error());
    if (stopped_.load(std::memory_order_acquire)) [[unlikely]]
      throw_shut_down(api);
  }
  [[noreturn]] void throw_shut_down(const char* api) const;

  // ---- Validation -------------------------------------------------------------
  // Counts the violation and throws ValidationError(rule, message).
  [[noreturn]] void violation(const char* rule, const std::string& message);

  // ---- Commits in flight -----------------------------------------------------
  // Counts a commit in flight; throws ShutDown once stop_commits() ran.
  void begin_commit(const char* api);
  // Undoes begin_commit for a commit that failed before reaching its queue.
  void abort_commit() noexcept;
  void end_commit(bool ok, uint64_t kernels) noexcept;
  uint64_t in_flight() const { return in_flight_.load(std::memory_order_acquire); }
  // Refuses further commits; the ones in flight still complete.
  void stop_commits() { stopped_.store(true, std::memory_order_seq_cst); }

  // ---- Completion threads ------------------------------------------------------
  void set_completion_threads(std::vector<CompletionThread*> threads) FL_EXCLUDES(mu_);
  CompletionThread* completion_thread_for(int queue_id) FL_EXCLUDES(mu_);

  // ---- Queues -----------------------------------------------------------------
  void register_queue(const std::shared_ptr<QueueCore>& q) FL_EXCLUDES(mu_);
  // Waits for every live queue's stream: work encoded but never committed
  // was launched at encoding time (Note [Command buffers on CUDA]) and
  // finishes too. Errors are ignored (a lost device has nothing to finish).
  void synchronize_queues() FL_EXCLUDES(mu_);

  EventPool& sync_events() { return sync_events_; }
  EventPool& timing_events() { return timing_events_; }
  TimeBase& clock() { return clock_; }
  CompletionWords& words() { return words_; }

  // Relaxed: ids only need to be unique.
  std::atomic<uint64_t> next_buffer_id{1};
  std::atomic<int> next_queue_id{1};
  // Relaxed: statistics, read for reports only.
  std::atomic<uint64_t> committed{0}, completed{0}, kernels{0}, violations{0}, handler_errors{0},
      gemm_plans{0}, gemm_tunings{0};

 private:
  const int index_;
  const std::string label_;
  int sm_count_ = 0;
  const std::chrono::microseconds wait_spin_;
  const int gather_blocks_;
  const bool tune_gemm_;

  mutable Mutex mu_;
  std::exception_ptr error_ FL_GUARDED_BY(mu_);
  std::vector<CompletionThread*> completion_ FL_GUARDED_BY(mu_);
  std::vector<std::weak_ptr<QueueCore>> queues_ FL_GUARDED_BY(mu_);
  // acquire/release: a reader that sees `lost_` set also sees error_ (which is
  // read under mu_ anyway).
  std::atomic<bool> lost_{false};
  // seq_cst, with in_flight_: begin_commit increments then checks stopped_,
  // shutdown sets stopped_ then waits for in_flight_ == 0 (Dekker's pattern:
  // one of the two sees the other, so no commit slips past a drain).
  std::atomic<bool> stopped_{false};
  std::atomic<uint64_t> in_flight_{0};

  EventPool sync_events_{cudaEventDisableTiming};
  EventPool timing_events_{cudaEventDefault};
  TimeBase clock_;
  CompletionWords words_;
};

}  // namespace flotilla::backend::cuda
