#include "flotilla/serve/batch_queue.h"

#include <sys/prctl.h>

#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <utility>

#include "flotilla/common/cache_hint.h"
#include "flotilla/common/error.h"
#include "flotilla/common/thread_name.h"
#include "flotilla/runtime/device.h"
#include "serve/queue_core.h"
#include "serve/recorded_sizes.h"

namespace flotilla::serve {

// ---- Names and options ---------------------------------------------------------------

const char* to_string(RequestStatus s) noexcept {
  switch (s) {
    case RequestStatus::kQueued: return "queued";
    case RequestStatus::kRunning: return "running";
    case RequestStatus::kCompleted: return "completed";
    case RequestStatus::kFailed: return "failed";
    case RequestStatus::kExpired: return "expired";
    case RequestStatus::kCancelled: return "cancelled";
    case RequestStatus::kRejected: return "rejected";
    case RequestStatus::kShutDown: return "shut_down";
  }
  return "?";
}

const char* to_string(OverflowPolicy p) noexcept {
  return p == OverflowPolicy::kReject ? "reject" : "block";
}

const char* to_string(ShutdownMode m) noexcept {
  return m == ShutdownMode::kDrain ? "drain" : "cancel";
}

OverflowPolicy parse_overflow_policy(const std::string& s) {
  if (s == "reject") return OverflowPolicy::kReject;
  if (s == "block") return OverflowPolicy::kBlock;
  throw InvalidArgument(::flotilla::detail::str_cat("[parse_overflow_policy] unknown policy '", s,
                                                    "'; use reject or block"));
}

void BatchQueueOptions::validate() const {
  FL_CHECK_ARG(max_batch >= 1, "[BatchQueueOptions] max_batch is ", max_batch,
               "; it must be at least 1");
  FL_CHECK_ARG(max_delay.count() >= 0, "[BatchQueueOptions] max_delay is ", max_delay.count(),
               " us; it must be >= 0");
  FL_CHECK_ARG(capacity >= 1, "[BatchQueueOptions] capacity is 0; it must be at least 1");
  FL_CHECK_ARG(workers >= 0 && workers <= 256, "[BatchQueueOptions] workers is ", workers,
               "; use 0 (manual mode, step()) to 256");
  FL_CHECK_ARG(default_deadline.count() >= 0, "[BatchQueueOptions] default_deadline is ",
               default_deadline.count(), " us; use 0 (none) or a positive time");
  FL_CHECK_ARG(metrics_window >= 1, "[BatchQueueOptions] metrics_window is 0; it must be >= 1");
  FL_CHECK_ARG(pipeline_depth >= 1 && pipeline_depth <= 64,
               "[BatchQueueOptions] pipeline_depth is ", pipeline_depth,
               "; use 1 (one batch in flight per worker) to 64");
  FL_CHECK_ARG(!record_batches || max_batch <= (1 << 20), "[BatchQueueOptions] max_batch is ",
               max_batch, "; record_batches supports up to 1048576");
  FL_CHECK_ARG(record_steps >= 1 && record_steps <= detail::kMaxStepsPerOctave &&
                   std::has_single_bit(static_cast<unsigned>(record_steps)),
               "[BatchQueueOptions] record_steps is ", record_steps,
               "; use a power of two from 1 to ", detail::kMaxStepsPerOctave,
               " (recorded sizes in each octave above ", detail::kPowersUpTo, " rows)");
  FL_CHECK_ARG(device_share >= 0 && device_share <= 256, "[BatchQueueOptions] device_share is ",
               device_share, "; use 0 (the number of streams the workers get) or 1 to 256");
  FL_CHECK_ARG(spin_wait.count() >= 0 && spin_wait.count() <= 1000000,
               "[BatchQueueOptions] spin_wait is ", spin_wait.count(),
               " us; use 0 (sleep at once) to 1000000");
}

// ---- RequestHandle -------------------------------------------------------------------

namespace {

detail::Request& need(const std::shared_ptr<detail::Request>& r, const char* api) {
  FL_CHECK_STATE(r != nullptr, "[", api,
                 "] the handle is empty (default-made or moved from); use the handle submit() "
                 "returned");
  return *r;
}

}  // namespace

uint64_t RequestHandle::id() const { return need(req_, "RequestHandle::id").id; }

RequestStatus RequestHandle::status() const {
  return need(req_, "RequestHandle::status").status.load(std::memory_order_acquire);
}

bool RequestHandle::done() const { return need(req_, "RequestHandle::done").done.is_set(); }

namespace {

// Note [A worker's own submit], for waits: a thread that runs the request's
// queue's batches must not wait for a request of that queue that has not
// completed; with one worker (or in step()) it would wait for itself. That
// holds for wait_for() too: its wait ends, but the request cannot complete
// meanwhile, and a loop of such waits never ends.
void check_may_wait(const detail::Request& r, const char* api) {
  if (r.done.is_set()) return;
  FL_CHECK_STATE(!detail::QueueCore::runs_batches_of(r.core), "[", api, "] request ", r.id,
                 " has not completed, and this thread runs its queue's batches (a completion "
                 "callback on a worker or in step(), or the model): waiting here could wait for "
                 "itself; wait from another thread, or take the result in a completion callback");
}

}  // namespace

void RequestHandle::wait() const {
  detail::Request& r = need(req_, "RequestHandle::wait");
  check_may_wait(r, "RequestHandle::wait");
  r.wait_done();
}

bool RequestHandle::wait_for(std::chrono::steady_clock::duration timeout) const {
  detail::Request& r = need(req_, "RequestHandle::wait_for");
  // Bounded, but no less a wait for itself: a loop of them never ends.
  check_may_wait(r, "RequestHandle::wait_for");
  return r.done.wait_for(timeout);
}

std::vector<float> RequestHandle::get() {
  detail::Request& r = need(req_, "RequestHandle::get");
  check_may_wait(r, "RequestHandle::get");
  r.wait_done();  // then the result is the handle's to read (Note [Request result])
  FL_CHECK_STATE(!r.taken, "[RequestHandle::get] called twice on request ", r.id,
                 "; get() hands the result over once, as std::future does");
  r.taken = true;
  if (r.error) std::rethrow_exception(r.error);
  return std::move(r.output);
}

bool RequestHandle::cancel() {
  detail::Request& r = need(req_, "RequestHandle::cancel");
  return detail::QueueCore::cancel_request(r);
}

// ---- BatchQueue ----------------------------------------------------------------------

namespace detail {

// One batch's place in a lane: pinned staging for max_batch rows each way,
// reused once the batch that last used it has completed.
struct Slot {
  // [max_batch, in] f32, then at table_offset max_batch row addresses
  // (Note [Inputs the device reads in place]); host-visible.
  std::unique_ptr<backend::Buffer> input;
  std::unique_ptr<backend::Buffer> output;  // [max_batch, out] f32, host-visible
  Batch batch;                              // the requests in flight here
  StreamFence fence;                        // reached when the output is in staging
  std::exception_ptr error;                 // the batch failed while launching
  // record_batches: the recorded batch of each size and copy in (index:
  // size_bucket() * 2, + 1 for a gather), made at first use; they name this
  // slot's staging.
  std::vector<Recording> recorded;
};

// Where a slot's table of row addresses starts in its input staging: after
// max_batch rows, on a cache line.
size_t table_offset(int64_t max_batch, int64_t in) {
  const size_t rows_bytes = static_cast<size_t>(max_batch * in) * sizeof(float);
  return (rows_bytes + 63) / 64 * 64;
}

// Note [Staging leaves the worker's cache]: staging of at least this many
// bytes is demoted once packed.
constexpr size_t kDemoteStagingFrom = 64 * 1024;

// What one worker owns: its stream and a ring of pipeline_depth slots; the
// in-flight ones are [oldest, oldest + in_flight) modulo the ring.
struct Lane {
  explicit Lane(Stream s) : stream(s) {}
  Stream stream;
  // BatchQueueOptions::device_share, claimed on the stream while the lane
  // lives (Note [The queue's share of the device]).
  DeviceShareClaim share;
  const backend::Pipeline* copy = nullptr;        // the driver's "copy_bytes"
  const backend::Pipeline* copy_small = nullptr;  // its "copy_pinned" (Note [One batch])
  // Its "gather_rows" (Note [Inputs the device reads in place]).
  const backend::Pipeline* gather = nullptr;
  const backend::Pipeline& copy_for(size_t bytes) const {
    return bytes <= kSmallCopyBytes ? *copy_small : *copy;
  }
  static constexpr size_t kSmallCopyBytes = 64 * 1024;
  std::vector<Slot> slots;
  size_t oldest = 0;
  size_t in_flight = 0;
  // Note [Frees while the device works]
  // A callback request has no handle: the worker completing its batch holds
  // its last reference and frees it, into the arena of the client that
  // allocated it (12 % of the workers' samples at 64 clients on the H100,
  // docs/PERF.md), while the workers set the pace and spend a third of
  // their time waiting for fences. So a worker keeps its completed callback
  // requests here and frees them before its next fence wait, while that
  // batch is still running on the device: a few at a time, for as long as
  // the fence is not reached (so a finished batch is not kept waiting), and
  // at once beyond kKeepReleased (memory stays bounded when the device is
  // always done first) or when the lane has nothing in flight (before the
  // worker waits for requests, and before it exits). So it pays with
  // pipeline_depth 2 or more, where a worker waits for one batch's fence
  // with the next one launched; with depth 1 the lane is empty after each
  // batch, and the frees come before the next take, as before. Manual mode
  // frees at once: step() returns with its batch's requests freed. Nothing
  // reads a completed request but its handle, which callback requests have
  // none of, so freeing later changes no outcome. The worker's alone.
  std::vector<std::shared_ptr<Request>> released;

