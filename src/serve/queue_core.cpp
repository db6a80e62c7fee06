#include "serve/queue_core.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <new>

#include "flotilla/common/error.h"
#include "flotilla/common/spin.h"

namespace flotilla::serve::detail {

namespace {

int64_t micros(Clock::duration d) {
  return std::chrono::duration_cast<std::chrono::microseconds>(d).count();
}

}  // namespace

namespace {

// Request::make's order to its allocator: the floats to add after the
// block, and where they went. allocate_shared calls allocate() on make()'s
// thread, before it builds the Request; a thread_local (rather than state in
// the allocator) keeps the allocator empty, so the control block holds no
// copy of it and the request sits right after the block's 16-byte header.
struct TrailingFloats {
  size_t count = 0;
  float* at = nullptr;
};
thread_local TrailingFloats t_trailing;

// allocate_shared's allocator for Request::make (Note [One allocation per
// request]). A block is [original pointer | padding | control block header
// (16 bytes) | Request | t_trailing.count floats], placed so that the
// Request starts a cache line: the header is the line before it.
template <typename T>
struct WithTrailingFloats {
  using value_type = T;
  static constexpr size_t kLine = 64, kHeader = 16;  // libstdc++'s counts before the object
  static_assert(alignof(T) <= kHeader && sizeof(T) % alignof(float) == 0);

  WithTrailingFloats() = default;
  template <typename U>
  WithTrailingFloats(const WithTrailingFloats<U>&) {}  // NOLINT: rebinding is implicit

