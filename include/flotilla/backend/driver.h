// The one narrow contract a backend implements.
//
// It is modelled on Metal's objects, because the seed's failures are stated in
// Metal's terms: a Driver owns Queues; a Queue makes CommandBuffers; a
// CommandBuffer makes ComputeEncoders, carries shared-event signals and waits,
// and is committed once; committed buffers of one queue run in commit order,
// buffers of different queues may run in parallel. Kernels ("pipelines") are
// looked up by name. SharedEvents hold a monotonically increasing value and
// call listeners when it is reached.
//
// Thread safety, as on a real GPU driver: a Driver, a Queue's
// new_command_buffer() and a SharedEvent may be used from any thread. A
// CommandBuffer and its encoders are single-threaded objects: using one from
// two threads at once is a rule violation, which a driver with validation
// reports as ValidationError("concurrent-object-use") rather than corrupting
// memory. A driver whose encoding_thread_safe() is false additionally forbids
// any two encoding calls at once anywhere on the device (Apple's AGX model);
// the runtime's EncodingLock exists for such drivers.
//
// Recording (Vulkan's secondary command buffers, CUDA graphs): a Queue's
// CommandRecorder records kernels into a CommandList instead of running
// them; a ComputeEncoder of the same queue replays the list, any number of
// times, as one command. While a recorder of a queue is open, nothing else
// may be encoded on that queue (a driver with validation reports
// "encode-while-recording"); on CUDA the recording is a stream capture of the
// queue's stream. Kernel arguments are fixed at recording: a replay reads
// and writes the same addresses, so the memory they name must outlive the
// list, and its contents at replay time are what the replay computes on.
//
// Lifetime: objects made by a Driver must not outlive it. Completion handlers
// and event listeners run on driver-owned threads; they must not block on
// work of the same driver, and exceptions they throw are caught and counted.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/common/config.h"

namespace flotilla::backend {

// Metal's command-buffer states (MTLCommandBufferStatus, less "enqueued",
// which commit() implies here).
enum class CommandBufferStatus {
  kNotEnqueued,  // being encoded
  kCommitted,    // committed, waiting its turn in the queue
  kScheduled,    // running on the device
  kCompleted,    // finished without error
  kError,        // finished with an error (error() says which)
};
const char* to_string(CommandBufferStatus s) noexcept;

// One scalar kernel argument (Metal's setBytes, a CUDA kernel parameter).
union Scalar {
  int64_t i;
  double f;
};

// Arguments of one kernel dispatch: device addresses, scalars and a grid size
// in elements. Fixed capacity, so encoding a kernel never allocates.
struct KernelArgs {
  static constexpr int kMaxPtrs = 8;
  static constexpr int kMaxScalars = 8;
  std::array<void*, kMaxPtrs> ptrs{};
  std::array<Scalar, kMaxScalars> scalars{};
  int num_ptrs = 0;
  int num_scalars = 0;
  uint64_t n = 0;

  KernelArgs& ptr(const void* p) {
    ptrs.at(static_cast<size_t>(num_ptrs++)) = const_cast<void*>(p);
    return *this;
  }
  KernelArgs& i64(int64_t v) {
    scalars.at(static_cast<size_t>(num_scalars++)).i = v;
    return *this;
  }
  KernelArgs& f64(double v) {
    scalars.at(static_cast<size_t>(num_scalars++)).f = v;
    return *this;
  }
  KernelArgs& size(uint64_t elements) {
    n = elements;
    return *this;
  }
};

// A kernel the driver can run, looked up by name; owned by the driver.
class Pipeline {
 public:
  virtual ~Pipeline() = default;
  virtual const std::string& name() const = 0;
};

// Device memory (or pinned host memory). Owned by whoever allocated it.
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual size_t size() const = 0;
  // The address kernels use.
  virtual void* device_ptr() const = 0;
  // A host-visible address of the same bytes, or nullptr if the memory is not
  // host-visible (CUDA device memory).
  virtual void* host_ptr() const = 0;
};

// A value that only grows, with listeners (Metal's MTLSharedEvent).
class SharedEvent {
 public:
  virtual ~SharedEvent() = default;
  // The value reached so far (host view).
  virtual uint64_t signaled_value() const = 0;
  // Blocks the host until the value reaches `value` or the deadline passes.
  virtual bool wait_until(uint64_t value, std::chrono::steady_clock::time_point deadline) = 0;
  // Calls `listener` once, on a driver thread, when the value reaches `value`
  // (at once, on the calling thread, if it already has).
  virtual void notify(uint64_t value, std::function<void()> listener) = 0;
  // Device time at which `value` was last reached, in ns on the driver's
  // clock; for elapsed-time measurement. Throws InvalidState if not reached.
  virtual int64_t signal_time_ns(uint64_t value) const = 0;
};

// A recorded sequence of kernels (see Recording above). Immutable once made;
// replayed only on the queue that recorded it.
class CommandList {
 public:
  virtual ~CommandList() = default;
  virtual size_t kernel_count() const = 0;
  // The id() of the queue that recorded it.
  virtual int queue_id() const = 0;
};

class ComputeEncoder {
 public:
  virtual ~ComputeEncoder() = default;
  // Encodes one kernel. Encoding calls: subject to the AGX rule.
  virtual void dispatch(const Pipeline& pipeline, const KernelArgs& args) = 0;
  // Encodes one replay of `list`, which this encoder's queue recorded
  // (else InvalidArgument). Counts as list.kernel_count() kernels.
  virtual void execute(const CommandList& list) = 0;
  virtual void end_encoding() = 0;
  virtual bool is_encoding() const = 0;
};