  // Frees released requests while `fence` is not reached, checking it every
  // eight frees, and then down to `keep` (so all of them with 0).
  void free_released(const StreamFence& fence, size_t keep) {
    while (!released.empty() && (released.size() > keep || !fence.reached()))
      for (int k = 0; k < 8 && !released.empty(); ++k) released.pop_back();
  }

  bool has_free_slot() const { return in_flight < slots.size(); }
  Slot& free_slot() { return slots[(oldest + in_flight) % slots.size()]; }
};

}  // namespace detail

BatchQueue::BatchQueue(Device& device, int64_t in_features, int64_t out_features, Model model,
                       BatchQueueOptions options)
    : device_(device),
      in_(in_features),
      out_(out_features),
      model_(std::move(model)),
      options_(std::move(options)),
      clock_(options_.clock ? options_.clock : SteadyClock::instance()) {
  options_.validate();
  FL_CHECK_ARG(in_ >= 1 && out_ >= 1, "[BatchQueue] in_features ", in_, " and out_features ", out_,
               " must both be at least 1");
  FL_CHECK_ARG(model_ != nullptr, "[BatchQueue] the model function is empty");
  device_.check_usable("BatchQueue");
  core_ = std::make_shared<detail::QueueCore>(options_, clock_, static_cast<size_t>(out_));

  backend::Driver& driver = device_.driver("BatchQueue");
  const auto rows = static_cast<size_t>(options_.max_batch);
  const int depth = options_.workers == 0 ? 1 : options_.pipeline_depth;
  for (int i = 0; i < std::max(1, options_.workers); ++i) {
    auto lane = std::make_unique<detail::Lane>(device_.streams().acquire_round_robin());
    lane->copy = &device_.pipeline("copy_bytes");
    lane->copy_small = &device_.pipeline("copy_pinned");
    lane->gather = &device_.pipeline("gather_rows");
    lane->slots.resize(static_cast<size_t>(depth));
    // Note [Frees while the device works]: a lane holds at most this many
    // (kKeepReleased after free_released, then one batch), so completing a
    // batch never allocates, and so never throws half-way.
    if (options_.workers > 0) lane->released.reserve(detail::kKeepReleased + rows);
    for (detail::Slot& slot : lane->slots) {
      slot.input = driver.allocate_host(detail::table_offset(options_.max_batch, in_) +
                                        rows * sizeof(const void*));
      slot.output = driver.allocate_host(rows * static_cast<size_t>(out_) * sizeof(float));
      FL_INTERNAL_CHECK(slot.input->host_ptr() && slot.output->host_ptr(),
                        "the driver's host staging memory is not host-visible");
      if (options_.record_batches)
        slot.recorded.resize(
            2 * (detail::size_bucket(options_.max_batch, options_.max_batch, options_.record_steps)
                     .first +
                 1));
    }
    lanes_.push_back(std::move(lane));
  }

  claim_device_share();

  listener_key_ = clock_->add_listener([core = core_.get()] { core->wake(); });
  try {
    for (int i = 0; i < options_.workers; ++i)
      threads_.emplace_back([this, i, lane = lanes_[static_cast<size_t>(i)].get()] {
        ::flotilla::detail::name_this_thread(::flotilla::detail::str_cat("fl-queue-w", i));
        // The leader's timed waits (max_delay, deadlines) are often a few
        // microseconds: without this the kernel may end them up to its
        // default timer slack (50 us) late.
        (void)prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);
        worker_loop(*lane);
      });
  } catch (...) {  // a thread could not start: stop the ones that did
    core_->stop(ShutdownMode::kCancel);
    for (auto& t : threads_) t.join();
    clock_->remove_listener(listener_key_);
    throw;
  }
}

