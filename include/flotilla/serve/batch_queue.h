// BatchQueue: many threads submit single requests; worker threads merge them
// into real batches, run one forward per batch on their own stream, and
// hand each request its row of the output.
//
//   serve::BatchQueue queue(device, 512, 512,
//       [&mlp](const Stream& s, const Tensor& x) { return mlp.forward(s, x); },
//       {.max_batch = 64, .max_delay = std::chrono::microseconds(200)});
//   serve::RequestHandle h = queue.submit(input);   // any thread
//   std::vector<float> y = h.get();                  // blocks; throws the request's error
//
// The model is a function from x [B, in] f32 to y [B, out] f32 on the
// stream it is given (an nn::Mlp's forward fits). It must encode its work on
// that stream (or order it before returning), must not keep x, and may throw:
// a throw, a wrong output shape or a device failure fails that batch only.
//
// A batch (Note [One batch] in batch_queue.cpp): a worker waits for a first
// request, then up to max_delay (by the clock, from the oldest request's
// arrival) for company, up to max_batch; completes the expired ones; packs
// the inputs into a pinned staging buffer (allocated once, pipeline_depth
// per worker; InputBuffer rows are not packed but gathered by the device
// where they are), copies them with one asynchronous copy into one [B, in]
// tensor on its stream, runs one forward, copies [B, out] back with one
// asynchronous copy into pinned staging, and takes a fence; when the fence
// is reached it scatters the rows. With record_batches, the copies and the
// forward are one recorded replay. Up to pipeline_depth batches per worker
// are in flight at once.
//
// Outcomes. Every submit() that returns a handle completes it exactly once
// (Note [Exactly once] in queue_core.h): with its output, or with
//   Timeout    its deadline passed before it ran (it never runs), or it
//              waited under kBlock until its deadline without room;
//   Cancelled  RequestHandle::cancel() before it started, or shutdown(kCancel);
//   QueueFull  the queue held `capacity` requests and the policy is kReject;
//   ShutDown   it was submitted after shutdown began;
//   the error of its batch (the model threw, the device failed).
// submit() itself throws only InvalidArgument, for a bad input (wrong size,
// NaN when reject_nan): the caller's bug, refused before it can touch a
// batch. Every other outcome arrives through the handle, so a client has
// one place to look.
//
// Completion callbacks (the second submit()): instead of a handle, the
// request's outcome goes to a function, called exactly once with a
// Completion: its output (a view of the batch's pinned staging, valid only
// during the call: no copy is made) or its error. No thread blocks on the
// request and none is woken for it, so a client can keep many requests in
// flight at the cost of one submit() each (Note [Completion callbacks] in
// queue_core.h). The callback runs
//   on a worker thread (or step()'s caller) when its batch completes or fails;
//   on the thread whose call decided it otherwise, before that call
//   returns: submit() itself for a refusal (QueueFull, ShutDown, a deadline
//   already passed), cancel() or shutdown(kCancel) for Cancelled (or, for a
//   request a worker or step() had just taken from the queue's inbox when
//   shutdown(kCancel) came, that worker or step(), which the shutdown waits
//   for), a worker (or step()'s caller) for Timeout;
// never while the queue's own lock is held (step() and the shutdown drain
// hold theirs), so it may submit() and cancel(). A submit() from a callback
// that runs on a worker (or in step()) never waits for room: under kBlock a
// full queue refuses it with QueueFull, as kReject would, since the room it
// would wait for is made by the workers, itself among them. It must not
// block for long (a worker's other requests wait meanwhile); waiting on
// this queue's handles (get(), wait() or wait_for(), for a request not yet
// complete), shutdown() and step() could wait for itself, so from a thread
// that runs the queue's batches they throw InvalidState instead. A throw is
// caught and counted (BatchQueueMetrics::callback_exceptions).
//
// Borrowed inputs (the submit()s taking a BorrowedInput): the request reads
// its input where the caller keeps it instead of copying it at submit(), so
// a submit() costs no copy of the input and a smaller allocation, and the
// thread that packs the batch (a worker, or step()'s or the manual-mode
// drain's caller) reads it from the caller's memory (Note [Borrowed
// inputs] in batch_queue.cpp). The caller must keep those values alive and
// unchanged until the request has completed: until its handle is done()
// (get() returned or threw, wait() returned, or wait_for() returned true),
// or until its callback has been called. A refused request (QueueFull,
// ShutDown, a deadline already passed) and one cancelled by a cancel() that
// returned true have completed when that call returns; a bad input is
// refused at submit() (InvalidArgument) and never read again. A dropped
// handle does not cancel its request, and shutdown(kDrain) and the
// destructor run what is queued: so keep a borrowed input whose handle you
// dropped until shutdown() returns, or cancel it first. The queue reads a
// borrowed input in submit() (its size, and with reject_nan its values:
// the NaN check covers the values as they are then) and while packing the
// request's batch, never after the request completes; it never writes it,
// so one buffer may back several requests at once. Changing the values
// before the request completes is a data race, and which values run is
// then undefined.
//
// Group submits (submit_all): a thread with several requests at hand (a
// client refilling its window of requests in flight, a server whose
// connection delivered a few at once) queues them in one call. Each is its
// own batch-1 request, with its own handle or callback, id and outcome,
// exactly as that many submit()s in the same order would make them; the
// group only pays once for what every submitter shares (the clock read and
// the queue's counters and inbox, one cache line that 64 clients pass
// around: Note [Group submits] in queue_core.h). Every input (and callback)
// is checked before any request is queued: one bad one throws
// InvalidArgument, and then none of the group is queued and no callback is
// called. A group that does not fit in the room left is submitted one
// request at a time, with submit()'s rules for each (the first ones may be
// queued and the rest refused, or wait, under kBlock).
//
// Deadlines: a queued request whose deadline passes completes with Timeout
// when a worker next looks at the queue: at once if one is waiting for
// requests (its wait ends at the earliest deadline), else when one finishes
// its batch. A request that has started runs to the end.
//
// Manual mode (workers = 0): no threads; step() forms and runs one batch on
// the calling thread, with the same rules, and never waits. With a
// ManualClock this makes every decision (max_delay, deadlines) a function
// of the calls the test makes, for deterministic tests.
//
// Thread safety: submit, cancel, metrics, step and shutdown may be called
// from any thread at once, except that a thread running the queue's
// batches (a worker, or step()'s caller while in step(): the model
// function and completion callbacks) gets InvalidState from shutdown(),
// step() and a wait (get, wait, wait_for) on an incomplete handle of this
// queue, each of which would wait for that thread itself (Note [A worker's
// own submit]).
//
// Lifetime: the queue must be destroyed before its Device. The destructor
// drains (shutdown(kDrain)). It must not run on a thread that runs the
// queue's batches: a completion callback (or the model) that lets go of
// the last reference to its queue, on a worker, in step() or in the
// shutdown drain, stops the process (std::abort, after a message that says
// so), since the destructor would have to join its own thread and free the
// batch that thread is completing (Note [A queue destroyed by its own
// batch] in batch_queue.cpp). So callbacks that run on those threads must
// not own their queue: keep a reference outside them, and call shutdown()
// from another thread before letting go of it. Callbacks also run on the
// threads that call submit() (a refused request), cancel() and
// shutdown(kCancel) (and, after a shutdown(kCancel), on a worker or step()
// for requests it had taken from the queue's inbox): there, on a thread that
// runs none of the queue's batches, one that lets go of the last reference,
// inside the callback itself, destroys the queue inside that call (draining
// and joining the workers, as the destructor does), and the call then
// returns without touching it (Note [A queue destroyed on the deciding
// thread]). The callbacks that call runs after it must not reach the queue
// through a plain pointer: it is gone. Calls on other threads are not
// covered: each caller of a queue function holds a reference for the call.
// RequestHandles may outlive the queue: they hold their request's state,
// and cancel() on one after the queue is gone returns false.
//
// What blocks: submit() under kBlock (until room, the request's deadline,
// or shutdown); RequestHandle::get()/wait()/wait_for(); step() (runs a batch);
// shutdown() and the destructor (drain or cancel, then join the workers).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "flotilla/common/sync.h"
#include "flotilla/ops/tensor.h"
#include "flotilla/runtime/stream.h"
#include "flotilla/serve/clock.h"
#include "flotilla/serve/metrics.h"

