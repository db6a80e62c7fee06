// The state behind a BatchQueue and its RequestHandles: the requests, the
// bounded FIFO of queued ones, their deadlines, and batch formation.
// Internal to the serve layer.
//
// Note [Exactly once]
// Each Request has an atomic status. It is made kQueued (or, when refused at
// submit, already final). Leaving kQueued is a compare-and-swap to kRunning
// (a worker picked it), kCancelled (its handle or shutdown(kCancel)) or
// kExpired (its deadline), and every such move of a request in the FIFO is
// made under the core's mutex together with removing it from the FIFO and
// the deadline set: so the FIFO holds exactly the kQueued requests that are
// in it. (A queued request may also be in the inbox or in a list a worker
// took from it; only that worker moves it, to kRunning, or puts it in the
// FIFO: Note [Batches straight from the inbox].) Leaving kRunning is a
// compare-and-swap to kCompleted or kFailed by the worker that picked it.
// Whoever wins a swap is the one party that completes the request
// (finish(): once, checked); every loser sees the swap fail and leaves the
// request alone. No path ends without a swap or a final initial status, so
// every submitted request completes exactly once.
//
// Note [Batch leader]
// Of the idle workers, one at a time is the leader: it waits for a first
// request, then until the batch is full or the oldest request has waited
// max_delay, and picks the batch; then it hands leadership on and runs the
// batch outside the lock while the next leader collects. The leader's wait
// also ends at the earliest queued deadline, to expire it on time. So
// batches form in FIFO order and workers never split a batch between them.
// A worker that still has batches in flight does not queue for leadership:
// it takes a ready batch if there is one (take_ready), else completes its
// oldest batch.
//
// Note [Spinning workers]
// With spin_wait, the waits on a small batch's path spin (without the lock)
// before they sleep: a leader facing an empty queue spins for a submit, a
// leader with requests queued spins for the rest of max_delay, and an idle
// worker spins for the leadership. A futex wake-up costs the waker a system
// call and the sleeper several microseconds, both on the way to the launch;
// and a timed sleep of a few microseconds ends late (workers set a 1 us
// timer slack, but a sleep and wake-up still costs several). A leader's
// spins share one budget of spin_wait per sleep: a spin that ends because a
// request arrived or the wait's own end came looks again and spins on; one
// that spends the budget sleeps next. While the leader spins, a submit does
// not wake it (it sees leader_spinning_): the spin watches the inbox, and the
// leader looks at the inbox again under the lock when the spin ends, so none
// is missed.
//
// Note [Inbox walks outside the lock]
// Moving the inbox into the FIFO walks a list of requests that clients on
// other cores just wrote: one cache miss each. Under mu_ that walk was the
// queue's serial part (about 0.7 us a request of a worker's time on the H100
// with 64 clients, waiting for the lock included), so a worker with a batch
// in flight (take_ready) takes the inbox with one exchange, without mu_,
// walks it, and only then takes mu_ to put the requests in the FIFO
// (splice): the misses of several workers overlap, and the lock is held for
// work whose lines are already in the holder's cache. Between the exchange
// and the splice the taken requests are queued but in neither the inbox nor
// the FIFO, where a decision under mu_ would look for them. Two decisions
// need them: cancel(), which must find a queued request, waits for every
// detached list to be spliced (take_everything: it raises quiesce_, which
// holds new detaches off, and waits on splice_cv_ until detached_ is 0);
// and shutdown(kCancel), which must cancel every queued request, sets
// cancel_on_splice_, so that the splice cancels such a list instead (on the
// splicing thread, before its call returns; the shutdown then joins that
// worker, or, in manual mode, waits for that step()). The other decisions
// lose nothing: expiries of detached requests wait for the splice (a few
// microseconds), and the leader, which never detaches, is woken by the
// submits themselves (Note [Inbox]). A request taken and spliced by a
// worker may be overtaken by a later one that another worker spliced first.
//
// Note [Batches straight from the inbox]
// With 64 clients on the H100, workers waited for mu_ a quarter of their
// time (take_ready: 2.05 of 8 workers' seconds per second, the lock held
// 52 % of the time, putting each request into the FIFO and picking it out
// again: docs/PERF.md, "Batches straight from the inbox"). So a worker
// with a batch in flight that takes a list from the inbox (Note [Inbox
// walks outside the lock]) makes its batch of that list without mu_ when
// nothing else is queued (fifo_hint_ is 0), the queue is not stopping,
// none of its requests has a deadline (expiry needs the deadline set) and
// the batch is ready (max_batch, max_delay or force); of a list longer
// than max_batch, of its oldest max_batch (Note [Lists longer than a
// batch]). Each request then moves kQueued -> kRunning by its compare-and-
// swap, which always wins: a detached request is in neither the FIFO nor
// the deadline set, where cancel, expiry and shutdown(kCancel) look; the
// batch is sorted by id if a submitter was overtaken (Note [Inbox]). Then
// the room is given back and detached_ lowered, as splice() would, with the
// two wake-ups that need mu_ taken only when someone waits: a kBlock
// submitter (blocked_hint_, seq_cst against queued_) or a cancel() waiting
// for detached lists (quiesce_). A cancel() of such a request finds it
// running and returns false, as for any picked request. A shutdown(kCancel)
// that comes after the worker looked at stopping_hint_ lets the list run
// (the worker took it from the inbox before the inbox closed); one that
// came before sends it through splice(), which cancels it. Lists that do
// not qualify go through the FIFO as before. The hints are read without
// mu_: a stale one only sends a list the locked way, or lets a list run
// before requests another worker is just putting in the FIFO (ordering
// between workers' lists was never strict).
//
// Note [Lists longer than a batch]
// A list taken from the inbox with more than max_batch requests went
// through the FIFO (above), and the FIFO, once it held anything, sent every
// later list there too, until it emptied. Under a backlog longer than
// max_batch that mode lasted: on the H100, 64 clients keeping 96 requests
// each in flight ran 2.3-2.6M req/s with max_batch 512 against 5.1M with
// 1024, at p99 7-8 ms, 7.5 of 16 cores busy, the workers queueing for mu_
// (docs/PERF.md); and with max_batch 1024, more in flight than 96 gave
// less. So a worker makes its batch of such a list's oldest max_batch
// requests (by id) straight away, and pushes the rest back onto the inbox,
// where they stay queued: their room and place in queued_ are kept, and
// cancel, expiry and shutdown see them as any request in the inbox (they
// have no deadlines; a cancel waiting for detached lists finds them there,
// as the push comes before detached_ is lowered). They go back newest
// first, the inbox's own order, so the next list taken holds them in id
// order ahead of what was pushed since; the split sorts by id all the
// same (a submitter may be overtaken at its push, Note [Inbox]). If the
// inbox has closed meanwhile (shutdown), they are spliced into the FIFO
// the locked way, which cancels them after shutdown(kCancel); their tail,
// linked to the head a failed try read, is cut first, or the splice would
// walk on into requests the shutdown took. The push wakes a sleeping
// leader as a submit does.
// Each list taken is walked whole (detach_inbox reverses it), so a request
// returned k times is walked k + 1 times: a list of more than kSplitLists
// batches (a backlog far beyond max_batch, where the FIFO's one insert and
// one pick per request cost less) goes through the FIFO as before.

