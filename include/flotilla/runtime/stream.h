// Stream: an ordered lane of work on a device (the seed's S0..S31).
//
// A Stream is a cheap value handle {device, index}; its state (a driver
// queue, the current command buffer and its open compute encoder) lives in
// the device's StreamPool. Consecutive kernels coalesce into the open
// encoder until a commit, which the sync mode decides (Config::sync_mode):
// none, commit, commit-and-wait, or adaptive (every N kernels).
//
// Thread safety: any thread may use any Stream. Callers sharing one stream
// (round-robin policy) are serialised by the stream's own mutex, so its
// command buffer is never used by two threads at once; work from one thread
// keeps its order. Lifetime: a Stream must not outlive its Device.
//
// Note [Uncommitted work at thread exit]
// Work a thread encoded is never lost. When a thread exits, Flotilla commits
// the open command buffer of the thread's current stream on each device (it
// does not wait for it). Device::synchronize() and Device::shutdown() commit
// every stream. So a thread that encodes and exits leaves work that runs.
//
// Errors: a failed command buffer or a throwing completion callback records
// the first error on the stream; the next synchronize() rethrows it once.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>

#include "flotilla/backend/driver.h"

namespace flotilla {

class Device;
class DeviceShareClaim;
class StreamFence;
class Recording;
namespace detail {
class StreamState;
struct RecordingState;
}  // namespace detail

class Stream {
 public:
  Stream(Device& device, int index) : device_(&device), index_(index) {}

  Device& device() const { return *device_; }
  int index() const { return index_; }
  bool is_default() const { return index_ == 0; }
  bool operator==(const Stream& o) const { return device_ == o.device_ && index_ == o.index_; }
  bool operator!=(const Stream& o) const { return !(*this == o); }

  // Encodes one kernel into the stream's open encoder (opening one, and a
  // command buffer, if needed), then applies the sync mode.
  void dispatch(const backend::Pipeline& pipeline, const backend::KernelArgs& args);
  void dispatch(std::string_view kernel, const backend::KernelArgs& args);

  // Ends the open encoder and commits the command buffer, if any.
  void commit();
  // Commits, then blocks until all work committed to the stream has run.
  // Rethrows the stream's first asynchronous error, once.
  void synchronize();
  // True if all work committed so far has finished (does not commit).
  bool query() const;
  // Commits, and returns a fence on the work committed so far: a point to
  // wait for later without waiting for what is encoded after it (a
  // synchronize() would). For pipelines that keep several batches in flight
  // on one stream.
  StreamFence fence();
  // Runs `fn` on a driver thread once the work encoded so far has run
  // (commits the stream). If `fn` throws, the error reaches synchronize().
  void add_callback(std::function<void()> fn);

  // Records the kernels `body` encodes on this stream from the calling
  // thread, without running them, for replay() (Note [Recording] in
  // stream.cpp; a CUDA graph on CUDA). First commits the stream and waits
  // for its work. While `body` runs, other threads' work on this stream
  // waits, and the calling thread may only dispatch on it (commit,
  // synchronize, fence, callbacks, events, replays and a nested record
  // throw InvalidState).
  // Device memory the calling thread allocates on this stream meanwhile is
  // kept by the Recording until it is destroyed, since replays use the same
  // addresses. If `body` throws, nothing is recorded and the error
  // propagates; a kernel refusing its arguments throws from record() (CUDA)
  // or fails the command buffers that replay it (CPU).
  Recording record(const std::function<void()>& body);
  // Encodes one replay of `recording` (made by record() on this stream, else
  // InvalidArgument): its kernels run again, in order, on the same memory,
  // ordered with the stream's other work. Applies the sync mode.
  void replay(const Recording& recording);