namespace flotilla {
class Device;
namespace backend {
class Buffer;
}
}  // namespace flotilla

namespace flotilla::serve {

namespace detail {
class QueueCore;
struct Request;
struct Lane;
struct Slot;
struct Batch;
}  // namespace detail

// What submit() does when `capacity` requests are queued.
enum class OverflowPolicy {
  kReject,  // complete the new request with QueueFull at once
  kBlock,   // wait for room up to the request's deadline (then Timeout), or forever without one
};

// What shutdown() does with the requests still queued.
enum class ShutdownMode {
  kDrain,   // run them (max_delay no longer waits), then stop
  kCancel,  // complete them with Cancelled, then stop
};

// Where a request is in its life. kQueued and kRunning are the only
// non-final states; a request leaves kQueued exactly once (compare-and-swap).
enum class RequestStatus {
  kQueued,
  kRunning,    // picked into a batch
  kCompleted,  // has its output
  kFailed,     // its batch failed
  kExpired,    // Timeout
  kCancelled,  // Cancelled
  kRejected,   // QueueFull
  kShutDown,   // ShutDown
};
const char* to_string(RequestStatus s) noexcept;
const char* to_string(OverflowPolicy p) noexcept;
const char* to_string(ShutdownMode m) noexcept;
// "reject" / "block"; throws InvalidArgument listing them.
OverflowPolicy parse_overflow_policy(const std::string& s);

struct BatchQueueOptions {
  int max_batch = 32;  // requests per batch, >= 1
  // How long the oldest request waits for company. 0 (Triton's default):
  // a free worker takes what is queued at once, and batches grow only while
  // the workers are busy; raise it to trade latency for bigger batches when
  // requests arrive faster than a batch runs.
  std::chrono::microseconds max_delay{0};
  size_t capacity = 1024;  // queued requests at most, >= 1
  OverflowPolicy when_full = OverflowPolicy::kReject;
  int workers = 1;  // threads, each with its own stream; 0: manual mode
  // Batches each worker keeps in flight on its stream (1..64), each with its
  // own pinned staging: while the device runs one, the worker packs and
  // launches the next, and completes each when its fence is reached (Note
  // [Pipelined lanes] in batch_queue.cpp). 1: launch, wait, complete. On the
  // H100 with the seed's MLP, 1 served batch-1 clients best (docs/PERF.md):
  // raise it when a batch's device time is long against its host time.
  int pipeline_depth = 1;
  // How long a waiting thread spins before it sleeps: a handle's get() and
  // wait(), the idle worker waiting for requests, and the leader waiting out
  // max_delay for company. A futex sleep and wake-up costs several
  // microseconds on each side of a request, and a timed sleep of a few
  // microseconds ends late; spinning trades CPU for that latency. 0: sleep
  // at once.
  std::chrono::microseconds spin_wait{0};
  // Record each batch size's work once and replay it (Stream::record; on
  // CUDA a graph: one launch per batch instead of one per kernel and copy;
  // Note [Recorded batches] in batch_queue.cpp). Batches are padded with
  // zero rows to a recorded size: the powers of two up to 64, then
  // record_steps sizes an octave (with the default four: 80, 96, 112, 128,
  // 160, ...: at most 25 % padding), and max_batch; each size is recorded
  // per worker slot and input kind when first used, and keeps the model's
  // intermediates of its rows. A batch that records runs
  // eagerly and then records (its worker drains its stream), so latencies
  // are higher until the sizes in use are recorded: warm the queue up with
  // representative traffic before serving or timing it (on the H100, 64
  // clients' p99 doubled over 2 s runs without a warm-up; docs/PERF.md).
  // The model must then encode and allocate only on the stream it is given,
  // treat rows independently, and depend on nothing but x (a replay repeats
  // exactly what was recorded).
  bool record_batches = false;
  // With record_batches: the recorded sizes in each octave above 64 rows
  // (1, 2, 4, 8, 16, 32 or 64; Note [Recorded sizes]). More pad less (at
  // most 1/record_steps of the batch) and record more sizes, each once per
  // slot and input kind (max_batch 1024: 11 sizes with 1, 23 with 4, 39
  // with 8).
  int record_steps = 4;
  // How many streams run the queue's batches at once, claimed on each
  // worker's stream while the queue lives (Stream::claim_device_share; the
  // streams are the device's pooled ones, shared with its other users, who
  // see the largest claim). On CUDA, f32 GEMMs of 64 to 512 rows are then
  // planned for that share of the SMs: with 8 workers busy, 1.4-1.5x the
  // device's rows/s at 64-256 rows; a batch running alone gets slower (256
  // rows: 96 against 72 us), but batches that big form only when requests
  // queue up behind busy workers (docs/PERF.md, "GEMMs for a share of the
  // device"). 0: the number of distinct streams the workers got (1 in
  // manual mode: nothing claimed); 1: claim nothing. 0..256.
  int device_share = 0;
  // InputBuffer rows are read by the device in place (Note [Inputs the
  // device reads in place] in batch_queue.cpp) in batches whose inputs,
  // padding included, take at most this many bytes; a larger batch packs
  // them like any other input, and its copy in goes to the copy engines
  // where it is over 64 KiB. On CUDA the in-place read is a kernel whose
  // blocks read host memory across PCIe and hold their SMs while they wait:
  // on the H100, 8 streams replaying 256- and 512-row batches of the seed's
  // MLP did 15-18 % fewer rows a second with it than with the copy engines,
  // while packing costs the workers a copy of each row. In the queue at 64
  // clients, packed inputs gained 5 % on one machine and a limit of 64 KiB
  // measured 0.95x on another, 4 of 7 rounds lower (docs/PERF.md, "Large
  // batches and the copy engines"), so the default, SIZE_MAX, reads every
  // batch in place; try 65536 where the device, not the host, is the busy
  // part. 0: never.
  size_t read_in_place_max_bytes = SIZE_MAX;
  std::chrono::microseconds default_deadline{0};  // from submit, for requests without one; 0: none
  bool reject_nan = false;                        // refuse inputs holding NaN at submit
  std::shared_ptr<Clock> clock;                   // null: SteadyClock::instance()
  size_t metrics_window = 4096;                   // latency samples kept for percentiles, >= 1
  // Called once per request as it completes, on the completing thread,
  // before its handle sees it; for tests and tracing. It must not block, call
  // into the queue or throw (a throw is swallowed).
  std::function<void(uint64_t id, RequestStatus status)> on_complete;