// Note [Room in one step]
// A fast-path submit takes its room with one fetch_add instead of a
// compare-and-swap loop on queued_, the line every client changes: the
// loop retried under contention. A submit that finds the queue full gives
// the room back and takes the slow path, which decides under mu_ with the
// exact compare-and-swap (reserve_room). queued_ may read up to the room
// such submitters asked for (one each, a group's size for a group: Note
// [Group submits]) over capacity for the moment between their add and
// their subtract; such a count is never a queued request, so the queue
// never holds more than capacity, and depth reads at most capacity. Two
// things can see that moment. A slow-path submit whose compare-and-swap
// comes in it, with the queue exactly at capacity, may be refused. A kBlock
// submitter woken in it sees a full queue and sleeps on; that loses no
// room: the submitter whose count it saw goes on to the slow path, which
// takes the room under mu_ (its deadline was still ahead when it read the
// clock, so it is not refused for that; a shutdown wakes every blocked
// submitter), unless another submit took it first, as could happen anyway.

// Note [Group submits]
// A thread with several requests at hand (a client refilling its window, a
// server's connection that delivered a few at once) may submit them as a
// group (BatchQueue::submit_all). Each fast-path submit takes the submit
// line (Note [Submit's cache line]) for its two fetch_adds and its push,
// and with 64 clients that line moves between cores on nearly every submit:
// about 0.34-0.7 us of a client's time each at 5.5M submits a second on the
// H100's host (docs/PERF.md, "The submit line"). A group takes it once: one
// clock read, one fetch_add of the group's size on queued_ (Note [Room in
// one step], with n for 1), one of the ids, consecutive in the group's
// order, and one compare-and-swap that pushes the group's requests, linked
// newest first as the inbox holds them, in one chain. Each request is then
// exactly what its own submit would have made (kQueued, its id, its inbox
// reference), so everything after the push is unchanged: a taker of the
// inbox sees the whole group or none of it, and take_inbox, take_direct
// and splits order by id as before. When the group does not fit in the room
// left, a deadline has passed or the inbox has closed, each of its requests
// takes submit()'s own path in turn, so refusals, waits for room and their
// order are those of single submits: the group is a saving, never a new
// outcome.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <set>
#include <span>
#include <utility>
#include <vector>

#include "flotilla/common/done_flag.h"
#include "flotilla/common/sync.h"
#include "flotilla/serve/batch_queue.h"
#include "serve/metrics_recorder.h"