// Note [The queue's share of the device]
// The workers' streams come from the device's pool, shared with every other
// user of the device, so the queue does not set their hint
// (Stream::set_device_share): it claims its share on each of them for as
// long as it lives (Stream::claim_device_share; the stream plans with the
// largest of its own setting and its claims) and its lanes give the claims
// back when they go, after the workers are joined, or when the constructor
// fails. The default share is the number of distinct streams the lanes got
// (workers beyond the pool's size share streams, and batches on one stream
// run one after another); 1 claims nothing.
void BatchQueue::claim_device_share() {
  int share = options_.device_share;
  if (share == 0) {
    std::set<int> streams;
    for (const auto& lane : lanes_) streams.insert(lane->stream.index());
    share = static_cast<int>(streams.size());
  }
  if (share <= 1) return;
  for (auto& lane : lanes_) lane->share = lane->stream.claim_device_share(share);
}

namespace {

// Note [A queue destroyed by its own batch]
// A completion callback (or the model, or the on_complete hook) that holds
// the last reference to its queue destroys it when it lets go: on a thread
// that runs the queue's batches, inside one (a worker's complete_batch,
// step(), the manual drain). The destructor cannot do its work there: it
// would join that very thread, and the frames below it still use the
// queue's core, the lane and its staging (the rest of the batch's rows are
// yet to complete, and the requests still queued yet to run). Going on
// would need the queue's state to outlive the object (shared with the
// workers) and its last worker's join handed to an owner that outlives the
// queue: not built. So the process stops, as it did before (on the
// InvalidState that shutdown() throws there, escaping the destructor), but
// with a message that names the destructor, says why, and says what to do.
[[noreturn]] void die_destroyed_by_own_batch() {
  std::fputs(
      "flotilla: fatal: [BatchQueue::~BatchQueue] the queue is being destroyed on a thread "
      "that runs its batches: a completion callback or the model (on one of its workers, in "
      "step() or in the shutdown drain) let go of the last reference to it. The destructor "
      "would have to join this very thread and free the batch it is still completing, with "
      "requests still to run; it cannot, so the process stops. Do not let the queue's callbacks "
      "own it: keep a reference outside them, and call shutdown() from a thread that runs none "
      "of its batches before letting go of it (once shutdown() returns, every callback has run "
      "and released what it held).\n",
      stderr);
  std::fflush(stderr);
  std::abort();
}

}  // namespace