  T* allocate(size_t n) {
    const size_t object = n * sizeof(T);
    const size_t extra = t_trailing.count * sizeof(float);
    char* raw = static_cast<char*>(::operator new(sizeof(void*) + kLine + object + extra));
    // The first address after the saved pointer whose object starts a line.
    const auto base = reinterpret_cast<uintptr_t>(raw) + sizeof(void*) + kHeader;
    char* block =
        raw + ((base + kLine - 1) / kLine * kLine - kHeader - reinterpret_cast<uintptr_t>(raw));
    std::memcpy(block - sizeof(void*), &raw, sizeof(void*));
    t_trailing.at = reinterpret_cast<float*>(block + object);
    return reinterpret_cast<T*>(block);
  }
  void deallocate(T* p, size_t) noexcept {
    char* raw = nullptr;
    std::memcpy(&raw, reinterpret_cast<char*>(p) - sizeof(void*), sizeof(void*));
    ::operator delete(raw);
  }
  template <typename U>
  bool operator==(const WithTrailingFloats<U>&) const {
    return true;
  }
};

}  // namespace

std::shared_ptr<Request> Request::make(std::span<const float> input, size_t out_features,
                                       Clock::time_point deadline, QueueCore* core,
                                       std::chrono::nanoseconds spin, CompletionCallback on_done,
                                       bool borrow, const void* device_input) {
  static float* const kInPlace = nullptr;  // a borrowed input's `storage`: no copy
  t_trailing = {borrow ? 0 : input.size(), nullptr};
  // A reference: t_trailing.at is set by the allocator before the Request
  // is built.
  float* const& storage = borrow ? kInPlace : t_trailing.at;
  return std::allocate_shared<Request>(WithTrailingFloats<Request>(), input, storage, out_features,
                                       deadline, core, spin, std::move(on_done), device_input);
}

void Request::finish(const float* row, std::exception_ptr err) {
  FL_INTERNAL_CHECK(!done.is_set(), "request ", id, " completed twice (Note [Exactly once])");
  if (!err) std::copy(row, row + output.size(), output.begin());
  error = std::move(err);
  done.set();  // Note [Request result]
}

void Request::wait_done() const {
  if (!::flotilla::detail::spin_until([&] { return done.is_set(); }, spin)) done.wait();
}

namespace {
std::atomic<void (*)()> g_before_push{nullptr};    // set_before_push_hook_for_testing
std::atomic<void (*)()> g_after_detach{nullptr};   // set_after_detach_hook_for_testing
std::atomic<void (*)()> g_room_refused{nullptr};   // set_room_refused_hook_for_testing
std::atomic<void (*)()> g_took_direct{nullptr};    // set_took_direct_hook_for_testing
std::atomic<void (*)()> g_freed{nullptr};          // set_request_freed_hook_for_testing
std::atomic<void (*)()> g_split_list{nullptr};     // set_split_list_hook_for_testing
std::atomic<void (*)()> g_before_return{nullptr};  // set_before_return_hook_for_testing
}  // namespace

Request::~Request() {
  if (auto* hook = g_freed.load(std::memory_order_relaxed)) hook();
}
void set_request_freed_hook_for_testing(void (*hook)()) { g_freed.store(hook); }

void set_before_push_hook_for_testing(void (*hook)()) { g_before_push.store(hook); }
void set_after_detach_hook_for_testing(void (*hook)()) { g_after_detach.store(hook); }
void set_room_refused_hook_for_testing(void (*hook)()) { g_room_refused.store(hook); }
void set_took_direct_hook_for_testing(void (*hook)()) { g_took_direct.store(hook); }
void set_split_list_hook_for_testing(void (*hook)()) { g_split_list.store(hook); }
void set_before_return_hook_for_testing(void (*hook)()) { g_before_return.store(hook); }

QueueCore::QueueCore(const BatchQueueOptions& options, std::shared_ptr<Clock> clock,
                     size_t out_features)
    : options_(options),
      clock_(std::move(clock)),
      out_features_(out_features),
      recorder_(options.metrics_window, options.max_batch) {
  // Note [Submit's cache line]: the queue is placed on a kLine boundary, and
  // the seven fields of the submit line are contiguous, in their declared
  // order, from the start of their group: a field moved into or out of the
  // group, or a group that lost its alignment, fails here.
  const auto at = [this](const void* p) {
    return reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(this);
  };
  const uintptr_t line = at(&inbox_head_);
  FL_INTERNAL_CHECK(reinterpret_cast<uintptr_t>(this) % kLine == 0 && line % kLine == 0 &&
                        at(&next_id_) == line + 8 && at(&queued_) == line + 16 &&
                        at(&leader_wake_) == line + 24 && at(&leader_waiting_) == line + 32 &&
                        at(&leader_waits_first_) == line + 33 && at(&leader_spinning_) == line + 34,
                    "QueueCore's submit line is not as Note [Submit's cache line] says");
}

namespace {
// Callback requests this thread made final under a core's mu_, waiting for
// their callbacks (Note [Completion callbacks]).
struct Parked {
  // Owned: the callback of an earlier parked request may destroy the queue
  // (Note [A queue destroyed on the deciding thread] in batch_queue.cpp).
  std::shared_ptr<QueueCore> core;
  std::shared_ptr<Request> request;
  std::exception_ptr error;
};
thread_local std::vector<Parked> t_parked;
// The innermost scope of the cores whose batches this thread is running
// (Note [A worker's own submit]).
thread_local const QueueCore::WorkerScope* t_worker_scope = nullptr;
}  // namespace

void QueueCore::finish(Request& r, RequestStatus status, std::exception_ptr err) {
  recorder_.outcome(status);
  if (!r.on_done) return complete_now(r, status, nullptr, std::move(err), Clock::time_point{});
  // Note [Completion callbacks]: not under mu_; this thread runs it before
  // its call returns.
  t_parked.push_back({shared_from_this(), r.shared_from_this(), std::move(err)});
}

QueueCore::WorkerScope::WorkerScope(const QueueCore& core) : core_(&core), outer_(t_worker_scope) {
  t_worker_scope = this;
}

QueueCore::WorkerScope::~WorkerScope() { t_worker_scope = outer_; }

bool QueueCore::runs_batches_of(const QueueCore* core) {
  for (const WorkerScope* s = t_worker_scope; s != nullptr; s = s->outer_)
    if (s->core_ == core) return true;
  return false;
}

bool QueueCore::has_parked() { return !t_parked.empty(); }

void QueueCore::run_parked() {
  if (t_parked.empty()) return;
  // Taken out first: a callback that calls into a queue parks and runs its own.
  std::vector<Parked> parked;
  parked.swap(t_parked);
  for (Parked& p : parked)
    p.core->complete_now(*p.request, p.request->status.load(std::memory_order_acquire), nullptr,
                         std::move(p.error), p.core->clock_->now());
}

void QueueCore::complete_now(Request& r, RequestStatus status, const float* row,
                             std::exception_ptr err, Clock::time_point when) {
  if (options_.on_complete) {
    try {
      options_.on_complete(r.id, status);
    } catch (...) {  // a tracing hook must not take the queue down
    }
  }
  if (r.on_done) {
    Completion c;
    c.id = r.id;
    c.status = status;
    if (!err) c.output = std::span<const float>(row, out_features_);
    c.error = err;
    c.completed_at = when;
    try {
      r.on_done(c);
    } catch (...) {  // the user's code: counted, and the queue goes on
      recorder_.callback_exception();
    }
    r.on_done = nullptr;  // what it holds goes now, not with the request
  }
  r.finish(row, std::move(err));
}

void QueueCore::refuse(Request& r, RequestStatus status, std::exception_ptr err) {
  if (r.id == 0) r.id = next_id_.fetch_add(1, std::memory_order_relaxed);
  const bool won = r.move(RequestStatus::kQueued, status);
  FL_INTERNAL_CHECK(won, "new request ", r.id, " was not queued");
  finish(r, status, std::move(err));
}

bool QueueCore::reserve_room() {
  size_t q = queued_.load(std::memory_order_relaxed);
  while (q < options_.capacity) {
    if (queued_.compare_exchange_weak(q, q + 1, std::memory_order_relaxed)) return true;
  }
  return false;
}

bool QueueCore::reserve_room_fast(size_t n) {
  // Note [Room in one step]
  if (queued_.fetch_add(n, std::memory_order_relaxed) + n <= options_.capacity) return true;
  if (auto* hook = g_room_refused.load(std::memory_order_relaxed)) hook();
  queued_.fetch_sub(n, std::memory_order_relaxed);
  return false;
}

void QueueCore::left_fifo(size_t n) { queued_.fetch_sub(n, std::memory_order_relaxed); }

bool QueueCore::push_chain(Request& newest, Request& oldest) {
  // Note [Submit's short hold]: the inbox_refs (and a group's links) are
  // set by the caller.
  uintptr_t head = inbox_head_.load(std::memory_order_relaxed);
  do {
    if (head == kInboxClosed) return false;
    oldest.inbox_next = reinterpret_cast<Request*>(head);
    // seq_cst: publishes the requests (release) and orders the push before
    // the read of leader_waiting_ that follows it (Note [Inbox]).
  } while (!inbox_head_.compare_exchange_weak(head, reinterpret_cast<uintptr_t>(&newest),
                                              std::memory_order_seq_cst,
                                              std::memory_order_relaxed));
  return true;
}

void QueueCore::insert_fifo(std::shared_ptr<Request> r) {
  if (r->deadline != Clock::kNever) deadlines_.emplace(r->deadline, r->id);
  if (fifo_.empty() || fifo_.back()->id < r->id) {
    fifo_.push_back(std::move(r));
  } else {
    // Overtaken between its id and its push (Note [Inbox]): rare, and near the back.
    auto it = fifo_.end();
    while (it != fifo_.begin() && (*(it - 1))->id > r->id) --it;
    fifo_.insert(it, std::move(r));
  }
  fifo_changed();
}

void QueueCore::take_inbox() {
  uintptr_t head = inbox_head_.load(std::memory_order_seq_cst);
  do {
    if (head == 0 || head == kInboxClosed) return;
  } while (!inbox_head_.compare_exchange_weak(head, 0, std::memory_order_seq_cst,
                                              std::memory_order_seq_cst));
  move_to_fifo(head);
}

namespace {
// The inbox is a stack, the newest first: reverses the links of the list at
// `head` (a Request*) and returns its oldest request.
Request* oldest_first(uintptr_t head) {
  Request* oldest = nullptr;
  for (auto* r = reinterpret_cast<Request*>(head); r != nullptr;) {
    Request* next = r->inbox_next;
    r->inbox_next = oldest;
    oldest = r;
    r = next;
  }
  return oldest;
}
}  // namespace

Request* QueueCore::detach_inbox(bool& counted) {
  counted = false;
  uintptr_t head = inbox_head_.load(std::memory_order_relaxed);
  if (head == 0 || head == kInboxClosed) return nullptr;
  // Note [Inbox walks outside the lock]: say so before looking at quiesce_.
  detached_.fetch_add(1, std::memory_order_seq_cst);
  counted = true;
  if (quiesce_.load(std::memory_order_seq_cst) > 0) return nullptr;  // a cancel waits
  head = inbox_head_.load(std::memory_order_seq_cst);
  do {
    if (head == 0 || head == kInboxClosed) return nullptr;
  } while (!inbox_head_.compare_exchange_weak(head, 0, std::memory_order_seq_cst,
                                              std::memory_order_seq_cst));
  // Each request's line comes into this core's cache here, without the lock.
  Request* const oldest = oldest_first(head);
  if (auto* hook = g_after_detach.load(std::memory_order_relaxed)) hook();
  return oldest;
}

void QueueCore::splice(Request* oldest, bool counted) {
  while (oldest != nullptr) {
    Request& r = *oldest;
    oldest = r.inbox_next;
    r.inbox_next = nullptr;
    if (cancel_on_splice_)
      cancel_on_shutdown(std::move(r.inbox_ref));
    else
      insert_fifo(std::move(r.inbox_ref));
  }
  max_depth_ = std::max(max_depth_, fifo_.size());
  if (counted) {
    // Under mu_, as a waiter looks at it: its wait cannot miss this.
    detached_.fetch_sub(1, std::memory_order_seq_cst);
    if (quiesce_.load(std::memory_order_seq_cst) > 0) splice_cv_.notify_all();
  }
}

bool QueueCore::take_direct(Request* oldest, Batch& batch, Clock::time_point now, bool force) {
  // Note [Batches straight from the inbox]
  if (fifo_hint_.load(std::memory_order_relaxed) != 0 ||
      stopping_hint_.load(std::memory_order_acquire))
    return false;
  const auto max_batch = static_cast<size_t>(options_.max_batch);
  size_t n = 0;
  Clock::time_point first = Clock::kNever;
  for (const Request* r = oldest; r != nullptr; r = r->inbox_next) {
    // Note [Lists longer than a batch]: up to kSplitLists batches' worth.
    if (++n > kSplitLists * max_batch || r->deadline != Clock::kNever) return false;
    first = std::min(first, r->enqueued);
  }
  if (!force && n < max_batch && now < first + options_.max_delay) return false;
  // Note [Lists longer than a batch]
  Request* rest = nullptr;
  if (n > max_batch) {
    oldest = split_oldest(oldest, n, max_batch, rest);
    n = max_batch;
  }
  if (auto* hook = g_took_direct.load(std::memory_order_relaxed)) hook();
  batch.requests.clear();
  batch.picked_at = now;
  bool in_order = true;
  uint64_t last = 0;
  for (Request* r = oldest; r != nullptr;) {
    Request* const next = r->inbox_next;
    r->inbox_next = nullptr;
    // A detached request is in neither the FIFO nor the deadline set, where
    // cancel, expiry and shutdown(kCancel) look: it is kQueued, and this is
    // the one move out of it.
    const bool won = r->move(RequestStatus::kQueued, RequestStatus::kRunning);
    FL_INTERNAL_CHECK(won, "request ", r->id, " taken from the inbox was not queued");
    in_order = in_order && r->id > last;
    last = r->id;
    batch.requests.push_back(std::move(r->inbox_ref));
    r = next;
  }
  // Overtaken between its id and its push (Note [Inbox]): the batch keeps id order.
  if (!in_order)
    std::sort(batch.requests.begin(), batch.requests.end(),
              [](const auto& a, const auto& b) { return a->id < b->id; });
  // The rest stay queued: back into the inbox, before detached_ is lowered
  // (a cancel waiting for detached lists then finds them there), or, once
  // the inbox has closed, into the FIFO the locked way (which cancels them
  // after shutdown(kCancel)).
  if (rest != nullptr) {
    if (!return_to_inbox(rest)) {
      MutexLock lock(mu_);
      splice(rest, /*counted=*/false);
    }
    if (auto* hook = g_split_list.load(std::memory_order_relaxed)) hook();
  }
  // queued_ counts these still: how many were queued at once.
  const size_t depth = std::min(queued_.load(std::memory_order_relaxed),
                                options_.capacity);  // Note [Room in one step]
  size_t seen = max_queued_.load(std::memory_order_relaxed);
  while (depth > seen &&
         !max_queued_.compare_exchange_weak(seen, depth, std::memory_order_relaxed)) {
  }
  // seq_cst, both: a kBlock submitter raises blocked_hint_ and then looks at
  // queued_; one of the two sees the other, and a submitter that may have
  // missed this room is woken under mu_, where it waits.
  queued_.fetch_sub(n, std::memory_order_seq_cst);
  if (blocked_hint_.load(std::memory_order_seq_cst) > 0) {
    MutexLock lock(mu_);
    room_made();
  }
  // Note [Inbox walks outside the lock]: a cancel() waiting for detached
  // lists waits under mu_, so it is woken under mu_ too.
  detached_.fetch_sub(1, std::memory_order_seq_cst);
  if (quiesce_.load(std::memory_order_seq_cst) > 0) {
    MutexLock lock(mu_);
    splice_cv_.notify_all();
  }
  return true;
}

Request* QueueCore::split_oldest(Request* list, size_t n, size_t keep, Request*& rest) {
  // Sorted whole by id (the list is mostly in order already; a submitter
  // may be overtaken between its id and its push, Note [Inbox]): the batch
  // oldest first, and the rest linked newest first, the inbox's own order,
  // so that the next list taken (oldest_first) holds them in id order,
  // ahead of what was pushed since: a splice of that list into the FIFO
  // then appends each request instead of searching back for its place.
  thread_local std::vector<Request*> all;
  all.clear();
  all.reserve(n);
  for (Request* r = list; r != nullptr; r = r->inbox_next) all.push_back(r);
  std::sort(all.begin(), all.end(),
            [](const Request* a, const Request* b) { return a->id < b->id; });
  const auto mid = all.begin() + static_cast<std::ptrdiff_t>(keep);
  for (auto it = all.begin(); it != mid; ++it)
    (*it)->inbox_next = it + 1 != mid ? *(it + 1) : nullptr;
  rest = nullptr;
  for (auto it = mid; it != all.end(); ++it) {  // oldest first, each pushed on top
    (*it)->inbox_next = rest;
    rest = *it;
  }
  return keep > 0 ? all.front() : nullptr;
}

bool QueueCore::return_to_inbox(Request* list) {
  Request* tail = list;
  while (tail->inbox_next != nullptr) tail = tail->inbox_next;
  uintptr_t head = inbox_head_.load(std::memory_order_relaxed);
  do {
    if (head == kInboxClosed) {
      // Untouched, as the caller splices it: the tail must not lead into
      // requests the shutdown has taken from the inbox since a failed try.
      tail->inbox_next = nullptr;
      return false;
    }
    tail->inbox_next = reinterpret_cast<Request*>(head);
    if (auto* hook = g_before_return.load(std::memory_order_relaxed)) hook();
    // seq_cst, as a submit's push: orders it before the read of
    // leader_waiting_ below (Note [Inbox]).
  } while (!inbox_head_.compare_exchange_weak(head, reinterpret_cast<uintptr_t>(list),
                                              std::memory_order_seq_cst,
                                              std::memory_order_relaxed));
  // Wake a sleeping leader, whatever it waits for: these requests are
  // queued and nobody may come to the inbox for them otherwise until this
  // worker comes back.
  wake_sleeping_leader([] { return true; });
  return true;
}

void QueueCore::take_everything() {
  quiesce_.fetch_add(1, std::memory_order_seq_cst);
  splice_cv_.wait(mu_, [&] { return detached_.load(std::memory_order_seq_cst) == 0; });
  quiesce_.fetch_sub(1, std::memory_order_seq_cst);
  take_inbox();
}

void QueueCore::move_to_fifo(uintptr_t head) {
  if (head == 0 || head == kInboxClosed) return;
  splice(oldest_first(head), /*counted=*/false);
}

namespace {
// Guard the lifetimes of the QueueCores against cancel(), each core's by
// the stripe its address picks (Note [Cancel after the queue is gone]);
// they hold no data.
constexpr size_t kLifetimeStripes = 64;
std::array<Mutex, kLifetimeStripes> g_lifetime_mu;

size_t lifetime_stripe(const QueueCore* core) {
  // Fibonacci hashing: cores are 128-byte aligned and often a fixed stride
  // apart, so the low bits alone would crowd a few stripes.
  const uint64_t h =
      static_cast<uint64_t>(reinterpret_cast<uintptr_t>(core)) * 0x9E3779B97F4A7C15ull;
  return static_cast<size_t>(h >> 58);  // 6 bits: kLifetimeStripes
}
static_assert(kLifetimeStripes == 64, "lifetime_stripe() keeps 6 bits");
}  // namespace

bool QueueCore::cancel_request(Request& r) {
  // The pointer only: the core may be gone.
  MutexLock lock(g_lifetime_mu[lifetime_stripe(r.core)]);
  if (r.status.load(std::memory_order_acquire) != RequestStatus::kQueued) return false;
  return r.core->cancel(r.id);  // queued: its queue has not shut down, the core lives
}

void QueueCore::retire_after_shutdown() const {
  MutexLock lock(g_lifetime_mu[lifetime_stripe(this)]);
}

size_t QueueCore::lifetime_stripe_for_testing(const RequestHandle& h) {
  return lifetime_stripe(h.req_->core);
}

void QueueCore::submit(const std::shared_ptr<Request>& r) {
  // The clock is read before any lock: on some machines (a VM whose clock
  // source is not the TSC) a clock read is a system call of a microsecond or
  // more. So enqueued times may be out of order by the time two submitters
  // took to get in (max_delay counts from the front's time: it can run short
  // by that much, never long).
  const Clock::time_point now = clock_->now();
  r->enqueued = now;
  // The fast path (Note [Inbox]): room, a live queue and a future deadline.
  if (r->deadline > now) {
    r->inbox_ref = r;  // before the submit line is touched (Note [Submit's short hold])
    if (reserve_room_fast()) {
      r->id = next_id_.fetch_add(1, std::memory_order_relaxed);
      if (auto* hook = g_before_push.load(std::memory_order_relaxed)) hook();
      if (push_inbox(*r)) {
        // Wake the waiting leader only when its decision may change: it waits
        // for a first request, the batch is full, or this deadline comes
        // before the time it sleeps until; otherwise its timed wait
        // (max_delay) ends by itself. What decides is the leader's own view
        // (leader_waits_first_, set as it looked at the FIFO), not the count
        // this submit saw when it took its room: another request may have
        // been picked since. A spinning leader needs no wake-up (Note
        // [Spinning workers]).
        wake_sleeping_leader([&] {
          return leader_waits_first_.load(std::memory_order_seq_cst) ||
                 queued_.load(std::memory_order_relaxed) >=
                     static_cast<size_t>(options_.max_batch) ||
                 r->deadline < leader_wake_.load(std::memory_order_relaxed);
        });
        return;
      }
      left_fifo(1);  // the inbox is closed: give the room back; the slow path refuses it
    }
    r->inbox_ref.reset();  // not pushed
  }
  submit_slow(r, now);
  run_parked();  // a refusal's callback (Note [Completion callbacks])
}

void QueueCore::submit_all(std::span<const std::shared_ptr<Request>> rs) {
  // Note [Group submits]
  if (rs.empty()) return;
  const size_t n = rs.size();
  const Clock::time_point now = clock_->now();  // one read for the group
  Clock::time_point earliest = Clock::kNever;
  for (const auto& r : rs) earliest = std::min(earliest, r->deadline);
  if (earliest > now) {
    // What touches only the requests comes before the submit line is
    // touched (Note [Submit's short hold]): their inbox references, and
    // the chain, newest first, that one compare-and-swap pushes.
    for (size_t i = 0; i < n; ++i) {
      Request& r = *rs[i];
      r.enqueued = now;
      r.inbox_ref = rs[i];
      r.inbox_next = i > 0 ? rs[i - 1].get() : nullptr;
    }
    if (reserve_room_fast(n)) {
      const uint64_t first = next_id_.fetch_add(n, std::memory_order_relaxed);
      for (size_t i = 0; i < n; ++i) rs[i]->id = first + i;
      if (auto* hook = g_before_push.load(std::memory_order_relaxed)) hook();
      if (push_chain(*rs[n - 1], *rs[0])) {
        // As submit(): wake the leader only when its decision may change.
        wake_sleeping_leader([&] {
          return leader_waits_first_.load(std::memory_order_seq_cst) ||
                 queued_.load(std::memory_order_relaxed) >=
                     static_cast<size_t>(options_.max_batch) ||
                 earliest < leader_wake_.load(std::memory_order_relaxed);
        });
        return;
      }
      // The inbox is closed: give the room back; the slow path refuses
      // each (ShutDown), keeping the ids they took, as submit() does.
      left_fifo(n);
      for (const auto& r : rs) {
        r->inbox_ref.reset();
        r->inbox_next = nullptr;
        submit_slow(r, now);
      }
      run_parked();
      return;
    }
    for (const auto& r : rs) {  // not pushed
      r->inbox_ref.reset();
      r->inbox_next = nullptr;
    }
  }
  // No room for the whole group, or a deadline passed: each alone, in
  // order, with submit()'s own decisions (room for the first ones, a
  // refusal or a wait for the rest).
  for (const auto& r : rs) submit(r);
}

void QueueCore::submit_slow(const std::shared_ptr<Request>& r, Clock::time_point now) {
  MutexLock lock(mu_, kSpinFirst);
  take_inbox();
  const Clock::time_point deadline = r->deadline;
  if (stopping_)
    return refuse(*r, RequestStatus::kShutDown,
                  std::make_exception_ptr(ShutDown(
                      "[BatchQueue::submit] the queue is shutting down; submit to a live queue")));
  if (deadline <= now)
    return refuse(*r, RequestStatus::kExpired,
                  std::make_exception_ptr(
                      Timeout("[BatchQueue::submit] the request's deadline had passed when it was "
                              "submitted; give it a later deadline")));
  if (!reserve_room()) {
    const auto refuse_full = [&](const char* what_to_do) FL_REQUIRES(mu_) {
      refuse(*r, RequestStatus::kRejected,
             std::make_exception_ptr(QueueFull(::flotilla::detail::str_cat(
                 "[BatchQueue::submit] the queue holds its capacity of ", options_.capacity,
                 " requests", what_to_do))));
    };
    if (options_.when_full == OverflowPolicy::kReject)
      return refuse_full(
          "; retry later, raise capacity, add workers, or use OverflowPolicy::kBlock");
    if (runs_batches_of(this))  // Note [A worker's own submit]
      return refuse_full(
          ", and this submit() runs on a thread that runs the queue's batches (a completion "
          "callback on a worker, or in step()): waiting for room there could wait for itself, "
          "so it does not wait (OverflowPolicy::kBlock applies to other threads); submit from "
          "another thread, or raise capacity");
    set_blocked(blocked_ + 1);
    bool room = false;
    for (;;) {
      // seq_cst, as the count of blocked submitters above: a take_direct()
      // that made room either is seen here or sees them (Note [Batches
      // straight from the inbox]).
      const bool ok = clock_->wait_until(mu_, space_cv_, deadline, [&]() FL_REQUIRES(mu_) {
        return stopping_ || queued_.load(std::memory_order_seq_cst) < options_.capacity;
      });
      if (!ok || stopping_) break;
      room = reserve_room();
      if (room) break;  // else a fast-path submit took the room first: wait on
    }
    set_blocked(blocked_ - 1);
    take_inbox();
    r->enqueued = clock_->now();
    if (stopping_) {
      if (room) left_fifo(1);
      return refuse(*r, RequestStatus::kShutDown,
                    std::make_exception_ptr(ShutDown(
                        "[BatchQueue::submit] the queue shut down while the request waited for "
                        "room; submit to a live queue")));
    }
    if (!room)
      return refuse(*r, RequestStatus::kExpired,
                    std::make_exception_ptr(Timeout(::flotilla::detail::str_cat(
                        "[BatchQueue::submit] the queue stayed full (", options_.capacity,
                        " requests) until the request's deadline; give it a later deadline, "
                        "raise capacity or add workers"))));
  }
  // Its id now that it enters (a blocked request waited without one); the
  // inbox was moved into the FIFO ahead of it just above.
  FL_INTERNAL_CHECK(r->id == 0, "request ", r->id, " entered the slow path with an id");
  r->id = next_id_.fetch_add(1, std::memory_order_relaxed);
  insert_fifo(r);
  max_depth_ = std::max(max_depth_, fifo_.size());
  bump_events();
  // Wake the leader only when its decision may change: a first request, a
  // full batch, or a deadline before the time it sleeps until. Otherwise its
  // timed wait (max_delay) ends by itself; waking it per submit would cost a
  // context switch per request under load.
  if (fifo_.size() == 1 || fifo_.size() >= static_cast<size_t>(options_.max_batch) ||
      deadline < leader_wake_.load(std::memory_order_relaxed))
    work_cv_.notify_one();  // only the leader waits there
}

std::deque<std::shared_ptr<Request>>::iterator QueueCore::find_queued(uint64_t id) {
  // The FIFO is in id order (take_inbox and insert_fifo keep it so, Note [Inbox]).
  const auto it =
      std::lower_bound(fifo_.begin(), fifo_.end(), id,
                       [](const std::shared_ptr<Request>& r, uint64_t v) { return r->id < v; });
  return it != fifo_.end() && (*it)->id == id ? it : fifo_.end();
}

std::shared_ptr<Request> QueueCore::remove(uint64_t id) {
  const auto it = find_queued(id);
  FL_INTERNAL_CHECK(it != fifo_.end(), "queued request ", id, " is missing from the FIFO");
  return remove(it);
}

std::shared_ptr<Request> QueueCore::remove(std::deque<std::shared_ptr<Request>>::iterator it) {
  std::shared_ptr<Request> r = std::move(*it);
  fifo_.erase(it);
  fifo_changed();
  left_fifo(1);
  if (r->deadline != Clock::kNever) deadlines_.erase({r->deadline, r->id});
  return r;
}

void QueueCore::room_made() {
  if (blocked_ > 0) space_cv_.notify_all();
}

void QueueCore::cancel_queued(std::shared_ptr<Request> removed) {
  Request& r = *removed;
  room_made();
  // The leader is not woken: a cancel only makes its decision later, and its
  // timed wait ends, looks again and sleeps on.
  finish(r, RequestStatus::kCancelled,
         std::make_exception_ptr(Cancelled(::flotilla::detail::str_cat(
             "[BatchQueue] request ", r.id, " was cancelled before it ran"))));
}

bool QueueCore::cancel(uint64_t id) {
  bool won = false;
  {
    MutexLock lock(mu_, kSpinFirst);
    // The request may be in the inbox, or in a list a worker took from it
    // (Note [Inbox walks outside the lock]): put them in the FIFO, where it
    // is found.
    take_everything();
    // The FIFO holds exactly the queued requests (Note [Exactly once]).
    const auto it = find_queued(id);
    if (it != fifo_.end()) {
      won = (*it)->move(RequestStatus::kQueued, RequestStatus::kCancelled);
      FL_INTERNAL_CHECK(won, "request ", id, " in the FIFO was not queued");
      cancel_queued(remove(it));
    }
  }
  run_parked();
  return won;
}

void QueueCore::expire(Request& r, Clock::time_point now) {
  const bool won = r.move(RequestStatus::kQueued, RequestStatus::kExpired);
  FL_INTERNAL_CHECK(won, "request ", r.id, " in the FIFO was not queued");
  finish(
      r, RequestStatus::kExpired,
      std::make_exception_ptr(Timeout(::flotilla::detail::str_cat(
          "[BatchQueue] request ", r.id, " reached its deadline after ", micros(now - r.enqueued),
          " us in the queue, before it ran; give it a later deadline, or add workers or "
          "lower max_delay"))));
}

void QueueCore::expire_due(Clock::time_point now) {
  bool removed = false;
  while (!deadlines_.empty() && deadlines_.begin()->first <= now) {
    std::shared_ptr<Request> r = remove(deadlines_.begin()->second);
    expire(*r, now);
    removed = true;
  }
  if (removed) room_made();
}

bool QueueCore::batch_ready(Clock::time_point now) const {
  if (fifo_.empty()) return false;
  return stopping_ || fifo_.size() >= static_cast<size_t>(options_.max_batch) ||
         now >= fifo_.front()->enqueued + options_.max_delay;
}

void QueueCore::pick(Batch& batch, Clock::time_point now) {
  batch.requests.clear();
  batch.picked_at = now;
  size_t taken = 0;
  while (!fifo_.empty() && batch.requests.size() < static_cast<size_t>(options_.max_batch)) {
    std::shared_ptr<Request> r = std::move(fifo_.front());
    fifo_.pop_front();
    ++taken;
    if (r->deadline != Clock::kNever) deadlines_.erase({r->deadline, r->id});
    if (r->deadline <= now) {  // expire_due ran first; kept for clarity of the rule
      expire(*r, now);
      continue;
    }
    const bool won = r->move(RequestStatus::kQueued, RequestStatus::kRunning);
    FL_INTERNAL_CHECK(won, "request ", r->id, " in the FIFO was not queued");
    batch.requests.push_back(std::move(r));
  }
  fifo_changed();
  // Once for the batch: queued_ is the line every submitter changes, and
  // each change here would be a cache miss with the lock held.
  left_fifo(taken);
  room_made();
}

bool QueueCore::next_batch(Batch& batch) {
  const bool got = next_batch_body(batch);
  run_parked();
  return got;
}

bool QueueCore::next_batch_body(Batch& batch) {
  batch.requests.clear();
  MutexLock lock(mu_, kSpinFirst);
  if (leader_ && options_.spin_wait.count() > 0) {
    // Spin for the leadership before sleeping for it (Note [Spinning workers]).
    lock.unlock();
    ::flotilla::detail::spin_until(
        [&] { return !leader_hint_.load(std::memory_order_acquire); },
        std::chrono::duration_cast<std::chrono::nanoseconds>(options_.spin_wait));
    lock.lock();
  }
  // Wait to be the leader (Note [Batch leader]), or to exit.
  idle_cv_.wait(mu_, [&]() FL_REQUIRES(mu_) { return !leader_ || (stopping_ && fifo_.empty()); });
  if (stopping_ && fifo_.empty()) {
    idle_cv_.notify_all();  // every idle worker exits too
    return false;
  }
  set_leader(true);
  // Note [Spinning workers]: the spin budget of this leadership's waits. Spins
  // that end because something arrived do not end the budget; once it is
  // spent (or a spin ran to its limit) the leader sleeps.
  const bool may_spin = options_.spin_wait.count() > 0;
  std::chrono::steady_clock::time_point spin_until_t{};
  bool spun = false;  // spun to the budget's end since the last sleep: sleep now
  for (;;) {
    take_inbox();
    const Clock::time_point now = clock_->now();
    expire_due(now);
    if (batch_ready(now)) {
      pick(batch, now);
      if (!batch.requests.empty()) break;
      continue;  // all were due: look again
    }
    if (fifo_.empty() && stopping_) {
      set_leader(false);
      idle_cv_.notify_all();
      return false;
    }
    if (has_parked()) {
      // Run the callbacks of what this leader expired before it waits (Note
      // [Completion callbacks]).
      lock.unlock();
      run_parked();
      lock.lock();
      continue;
    }
    Clock::time_point wake = Clock::kNever;
    if (!fifo_.empty()) wake = fifo_.front()->enqueued + options_.max_delay;
    if (!deadlines_.empty()) wake = std::min(wake, deadlines_.begin()->first);
    const uint64_t seen = events_;
    // About to wait: say so, then look at the inbox once more (Note [Inbox]).
    leader_wake_.store(wake, std::memory_order_relaxed);
    leader_waits_first_.store(fifo_.empty(), std::memory_order_seq_cst);
    leader_waiting_.store(true, std::memory_order_seq_cst);
    const size_t before = fifo_.size();
    take_inbox();
    if (fifo_.size() != before) {
      leader_waiting_.store(false, std::memory_order_relaxed);
      continue;
    }
    if (may_spin && !spun) {
      // Spin before sleeping (spin_wait), for a first request or for the
      // rest of max_delay: a sleeping leader costs each first request of a
      // batch a futex wake-up, and a timed sleep of a few microseconds
      // overshoots by the kernel's timer slack. The lock is released
      // meanwhile, so submitters can get in.
      const auto real_now = std::chrono::steady_clock::now();
      if (spin_until_t == std::chrono::steady_clock::time_point{})
        spin_until_t = real_now + options_.spin_wait;
      const auto budget = spin_until_t - real_now;
      const Clock::duration to_wake = wake - clock_->now();
      const bool wake_first = to_wake < budget;
      const auto limit = std::max<std::chrono::steady_clock::duration>(
          std::chrono::steady_clock::duration::zero(),
          std::min<std::chrono::steady_clock::duration>(budget, to_wake));
      leader_spinning_.store(true, std::memory_order_seq_cst);
      lock.unlock();
      // The inbox's head, not queued_: a submit counts itself in queued_
      // before it pushes, and the look after the spin must find it.
      const bool arrived = ::flotilla::detail::spin_until(
          [&] {
            return inbox_head_.load(std::memory_order_relaxed) != 0 ||
                   events_hint_.load(std::memory_order_acquire) != seen;
          },
          limit);
      lock.lock();
      // seq_cst: a submit that saw the flag set appended before it looked;
      // the take_inbox() this `continue` leads to finds its request.
      leader_spinning_.store(false, std::memory_order_seq_cst);
      leader_waiting_.store(false, std::memory_order_relaxed);
      // A spin that reached the wait's own end (max_delay, a deadline) or
      // saw an arrival looks again; one that spent the budget sleeps next.
      spun = !arrived && !wake_first;
      continue;  // look again, under the lock
    }
    spun = false;
    spin_until_t = {};
    clock_->wait_until(mu_, work_cv_, wake, [&]() FL_REQUIRES(mu_) { return events_ != seen; });
    leader_waiting_.store(false, std::memory_order_relaxed);
    leader_wake_.store(Clock::kNever, std::memory_order_relaxed);
  }
  set_leader(false);
  // The next leader collects while this batch runs. A spinning one is not
  // asleep, so this costs no system call on the way to the launch.
  idle_cv_.notify_one();
  return true;
}

bool QueueCore::take_ready(Batch& batch, bool force) {
  const bool got = take_ready_body(batch, force);
  run_parked();
  return got;
}

bool QueueCore::take_ready_body(Batch& batch, bool force) {
  batch.requests.clear();
  const Clock::time_point now = clock_->now();  // before the lock, as in submit()
  // Note [Inbox walks outside the lock]
  bool counted = false;
  Request* const detached = detach_inbox(counted);
  if (detached != nullptr && take_direct(detached, batch, now, force)) return true;
  // Nothing taken and nothing in the FIFO (so no deadline to expire): no
  // lock to take either.
  if (!counted && fifo_hint_.load(std::memory_order_relaxed) == 0 &&
      !stopping_hint_.load(std::memory_order_acquire))
    return false;
  MutexLock lock(mu_, kSpinFirst);
  splice(detached, counted);
  take_inbox();  // what arrived since, or all of it if a cancel held detaching off
  expire_due(now);
  if (force ? !fifo_.empty() : batch_ready(now)) pick(batch, now);
  return !batch.requests.empty();
}

void QueueCore::complete_batch(Batch& batch, std::exception_ptr error, const float* rows,
                               Clock::time_point done_at,
                               std::vector<std::shared_ptr<Request>>* released) {
  const size_t n = batch.requests.size();
  const RequestStatus to = error ? RequestStatus::kFailed : RequestStatus::kCompleted;
  // Counted before any handle sees its result, as finish() does one by one.
  recorder_.outcome(to, n);
  const size_t row_bytes = out_features_ * sizeof(float);
  size_t read_at = 0;  // the row whose callback done_at was read for
  for (size_t i = 0; i < n; ++i) {
    Request& r = *batch.requests[i];
    // The GPU wrote the rows into pinned memory, so they are in no cache,
    // and a row starts every 2 KiB, where the hardware's prefetch (which
    // stops at 4 KiB pages) often does not look. Asking for the next request
    // and its row while this one's callback (or copy) runs hides that wait
    // behind useful work.
    if (i + 1 < n) {
      __builtin_prefetch(batch.requests[i + 1].get());
      if (!error) {
        const char* next = reinterpret_cast<const char*>(rows + (i + 1) * out_features_);
        for (size_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(next + b);
      }
    }
    const bool won = r.move(RequestStatus::kRunning, to);
    FL_INTERNAL_CHECK(won, "request ", r.id, " finished by a worker was not running");
    // A callback gets a time read at most kClockEveryRows - 1 rows before its
    // own: one read per that many rows, not per request (on the H100 a read
    // was 5 % of the workers' time with 64 clients), and none for handles,
    // which have no Completion to read it from.
    if (r.on_done && i - read_at >= kClockEveryRows) {
      done_at = clock_->now();
      read_at = i;
    }
    const bool callback = r.on_done != nullptr;  // complete_now() clears it
    complete_now(r, to, error ? nullptr : rows + i * out_features_, error, done_at);
    // Note [Who frees a request]: let go of it now, while its client is
    // still waking up, not after the whole batch; a callback request, which
    // this batch alone holds, goes to `released` when there is one.
    if (callback && released != nullptr)
      released->push_back(std::move(batch.requests[i]));
    else
      batch.requests[i].reset();
  }
  batch.requests.clear();
}

void QueueCore::stop(ShutdownMode mode) {
  stop_body(mode);
  run_parked();
}

void QueueCore::stop_body(ShutdownMode mode) {
  MutexLock lock(mu_);
  stopping_ = true;
  stopping_hint_.store(true, std::memory_order_release);
  // Close the inbox and take what it holds: later pushes fail and take the
  // slow path, which sees stopping_ (Note [Inbox]).
  move_to_fifo(inbox_head_.exchange(kInboxClosed, std::memory_order_seq_cst));
  if (mode == ShutdownMode::kCancel) {
    // Lists workers have taken from the inbox are cancelled as they are
    // spliced (Note [Inbox walks outside the lock]).
    cancel_on_splice_ = true;
    while (!fifo_.empty()) {
      std::shared_ptr<Request> r = std::move(fifo_.front());
      fifo_.pop_front();
      cancel_on_shutdown(std::move(r));
    }
    fifo_changed();
    deadlines_.clear();
  }
  bump_events();
  work_cv_.notify_all();
  idle_cv_.notify_all();
  space_cv_.notify_all();
}

void QueueCore::cancel_on_shutdown(std::shared_ptr<Request> r) {
  left_fifo(1);
  if (r->deadline != Clock::kNever) deadlines_.erase({r->deadline, r->id});
  const bool won = r->move(RequestStatus::kQueued, RequestStatus::kCancelled);
  FL_INTERNAL_CHECK(won, "request ", r->id, " in the FIFO was not queued");
  finish(*r, RequestStatus::kCancelled,
         std::make_exception_ptr(Cancelled(
             ::flotilla::detail::str_cat("[BatchQueue::shutdown] request ", r->id,
                                         " was cancelled by shutdown(kCancel) before it ran"))));
}

bool QueueCore::stopping() const {
  MutexLock lock(mu_);
  return stopping_;
}

void QueueCore::wake() {
  // Under mu_: a waiter between its look at the clock and its block holds it
  // (Note [Clock waits without lost wake-ups] in clock.h).
  MutexLock lock(mu_);
  work_cv_.notify_all();
  space_cv_.notify_all();
}

void QueueCore::fill(BatchQueueMetrics& m) const {
  MutexLock lock(mu_);
  m.capacity = options_.capacity;
  m.max_batch = options_.max_batch;
  m.workers = options_.workers;
  // The FIFO, the inbox and the lists workers took from it; a submit's
  // moment over capacity is not a queued request (Note [Room in one step]).
  m.depth = std::min(queued_.load(std::memory_order_relaxed), options_.capacity);
  m.max_depth = std::max(max_depth_, max_queued_.load(std::memory_order_relaxed));
  m.submitted = next_id_.load(std::memory_order_relaxed) - 1;
  recorder_.fill(m);  // lock order: mu_, then the recorder's leaf mutex
}

}  // namespace flotilla::serve::detail