namespace flotilla::serve::detail {

class QueueCore;

// Tests only: called by a fast-path submit between taking its room and id
// and pushing onto the inbox (null: nothing), to hold a submitter in that
// window on purpose. Set it while no queue is in use.
void set_before_push_hook_for_testing(void (*hook)());
// Tests only: called by take_ready() after it has taken a non-empty inbox
// and walked it, before it takes the core's lock to put the requests in the
// FIFO (null: nothing): holds a taker in that window (Note [Inbox walks
// outside the lock]). Set it while no queue is in use.
void set_after_detach_hook_for_testing(void (*hook)());
// Tests only: called by a fast-path submit that found the queue full, after
// its fetch_add and before it gives it back (Note [Room in one step]).
void set_room_refused_hook_for_testing(void (*hook)());
// Tests only: called as each request is destroyed (its memory freed), on
// the thread that lets go of it last (Note [Frees while the device works]
// in batch_queue.cpp). Set it while no queue is in use.
void set_request_freed_hook_for_testing(void (*hook)());
// Tests only: called once for each batch take_ready() makes straight from
// the inbox (Note [Batches straight from the inbox]), on the taking thread.
void set_took_direct_hook_for_testing(void (*hook)());
// Tests only: called once for each list take_ready() split (Note [Lists
// longer than a batch]), after the rest went back to the inbox (or, once it
// had closed, into the FIFO), on the taking thread.
void set_split_list_hook_for_testing(void (*hook)());
// Tests only: called by each try of a split list's return to the inbox,
// after its tail was linked to the head it read and before its
// compare-and-swap (Note [Lists longer than a batch]).
void set_before_return_hook_for_testing(void (*hook)());

// Note [One allocation per request]
// A request, its shared_ptr's control block and its copy of the input are one
// block from the heap (Request::make: allocate_shared with an allocator that
// adds the input's bytes after the request), not three (a handle's request
// also has its output vector, which get() hands over): with 64 clients,
// malloc was the largest item of a client's time on the H100, and every
// block a client allocates is freed by a worker, the costlier kind of free
// (docs/PERF.md). The input is written once, in the constructor, and read by
// the worker that packs the batch (a borrowed input, Note [Borrowed inputs]
// in batch_queue.cpp, is not copied: the block has no room for it). The
// allocator also places the block so that the request starts a cache line,
// whose first 64 bytes hold what a worker touches under the core's lock
// (the inbox link, id, deadline, status): taking the inbox walks a list of
// requests that other cores just wrote, one cache miss each, and every miss
// is time the lock is held.
struct Request : std::enable_shared_from_this<Request> {
  // Made by the submitting thread, outside the core's lock; `output` is
  // allocated here too, so the worker only copies into it.
  // With `on_done`, the outcome goes to it (Note [Completion callbacks]) and
  // `output` stays empty. `borrow`: the request reads `input` where it is
  // (BorrowedInput, Note [Borrowed inputs]) and its block has no room for a
  // copy.
  // `device_input`: for a borrowed input from an InputBuffer of the queue's
  // device, the address the device reads it at (Note [Inputs the device
  // reads in place] in batch_queue.cpp); else null.
  static std::shared_ptr<Request> make(std::span<const float> input, size_t out_features,
                                       Clock::time_point deadline, QueueCore* core,
                                       std::chrono::nanoseconds spin,
                                       CompletionCallback on_done = nullptr, bool borrow = false,
                                       const void* device_input = nullptr);

  // For make() only (the allocator places it): `storage` is where make()'s
  // allocator put room for input.size() floats, set before this runs; null
  // for a borrowed input, which is then used in place.
  Request(std::span<const float> input, float* const& storage, size_t out_features,
          Clock::time_point deadline, QueueCore* core, std::chrono::nanoseconds spin,
          CompletionCallback on_done, const void* device_input)
      : deadline(deadline),
        input(storage ? copy_to(input, storage) : input),
        device_input(device_input),
        core(core),
        spin(spin),
        on_done(std::move(on_done)),
        output(this->on_done ? 0 : out_features) {}

  // The fields a worker uses under the core's lock (the inbox walk, the
  // FIFO, pick) come first: make() places the request so that they share
  // one cache line (Note [One allocation per request]).
  //
  // Written once by submit(), before the request is published (in the
  // inbox, the FIFO, or to its handle); read-only after.
  uint64_t id = 0;
  // Its link in the inbox and the inbox's reference to it (Note [Inbox]):
  // written by the submitter before the push that publishes the request,
  // moved out by whoever takes the inbox.
  Request* inbox_next = nullptr;
  std::shared_ptr<Request> inbox_ref;
  const Clock::time_point deadline;  // Clock::kNever: none
  // acq_rel swaps: the winner of a move (Note [Exactly once]) sees every
  // write made before the previous move; acquire loads for status().
  std::atomic<RequestStatus> status{RequestStatus::kQueued};