BatchQueue::~BatchQueue() {
  // Note [A queue destroyed by its own batch]
  if (detail::QueueCore::runs_batches_of(core_.get())) die_destroyed_by_own_batch();
  shutdown(ShutdownMode::kDrain);
  clock_->remove_listener(listener_key_);
  core_->retire_after_shutdown();  // before core_ goes
}

void BatchQueue::check_input(std::span<const float> input) {
  if (static_cast<int64_t>(input.size()) != in_) {
    core_->recorder().invalid();
    throw InvalidArgument(::flotilla::detail::str_cat(
        "[BatchQueue::submit] the input has ", input.size(), " values but the model takes ", in_,
        "; pass exactly in_features values (one sample)"));
  }
  if (options_.reject_nan) {
    for (size_t i = 0; i < input.size(); ++i) {
      if (std::isnan(input[i])) {
        core_->recorder().invalid();
        throw InvalidArgument(::flotilla::detail::str_cat(
            "[BatchQueue::submit] input value ", i,
            " is NaN and the queue rejects NaN (reject_nan); clean the input"));
      }
    }
  }
}

Clock::time_point BatchQueue::effective_deadline(std::optional<Clock::time_point> deadline) const {
  if (deadline) return *deadline;
  if (options_.default_deadline.count() > 0) return clock_->now() + options_.default_deadline;
  return Clock::kNever;
}

std::shared_ptr<detail::Request> BatchQueue::make_request(const InputRef& ref,
                                                          std::optional<Clock::time_point> deadline,
                                                          CompletionCallback done) {
  check_input(ref.values);
  return detail::Request::make(ref.values, static_cast<size_t>(out_), effective_deadline(deadline),
                               core_.get(), options_.spin_wait, std::move(done), ref.borrow,
                               ref.device_address);
}

RequestHandle BatchQueue::submit_handle(const InputRef& input,
                                        std::optional<Clock::time_point> deadline) {
  auto r = make_request(input, deadline, nullptr);
  core_->submit(r);
  return RequestHandle(std::move(r));
}

uint64_t BatchQueue::submit_callback(const InputRef& input, CompletionCallback done,
                                     std::optional<Clock::time_point> deadline) {
  if (!done) {
    core_->recorder().invalid();
    throw InvalidArgument(
        "[BatchQueue::submit] the completion callback is empty; pass a function, or use the "
        "submit() that returns a handle");
  }
  auto r = make_request(input, deadline, std::move(done));
  core_->submit(r);
  return r->id;  // written by submit() on this thread
}

RequestHandle BatchQueue::submit(std::span<const float> input,
                                 std::optional<Clock::time_point> deadline) {
  return submit_handle({input}, deadline);
}

uint64_t BatchQueue::submit(std::span<const float> input, CompletionCallback done,
                            std::optional<Clock::time_point> deadline) {
  return submit_callback({input}, std::move(done), deadline);
}

std::vector<std::shared_ptr<detail::Request>> BatchQueue::submit_group(
    std::span<const InputRef> inputs, bool callbacks, std::span<CompletionCallback> done,
    std::optional<Clock::time_point> deadline) {
  // Every check before any request exists (Group submits, in the header):
  // a throw leaves the caller's callbacks where they were.
  if (callbacks && done.size() != inputs.size()) {
    core_->recorder().invalid();
    throw InvalidArgument(::flotilla::detail::str_cat("[BatchQueue::submit_all] ", inputs.size(),
                                                      " inputs but ", done.size(),
                                                      " callbacks; pass one callback per input"));
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (callbacks && !done[i]) {
      core_->recorder().invalid();
      throw InvalidArgument(::flotilla::detail::str_cat(
          "[BatchQueue::submit_all] callback ", i,
          " is empty; pass a function for every input, or use the submit_all() that returns "
          "handles"));
    }
    check_input(inputs[i].values);
  }
  const Clock::time_point d = effective_deadline(deadline);  // one clock read at most
  std::vector<std::shared_ptr<detail::Request>> requests;
  requests.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i)
    requests.push_back(detail::Request::make(inputs[i].values, static_cast<size_t>(out_), d,
                                             core_.get(), options_.spin_wait,
                                             callbacks ? std::move(done[i]) : CompletionCallback{},
                                             inputs[i].borrow, inputs[i].device_address));
  core_->submit_all(requests);
  return requests;
}

std::vector<RequestHandle> BatchQueue::submit_all(std::span<const std::span<const float>> inputs,
                                                  std::optional<Clock::time_point> deadline) {
  return handles(submit_group(copied(inputs), false, {}, deadline));
}

std::vector<RequestHandle> BatchQueue::submit_all(std::span<const BorrowedInput> inputs,
                                                  std::optional<Clock::time_point> deadline) {
  return handles(submit_group(borrowed(inputs), false, {}, deadline));
}

std::vector<uint64_t> BatchQueue::submit_all(std::span<const std::span<const float>> inputs,
                                             std::span<CompletionCallback> done,
                                             std::optional<Clock::time_point> deadline) {
  return ids(submit_group(copied(inputs), true, done, deadline));
}

std::vector<uint64_t> BatchQueue::submit_all(std::span<const BorrowedInput> inputs,
                                             std::span<CompletionCallback> done,
                                             std::optional<Clock::time_point> deadline) {
  return ids(submit_group(borrowed(inputs), true, done, deadline));
}