  // Throws InvalidArgument naming the field.
  void validate() const;
};

// An input for submit() to read in place, without a copy: the caller keeps
// `values` alive and unchanged until the request has completed (Borrowed
// inputs, above).
struct BorrowedInput {
  explicit BorrowedInput(std::span<const float> values) : values(values) {}
  // A temporary vector would be gone before the queue reads it.
  explicit BorrowedInput(std::vector<float>&&) = delete;
  std::span<const float> values;

 private:
  friend class InputBuffer;
  friend class BatchQueue;
  // Set by InputBuffer::input(): the device that reads `values` in place,
  // and the address it reads them at (null: none; the worker packs them).
  const Device* device_ = nullptr;
  const void* device_address_ = nullptr;
};

// Rows of host memory that a queue's device reads in place (pinned and
// mapped on CUDA), for inputs that are written once and then submitted:
// a server that decodes each request's input into a row of its own saves
// the worker's copy of that row into the batch's staging (in batches over
// read_in_place_max_bytes, if set, the worker packs it like any borrowed
// input; Note [Inputs the device reads in place] in batch_queue.cpp).
// input(i) is row i as a
// BorrowedInput, with the borrowed-input rules (above): keep the row
// unchanged until the request that reads it has completed. Made by
// BatchQueue::make_input_buffer; any queue on the same device reads its rows
// in place (a queue on another device packs them like any borrowed input).
// Must not outlive its device. Move-only. Thread safety: the rows are plain
// memory, each starting a cache line: different threads may fill different
// rows at once.
class InputBuffer {
 public:
  InputBuffer();  // no rows; so is a moved-from one
  ~InputBuffer();
  InputBuffer(InputBuffer&&) noexcept;
  InputBuffer& operator=(InputBuffer&&) noexcept;
  InputBuffer(const InputBuffer&) = delete;
  InputBuffer& operator=(const InputBuffer&) = delete;