  // Written once by submit(), like id.
  Clock::time_point enqueued{};  // when it entered the queue (max_delay counts from it)
  // Immutable after construction: read by the worker that picked it. Lives
  // in the request's own block (Note [One allocation per request]), or, when
  // borrowed, in the caller's memory (Note [Borrowed inputs]).
  const std::span<const float> input;
  // Where the device reads `input` in place (an InputBuffer's row), or null:
  // the worker then copies it into the batch's staging.
  const void* const device_input;
  // For cancel(), which may use it only under the lifetime lock and only
  // while the request is queued (Note [Cancel after the queue is gone]). A
  // weak_ptr would cost two atomic operations per request on one counter
  // that every client shares.
  QueueCore* const core;
  const std::chrono::nanoseconds spin;  // BatchQueueOptions::spin_wait
  // Called once by whoever completes the request, outside the core's lock
  // (Note [Completion callbacks]); empty for a handle's request.
  CompletionCallback on_done;

  ~Request();  // calls the freed hook (set_request_freed_hook_for_testing)
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;

  bool move(RequestStatus from, RequestStatus to) {
    return status.compare_exchange_strong(from, to, std::memory_order_acq_rel,
                                          std::memory_order_acquire);
  }

  // Sets the result (`row`, out_features values, or the error `err`) and
  // wakes the handle. Exactly once.
  void finish(const float* row, std::exception_ptr err);
  // Spins up to `spin`, then sleeps, until the result is in.
  void wait_done() const;

  // Note [Request result]: `output` and `error` are written only by finish(),
  // before it sets `done` (release); the handle reads them only after it saw
  // `done` set (acquire), so they need no lock. No mutex per request: a
  // batch completes its rows with one atomic exchange each, and a futex
  // wake-up only for a client asleep in get().
  DoneFlag done;
  std::vector<float> output;  // sized at construction
  std::exception_ptr error;
  // get() has handed the result over; the handle's owner's alone (a handle
  // has one owner at a time).
  bool taken = false;

 private:
  static std::span<const float> copy_to(std::span<const float> from, float* to) {
    std::copy(from.begin(), from.end(), to);
    return {to, from.size()};
  }
};

// Requests picked for one batch, in FIFO order, all kRunning.
//
// Note [Who frees a request]
// A request is shared by its handle and, while it runs, by its batch; the
// last of them to let go frees it (and its input), and a free is cheapest on
// the thread that allocated it: the client, in submit(). So complete_batch
// drops the batch's reference to each request right after completing it,
// while its client is still waking up, rather than after the last row: with
// a hundred rows a batch, a client woken by an early row used to be done
// with its handle before the worker let go, and the worker then freed most
// of the requests, into other threads' arenas (17 % of the workers' time on
// the H100 with 64 clients, docs/PERF.md). A callback request has no
// handle, so its batch always frees it: a worker hands those to its lane
// instead, which frees them while its next batch runs on the device (Note
// [Frees while the device works] in batch_queue.cpp).
struct Batch {
  std::vector<std::shared_ptr<Request>> requests;
  Clock::time_point picked_at{};
};

// Note [Completion callbacks]
// A request submitted with a callback has no handle: nobody waits on it, so
// completing it wakes no thread, and its output is not copied (the callback
// reads its row of the staging). The callback is user code, so it never
// runs under mu_ (it may submit or cancel): a decision made under mu_
// (refused, expired, cancelled) wins the request's status there, and parks
// the request in a list of the deciding thread's own (thread_local); the
// call that made the decision runs that thread's parked callbacks once it
// has let go of mu_, before it returns (run_parked), and so does a leader
// before it waits. So a refusal's callback has run when submit() returns,
// a cancellation's when cancel() returns true, each on that caller's thread,
// and no call runs callbacks another thread decided. A callback that calls
// into the queue parks and runs its own the same way (a nested call). A
// batch's completions run outside mu_ already. Handle requests are
// completed at once, under mu_ or not: their completion (a DoneFlag) runs
// no user code but the on_complete hook.

// Note [Lists longer than a batch]: the longest list take_direct() splits,
// in batches (max_batch requests).
inline constexpr size_t kSplitLists = 8;
// Note [Frees while the device works] (batch_queue.cpp): the completed
// callback requests a worker may keep unfreed before it waits on a fence.
inline constexpr size_t kKeepReleased = 512;

// Note [Cancel after the queue is gone]
// A RequestHandle may outlive its queue; cancel() on it must then return
// false without touching the freed QueueCore. Every request is final once
// its queue has shut down, and a queue shuts down before its core is freed.
// So cancel() takes the core's lifetime lock, and under it touches the
// core only if the request is still queued; the core's owner, after
// shutdown, passes through the same lock before freeing it
// (retire_after_shutdown), so no cancel() that saw a queued request is still
// using the core. Only cancel() and queue destruction take these locks.
// They cannot live in the core (it may be gone): they are kLifetimeStripes
// process-wide mutexes, a core's chosen by a hash of its address (which
// cancel() reads from the request without touching the core). A cancel()
// may wait under its lock (for lists a worker has taken from the inbox,
// Note [Inbox walks outside the lock]); with one lock for every queue,
// that held up the cancels of every other queue in the process, and their
// destructors, meanwhile. Now only queues whose cores share a stripe (1 in
// kLifetimeStripes) wait for each other.
//
// Shared: the BatchQueue owns its core, and a parked callback (Note
// [Completion callbacks]) holds it too until it has run, so that a callback
// that destroys the queue does not free the core under the callbacks parked
// after it (Note [A queue destroyed on the deciding thread] in
// batch_queue.cpp).
class QueueCore : public std::enable_shared_from_this<QueueCore> {
 public:
  // Note [A worker's own submit]
  // Marks the current thread, while it lives, as one that runs this core's
  // batches (a worker; step()'s caller, or the manual drain's), so that a
  // submit() from it, which can only come from a completion callback (or
  // the model), never waits for room under kBlock: the room it would wait
  // for is made by the workers, itself among them, so with one worker, or
  // all of them in such callbacks, it would wait for itself. Such a submit
  // is refused with QueueFull when the queue is full, as under kReject.
  // Scopes nest (a callback of queue A that steps queue B), and a thread is
  // running the batches of every core on its chain of scopes.
  class WorkerScope {
   public:
    explicit WorkerScope(const QueueCore& core);
    ~WorkerScope();
    WorkerScope(const WorkerScope&) = delete;
    WorkerScope& operator=(const WorkerScope&) = delete;