std::vector<BatchQueue::InputRef> BatchQueue::copied(
    std::span<const std::span<const float>> inputs) {
  std::vector<InputRef> refs;
  refs.reserve(inputs.size());
  for (std::span<const float> v : inputs) refs.push_back({v});
  return refs;
}

std::vector<BatchQueue::InputRef> BatchQueue::borrowed(
    std::span<const BorrowedInput> inputs) const {
  std::vector<InputRef> refs;
  refs.reserve(inputs.size());
  for (const BorrowedInput& in : inputs) refs.push_back(borrowed(in));
  return refs;
}

std::vector<RequestHandle> BatchQueue::handles(
    std::vector<std::shared_ptr<detail::Request>>&& requests) {
  std::vector<RequestHandle> out;
  out.reserve(requests.size());
  for (auto& r : requests) out.push_back(RequestHandle(std::move(r)));
  return out;
}

std::vector<uint64_t> BatchQueue::ids(
    const std::vector<std::shared_ptr<detail::Request>>& requests) {
  std::vector<uint64_t> out;
  out.reserve(requests.size());
  for (const auto& r : requests) out.push_back(r->id);  // written by the submit on this thread
  return out;
}

// Note [Borrowed inputs]
// A request normally copies its input into its own block at submit() (Note
// [One allocation per request] in queue_core.h): the caller may reuse its
// buffer at once. With 64 clients on the H100 that copy, the larger block,
// and the worker's reads of input lines another core had just written cost
// about a tenth of the throughput (docs/PERF.md, "Borrowed inputs"). A
// BorrowedInput skips the copy: the request's input is the caller's span,
// read by submit() (make_request: its size, and with reject_nan its
// values) and once by the thread that packs the request's batch
// (launch_batch), before the batch runs, so before the request can
// complete. Nothing else reads it: an expired, cancelled or refused request
// never runs, a failed batch was packed before it failed, and a recorded
// batch replays from the staging, not from the requests. So the caller's
// promise (keep the values until the request has completed) covers every
// read, and a caller may free or rewrite its buffer from the completion
// callback on.
RequestHandle BatchQueue::submit(BorrowedInput input, std::optional<Clock::time_point> deadline) {
  return submit_handle(borrowed(input), deadline);
}

uint64_t BatchQueue::submit(BorrowedInput input, CompletionCallback done,
                            std::optional<Clock::time_point> deadline) {
  return submit_callback(borrowed(input), std::move(done), deadline);
}

BatchQueue::InputRef BatchQueue::borrowed(const BorrowedInput& input) const {
  return {input.values, true, input.device_ == &device_ ? input.device_address_ : nullptr};
}

// Note [Inputs the device reads in place]
// A worker's largest item of work at 64 clients was packing: copying each
// request's 2 KiB input into the batch's pinned staging (with the demotion
// of the staging, a third of its samples on the H100; docs/PERF.md). An
// InputBuffer's rows are pinned and mapped already, so a request borrowing
// one (its Request::device_input set) is not packed: the worker writes the
// row's device address into the slot's table of row addresses (8 bytes,
// not 2 KiB), copies only the other rows into staging (their addresses go
// in the table too), and the batch's copy in is one gather_rows kernel
// that reads every row where its address says (Note [Gathered rows] in
// basic_kernels.cu). A batch with no such row keeps the plain copy of its
// staging (the copy engines for large batches), and so does a batch larger
// than read_in_place_max_bytes (no limit by default): its InputBuffer rows
// are packed like the rest. A gather's blocks read across PCIe and hold SMs
// while they wait, where the copy engines leave the SMs to the GEMMs; when
// the device is the busy part that can cost more than packing costs the
// workers (docs/PERF.md, "Large batches and the copy engines"). Padding
// rows of a recorded size repeat row 0's address: rows are independent and
// padding outputs are never read. The device reads a borrowed row while
// the batch runs, before the batch's fence, so before the request
// completes, which the borrowed-input promise covers; a recorded batch
// gathers through the same table, which the next batch in the slot
// rewrites only after this one's fence. A BorrowedInput of another
// device's buffer, or none, is packed as before (BatchQueue::borrowed
// drops the address).
InputBuffer::InputBuffer() = default;
InputBuffer::~InputBuffer() = default;
// A moved-from buffer has no rows (its row() and input() throw).
InputBuffer::InputBuffer(InputBuffer&& o) noexcept
    : device_(std::exchange(o.device_, nullptr)),
      memory_(std::move(o.memory_)),
      rows_(std::exchange(o.rows_, 0)),
      features_(std::exchange(o.features_, 0)),
      stride_(std::exchange(o.stride_, 0)) {}

InputBuffer& InputBuffer::operator=(InputBuffer&& o) noexcept {
  if (this != &o) {
    device_ = std::exchange(o.device_, nullptr);
    memory_ = std::move(o.memory_);
    rows_ = std::exchange(o.rows_, 0);
    features_ = std::exchange(o.features_, 0);
    stride_ = std::exchange(o.stride_, 0);
  }
  return *this;
}

InputBuffer::InputBuffer(const Device& device, std::unique_ptr<backend::Buffer> memory, size_t rows,
                         size_t features, size_t stride)
    : device_(&device),
      memory_(std::move(memory)),
      rows_(rows),
      features_(features),
      stride_(stride) {}