  // A hint: `streams` streams, this one included, run work on the device at
  // the same time, so kernels encoded from now on may size their work for
  // that share of it. On CUDA, f32 GEMMs of 64 to 512 rows are then planned
  // by cuBLASLt for sm_count / streams SMs (Note [GEMMs for a share of the
  // device] in src/backend/cuda/nn_kernels.cu); other kernels and backends
  // ignore it. >= 1, else InvalidArgument; 1, the default, plans for the
  // whole device. It changes speed and, as any other choice of algorithm,
  // the last bits of f32 sums, never correctness. A recording keeps the
  // plans it was recorded with.
  //
  // A pooled stream is shared by whoever holds it, so the hint is the
  // largest of this setting and the claims held on the stream
  // (claim_device_share: a BatchQueue claims its share on its workers'
  // streams while it lives); device_share() returns that.
  void set_device_share(int streams);
  [[nodiscard]] DeviceShareClaim claim_device_share(int streams);
  int device_share() const;

  // Statistics.
  uint64_t kernels_encoded() const;
  uint64_t commits() const;

  detail::StreamState& state() const;

 private:
  Device* device_;
  int index_;
};

// Stream::claim_device_share's claim: while it lives, the stream's hint is
// at least its share; destroying (or release()) takes it back. Movable, not
// copyable. It must not outlive the stream's device.
class DeviceShareClaim {
 public:
  DeviceShareClaim() = default;
  DeviceShareClaim(DeviceShareClaim&& o) noexcept;
  DeviceShareClaim& operator=(DeviceShareClaim&& o) noexcept;
  DeviceShareClaim(const DeviceShareClaim&) = delete;
  DeviceShareClaim& operator=(const DeviceShareClaim&) = delete;
  ~DeviceShareClaim() { release(); }
  void release() noexcept;
  bool held() const { return state_ != nullptr; }

 private:
  friend class Stream;
  DeviceShareClaim(detail::StreamState* state, int share) : state_(state), share_(share) {}
  detail::StreamState* state_ = nullptr;
  int share_ = 0;
};

// A point in one stream's committed work (Stream::fence()). A value: copies
// refer to the same point; a default-made fence is already reached.
//
// wait() blocks until the point is reached, then rethrows the stream's first
// asynchronous error, once, as Stream::synchronize() does, but only if it
// came from work committed at or before the fence (a later buffer's failure
// is left for a later fence or synchronize); if there was none but the
// fenced command buffer itself failed, it throws that failure. So a pipeline
// that waits for its fences in order sees each failure at the first fence
// after it, never at an earlier one. reached() does not block or throw.
//
// Thread safety: any thread; wait() from several threads at once is allowed
// (each error is rethrown to one of them). Lifetime: not past its Device.
class StreamFence {
 public:
  StreamFence() = default;
  bool reached() const;
  void wait() const;

 private:
  friend class Stream;
  StreamFence(detail::StreamState* state, std::shared_ptr<backend::CommandBuffer> cb, uint64_t seq)
      : state_(state), cb_(std::move(cb)), seq_(seq) {}
  detail::StreamState* state_ = nullptr;
  std::shared_ptr<backend::CommandBuffer> cb_;  // null: nothing was committed yet
  uint64_t seq_ = 0;                            // cb_'s commit number on its stream
};

// What Stream::record() made: a value; copies share one recording. Replays
// read and write the memory its kernels named when recorded, so fill the
// inputs in place before each replay. Thread safety: const members from any
// thread. Lifetime: not past its Device; destroying it while replays are in
// flight is allowed (its memory then returns to the stream, stream-ordered).
class Recording {
 public:
  Recording() = default;  // empty: replay() refuses it
  bool valid() const { return state_ != nullptr; }
  // Kernels a replay runs.
  size_t kernels() const;
  // The stream it replays on.
  Stream stream() const;

 private:
  friend class Stream;
  explicit Recording(std::shared_ptr<const detail::RecordingState> s) : state_(std::move(s)) {}
  std::shared_ptr<const detail::RecordingState> state_;
};

// Makes `stream` the calling thread's current stream on its device for the
// scope; restores the previous one (noexcept) at the end.
class StreamGuard {
 public:
  explicit StreamGuard(const Stream& stream);
  ~StreamGuard();
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  Device* device_;
  int previous_;  // -1: the thread had no current stream yet
};

}  // namespace flotilla