   private:
    friend class QueueCore;
    const QueueCore* const core_;
    const WorkerScope* const outer_;  // the scope this one is inside, or null
  };
  // True on a thread inside a WorkerScope of `core`, at any depth (compares
  // the pointer only: `core` may be gone).
  static bool runs_batches_of(const QueueCore* core);

  // Cancels `r` through its core, if it is still queued (see the Note).
  static bool cancel_request(Request& r);
  // Call after shutdown, before freeing the core (see the Note).
  void retire_after_shutdown() const;
  // The lifetime lock (see the Note) that guards the core of `h`'s request.
  static size_t lifetime_stripe_for_testing(const RequestHandle& h);

  // `out_features`: the values of one output row.
  QueueCore(const BatchQueueOptions& options, std::shared_ptr<Clock> clock, size_t out_features);

  // Queues `r` (new, its input already checked) or refuses it (ShutDown,
  // QueueFull, Timeout): on return it is kQueued or already final, with its
  // id. Blocks under kBlock.
  void submit(const std::shared_ptr<Request>& r) FL_EXCLUDES(mu_);
  // Queues the new requests `rs` (inputs checked, no ids yet) as that many
  // submit()s would, in order: in one step when there is room for all of
  // them, the queue is live and no deadline has passed (Note [Group
  // submits]), their ids then consecutive; else each through submit().
  void submit_all(std::span<const std::shared_ptr<Request>> rs) FL_EXCLUDES(mu_);
  // Moves the request `id` (of either kind; a handle's through
  // cancel_request) from kQueued to kCancelled and completes it; false if no
  // queued request has it.
  bool cancel(uint64_t id) FL_EXCLUDES(mu_);

  // Worker mode: blocks until this worker has picked a batch (true) or the
  // queue is stopping and empty (false: the worker exits).
  bool next_batch(Batch& batch) FL_EXCLUDES(mu_);
  // Expires what is due, then picks a batch if one is ready (or, with
  // `force`, whatever is queued), without waiting or taking leadership;
  // true if it picked one. For a worker with batches in flight, for manual
  // mode's step(), and for the manual-mode drain.
  bool take_ready(Batch& batch, bool force) FL_EXCLUDES(mu_);

  // A worker's verdict on a batch it picked: each request kRunning ->
  // kCompleted with its row of `rows` ([n, out_features]), or kFailed with
  // `error`. Clears batch.requests. `done_at`: when the batch's outputs
  // were in, the first rows' Completion::completed_at (it is read again for
  // a callback at least kClockEveryRows rows after the last read).
  // `released`: where the batch's callback requests go once completed, for
  // the caller to let go of later (Note [Frees while the device works] in
  // batch_queue.cpp); null: let go of each at once.
  void complete_batch(Batch& batch, std::exception_ptr error, const float* rows,
                      Clock::time_point done_at,
                      std::vector<std::shared_ptr<Request>>* released = nullptr);
  static constexpr size_t kClockEveryRows = 16;