  size_t rows() const { return rows_; }
  // Values a row (the queue's in_features).
  size_t row_size() const { return features_; }
  // Row i, to fill or read. InvalidArgument if i >= rows().
  std::span<float> row(size_t i);
  std::span<const float> row(size_t i) const;
  // Row i as an input the device reads in place. InvalidArgument if i >= rows().
  BorrowedInput input(size_t i) const;

 private:
  friend class BatchQueue;
  InputBuffer(const Device& device, std::unique_ptr<backend::Buffer> memory, size_t rows,
              size_t features, size_t stride);
  const float* row_ptr(size_t i, const char* api) const;
  const Device* device_ = nullptr;
  std::unique_ptr<backend::Buffer> memory_;
  size_t rows_ = 0, features_ = 0, stride_ = 0;  // stride_: floats from one row to the next
};

// The caller's side of one request, like a std::future: move-only, get()
// once. Thread safety: one handle is one owner's object (move it to hand it
// over); different handles may be used on any threads at once.
class RequestHandle {
 public:
  RequestHandle() = default;  // not valid()
  RequestHandle(RequestHandle&&) noexcept = default;
  RequestHandle& operator=(RequestHandle&&) noexcept = default;
  RequestHandle(const RequestHandle&) = delete;
  RequestHandle& operator=(const RequestHandle&) = delete;
  ~RequestHandle() = default;  // does not cancel: the request still completes