const float* InputBuffer::row_ptr(size_t i, const char* api) const {
  FL_CHECK_ARG(i < rows_, "[InputBuffer::", api, "] row ", i, " of a buffer of ", rows_,
               " rows; pass a row below rows()");
  return static_cast<const float*>(memory_->host_ptr()) + i * stride_;
}

std::span<float> InputBuffer::row(size_t i) {
  return {const_cast<float*>(row_ptr(i, "row")), features_};
}

std::span<const float> InputBuffer::row(size_t i) const { return {row_ptr(i, "row"), features_}; }

BorrowedInput InputBuffer::input(size_t i) const {
  BorrowedInput in(std::span<const float>(row_ptr(i, "input"), features_));
  in.device_ = device_;
  in.device_address_ = static_cast<const float*>(memory_->device_ptr()) + i * stride_;
  return in;
}

InputBuffer BatchQueue::make_input_buffer(size_t rows) const {
  FL_CHECK_ARG(rows >= 1, "[BatchQueue::make_input_buffer] asked for 0 rows; ask for at least 1");
  // Each row starts a cache line: rows filled by different threads share none.
  constexpr size_t kLineFloats = 64 / sizeof(float);
  const size_t features = static_cast<size_t>(in_);
  const size_t stride = (features + kLineFloats - 1) / kLineFloats * kLineFloats;
  FL_CHECK_ARG(rows <= SIZE_MAX / sizeof(float) / stride, "[BatchQueue::make_input_buffer] ", rows,
               " rows of ", features, " values overflow the address space");
  auto memory =
      device_.driver("BatchQueue::make_input_buffer").allocate_host(rows * stride * sizeof(float));
  FL_INTERNAL_CHECK(memory->host_ptr() != nullptr,
                    "the driver's host staging memory is not host-visible");
  return InputBuffer(device_, std::move(memory), rows, features, stride);
}

bool BatchQueue::cancel(uint64_t id) { return core_->cancel(id); }

Clock::time_point BatchQueue::deadline_in(Clock::duration d) const { return clock_->now() + d; }

size_t BatchQueue::step() {
  FL_CHECK_STATE(options_.workers == 0, "[BatchQueue::step] the queue has ", options_.workers,
                 " worker threads; step() is for manual mode (workers = 0)");
  FL_CHECK_STATE(!detail::QueueCore::runs_batches_of(core_.get()),
                 "[BatchQueue::step] called from inside one of this queue's batches (a "
                 "completion callback or the model, during step()): it would wait for the "
                 "batch it runs in; call step() again after it returns");
  MutexLock lock(step_mu_);
  // Note [A worker's own submit]: from here on this thread runs the queue's
  // callbacks (expiries in take_ready, then the batch's).
  const detail::QueueCore::WorkerScope scope(*core_);
  detail::Lane& lane = *lanes_.front();
  detail::Slot& slot = lane.free_slot();
  if (!core_->take_ready(slot.batch, /*force=*/false)) return 0;
  const size_t n = slot.batch.requests.size();
  run_batch(lane);
  return n;
}

// Note [Pipelined lanes]
// A worker keeps up to pipeline_depth batches in flight on its stream. With
// a free slot it takes a batch: waiting for one (as the leader, Note [Batch
// leader]) only when it has nothing in flight, else just a ready one
// (take_ready). With no free slot, or nothing ready, it completes its oldest
// batch: waits for that batch's fence and scatters the rows. The stream runs
// batches in order, so fences are reached in order and staging is reused
// only after the batch that used it completed. A worker exits once the
// queue is stopping and empty and its last batch has completed.
// A worker blocked on its oldest batch takes no new requests until that
// batch completes (they go to another worker, or wait, as with depth 1): the
// pipeline fills when requests are queued as a batch finishes launching,
// that is under load, where it pays.
void BatchQueue::worker_loop(detail::Lane& lane) {
  const detail::QueueCore::WorkerScope scope(*core_);  // Note [A worker's own submit]
  for (;;) {
    if (lane.has_free_slot()) {
      detail::Batch& batch = lane.free_slot().batch;
      // Nothing on the device: free what is left before waiting as the
      // leader (Note [Frees while the device works]).
      if (lane.in_flight == 0) lane.free_released(StreamFence(), 0);
      const bool got =
          lane.in_flight > 0 ? core_->take_ready(batch, /*force=*/false) : core_->next_batch(batch);
      if (got) {
        launch_batch(lane);
        continue;
      }
      if (lane.in_flight == 0) return;  // stopping, and nothing is left
    }
    complete_oldest(lane);
  }
}

void BatchQueue::run_batch(detail::Lane& lane) {
  launch_batch(lane);
  complete_oldest(lane);
}

