// Queues, command buffers and encoders of the CUDA driver. Internal.
//
// Note [Command buffers on CUDA]
// A queue is one non-blocking CUDA stream, created once. A command buffer is
// an ordered batch of commands on that stream: each kernel is launched when
// it is encoded (the launch is the expensive part of a small op, and doing it
// at once keeps it off the commit path), event signals and waits are
// recorded when encoded. commit() records one pooled CUDA event after the
// batch (or reuses the event of a signal encoded last) and hands the buffer
// to the queue's completion thread, which sees the event complete, marks the
// signals reached, runs the completion handlers and wakes waiters.
//
// What differs from Metal, and why it does not matter to the runtime:
// encoded work runs even if the buffer is never committed (the runtime always
// commits), and two buffers of one queue encoded at once interleave in
// encoding order (the runtime encodes one buffer per stream at a time, under
// the stream's lock).
//
// Validation (the CPU driver's rule names, DESIGN.md §3): encode-after-commit,
// encoder-already-open, encoder-ended, handler-after-commit, commit-twice,
// commit-with-open-encoder, wait-not-committed, encode-while-recording.
//
// Note [Recording on CUDA]
// A CommandRecorder is a stream capture of the queue's own stream, in
// relaxed mode (other threads' CUDA calls, and this thread's allocations, are
// not restricted); kernels launch onto it as usual, with the queue's
// resources (its cuBLASLt workspace is baked into the graph, which is why a
// list replays only on its queue: replays and the queue's other work stay in
// stream order). finish() ends the capture and instantiates the graph; a
// replay is one cudaGraphLaunch. While the capture is open, command buffers
// of the queue refuse to encode (encode-while-recording): their work would
// land in the graph instead of running. Each command buffer guards its
// state with its own (uncontended) mutex, so racing misuse is reported and
// never corrupts memory; the CUDA driver is thread-safe and has no
// device-wide encoding rule.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_core.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/shared_event.h"
#include "flotilla/backend/driver.h"
#include "flotilla/common/sync.h"

namespace flotilla::backend::cuda {

class CudaCommandBuffer;
class CompletionThread;

class CudaPipeline final : public Pipeline {
 public:
  CudaPipeline(std::string name, KernelFn fn) : name_(std::move(name)), fn_(fn) {}
  const std::string& name() const override { return name_; }
  KernelFn fn() const { return fn_; }

 private:
  std::string name_;
  KernelFn fn_;
};

// A queue's state, shared by its handle, its command buffers and its
// completion thread.
class QueueCore : public std::enable_shared_from_this<QueueCore> {
 public:
  QueueCore(std::shared_ptr<DeviceCore> device, int id, CompletionThread* completion);
  // Waits for the stream, destroys the queue's kernel resources and stream.
  ~QueueCore();

  int id() const { return id_; }
  DeviceCore& device() { return *device_; }
  const std::shared_ptr<DeviceCore>& device_shared() const { return device_; }
  cudaStream_t stream() const { return stream_.get(); }
  LaunchContext& launch_context() { return ctx_; }

  // Records `cb`'s completion event (or adopts `reuse`, an event recorded
  // last on this stream) and appends `cb` to the in-flight list, as one step
  // so the list stays in stream order. The device must be current.
  void submit(const std::shared_ptr<CudaCommandBuffer>& cb, cudaEvent_t reuse) FL_EXCLUDES(mu_);

  // A recorder is open on this queue (Note [Recording on CUDA]).
  bool try_start_recording() { return !recording_.exchange(true, std::memory_order_acq_rel); }
  void end_recording() { recording_.store(false, std::memory_order_release); }
  bool recording() const { return recording_.load(std::memory_order_acquire); }