  bool valid() const { return req_ != nullptr; }
  // The request's id in its queue (ids grow in submission order).
  uint64_t id() const;
  RequestStatus status() const;
  // True once get() would not block.
  bool done() const;
  // Blocks until done.
  void wait() const;
  // Blocks until done or `timeout` of real (steady) time passes; returns done().
  // Like wait() and get(), throws InvalidState if the request is not done and
  // this thread runs its queue's batches (a completion callback on a worker
  // or in step(), or the model): with one worker or in manual mode the
  // request cannot complete while it waits, so a loop of bounded waits would
  // never end; the rule is the same with several workers, as for get() and
  // wait() (Thread safety, above). To poll there, use done().
  bool wait_for(std::chrono::steady_clock::duration timeout) const;
  // Blocks until done; returns the output (out_features values) or throws
  // the request's error. Once: a second call throws InvalidState.
  std::vector<float> get();
  // Cancels the request if it has not started: then it completes with
  // Cancelled, never runs, and this returns true. False if it had started,
  // had already completed, or its queue is gone.
  bool cancel();

 private:
  friend class BatchQueue;
  friend class detail::QueueCore;
  explicit RequestHandle(std::shared_ptr<detail::Request> req) : req_(std::move(req)) {}
  std::shared_ptr<detail::Request> req_;
};

// What a completion callback is told about its request.
struct Completion {
  uint64_t id = 0;  // as RequestHandle::id(): ids grow in submission order
  RequestStatus status = RequestStatus::kQueued;  // final: kCompleted or an error's
  // kCompleted: out_features values, valid only during the callback (they
  // live in the batch's staging, reused by the next batch). Empty otherwise.
  std::span<const float> output;
  // Every status but kCompleted: the error the handle's get() would throw.
  std::exception_ptr error;
  // When the queue completed the request, by its clock (BatchQueue::clock()),
  // read shortly before the callback runs: in a batch, the clock is read at
  // most once per 16 rows, for callback rows only (so this is from before
  // the callbacks of at most 15 earlier rows of the batch, and of whatever
  // those ran in turn); for a refusal, a cancellation or an expiry, just
  // before its callback. Latency measured against it costs no clock read
  // per request.
  Clock::time_point completed_at{};
};
using CompletionCallback = std::function<void(const Completion&)>;

class BatchQueue {
 public:
  using Model = std::function<Tensor(const Stream& stream, const Tensor& x)>;