  // Stops submits; kCancel completes every queued request with Cancelled.
  void stop(ShutdownMode mode) FL_EXCLUDES(mu_);
  bool stopping() const FL_EXCLUDES(mu_);
  // Wakes every waiter to look at the clock again (ManualClock listener).
  void wake() FL_EXCLUDES(mu_);

  MetricsRecorder& recorder() { return recorder_; }
  void fill(BatchQueueMetrics& m) const FL_EXCLUDES(mu_);

 private:
  // Completes a request whose final status (with error `err`) the caller
  // has just won under mu_, and counts it; a callback request is parked
  // instead (Note [Completion callbacks]).
  void finish(Request& r, RequestStatus status, std::exception_ptr err) FL_REQUIRES(mu_);
  // Runs the callbacks this thread parked (Note [Completion callbacks]);
  // call without mu_.
  static void run_parked();
  static bool has_parked();
  // Calls r's hook and callback (if any), then sets its result (`row`, or
  // `err`). Once per request; a callback request only without mu_. `when`:
  // the callback's Completion::completed_at (unused for a handle's request).
  void complete_now(Request& r, RequestStatus status, const float* row, std::exception_ptr err,
                    Clock::time_point when);
  // Completes `removed`, just taken out of the FIFO as kCancelled.
  void cancel_queued(std::shared_ptr<Request> removed) FL_REQUIRES(mu_);
  // The bodies of the entry points that may park callbacks; the public ones
  // run the parked callbacks after them.
  bool next_batch_body(Batch& batch) FL_EXCLUDES(mu_);
  bool take_ready_body(Batch& batch, bool force) FL_EXCLUDES(mu_);
  void stop_body(ShutdownMode mode) FL_EXCLUDES(mu_);
  // Completes the new request `r` with a refusal (giving it an id if it has none).
  void refuse(Request& r, RequestStatus status, std::exception_ptr err) FL_REQUIRES(mu_);
  // The part of submit() that takes mu_: refusals and waiting for room.
  void submit_slow(const std::shared_ptr<Request>& r, Clock::time_point now) FL_EXCLUDES(mu_);
  // Counts one more queued request if that stays within capacity.
  bool reserve_room();
  // The same for `n` requests in one fetch_add, for the fast paths; a false
  // is decided again by reserve_room() under mu_ (Note [Room in one step]).
  bool reserve_room_fast(size_t n = 1);
  // `n` requests left the FIFO.
  void left_fifo(size_t n);
  // Pushes `r` (with its id and its inbox_ref) onto the inbox; false once
  // the inbox is closed (stop() began). Lock-free (Note [Inbox]).
  bool push_inbox(Request& r) { return push_chain(r, r); }
  // Pushes the chain from `newest` to `oldest`, linked newest first through
  // inbox_next (the inbox's order; oldest's link is set here), in one
  // compare-and-swap; false (nothing pushed) once the inbox is closed.
  bool push_chain(Request& newest, Request& oldest);
  // Moves the inbox into the FIFO, in id order (Note [Inbox]).
  void take_inbox() FL_REQUIRES(mu_);
  // Note [Inbox walks outside the lock]: takes the inbox without mu_ and
  // walks it, unless a caller waits for every request to be in the FIFO;
  // returns its requests, oldest first, linked through inbox_next (null:
  // none). `counted`: detached_ was raised, and splice() must lower it.
  Request* detach_inbox(bool& counted) FL_EXCLUDES(mu_);
  // Puts the requests detach_inbox() returned into the FIFO (or, after
  // shutdown(kCancel), cancels them), then lowers detached_ if `counted`.
  void splice(Request* oldest, bool counted) FL_REQUIRES(mu_);
  // Note [Batches straight from the inbox]: makes `batch` of the list
  // detach_inbox() returned (counted), without mu_, when nothing else is
  // queued and the list is a ready batch of requests without deadlines
  // (of its oldest max_batch, the rest returned to the inbox: Note [Lists
  // longer than a batch]); false (the list untouched) otherwise.
  bool take_direct(Request* oldest, Batch& batch, Clock::time_point now, bool force)
      FL_EXCLUDES(mu_);
  // Splits the n-request `list` into its `keep` oldest (by id; returned,
  // linked through inbox_next) and the others (`rest`).
  static Request* split_oldest(Request* list, size_t n, size_t keep, Request*& rest);
  // Pushes a detached list back onto the inbox and wakes a sleeping leader;
  // false (the list untouched) if the inbox has closed.
  bool return_to_inbox(Request* list) FL_EXCLUDES(mu_);
  // For a caller that needs every queued request in the FIFO (cancel):
  // stops new detaches, waits for the ones under way, and takes the inbox.
  void take_everything() FL_REQUIRES(mu_);
  // Cancels the queued request `r`, just taken from the FIFO or a detached
  // list by shutdown(kCancel).
  void cancel_on_shutdown(std::shared_ptr<Request> r) FL_REQUIRES(mu_);
  // Moves the requests of an inbox list (newest first) into the FIFO.
  void move_to_fifo(uintptr_t head) FL_REQUIRES(mu_);
  // Puts `r` (queued, with its id) into the FIFO at its id's place and its
  // deadline into the set.
  void insert_fifo(std::shared_ptr<Request> r) FL_REQUIRES(mu_);
  void expire_due(Clock::time_point now) FL_REQUIRES(mu_);
  void expire(Request& r, Clock::time_point now) FL_REQUIRES(mu_);
  void pick(Batch& batch, Clock::time_point now) FL_REQUIRES(mu_);
  bool batch_ready(Clock::time_point now) const FL_REQUIRES(mu_);
  // Where the queued request `id` is in the FIFO (end(): not there).
  std::deque<std::shared_ptr<Request>>::iterator find_queued(uint64_t id) FL_REQUIRES(mu_);
  // Removes the queued request `id` from the FIFO and the deadline set.
  std::shared_ptr<Request> remove(uint64_t id) FL_REQUIRES(mu_);
  // The same for the request at `it` (a valid position).
  std::shared_ptr<Request> remove(std::deque<std::shared_ptr<Request>>::iterator it)
      FL_REQUIRES(mu_);
  void room_made() FL_REQUIRES(mu_);
  // After every change to the FIFO: its size for take_direct().
  void fifo_changed() FL_REQUIRES(mu_) {
    fifo_hint_.store(fifo_.size(), std::memory_order_relaxed);
  }
  void set_blocked(int n) FL_REQUIRES(mu_) {
    blocked_ = n;
    blocked_hint_.store(n, std::memory_order_seq_cst);
  }
  void set_leader(bool on) FL_REQUIRES(mu_) {
    leader_ = on;
    leader_hint_.store(on, std::memory_order_release);
  }
  // Note [Inbox]: after a push onto the inbox (seq_cst), wakes the leader
  // if it sleeps waiting for work (not spinning: it watches the inbox) and
  // `may_change()` says the push may change its decision; the exchange lets
  // one pusher wake it, not every one that saw it waiting. Only the leader
  // waits on work_cv_.
  template <typename MayChange>
  void wake_sleeping_leader(MayChange may_change) FL_EXCLUDES(mu_) {
    if (leader_waiting_.load(std::memory_order_seq_cst) &&
        !leader_spinning_.load(std::memory_order_seq_cst) && may_change() &&
        leader_waiting_.exchange(false, std::memory_order_seq_cst)) {
      MutexLock lock(mu_);
      bump_events();
      work_cv_.notify_one();
    }
  }
  void bump_events() FL_REQUIRES(mu_) {
    ++events_;
    events_hint_.store(events_, std::memory_order_release);
  }