// Note [One batch]
// Pack every input into the slot's pinned staging buffer (InputBuffer rows
// excepted: Note [Inputs the device reads in place]), one asynchronous
// copy into one [B, in] tensor, one forward, one asynchronous copy of
// [B, out] back into pinned staging, then a fence (which commits). Any error
// while launching (the model threw, a wrong output, a device failure) is
// kept in the slot and fails just these requests when the slot completes,
// in turn; the fence is taken anyway, so what was encoded still runs before
// the slot's staging is reused. A failure the device reports later reaches
// the fence's wait(). Copies up to 64 KiB use the driver's copy_pinned (on
// CUDA a kernel on the mapped staging: about 4 us less host time each than a
// memcpy, Note [Pinned copies]); larger ones copy_bytes (the copy engines).
//
// Note [Recorded batches]
// With record_batches, the copy in, the forward and the copy out of a batch
// of R rows are recorded once per slot and size (Stream::record) and then
// replayed: on CUDA one graph launch instead of five or more launches, which
// is most of a small batch's host time. A batch of B rows runs as the
// smallest recorded size R >= B (Note [Recorded sizes] in
// recorded_sizes.h), with rows B..R of the staging zeroed (rows
// are independent, so the padding changes no result; its outputs are not
// read). The first batch of a size runs eagerly (that run is its result,
// not replayed) and is then recorded, so that lazily made resources
// (cuBLASLt plans, workspaces, cached blocks) exist before the capture. A recording that fails (the
// model threw) fails that batch only; the next batch of that size tries again.
// Note [Staging leaves the worker's cache]
// The gather leaves the batch's inputs (2 KiB a row with the seed's MLP,
// about 240 KiB for a batch of 120) dirty in the worker's private caches,
// where the device's read of the staging has to fetch them from and where
// they crowd out what the worker reads next: its next batch's requests, and
// the rows and references its callbacks read. So the worker demotes a large
// batch's staging to the shared cache once packed (demote_to_shared_cache:
// x86 CLDEMOTE, a NOP where missing). On the H100 host, with 64 clients of
// 32 or 48 requests in flight (batches of 110 to 180 rows), this gave 1.08x
// to 1.15x requests/s in two A/B calls, every round faster (docs/PERF.md:
// "Where a worker's time goes"). Demoting every batch cost 8 closed-loop
// clients (batches of 2 or 3 rows, which leave little behind) 2 %, so
// staging under 64 KiB (padding rows included: this core wrote them too) is
// left alone. The same hint on the clients' request blocks made the
// workers' reads faster but cost the clients more, and lost.
void BatchQueue::encode_batch(detail::Lane& lane, detail::Slot& slot, int64_t rows, bool gather) {
  Stream stream = lane.stream;
  const size_t in_row = static_cast<size_t>(in_) * sizeof(float);
  const size_t in_bytes = static_cast<size_t>(rows) * in_row;
  const size_t out_bytes = static_cast<size_t>(rows * out_) * sizeof(float);
  Tensor x = Tensor::empty({rows, in_}, DType::kF32, stream);
  if (gather) {
    const char* table = static_cast<const char*>(slot.input->device_ptr()) +
                        detail::table_offset(options_.max_batch, in_);
    stream.dispatch(*lane.gather, backend::KernelArgs()
                                      .ptr(x.data())
                                      .ptr(table)
                                      .i64(static_cast<int64_t>(in_row))
                                      .size(static_cast<uint64_t>(rows)));
  } else {
    stream.dispatch(
        lane.copy_for(in_bytes),
        backend::KernelArgs().ptr(x.data()).ptr(slot.input->device_ptr()).size(in_bytes));
  }
  Tensor y = model_(stream, x);
  FL_CHECK_STATE(y.defined() && y.dtype() == DType::kF32 && y.rank() == 2 && y.dim(0) == rows &&
                     y.dim(1) == out_ && &y.device() == &device_,
                 "[BatchQueue] the model returned ", y.to_string(), " for x ", x.to_string(),
                 "; it must return f32[", rows, ", ", out_, "] on ", device_.name());
  y.record_stream(stream);
  stream.dispatch(
      lane.copy_for(out_bytes),
      backend::KernelArgs().ptr(slot.output->device_ptr()).ptr(y.data()).size(out_bytes));
}