  // Completion-thread side (one thread per queue).
  // The oldest in-flight buffer, or nullptr; then the queue is idle until
  // the next submit hands it to the completion thread again.
  std::shared_ptr<CudaCommandBuffer> front_or_idle() FL_EXCLUDES(mu_);
  void pop_front() FL_EXCLUDES(mu_);
  // The last sequence number the GPU wrote (Note [Completion words]).
  uint64_t done_seq() const { return __atomic_load_n(word_.host, __ATOMIC_ACQUIRE); }
  // Since when the oldest buffer has been seen pending without progress, and
  // how many stall checks found the stream idle with the word unmoved; read
  // and written by the queue's completion thread only.
  std::chrono::steady_clock::time_point stall_since;
  int idle_checks = 0;

 private:
  std::shared_ptr<DeviceCore> device_;
  const int id_;
  StreamHandle stream_;
  QueueResources resources_;
  LaunchContext ctx_;
  CompletionThread* const completion_;  // owned by the driver, which outlives queues
  CompletionWords::Word word_;          // empty when completion uses events

  Mutex mu_;
  std::deque<std::shared_ptr<CudaCommandBuffer>> in_flight_ FL_GUARDED_BY(mu_);
  bool active_ FL_GUARDED_BY(mu_) = false;  // handed to the completion thread
  uint64_t next_seq_ FL_GUARDED_BY(mu_) = 0;
  std::atomic<bool> recording_{false};  // acquire/release: see recording()
};

// A recorded list: an instantiated CUDA graph.
class CudaCommandList final : public CommandList {
 public:
  CudaCommandList(std::shared_ptr<DeviceCore> device, cudaGraph_t graph, cudaGraphExec_t exec,
                  int queue_id, size_t kernels)
      : device_(std::move(device)),
        graph_(graph),
        exec_(exec),
        queue_id_(queue_id),
        kernels_(kernels) {}
  // CUDA frees an executable graph that is still running once it completes.
  ~CudaCommandList() override;
  CudaCommandList(const CudaCommandList&) = delete;
  CudaCommandList& operator=(const CudaCommandList&) = delete;
  size_t kernel_count() const override { return kernels_; }
  int queue_id() const override { return queue_id_; }
  cudaGraphExec_t exec() const { return exec_; }

 private:
  std::shared_ptr<DeviceCore> device_;
  cudaGraph_t graph_;
  cudaGraphExec_t exec_;
  const int queue_id_;
  const size_t kernels_;
};

// A stream capture of its queue (Note [Recording on CUDA]).
class CudaRecorder final : public CommandRecorder {
 public:
  // Begins the capture; the queue must have been marked recording.
  explicit CudaRecorder(std::shared_ptr<QueueCore> queue);
  ~CudaRecorder() override;  // without finish(): ends the capture, drops the graph
  void dispatch(const Pipeline& pipeline, const KernelArgs& args) override;
  std::unique_ptr<CommandList> finish() override;

 private:
  // Ends the capture (once); returns the graph or nullptr, and the error.
  cudaGraph_t end_capture(cudaError_t* err);

  std::shared_ptr<QueueCore> queue_;
  // Single-threaded object (driver.h): no lock.
  size_t kernels_ = 0;
  std::exception_ptr error_;  // a kernel refused its arguments
  bool capturing_ = true;
  bool finished_ = false;
};

class CudaQueue final : public Queue {
 public:
  explicit CudaQueue(std::shared_ptr<QueueCore> core) : core_(std::move(core)) {}
  std::shared_ptr<CommandBuffer> new_command_buffer() override;
  std::unique_ptr<CommandRecorder> new_recorder() override;
  int id() const override { return core_->id(); }
  void set_device_share(int queues) override;

 private:
  std::shared_ptr<QueueCore> core_;
};

class CudaEncoder final : public ComputeEncoder {
 public:
  explicit CudaEncoder(CudaCommandBuffer& cb) : cb_(cb) {}
  void dispatch(const Pipeline& pipeline, const KernelArgs& args) override;
  void execute(const CommandList& list) override;
  void end_encoding() override;
  bool is_encoding() const override { return encoding_.load(std::memory_order_acquire); }
  void mark_ended() { encoding_.store(false, std::memory_order_release); }

