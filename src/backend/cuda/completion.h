// The CUDA driver's completion threads. Internal.
//
// Note [Completion threads]
// Each device has one or a few completion threads (Config::
// cuda_completion_threads); each queue belongs to one of them. A thread
// watches the oldest in-flight command buffer of each of its active queues
// (buffers of a queue complete in order) through the queue's completion word
// (Note [Completion words]: a load of host memory, no CUDA call) or, where
// those are unavailable, cudaEventQuery. For each completed buffer it marks
// the signals reached, runs the completion handlers and wakes the waiters.
// Handlers therefore run on a Flotilla-owned thread that may call CUDA,
// never inside a cudaLaunchHostFunc callback (where calling CUDA is
// forbidden and which would stall the stream).
//
// Latency versus CPU: while any buffer is pending the thread polls, pausing
// briefly between unproductive rounds (or, with Config::
// cuda_completion_sleep, sleeping that long: the core goes to the host's
// other threads, and a completion is seen up to that much later); with
// nothing pending it spins a further 200 us for new work (back-to-back
// round trips never pay a wake-up), then sleeps on a condition variable
// until a submit wakes it. A thread asleep between polls sees a newly
// active queue, a stop or a device loss when its sleep ends (at most 1 ms).
//
// Device loss: once the device is marked lost, every pending and later
// buffer of the thread's queues is finished at once with the DeviceLost
// error (handlers run once with it, waiters wake).
//
// Lifetime: owned and joined by the driver (shutdown or destructor).
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "flotilla/common/sync.h"

namespace flotilla::backend::cuda {

class DeviceCore;
class QueueCore;

class CompletionThread {
 public:
  // `sleep`: Config::cuda_completion_sleep (0: spin between polls).
  CompletionThread(DeviceCore& device, int number, std::chrono::microseconds sleep);
  ~CompletionThread() { stop(); }
  CompletionThread(const CompletionThread&) = delete;
  CompletionThread& operator=(const CompletionThread&) = delete;

  // Hands a queue that just became active (its first in-flight buffer).
  void enqueue(std::shared_ptr<QueueCore> queue) FL_EXCLUDES(mu_);
  // Wakes the thread (device lost).
  void wake() FL_EXCLUDES(mu_);
  // Finishes what is pending, then joins. Idempotent.
  void stop() FL_EXCLUDES(mu_);
  // True on this completion thread (a handler calling back into the driver).
  bool is_this_thread() const;

 private:
  void run() FL_EXCLUDES(mu_);
  // Polls the working set once; true if a buffer finished.
  bool poll(std::vector<std::shared_ptr<QueueCore>>& working);
  bool take_incoming(std::vector<std::shared_ptr<QueueCore>>& working) FL_EXCLUDES(mu_);

  DeviceCore& device_;
  const int number_;
  const std::chrono::microseconds sleep_;
  Mutex mu_;
  CondVar cv_;
  std::vector<std::shared_ptr<QueueCore>> incoming_ FL_GUARDED_BY(mu_);
  bool sleeping_ FL_GUARDED_BY(mu_) = false;
  bool stop_ FL_GUARDED_BY(mu_) = false;
  // release/acquire: a hint that incoming_ (read under mu_) is non-empty or
  // that stop/wake was asked, so the spinning thread need not take the lock.
  std::atomic<bool> poke_{false};
  std::thread thread_;  // started by the constructor, joined by stop()
  Mutex join_mu_;       // serialises stop() callers
};

}  // namespace flotilla::backend::cuda