void BatchQueue::launch_batch(detail::Lane& lane) {
  detail::Slot& slot = lane.free_slot();
  ++lane.in_flight;
  auto& reqs = slot.batch.requests;
  const auto b = static_cast<int64_t>(reqs.size());
  const size_t in_row = static_cast<size_t>(in_) * sizeof(float);
  Stream stream = lane.stream;
  slot.error = nullptr;
  try {
    auto* packed = static_cast<char*>(slot.input->host_ptr());
    const auto* packed_dev = static_cast<const char*>(slot.input->device_ptr());
    auto* table =
        reinterpret_cast<const void**>(packed + detail::table_offset(options_.max_batch, in_));
    const auto [bucket, rows] =
        options_.record_batches ? detail::size_bucket(b, options_.max_batch, options_.record_steps)
                                : std::pair<size_t, int64_t>(0, b);
    // Note [Inputs the device reads in place]: in a batch small enough
    // (read_in_place_max_bytes), rows with a device address go in the table
    // as they are; the others are packed, in order, from staging row 0 on
    // (all of them, when none has one or the batch is larger: the plain copy).
    const bool in_place = static_cast<size_t>(rows) * in_row <= options_.read_in_place_max_bytes;
    size_t staged = 0;
    for (int64_t i = 0; i < b; ++i) {
      const detail::Request& r = *reqs[static_cast<size_t>(i)];
      if (in_place && r.device_input) {
        table[i] = r.device_input;
        continue;
      }
      std::memcpy(packed + staged * in_row, r.input.data(), in_row);
      table[i] = packed_dev + staged * in_row;
      ++staged;
    }
    const bool gather = staged < static_cast<size_t>(b);
    if (gather) core_->recorder().read_in_place(static_cast<uint64_t>(b) - staged);
    if (gather) {
      for (int64_t i = b; i < rows; ++i) table[i] = table[0];
    } else {
      std::memset(packed + static_cast<size_t>(b) * in_row, 0,
                  static_cast<size_t>(rows - b) * in_row);
    }
    // Note [Staging leaves the worker's cache]
    if (const size_t packed_bytes = (gather ? staged : static_cast<size_t>(rows)) * in_row;
        packed_bytes >= detail::kDemoteStagingFrom)
      ::flotilla::detail::demote_to_shared_cache(packed, packed_bytes);
    if (options_.record_batches) {
      Recording& rec = slot.recorded[bucket * 2 + (gather ? 1 : 0)];
      if (rec.valid()) {
        stream.replay(rec);
      } else {
        // The warm-up computes this batch: record() drains the stream before
        // it records, so the output is in staging and nothing is replayed.
        encode_batch(lane, slot, rows, gather);
        rec = stream.record([&, rows = rows] { encode_batch(lane, slot, rows, gather); });
      }
    } else {
      encode_batch(lane, slot, b, gather);
    }
  } catch (...) {
    slot.error = std::current_exception();
  }
  try {
    slot.fence = stream.fence();
  } catch (...) {  // the device is gone or shutting down: nothing to wait for
    slot.fence = StreamFence();
    if (!slot.error) slot.error = std::current_exception();
  }
}

void BatchQueue::complete_oldest(detail::Lane& lane) {
  FL_INTERNAL_CHECK(lane.in_flight > 0, "no batch in flight to complete");
  detail::Slot& slot = lane.slots[lane.oldest];
  lane.free_released(slot.fence, detail::kKeepReleased);
  try {
    slot.fence.wait();
  } catch (...) {
    if (!slot.error) slot.error = std::current_exception();
  }
  slot.fence = StreamFence();
  const Clock::time_point end = clock_->now();
  auto& reqs = slot.batch.requests;

  try {  // metrics are best effort: never a reason to lose a result
    std::vector<std::chrono::nanoseconds> waits;
    waits.reserve(reqs.size());
    for (const auto& r : reqs)
      waits.push_back(
          std::chrono::duration_cast<std::chrono::nanoseconds>(slot.batch.picked_at - r->enqueued));
    core_->recorder().batch(
        std::chrono::duration_cast<std::chrono::nanoseconds>(end - slot.batch.picked_at), waits);
  } catch (...) {
  }

  core_->complete_batch(slot.batch, slot.error, static_cast<const float*>(slot.output->host_ptr()),
                        end, options_.workers > 0 ? &lane.released : nullptr);
  slot.error = nullptr;
  lane.oldest = (lane.oldest + 1) % lane.slots.size();
  --lane.in_flight;
}

// Note [A queue destroyed on the deciding thread]
// The callbacks of requests that submit() refuses, cancel() cancels or
// shutdown(kCancel) cancels run on the thread that made that call, before it
// returns (Note [Completion callbacks] in queue_core.h). Such a thread runs
// none of the queue's batches, so a callback there that lets go of the last
// reference may destroy the queue: the destructor drains and joins the
// workers as anywhere else. The call it is nested in must then touch
// nothing of the queue: submit() and cancel() return what they hold on
// their own stack; the parked callbacks still to run hold the core (not the
// queue) themselves; and shutdown(), which has more to do after stop(),
// first checks that the queue is still there (alive_, which only the queue
// owns): if a callback destroyed it, its destructor has joined the workers
// already. (On a thread that runs the queue's batches this cannot be done:
// Note [A queue destroyed by its own batch].)
void BatchQueue::shutdown(ShutdownMode mode) {
  FL_CHECK_STATE(!detail::QueueCore::runs_batches_of(core_.get()),
                 "[BatchQueue::shutdown] called on a thread that runs this queue's batches (a "
                 "completion callback on a worker or in step(), or the model): it would wait "
                 "for itself to finish; call shutdown() from another thread");
  const std::weak_ptr<const int> alive = alive_;
  core_->stop(mode);            // first, outside shutdown_mu_: a kCancel cuts a running drain short
  if (alive.expired()) return;  // a kCancel's callback destroyed the queue (see the Note)
  MutexLock lock(shutdown_mu_);
  if (joined_) return;
  if (options_.workers == 0) {
    MutexLock step_lock(step_mu_);
    const detail::QueueCore::WorkerScope scope(*core_);  // the drain runs the batches here
    detail::Lane& lane = *lanes_.front();
    while (core_->take_ready(lane.free_slot().batch, /*force=*/true)) run_batch(lane);
  }
  for (auto& t : threads_) t.join();
  joined_ = true;
}

bool BatchQueue::is_shut_down() const { return core_->stopping(); }

BatchQueueMetrics BatchQueue::metrics() const {
  BatchQueueMetrics m;
  core_->fill(m);
  return m;
}

std::vector<Stream> BatchQueue::streams() const {
  std::vector<Stream> out;
  for (const auto& l : lanes_) out.push_back(l->stream);
  return out;
}

}  // namespace flotilla::serve
