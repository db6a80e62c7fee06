// The state behind a Stream handle. Internal.
#pragma once

#include <atomic>
#include <exception>
#include <functional>
#include <memory>
#include <set>
#include <thread>
#include <utility>

#include "flotilla/backend/driver.h"
#include "flotilla/common/sync.h"

namespace flotilla {
class Device;
class EncodingLock;
}  // namespace flotilla

namespace flotilla::detail {

class StreamState {
 public:
  StreamState(Device& device, int index, std::unique_ptr<backend::Queue> queue);
  ~StreamState();

  void dispatch(const backend::Pipeline& pipeline, const backend::KernelArgs& args)
      FL_EXCLUDES(mu_);
  void commit() FL_EXCLUDES(mu_);
  void synchronize() FL_EXCLUDES(mu_);
  // Commits; returns the last committed buffer (null if none ever was) and
  // its commit number (1, 2, ... in commit order; 0: none).
  std::pair<std::shared_ptr<backend::CommandBuffer>, uint64_t> commit_for_fence() FL_EXCLUDES(mu_);
  // Rethrows the first asynchronous error, once.
  void rethrow_error() FL_EXCLUDES(mu_);
  // The same, only if that error came from a buffer committed at or before
  // commit number `seq` (a fence must not take a later buffer's failure).
  void rethrow_error_upto(uint64_t seq) FL_EXCLUDES(mu_);
  bool query() const FL_EXCLUDES(mu_);
  void add_callback(std::function<void()> fn) FL_EXCLUDES(mu_);
  // Event commands: end the encoder, append a signal or wait; a signal commits.
  void encode_signal(backend::SharedEvent& event, uint64_t value) FL_EXCLUDES(mu_);
  void encode_wait(backend::SharedEvent& event, uint64_t value) FL_EXCLUDES(mu_);
  // Recording (Note [Recording] in stream.cpp). begin: waits for any other
  // thread's recording to end, commits and waits for the stream's work, then
  // opens a recorder owned by the calling thread. end: finishes it (throws
  // the recording's failure); abort: drops it. Both let waiters go on.
  void begin_recording() FL_EXCLUDES(mu_);
  std::unique_ptr<backend::CommandList> end_recording() FL_EXCLUDES(mu_);
  void abort_recording() FL_EXCLUDES(mu_);
  // Encodes one replay of `list` (recorded on this stream), then applies the
  // sync mode as dispatch() does.
  void replay(const backend::CommandList& list) FL_EXCLUDES(mu_);
  // Records an asynchronous error of the buffer with commit number `seq`
  // (first one wins).
  void record_error(std::exception_ptr e, uint64_t seq) FL_EXCLUDES(mu_);

  int index() const { return index_; }
  // Stream::set_device_share and claim_device_share: the hint handed to the
  // backend queue is the largest of the stream's own setting and its claims.
  void set_device_share(int streams) FL_EXCLUDES(share_mu_);
  void add_share_claim(int streams) FL_EXCLUDES(share_mu_);
  void remove_share_claim(int streams) noexcept FL_EXCLUDES(share_mu_);
  int device_share() const { return share_.load(std::memory_order_relaxed); }
  uint64_t kernels() const { return kernels_total_.load(std::memory_order_relaxed); }
  uint64_t commits() const { return commits_total_.load(std::memory_order_relaxed); }

 private:
  // While another thread records on this stream, waits until it is done;
  // if the calling thread is the one recording, throws InvalidState naming
  // `api` (its work would be recorded, or would commit the recording).
  void wait_not_recording(const char* api) FL_REQUIRES(mu_);
  void apply_share() FL_REQUIRES(share_mu_);
  // Applies the sync mode after an encode; returns a buffer to wait for.
  std::shared_ptr<backend::CommandBuffer> after_encode() FL_REQUIRES(mu_);
  // kCommitAndWait, outside the lock: waits for `cb` (if any), rethrows.
  void wait_after_encode(const std::shared_ptr<backend::CommandBuffer>& cb) FL_EXCLUDES(mu_);
  // The recording is over (or never began): other threads' encodes go on.
  void stop_recording() FL_REQUIRES(mu_);
  // `api` names the caller in the ShutDown error of a device shutting down.
  void ensure_buffer(const char* api) FL_REQUIRES(mu_);
  void ensure_encoder(const char* api) FL_REQUIRES(mu_);
  void end_encoder() FL_REQUIRES(mu_);
  // Commits the current buffer, if any; returns the last committed buffer.
  std::shared_ptr<backend::CommandBuffer> commit_locked() FL_REQUIRES(mu_);

  Device& device_;
  EncodingLock& encoding_lock_;
  const int index_;
  const std::unique_ptr<backend::Queue> queue_;

  Mutex share_mu_;  // guards base_share_ and share_claims_ (the device-share hint)
  int base_share_ FL_GUARDED_BY(share_mu_) = 1;
  std::multiset<int> share_claims_ FL_GUARDED_BY(share_mu_);
  std::atomic<int> share_{1};  // what apply_share() last handed the queue; relaxed: a hint

  // Serialises the callers sharing this stream; guards its encoding state.
  mutable Mutex mu_;
  std::shared_ptr<backend::CommandBuffer> cb_ FL_GUARDED_BY(mu_);
  backend::ComputeEncoder* encoder_ FL_GUARDED_BY(mu_) = nullptr;  // owned by cb_
  int kernels_in_cb_ FL_GUARDED_BY(mu_) = 0;
  std::shared_ptr<backend::CommandBuffer> last_committed_ FL_GUARDED_BY(mu_);
  std::exception_ptr error_ FL_GUARDED_BY(mu_);
  uint64_t error_seq_ FL_GUARDED_BY(mu_) = 0;      // commit number of error_'s buffer
  uint64_t committed_seq_ FL_GUARDED_BY(mu_) = 0;  // buffers committed so far
  // Recording: the thread that records (set from begin_recording until
  // end/abort), and its recorder (opened once the stream's work is done).
  bool recording_ FL_GUARDED_BY(mu_) = false;
  std::thread::id recording_thread_ FL_GUARDED_BY(mu_);
  std::unique_ptr<backend::CommandRecorder> recorder_ FL_GUARDED_BY(mu_);
  CondVar not_recording_;  // signalled (under mu_) when recording_ becomes false

  // Relaxed: statistics.
  std::atomic<uint64_t> kernels_total_{0};
  std::atomic<uint64_t> commits_total_{0};
};

}  // namespace flotilla::detail