  const BatchQueueOptions options_;
  const std::shared_ptr<Clock> clock_;
  const size_t out_features_;

  // Note [Submit's cache line]
  // Every fast-path submit changes queued_, next_id_ and inbox_head_ and
  // reads the leader's flags; 64 clients on 16 cores do it millions of
  // times a second, so each of those lines moves from core to core on
  // nearly every submit. They used to lie on three lines, each shared with
  // fields the workers write per batch (detached_, max_depth_, fifo_hint_,
  // events_hint_): three transfers a submit, and the workers' writes took
  // the lines away between submits (QueueCore::submit and push_inbox were
  // 45 % of a client's samples on the H100: docs/PERF.md). Now what a submit
  // touches is one line, which it takes once for its three read-modify-
  // writes; what the workers write per batch is on a line of its own, and
  // mu_ with what it guards on another. kLine is 128: Intel's adjacent-line
  // prefetcher moves lines in pairs.
  static constexpr size_t kLine = 128;

  // Note [Submit's short hold]
  // Under load the submit line has waiters, and it moves to the next one as
  // soon as a locked instruction on it retires: a submit that does other
  // work between its read-modify-writes on the line may have to fetch it
  // again. On the H100 with 64 clients at 112 in flight on a tiny model
  // (the host's work alone), 12 % of a client's samples were on
  // push_inbox's load of the inbox head, the line gone again a few
  // instructions after submit's fetch_adds took it (docs/PERF.md, "The
  // submit line"); between them lay the inbox's reference to the request (a
  // locked increment on the request's own control block) and a call. So
  // what touches only the request is done before the first fetch_add, and
  // the fetch_adds, the head's load and the compare-and-swap follow one
  // another: 1.14x requests/s on that model, side by side; the seed's MLP,
  // whose pace the device sets, was level (0.99x).