  // Starts `options.workers` threads, each with a stream from `device`'s pool
  // (round-robin) and its staging buffers. Throws InvalidArgument for bad
  // options or sizes, and the device's errors (ShutDown, OutOfMemory).
  BatchQueue(Device& device, int64_t in_features, int64_t out_features, Model model,
             BatchQueueOptions options = {});
  // shutdown(kDrain). On a thread that runs this queue's batches (its own
  // callback let go of the last reference) it stops the process instead
  // (Lifetime, above).
  ~BatchQueue();
  BatchQueue(const BatchQueue&) = delete;
  BatchQueue& operator=(const BatchQueue&) = delete;

  // Queues a copy of `input` (in_features values); `deadline` by clock()
  // (unset: now + default_deadline, or none). See Outcomes above.
  RequestHandle submit(std::span<const float> input,
                       std::optional<Clock::time_point> deadline = std::nullopt);
  // Queues a copy of `input` like submit() above, but reports the outcome
  // to `done` (non-empty) instead of a handle (see Completion callbacks
  // above). Returns the request's id, for cancel(). Throws InvalidArgument
  // for a bad input or an empty callback, and then never calls it.
  uint64_t submit(std::span<const float> input, CompletionCallback done,
                  std::optional<Clock::time_point> deadline = std::nullopt);
  // The same two submits for an input the queue reads in place instead of
  // copying (Borrowed inputs, above): `input.values` must stay alive and
  // unchanged until the request has completed.
  RequestHandle submit(BorrowedInput input,
                       std::optional<Clock::time_point> deadline = std::nullopt);
  uint64_t submit(BorrowedInput input, CompletionCallback done,
                  std::optional<Clock::time_point> deadline = std::nullopt);
  // Group submits (above): the requests of `inputs`, in order, as that
  // many submit()s with the same `deadline` would queue them; one handle
  // each, in the order of `inputs`.
  std::vector<RequestHandle> submit_all(std::span<const std::span<const float>> inputs,
                                        std::optional<Clock::time_point> deadline = std::nullopt);
  std::vector<RequestHandle> submit_all(std::span<const BorrowedInput> inputs,
                                        std::optional<Clock::time_point> deadline = std::nullopt);
  // The same with a callback each: done[i] (non-empty; moved from once the
  // group is checked) gets inputs[i]'s outcome. Returns the ids in the order
  // of `inputs`. InvalidArgument also if the two spans differ in size.
  std::vector<uint64_t> submit_all(std::span<const std::span<const float>> inputs,
                                   std::span<CompletionCallback> done,
                                   std::optional<Clock::time_point> deadline = std::nullopt);
  std::vector<uint64_t> submit_all(std::span<const BorrowedInput> inputs,
                                   std::span<CompletionCallback> done,
                                   std::optional<Clock::time_point> deadline = std::nullopt);
  // `rows` rows of in_features values that this queue's device reads in
  // place (InputBuffer). Throws InvalidArgument for 0 rows, OutOfMemory.
  InputBuffer make_input_buffer(size_t rows) const;
  // Cancels the request `id` if it is queued (not started): it completes
  // with Cancelled and this returns true. False if it had started, had
  // completed, or no request of this queue has that id. For requests of
  // either submit().
  bool cancel(uint64_t id);

  // clock().now() + d, for submit's deadline.
  Clock::time_point deadline_in(Clock::duration d) const;

  // Manual mode only (workers = 0; else InvalidState): completes expired
  // requests, then, if a batch is ready (max_batch queued, the oldest has
  // waited max_delay, or shutdown began), runs it on the calling thread.
  // Returns the requests run (0: none ready). Calls are serialised.
  size_t step();

  // Stops new submits (they complete with ShutDown; blocked ones too), then
  // drains or cancels what is queued, and joins the workers. Idempotent; a
  // later kCancel still cancels what a running drain has not started.
  void shutdown(ShutdownMode mode = ShutdownMode::kDrain);
  bool is_shut_down() const;

  BatchQueueMetrics metrics() const;
  const BatchQueueOptions& options() const { return options_; }
  Clock& clock() const { return *clock_; }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  // The streams the batches run on (one per worker; one in manual mode).
  std::vector<Stream> streams() const;