 private:
  CudaCommandBuffer& cb_;
  // acquire/release: is_encoding() is read without the buffer's lock.
  std::atomic<bool> encoding_{true};
};

class CudaCommandBuffer final : public CommandBuffer,
                                public std::enable_shared_from_this<CudaCommandBuffer> {
 public:
  CudaCommandBuffer(std::shared_ptr<QueueCore> queue, uint64_t id);
  ~CudaCommandBuffer() override;

  ComputeEncoder& compute_encoder() override FL_EXCLUDES(mu_);
  void encode_signal(SharedEvent& event, uint64_t value) override FL_EXCLUDES(mu_);
  void encode_wait(SharedEvent& event, uint64_t value) override FL_EXCLUDES(mu_);
  void add_completed_handler(Handler handler) override FL_EXCLUDES(mu_);
  void commit() override FL_EXCLUDES(mu_);
  void wait_until_completed() override FL_EXCLUDES(mu_);
  CommandBufferStatus status() const override {
    return static_cast<CommandBufferStatus>(status_.load(std::memory_order_acquire));
  }
  std::exception_ptr error() const override FL_EXCLUDES(mu_);
  size_t kernel_count() const override FL_EXCLUDES(mu_);

  // Encoder side.
  void add_kernel(CudaEncoder& enc, const CudaPipeline& p, const KernelArgs& args) FL_EXCLUDES(mu_);
  void add_list(CudaEncoder& enc, const CudaCommandList& list) FL_EXCLUDES(mu_);
  void end_encoder(CudaEncoder& enc) FL_EXCLUDES(mu_);
  int queue_id() const { return queue_->id(); }

  // Completion side: called once, by the queue's completion thread, after
  // the completion event finished (`failure` null) or the device was lost.
  void finish(std::exception_ptr failure) FL_EXCLUDES(mu_);
  // Written by QueueCore::submit before the buffer is published to the
  // completion thread, read only by it afterwards: the sequence number its
  // queue's completion word reaches when it is done (Note [Completion
  // words]), or 0 and an event to query instead.
  uint64_t completion_seq() const { return completion_seq_; }
  cudaEvent_t completion_event() const { return completion_event_; }

 private:
  friend class QueueCore;
  [[noreturn]] void violation(const char* rule, const char* call, const std::string& what);
  CudaSharedEvent& cuda_event(SharedEvent& event, const char* call);
  void set_status(CommandBufferStatus s) {
    status_.store(static_cast<int>(s), std::memory_order_release);
  }

  std::shared_ptr<QueueCore> queue_;
  DeviceCore& device_;
  const uint64_t id_;

  mutable Mutex mu_;  // guards the encoding state below against racing misuse
  CondVar done_cv_;
  std::vector<std::unique_ptr<CudaEncoder>> encoders_ FL_GUARDED_BY(mu_);
  CudaEncoder* open_encoder_ FL_GUARDED_BY(mu_) = nullptr;
  struct Signal {
    std::shared_ptr<EventCore> event;
    uint64_t value;
    cudaEvent_t recorded;  // owned by the EventCore
  };
  std::vector<Signal> signals_ FL_GUARDED_BY(mu_);
  std::vector<Handler> handlers_ FL_GUARDED_BY(mu_);
  size_t kernels_ FL_GUARDED_BY(mu_) = 0;
  std::exception_ptr error_ FL_GUARDED_BY(mu_);
  // The event of the last signal, if nothing was encoded after it: commit()
  // can then use it as the completion event instead of recording another.
  cudaEvent_t tail_signal_ FL_GUARDED_BY(mu_) = nullptr;

  uint64_t completion_seq_ = 0;             // see completion_seq()
  cudaEvent_t completion_event_ = nullptr;  // see completion_event()
  bool owns_completion_event_ = false;      // false when it is a signal's (the EventCore owns it)

  // acquire/release: read without the lock by status() and the fast paths.
  std::atomic<int> status_{static_cast<int>(CommandBufferStatus::kNotEnqueued)};
  // acquire/release: set after the handlers ran; waiters spin on it first.
  std::atomic<bool> finished_{false};
};

}  // namespace flotilla::backend::cuda