  // The submit line. Note [Inbox]: submits that need no decision (room, a
  // live queue, a future deadline) push onto the inbox, a lock-free stack of
  // requests linked through Request::inbox_next, with one compare-and-swap;
  // no lock is taken on that path, so 64 submitting threads on 16 cores
  // never wait for a preempted lock holder. Whoever takes mu_ moves the inbox
  // into the FIFO first (take_inbox), so under mu_ the FIFO is complete. Ids
  // come from an atomic counter; a submitter may be overtaken between its id
  // and its push, so take_inbox puts each request at its id's place (almost
  // always the back), and the FIFO stays in id order. stop() swaps the head
  // for kInboxClosed under mu_; a push that finds it fails and the submit
  // takes the slow path, which refuses it (ShutDown): nothing is left in a
  // closed inbox. A leader about to wait sets leader_waiting_ and then looks
  // at the inbox once more; a fast submit pushes and then reads
  // leader_waiting_ (all seq_cst): one of the two sees the other, so no
  // request sleeps in the inbox while the leader sleeps (a woken leader is
  // notified under mu_).
  static constexpr uintptr_t kInboxClosed = 1;
  alignas(kLine) std::atomic<uintptr_t> inbox_head_{0};  // a Request*, 0 (empty) or kInboxClosed
  std::atomic<uint64_t> next_id_{1};  // every submit takes one: submitted = next_id_ - 1
  // Requests queued (FIFO + inbox); reserve_room() keeps it <= capacity.
  std::atomic<size_t> queued_{0};
  // When the waiting leader's timed wait ends (kNever: none is waiting).
  // Written under mu_ by the leader; read by slow-path submits under mu_ and
  // by fast-path submits without it (relaxed: a stale value only wakes the
  // leader early, or leaves it to its timed wait).
  std::atomic<Clock::time_point> leader_wake_{Clock::kNever};
  std::atomic<bool> leader_waiting_{false};
  // The waiting leader saw an empty FIFO: it waits for a first request, and
  // any submit must wake it (else its wait ends only by a deadline).
  std::atomic<bool> leader_waits_first_{false};
  // The leader is spinning for a submit (Note [Spinning workers]).
  std::atomic<bool> leader_spinning_{false};

  // The workers' line (Note [Submit's cache line]).
  // Note [Inbox walks outside the lock]: the inbox lists workers have taken
  // and not yet put into the FIFO, and the callers (cancel) waiting for
  // them, who hold new detaches off meanwhile. seq_cst, both: a detacher
  // raises detached_ and then reads quiesce_; a waiter raises quiesce_ and
  // then reads detached_; one of the two sees the other.
  alignas(kLine) std::atomic<int> detached_{0};
  std::atomic<int> quiesce_{0};
  // Copies for take_direct(), which runs without mu_ (Note [Batches
  // straight from the inbox]); each written under mu_ with what it copies.
  std::atomic<size_t> fifo_hint_{0};        // fifo_.size()
  std::atomic<bool> stopping_hint_{false};  // stopping_
  std::atomic<int> blocked_hint_{0};        // blocked_ (seq_cst: see take_direct)
  // The most requests queued at once that take_direct() saw (queued_ as it
  // took a list); max_depth reports the larger of this and max_depth_.
  std::atomic<size_t> max_queued_{0};
  // A copy of leader_ for workers spinning for the leadership; written under
  // mu_ (release), read without it.
  std::atomic<bool> leader_hint_{false};
  // A copy of events_ for the leader's spin (spin_wait), which runs without
  // mu_; written under mu_ (release), read with acquire.
  std::atomic<uint64_t> events_hint_{0};

  // Guards the FIFO, the deadlines and the flags below. Taken by every batch
  // and by submits that need a decision (Note [Inbox]); the hot paths take it
  // with kSpinFirst.
  alignas(kLine) mutable Mutex mu_;
  std::deque<std::shared_ptr<Request>> fifo_ FL_GUARDED_BY(mu_);  // kQueued only, ids ascending
  std::set<std::pair<Clock::time_point, uint64_t>> deadlines_ FL_GUARDED_BY(mu_);
  CondVar splice_cv_;  // detached_ fell while quiesce_ was raised
  // shutdown(kCancel) began: a detached list is cancelled as it is spliced.
  bool cancel_on_splice_ FL_GUARDED_BY(mu_) = false;
  size_t max_depth_ FL_GUARDED_BY(mu_) = 0;
  bool stopping_ FL_GUARDED_BY(mu_) = false;
  bool leader_ FL_GUARDED_BY(mu_) = false;  // a worker is collecting (Note [Batch leader])
  uint64_t events_ FL_GUARDED_BY(mu_) = 0;  // bumped by submit and stop: ends the leader's wait
  int blocked_ FL_GUARDED_BY(mu_) = 0;      // submitters waiting for room (kBlock)
  CondVar work_cv_;   // the leader waits for requests, max_delay or a deadline
  CondVar idle_cv_;   // workers wait to become the leader
  CondVar space_cv_;  // kBlock submitters wait for room

  // Written by the workers per batch (its own lines: Note [Submit's cache line]).
  alignas(kLine) MetricsRecorder recorder_;
};

}  // namespace flotilla::serve::detail