 private:
  // A submit()'s input: copied into the request, or borrowed (read in place
  // by the packer, or, with a device address, by the device itself).
  struct InputRef {
    std::span<const float> values;
    bool borrow = false;
    const void* device_address = nullptr;
  };
  // The InputRef of a BorrowedInput: its device address only if it is this
  // queue's device's.
  InputRef borrowed(const BorrowedInput& input) const;
  // Checks `input` (InvalidArgument) and makes its request.
  std::shared_ptr<detail::Request> make_request(const InputRef& input,
                                                std::optional<Clock::time_point> deadline,
                                                CompletionCallback done);
  // Throws InvalidArgument for a bad input (wrong size, NaN under reject_nan).
  void check_input(std::span<const float> input);
  // The request deadline a submit() with `deadline` gives (default_deadline
  // when unset, else none).
  Clock::time_point effective_deadline(std::optional<Clock::time_point> deadline) const;
  // The submit_all()s' common body: checks every input (and, with
  // `callbacks`, that `done` has one non-empty callback each), then queues
  // the group; its requests, in order.
  std::vector<std::shared_ptr<detail::Request>> submit_group(
      std::span<const InputRef> inputs, bool callbacks, std::span<CompletionCallback> done,
      std::optional<Clock::time_point> deadline);
  // The InputRefs of a group's inputs, copied or borrowed.
  static std::vector<InputRef> copied(std::span<const std::span<const float>> inputs);
  std::vector<InputRef> borrowed(std::span<const BorrowedInput> inputs) const;
  static std::vector<RequestHandle> handles(
      std::vector<std::shared_ptr<detail::Request>>&& requests);
  static std::vector<uint64_t> ids(const std::vector<std::shared_ptr<detail::Request>>& requests);
  // The submit()s' common body.
  RequestHandle submit_handle(const InputRef& input, std::optional<Clock::time_point> deadline);
  uint64_t submit_callback(const InputRef& input, CompletionCallback done,
                           std::optional<Clock::time_point> deadline);
  void worker_loop(detail::Lane& lane);
  // Claims options_.device_share on the lanes' streams (Note [The queue's
  // share of the device]).
  void claim_device_share();
  // Launches the batch in the lane's free slot; it is then in flight.
  void launch_batch(detail::Lane& lane);
  // Waits for the lane's oldest batch and completes its requests.
  void complete_oldest(detail::Lane& lane);
  // Launches and completes the batch in the free slot (manual mode).
  void run_batch(detail::Lane& lane);
  // Encodes the copy in, the forward of `rows` rows and the copy out for
  // `slot`'s staging on the lane's stream (eagerly, or inside a recording);
  // `gather`: the copy in gathers the rows through the slot's table (Note
  // [Inputs the device reads in place]).
  void encode_batch(detail::Lane& lane, detail::Slot& slot, int64_t rows, bool gather);

  Device& device_;
  const int64_t in_, out_;
  const Model model_;
  const BatchQueueOptions options_;
  const std::shared_ptr<Clock> clock_;
  std::shared_ptr<detail::QueueCore> core_;
  uint64_t listener_key_ = 0;  // written in the constructor only
  // One lane per worker (or one for manual mode); fixed after construction.
  std::vector<std::unique_ptr<detail::Lane>> lanes_;
  std::vector<std::thread> threads_;  // joined by shutdown(); written in the constructor
  // Owned by the queue alone, never written: shutdown() watches it to see
  // whether a callback it ran destroyed the queue (Note [A queue destroyed
  // on the deciding thread] in batch_queue.cpp).
  const std::shared_ptr<const int> alive_ = std::make_shared<const int>(0);

  // Serialises shutdown() callers; guards the join.
  Mutex shutdown_mu_;
  bool joined_ FL_GUARDED_BY(shutdown_mu_) = false;
  // Serialises step() and the manual-mode drain (manual mode has one lane).
  Mutex step_mu_ FL_ACQUIRED_AFTER(shutdown_mu_);
};

}  // namespace flotilla::serve