class CommandBuffer {
 public:
  using Handler = std::function<void(CommandBuffer&)>;
  virtual ~CommandBuffer() = default;

  // Opens a compute encoder. At most one encoder is open at a time.
  virtual ComputeEncoder& compute_encoder() = 0;
  // Shared-event commands; no encoder may be open.
  virtual void encode_signal(SharedEvent& event, uint64_t value) = 0;
  virtual void encode_wait(SharedEvent& event, uint64_t value) = 0;
  // Runs on a driver thread after the buffer completes (or fails). Only
  // before commit.
  virtual void add_completed_handler(Handler handler) = 0;
  // Hands the buffer to its queue. Once; no encoder may be open.
  virtual void commit() = 0;
  // Blocks until completed or failed. Only after commit.
  virtual void wait_until_completed() = 0;
  virtual CommandBufferStatus status() const = 0;
  // The failure of a buffer in kError, else nullptr.
  virtual std::exception_ptr error() const = 0;
  // Number of kernels encoded so far.
  virtual size_t kernel_count() const = 0;
};

// Records kernels for later replay (see Recording above). A single-threaded
// object. Destroying it without finish() discards the recording (and, on
// CUDA, ends the capture), so the queue can be used again either way.
class CommandRecorder {
 public:
  virtual ~CommandRecorder() = default;
  // Records one kernel. A bad argument (InvalidArgument from the kernel)
  // fails the recording: finish() throws it.
  virtual void dispatch(const Pipeline& pipeline, const KernelArgs& args) = 0;
  // Ends the recording and returns it. Once; throws the recording's failure.
  virtual std::unique_ptr<CommandList> finish() = 0;
};

class Queue {
 public:
  virtual ~Queue() = default;
  virtual std::shared_ptr<CommandBuffer> new_command_buffer() = 0;
  // Starts recording on this queue. One recorder per queue at a time (else
  // InvalidState); the caller keeps everything else off the queue meanwhile.
  virtual std::unique_ptr<CommandRecorder> new_recorder() = 0;
  // A small number naming the queue in messages.
  virtual int id() const = 0;
  // How many queues run work at the same time, this one included (>= 1; 1
  // when never set): kernels encoded from now on may size their work for
  // that share of the device (Note [GEMMs for a share of the device] in
  // src/backend/cuda/nn_kernels.cu). A hint: it changes speed and, as any
  // other choice of algorithm, the last bits of f32 sums; never correctness.
  // Drivers without such kernels ignore it. Thread-safe. The runtime's
  // StreamState decides the value (Stream::set_device_share).
  virtual void set_device_share(int queues) { (void)queues; }
};

struct DeviceInfo {
  std::string backend;  // "cpu", "cuda"
  int index = 0;
  std::string name;
  size_t memory_bytes = 0;  // total device memory
  int compute_units = 0;    // execution threads (cpu) or multiprocessors (cuda)
  bool encoding_thread_safe = true;
};

// Counters a driver keeps; read them at any time.
struct DriverStats {
  uint64_t command_buffers_committed = 0;
  uint64_t command_buffers_completed = 0;
  uint64_t kernels_executed = 0;
  uint64_t violations = 0;      // rule violations reported by validation
  uint64_t handler_errors = 0;  // completion handlers / listeners that threw
  // GEMM plans made (CUDA: cuBLASLt plans, one per queue and plan key, Note
  // [cuBLASLt plans]); 0 on drivers without plans.
  uint64_t gemm_plans = 0;
  // GEMM shapes timed to choose their algorithm (CUDA with
  // Config::cuda_tune_gemm: Note [Tuned GEMMs for a share of the device]);
  // one per shape and device, whatever the streams.
  uint64_t gemm_tunings = 0;
};

class Driver {
 public:
  virtual ~Driver() = default;
  virtual const DeviceInfo& info() const = 0;
  // False for drivers whose encoding path must be serialised (the AGX model).
  virtual bool encoding_thread_safe() const = 0;

  virtual std::unique_ptr<Queue> new_queue() = 0;
  virtual std::unique_ptr<SharedEvent> new_shared_event() = 0;
  // Device memory; throws OutOfMemory saying how much was asked and is free.
  virtual std::unique_ptr<Buffer> allocate(size_t bytes) = 0;
  // Host memory the device can copy from and to asynchronously (pinned).
  virtual std::unique_ptr<Buffer> allocate_host(size_t bytes) = 0;
  // Throws InvalidArgument naming the kernel if there is none of that name.
  virtual const Pipeline& pipeline(std::string_view name) = 0;
  virtual std::vector<std::string> pipeline_names() const = 0;

  virtual DriverStats stats() const = 0;
  // The sticky failure of a lost device, or nullptr.
  virtual std::exception_ptr device_error() const = 0;
  // Lets all committed work finish, then stops the driver's threads.
  // Idempotent; later calls on the driver's objects throw ShutDown.
  virtual void shutdown() = 0;
};

// ---- The backend registry -------------------------------------------------

using DriverFactory = std::unique_ptr<Driver> (*)(int index, const Config& config);
using DeviceCounter = int (*)();

struct BackendEntry {
  const char* name;
  DriverFactory create;
  DeviceCounter device_count;
};

// Backends built into this binary ("cpu" always; "cuda" when compiled).
const std::vector<BackendEntry>& backends();
// Throws InvalidArgument listing the built-in backends if `name` is unknown.
const BackendEntry& find_backend(std::string_view name);

}  // namespace flotilla::backend
