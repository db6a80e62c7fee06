#include "backend/cuda/completion.h"

#include <cuda_runtime_api.h>
#include <sys/prctl.h>

#include <string>

#include "backend/cuda/command_buffer.h"
#include "backend/cuda/device_core.h"
#include "backend/cuda/spin.h"
#include "flotilla/common/error.h"
#include "flotilla/common/thread_name.h"

namespace flotilla::backend::cuda {

namespace {

thread_local const CompletionThread* tls_current = nullptr;

// Note [Completion threads]: the pause between unproductive polls (with
// completion events; with completion words it is a few spin-loop hints;
// with Config::cuda_completion_sleep, that sleep instead), and how long an
// idle thread waits for new work before it sleeps.
constexpr auto kPollPause = std::chrono::microseconds(1);
constexpr auto kIdleSpin = std::chrono::microseconds(200);

}  // namespace

CompletionThread::CompletionThread(DeviceCore& device, int number, std::chrono::microseconds sleep)
    : device_(device), number_(number), sleep_(sleep) {
  thread_ = std::thread([this] { run(); });
}

bool CompletionThread::is_this_thread() const { return tls_current == this; }

void CompletionThread::enqueue(std::shared_ptr<QueueCore> queue) {
  MutexLock lock(mu_);
  incoming_.push_back(std::move(queue));
  poke_.store(true, std::memory_order_release);
  if (sleeping_) cv_.notify_one();
}

void CompletionThread::wake() {
  MutexLock lock(mu_);
  poke_.store(true, std::memory_order_release);
  cv_.notify_one();
}

void CompletionThread::stop() {
  MutexLock join(join_mu_);
  {
    MutexLock lock(mu_);
    stop_ = true;
    poke_.store(true, std::memory_order_release);
    cv_.notify_one();
  }
  if (thread_.joinable() && !is_this_thread()) thread_.join();
}

bool CompletionThread::take_incoming(std::vector<std::shared_ptr<QueueCore>>& working) {
  if (!poke_.load(std::memory_order_acquire)) return false;
  MutexLock lock(mu_);
  poke_.store(false, std::memory_order_relaxed);
  for (auto& q : incoming_) working.push_back(std::move(q));
  incoming_.clear();
  return stop_;
}

namespace {

// A pending buffer whose completion word has not moved for this long is
// checked with cudaStreamQuery, which reports a fault (Note [Completion words]).
constexpr auto kStallCheck = std::chrono::microseconds(200);
// How many stall checks must find the stream idle with the word unmoved
// before the buffer counts as done anyway (5 ms: a fault is reported by then).
constexpr int kIdleChecks = 25;

}  // namespace

bool CompletionThread::poll(std::vector<std::shared_ptr<QueueCore>>& working) {
  bool progressed = false;
  for (size_t i = 0; i < working.size();) {
    QueueCore& q = *working[i];
    bool idle = false;
    for (;;) {
      auto cb = q.front_or_idle();
      if (!cb) {
        idle = true;
        break;
      }
      if (device_.lost()) {
        q.pop_front();
        cb->finish(device_.error());
        progressed = true;
        continue;
      }
      // Is the oldest buffer done? A load of host memory when completion
      // words are on; CUDA is asked only when it stalls (or without words).
      cudaError_t r = cudaSuccess;
      const char* call = "cudaEventQuery(completion event)";
      if (const uint64_t seq = cb->completion_seq()) {
        if (q.done_seq() < seq) {
          const auto now = std::chrono::steady_clock::now();
          if (q.stall_since == std::chrono::steady_clock::time_point{}) q.stall_since = now;
          if (now - q.stall_since < kStallCheck) break;  // pending, no CUDA call
          q.stall_since = now;
          call = "cudaStreamQuery(stream)";
          r = cudaStreamQuery(q.stream());
          // The stream says it is idle, yet the word has not moved: the write
          // is about to land, or a fault aborted the work and is not reported
          // yet (seen on an H100: other streams' queries report it first).
          // Believe "idle" only when it persists.
          if (r == cudaSuccess && q.done_seq() < seq && ++q.idle_checks < kIdleChecks) break;
        }
      } else {
        r = cudaEventQuery(cb->completion_event());
      }
      if (r == cudaErrorNotReady) break;  // the queue's later buffers are not done either
      if (r == cudaSuccess) {
        q.stall_since = {};
        q.idle_checks = 0;
        q.pop_front();
        cb->finish(nullptr);
        progressed = true;
        continue;
      }
      if (is_sticky(r)) {
        // The next round of this loop fails this buffer and every other one.
        device_.mark_lost(device_.lost_error(r, call, __FILE__, __LINE__));
        continue;
      }
      // Not sticky (the CUDA runtime unloading at exit, say): this buffer's
      // fate is unknown, so it fails with the error, and the rest go on.
      std::exception_ptr error;
      try {
        throw_cuda_error(r, detail::str_cat("[", device_.label(), "]").c_str(), call, __FILE__,
                         __LINE__);
      } catch (...) {
        error = std::current_exception();
      }
      q.stall_since = {};
      q.idle_checks = 0;
      q.pop_front();
      cb->finish(error);
      progressed = true;
    }
    if (idle) {
      working[i] = std::move(working.back());
      working.pop_back();
    } else {
      ++i;
    }
  }
  return progressed;
}

void CompletionThread::run() {
  tls_current = this;
  detail::name_this_thread(detail::str_cat("fl-cuda", device_.index(), "-done", number_));
  // Events of this device are queried from here; the result is ignored
  // (a failure shows up as the queries' own errors).
  (void)cudaSetDevice(device_.index());
  // A sleep of a few microseconds would otherwise last the default 50 us
  // timer slack longer.
  if (sleep_.count() > 0) (void)prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);
  std::vector<std::shared_ptr<QueueCore>> working;
  auto poked = [this] { return poke_.load(std::memory_order_acquire); };
  for (;;) {
    const bool stopping = take_incoming(working);
    const bool progressed = poll(working);
    if (stopping && working.empty()) {
      MutexLock lock(mu_);
      if (incoming_.empty()) return;
      continue;
    }
    if (progressed) continue;
    if (!working.empty()) {
      if (sleep_.count() > 0) {
        std::this_thread::sleep_for(sleep_);  // Config::cuda_completion_sleep
      } else if (device_.words().enabled()) {
        // Polling is a few loads of host memory: pause only briefly.
        for (int k = 0; k < 8; ++k) cpu_relax();
      } else {
        spin_until(poked, kPollPause);  // each poll is a CUDA call: leave the lock alone a while
      }
      continue;
    }
    if (spin_until(poked, kIdleSpin)) continue;
    MutexLock lock(mu_);
    if (!incoming_.empty() || stop_ || poked()) continue;
    sleeping_ = true;
    cv_.wait(mu_, [&]() FL_REQUIRES(mu_) { return !incoming_.empty() || stop_ || poked(); });
    sleeping_ = false;
  }
}

}  // namespace flotilla::backend::cuda
