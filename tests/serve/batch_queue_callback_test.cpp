// BatchQueue completion callbacks (the submit() that takes a callback and
// returns an id, and cancel(id)): unit tests, deterministic where they can be
// (ManualClock, manual mode: workers = 0 and step()). Each test checks what
// the callback was told (id, status, output, error and its type), that it ran
// exactly once, and on which thread (Note [Completion callbacks] in
// queue_core.h). Callbacks that call back into the queue run on a helper
// thread under a time limit, so a deadlock fails the test instead of hanging.
#include <gtest/gtest.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <future>
#include <mutex>
#include <nlohmann/json.hpp>
#include <semaphore>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "serve/serve_test_util.h"

namespace flotilla::serve::test {
namespace {

using namespace std::chrono_literals;

std::string this_thread_name() {
  char buf[32] = {};
  pthread_getname_np(pthread_self(), buf, sizeof buf);
  return buf;
}

// What one call of a callback was told, copied during the call (the output
// is valid only then), and where it ran.
struct Call {
  uint64_t id = 0;
  RequestStatus status = RequestStatus::kQueued;
  bool output_empty = true;
  std::vector<float> output;
  std::exception_ptr error;
  std::thread::id thread;
  std::string thread_name;
  Clock::time_point completed_at{};
};

// Records every call of the callbacks it makes, in order. Thread-safe: the
// calls may come from workers.
class CallLog {
 public:
  // A callback that records its call, then runs `then` (if any) with it.
  CompletionCallback callback(std::function<void(const Completion&)> then = nullptr) {
    return [this, then = std::move(then)](const Completion& c) {
      Call call;
      call.id = c.id;
      call.status = c.status;
      call.output_empty = c.output.empty();
      call.output.assign(c.output.begin(), c.output.end());
      call.error = c.error;
      call.completed_at = c.completed_at;
      call.thread = std::this_thread::get_id();
      call.thread_name = this_thread_name();
      {
        std::lock_guard<std::mutex> lock(mu_);
        calls_.push_back(std::move(call));
      }
      if (then) then(c);
    };
  }
  std::vector<Call> calls() const {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }
  size_t size() const {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_.size();
  }
  int count(uint64_t id) const {
    std::lock_guard<std::mutex> lock(mu_);
    int n = 0;
    for (const Call& c : calls_) n += c.id == id;
    return n;
  }
  // The one call for `id`; a failure (and an empty Call) unless exactly one.
  Call only(uint64_t id) const {
    std::lock_guard<std::mutex> lock(mu_);
    const Call* found = nullptr;
    int n = 0;
    for (const Call& c : calls_) {
      if (c.id != id) continue;
      ++n;
      found = &c;
    }
    EXPECT_EQ(n, 1) << "callback calls for request " << id;
    return n == 1 ? *found : Call{};
  }

 private:
  mutable std::mutex mu_;
  std::vector<Call> calls_;
};

// The call's error is an E (flotilla's errors are siblings under Error, so
// this tells them apart) and its message holds `fragment`.
template <class E>
void expect_error(const Call& c, const char* fragment = "") {
  ASSERT_TRUE(c.error) << "request " << c.id << " (" << to_string(c.status) << ") has no error";
  EXPECT_THROW(std::rethrow_exception(c.error), E) << "request " << c.id;
  try {
    std::rethrow_exception(c.error);
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
  EXPECT_TRUE(c.output_empty) << "a " << to_string(c.status) << " request was given an output";
}

// Runs `fn` on a helper thread and waits up to `limit` of real time for it.
// A callback that re-enters the queue under its lock would deadlock: that
// cannot be recovered from (the queue's destructor would wait too), so the
// process stops with a message naming the test's step instead of hanging.
void within(const char* what, const std::function<void()>& fn, std::chrono::seconds limit = 30s) {
  std::packaged_task<void()> task(fn);
  std::future<void> done = task.get_future();
  std::thread t(std::move(task));
  if (done.wait_for(limit) != std::future_status::ready) {
    std::fprintf(stderr, "FATAL: %s did not return within %lld s: a deadlock\n", what,
                 static_cast<long long>(limit.count()));
    std::fflush(stderr);
    std::abort();
  }
  t.join();
  done.get();  // rethrows what fn threw
}

// What `call` threw as InvalidState, or "returned" if it threw nothing.
std::string invalid_state_of(const std::function<void()>& call) {
  try {
    call();
    return "returned";
  } catch (const InvalidState& e) {
    return e.what();
  }
}

// The outcome counts of a queue that is idle add up (metrics.h).
void expect_counts_add_up(const BatchQueueMetrics& m) {
  EXPECT_EQ(m.submitted,
            m.completed + m.rejected + m.expired + m.cancelled + m.failed + m.shut_down);
}

class BatchQueueCallbackTest : public QueueTest {
 protected:
  // Manual mode, ManualClock.
  BatchQueueOptions manual(int max_batch = 4, std::chrono::microseconds max_delay = 0us) {
    return QueueTest::manual(max_batch, max_delay);
  }
  // `workers` threads on the ManualClock.
  BatchQueueOptions threaded(int workers = 1, int max_batch = 4,
                             std::chrono::microseconds max_delay = 0us) {
    BatchQueueOptions o = manual(max_batch, max_delay);
    o.workers = workers;
    return o;
  }
  // The counted model, whose first batch waits (on the worker that runs
  // it) until `release` is released.
  BatchQueue::Model first_batch_waits_for(std::binary_semaphore& release) {
    auto first = std::make_shared<std::atomic<bool>>(true);
    return [model = counted(), first, &release](const Stream& s, const Tensor& x) {
      if (first->exchange(false)) release.acquire();
      return model(s, x);
    };
  }
  // Submits input(i) and returns its handle once it has completed: by
  // step() in manual mode, else by waiting for the worker to run it.
  RequestHandle submit_completed(BatchQueue& q, int workers, int i) {
    RequestHandle h = q.submit(input(i));
    if (workers == 0) {
      EXPECT_EQ(q.step(), 1u);
    } else {
      h.wait();
    }
    return h;
  }
  // The one queued request's batch runs (in manual mode on this thread,
  // else on the one worker), its callback sets `done`, then (manual mode)
  // the one request that callback left queued runs too.
  void run_callback_then_what_it_queued(BatchQueue& q, int workers, std::promise<void>& done) {
    if (workers == 0) {
      EXPECT_EQ(q.step(), 1u);
    }
    ASSERT_EQ(done.get_future().wait_for(30s), std::future_status::ready);
    if (workers == 0) {
      EXPECT_EQ(q.step(), 1u);
    }
  }
  // The call completed with the model's output for input(i).
  void expect_output(const Call& c, int i) {
    EXPECT_EQ(c.status, RequestStatus::kCompleted) << "request " << c.id;
    EXPECT_FALSE(c.error) << "request " << c.id << " completed with an error";
    ASSERT_EQ(c.output.size(), static_cast<size_t>(kOut)) << "request " << c.id;
    EXPECT_LT(max_rel_error(c.output, model_->host_reference(input(i))), 1e-5)
        << "request " << c.id << " (input " << i << ")";
  }
  using QueueTest::expect_output;
};

// ---- Completed -------------------------------------------------------------------------

TEST_F(BatchQueueCallbackTest, ACompletedRequestGetsItsOwnOutputOnceOnTheSteppingThread) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 100us));
  CallLog log;
  const uint64_t a = q.submit(input(0), log.callback());
  const uint64_t b = q.submit(input(1), log.callback());
  EXPECT_NE(a, 0u);
  EXPECT_LT(a, b) << "ids grow in submission order";
  EXPECT_EQ(q.step(), 0u) << "max_delay not reached";
  EXPECT_EQ(log.size(), 0u) << "a callback ran before its request did";
  clock_->advance(100us);
  const auto stepper = std::this_thread::get_id();
  EXPECT_EQ(q.step(), 2u);
  EXPECT_EQ(calls_.load(), 1) << "both in one batch";
  ASSERT_EQ(log.size(), 2u);
  const Call ca = log.only(a), cb = log.only(b);
  expect_output(ca, 0);
  expect_output(cb, 1);
  EXPECT_EQ(ca.thread, stepper) << "manual mode: the callback runs on step()'s caller";
  EXPECT_EQ(cb.thread, stepper);
  // Rows are not swapped: each is far from the other's reference.
  EXPECT_GT(max_rel_error(ca.output, model_->host_reference(input(1))), 1e-3);
  EXPECT_EQ(log.calls()[0].id, a) << "callbacks of a batch run in FIFO order";

  // Nothing runs twice: later steps and the shutdown add no call.
  EXPECT_EQ(q.step(), 0u);
  q.shutdown(ShutdownMode::kDrain);
  EXPECT_EQ(log.size(), 2u);
  auto m = q.metrics();
  EXPECT_EQ(m.submitted, 2u);
  EXPECT_EQ(m.completed, 2u);
  EXPECT_EQ(m.callback_exceptions, 0u);
  expect_counts_add_up(m);
}

TEST_F(BatchQueueCallbackTest, WithWorkersACompletedCallbackRunsOnAWorkerThread) {
  BatchQueue q(*device_, kIn, kOut, counted(), threaded(1));
  CallLog log;
  std::promise<void> ran;
  const uint64_t id = q.submit(input(3), log.callback([&](const Completion&) { ran.set_value(); }));
  ASSERT_EQ(ran.get_future().wait_for(30s), std::future_status::ready)
      << "the worker never completed the request";
  const Call c = log.only(id);
  expect_output(c, 3);
  EXPECT_NE(c.thread, std::this_thread::get_id()) << "ran on the submitting thread";
  EXPECT_EQ(c.thread_name, "fl-queue-w0") << "not the queue's worker";
  q.shutdown();
  EXPECT_EQ(log.size(), 1u);
  EXPECT_EQ(q.metrics().completed, 1u);
}

// ---- Frees (Note [Frees while the device works] in batch_queue.cpp) --------------------

// Counts requests destroyed while it lives (set_request_freed_hook_for_testing).
class FreedCount {
 public:
  FreedCount() {
    count_.store(0);
    detail::set_request_freed_hook_for_testing([] { count_.fetch_add(1); });
  }
  ~FreedCount() { detail::set_request_freed_hook_for_testing(nullptr); }
  int operator()() const { return count_.load(); }

 private:
  static inline std::atomic<int> count_{0};
};

// A worker keeps completed callback requests to free while its next batch
// runs on the device; once it has nothing in flight it frees them before it
// waits for requests, so an idle queue holds none, and none is freed twice.
TEST_F(BatchQueueCallbackTest, AnIdleWorkerHasFreedEveryCompletedCallbackRequest) {
  const FreedCount freed;
  constexpr int kRequests = 3000;
  BatchQueueOptions o = threaded(2, 8);
  o.pipeline_depth = 2;
  o.capacity = kRequests;  // room for all: none is refused
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  std::atomic<int> ran{0};
  const std::vector<float> x = input(0);
  for (int i = 0; i < kRequests; ++i)
    q.submit(x, [&](const Completion& c) {
      EXPECT_EQ(c.status, RequestStatus::kCompleted);
      ran.fetch_add(1);
    });
  for (int i = 0; i < 3000 && (ran.load() < kRequests || freed() < kRequests); ++i)
    std::this_thread::sleep_for(10ms);
  EXPECT_EQ(ran.load(), kRequests);
  EXPECT_EQ(freed(), kRequests) << "an idle queue still holds completed callback requests";
  q.shutdown();
  EXPECT_EQ(freed(), kRequests) << "after shutdown(): a request left unfreed, or freed twice";
}

// A worker that always has a batch in flight frees completed callback
// requests while the device works, and at once beyond kKeepReleased: on a
// device that is always done first (each fence already reached when the
// worker looks, as here, where each callback takes a while) it must not keep
// every completed request until the queue goes idle. Each callback counts
// the completed requests not yet freed: at most kKeepReleased, the batch
// being completed and the one before it. Without the bound, all of them.
TEST_F(BatchQueueCallbackTest, AWorkerThatNeverGoesIdleKeepsABoundedNumberOfCompletedRequests) {
  const FreedCount freed;
  constexpr int kRequests = 4000, kMaxBatch = 16;
  BatchQueueOptions o = threaded(1, kMaxBatch);
  o.pipeline_depth = 2;
  o.capacity = kRequests;  // room for all: none is refused
  // The first batch waits for every request to be queued, so the worker
  // never runs dry (and so never frees everything) until the end.
  std::binary_semaphore all_queued{0};
  BatchQueue q(*device_, kIn, kOut, first_batch_waits_for(all_queued), o);
  std::atomic<int> ran{0};
  int most_kept = 0;  // the one worker's, read after shutdown() joined it
  const std::vector<float> x = input(0);
  for (int i = 0; i < kRequests; ++i)
    q.submit(x, [&](const Completion& c) {
      EXPECT_EQ(c.status, RequestStatus::kCompleted);
      most_kept = std::max(most_kept, ran.fetch_add(1) + 1 - freed());
      std::this_thread::sleep_for(20us);  // the device is done first
    });
  all_queued.release();
  for (int i = 0; i < 3000 && ran.load() < kRequests; ++i) std::this_thread::sleep_for(10ms);
  q.shutdown();
  EXPECT_EQ(ran.load(), kRequests);
  EXPECT_LE(most_kept, static_cast<int>(detail::kKeepReleased) + 2 * kMaxBatch)
      << "completed callback requests piled up unfreed";
  EXPECT_EQ(freed(), kRequests);
}

// Manual mode frees a batch's callback requests before step() returns.
TEST_F(BatchQueueCallbackTest, StepReturnsWithItsBatchsCallbackRequestsFreed) {
  const FreedCount freed;
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4));
  int ran = 0;
  for (int i = 0; i < 3; ++i) q.submit(input(i), [&](const Completion&) { ++ran; });
  EXPECT_EQ(freed(), 0);
  EXPECT_EQ(q.step(), 3u);
  EXPECT_EQ(ran, 3);
  EXPECT_EQ(freed(), 3);
}

// Every request a submit() refuses, or sends the slow way, is freed once
// decided: a fast-path submit takes the inbox's reference to its request
// before it looks for room (Note [Submit's short hold]) and must drop it
// when the request goes no further, or the request keeps itself alive.
// Refused for room (kReject), for an expired deadline, after shutdown; then
// one that waited for room (kBlock) and ran.
TEST_F(BatchQueueCallbackTest, RequestsThatSubmitRefusesOrSendsTheSlowWayAreFreed) {
  const FreedCount freed;
  {
    auto o = manual(4, 0us);
    o.capacity = 1;
    o.when_full = OverflowPolicy::kReject;
    BatchQueue q(*device_, kIn, kOut, counted(), o);
    CallLog log;
    q.submit(input(0), log.callback());
    const uint64_t full = q.submit(input(1), log.callback());
    EXPECT_EQ(log.only(full).status, RequestStatus::kRejected);
    EXPECT_EQ(freed(), 1) << "a request refused for room kept itself alive";
    const uint64_t late = q.submit(input(2), log.callback(), clock_->now());
    EXPECT_EQ(log.only(late).status, RequestStatus::kExpired);
    EXPECT_EQ(freed(), 2) << "a request refused for its deadline kept itself alive";
    EXPECT_EQ(q.step(), 1u);
    EXPECT_EQ(freed(), 3);
    q.shutdown();
    const uint64_t after = q.submit(input(3), log.callback());
    EXPECT_EQ(log.only(after).status, RequestStatus::kShutDown);
    EXPECT_EQ(freed(), 4) << "a request refused after shutdown kept itself alive";
  }
  {
    BatchQueueOptions o = threaded(1, 2);
    o.capacity = 1;
    o.when_full = OverflowPolicy::kBlock;
    std::binary_semaphore release{0};
    BatchQueue q(*device_, kIn, kOut, first_batch_waits_for(release), o);
    std::atomic<int> ran{0};
    auto count = [&](const Completion& c) {
      EXPECT_EQ(c.status, RequestStatus::kCompleted);
      ran.fetch_add(1);
    };
    q.submit(input(0), count);  // taken by the worker, held in the model
    for (int i = 0; i < 2000 && q.metrics().depth > 0; ++i) std::this_thread::sleep_for(1ms);
    q.submit(input(1), count);                                // fills the queue
    std::thread blocked([&] { q.submit(input(2), count); });  // waits for room: the slow way
    std::this_thread::sleep_for(20ms);
    release.release();
    blocked.join();
    q.shutdown(ShutdownMode::kDrain);
    EXPECT_EQ(ran.load(), 3);
  }
  EXPECT_EQ(freed(), 7) << "a request left unfreed, or freed twice";
}

// Completion::completed_at is the queue's clock, read once per 16 rows of a
// batch (not per request), so at most 15 callbacks before the callback's own
// start; and, for a refusal or a cancellation, when its callback runs. Each
// callback here advances the ManualClock by 1 us, so a read skipped or
// misplaced shows as a time outside that bound.
TEST_F(BatchQueueCallbackTest, CompletedAtIsTheQueuesClockReadOncePerSixteenRows) {
  constexpr int kRows = 40;
  BatchQueue q(*device_, kIn, kOut, counted(), manual(kRows, 100us));
  std::vector<Clock::time_point> started(kRows), told(kRows);
  std::vector<uint64_t> ids;
  for (int i = 0; i < kRows; ++i)
    ids.push_back(q.submit(input(i), [&, i](const Completion& c) {
      started[static_cast<size_t>(i)] = clock_->now();
      told[static_cast<size_t>(i)] = c.completed_at;
      clock_->advance(1us);
    }));
  clock_->advance(100us);
  const Clock::time_point batch_done = clock_->now();
  ASSERT_EQ(q.step(), static_cast<size_t>(kRows));
  EXPECT_EQ(calls_.load(), 1) << "one batch";
  for (size_t i = 0; i < kRows; ++i) {
    EXPECT_LE(told[i], started[i]) << "row " << i << " was told a time after its callback began";
    EXPECT_GE(told[i], started[i] - 15us) << "row " << i << ": more than 15 callbacks late";
    // Read at rows 0, 16 and 32: the time the row of the last read began.
    EXPECT_EQ(told[i], batch_done + std::chrono::microseconds(i / 16 * 16)) << "row " << i;
  }

  // A cancellation: the time its callback runs.
  Clock::time_point cancel_told{}, cancel_started{};
  const uint64_t c = q.submit(input(0), [&](const Completion& comp) {
    cancel_started = clock_->now();
    cancel_told = comp.completed_at;
  });
  clock_->advance(7us);
  ASSERT_TRUE(q.cancel(c));
  EXPECT_EQ(cancel_told, cancel_started);
  EXPECT_EQ(cancel_told, batch_done + std::chrono::microseconds(kRows + 7));
  q.shutdown();
}

// ---- Refusals at submit ----------------------------------------------------------------

TEST_F(BatchQueueCallbackTest, QueueFullIsReportedOnTheSubmittingThreadBeforeSubmitReturns) {
  auto o = manual(4, 100us);
  o.capacity = 2;
  o.when_full = OverflowPolicy::kReject;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  CallLog log;
  const uint64_t a = q.submit(input(0), log.callback());
  const uint64_t b = q.submit(input(1), log.callback());
  bool returned = false, ran_inside_submit = false;
  const uint64_t full =
      q.submit(input(2), log.callback([&](const Completion&) { ran_inside_submit = !returned; }));
  returned = true;
  EXPECT_TRUE(ran_inside_submit) << "the refusal's callback did not run inside submit()";
  ASSERT_EQ(log.size(), 1u) << "only the refused request is decided";
  const Call c = log.only(full);
  EXPECT_EQ(c.id, full);
  EXPECT_GT(full, b);
  EXPECT_EQ(c.status, RequestStatus::kRejected);
  expect_error<QueueFull>(c, "capacity");
  EXPECT_EQ(c.thread, std::this_thread::get_id());

  clock_->advance(100us);
  EXPECT_EQ(q.step(), 2u);
  expect_output(log.only(a), 0);
  expect_output(log.only(b), 1);
  EXPECT_EQ(log.count(full), 1) << "the refused request completed again";
  EXPECT_EQ(rows_.load(), 2) << "the refused request reached the model";
  auto m = q.metrics();
  EXPECT_EQ(m.submitted, 3u);
  EXPECT_EQ(m.rejected, 1u);
  EXPECT_EQ(m.completed, 2u);
  expect_counts_add_up(m);
}

TEST_F(BatchQueueCallbackTest, ASubmitAfterShutdownIsReportedShutDownAtOnce) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual());
  q.shutdown();
  CallLog log;
  bool returned = false, ran_inside_submit = false;
  const uint64_t id =
      q.submit(input(0), log.callback([&](const Completion&) { ran_inside_submit = !returned; }));
  returned = true;
  EXPECT_TRUE(ran_inside_submit);
  const Call c = log.only(id);
  EXPECT_EQ(c.status, RequestStatus::kShutDown);
  expect_error<ShutDown>(c, "shutting down");
  EXPECT_EQ(c.thread, std::this_thread::get_id());
  EXPECT_EQ(calls_.load(), 0);
  auto m = q.metrics();
  EXPECT_EQ(m.submitted, 1u);
  EXPECT_EQ(m.shut_down, 1u);
  expect_counts_add_up(m);
}

TEST_F(BatchQueueCallbackTest, ADeadlineAlreadyPassedIsReportedTimeoutAtOnce) {
  auto o = manual();
  o.default_deadline = 50us;  // an explicit deadline wins over it
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  CallLog log;
  clock_->advance(10us);
  bool returned = false, ran_inside_submit = false;
  const uint64_t past =
      q.submit(input(0), log.callback([&](const Completion&) { ran_inside_submit = !returned; }),
               clock_->now() - 1us);
  const uint64_t now = q.submit(input(1), log.callback(), clock_->now());
  returned = true;
  EXPECT_TRUE(ran_inside_submit);
  ASSERT_EQ(log.size(), 2u);
  for (uint64_t id : {past, now}) {
    const Call c = log.only(id);
    EXPECT_EQ(c.status, RequestStatus::kExpired);
    expect_error<Timeout>(c, "deadline");
    EXPECT_EQ(c.thread, std::this_thread::get_id());
  }
  EXPECT_EQ(q.step(), 0u);
  EXPECT_EQ(calls_.load(), 0);
  auto m = q.metrics();
  EXPECT_EQ(m.expired, 2u);
  EXPECT_EQ(m.depth, 0u);
  expect_counts_add_up(m);
}

TEST_F(BatchQueueCallbackTest, ABlockedSubmitReportsTimeoutOrShutDownOnItsOwnThread) {
  auto o = manual(2, 0us);
  o.capacity = 1;
  o.when_full = OverflowPolicy::kBlock;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  CallLog log;
  const uint64_t a = q.submit(input(0), log.callback());
  std::atomic<uint64_t> b{0};
  std::atomic<bool> returned{false};
  std::thread::id submitter;
  const auto deadline = q.deadline_in(100us);  // taken before the clock can move
  std::thread t([&] {
    submitter = std::this_thread::get_id();
    b = q.submit(input(1), log.callback(), deadline);
    returned = true;
  });
  std::this_thread::sleep_for(30ms);
  EXPECT_FALSE(returned.load()) << "submit must block while the queue is full";
  EXPECT_EQ(log.size(), 0u);
  clock_->advance(100us);
  t.join();
  const Call cb = log.only(b.load());
  EXPECT_EQ(cb.status, RequestStatus::kExpired);
  expect_error<Timeout>(cb, "stayed full");
  EXPECT_EQ(cb.thread, submitter) << "the blocked submit() decides, and reports";

  // Blocked without a deadline, then the queue shuts down (and drains a).
  std::atomic<uint64_t> c{0};
  std::thread t2([&] { c = q.submit(input(2), log.callback()); });
  std::this_thread::sleep_for(30ms);
  EXPECT_EQ(log.size(), 1u);
  q.shutdown(ShutdownMode::kDrain);
  t2.join();
  EXPECT_EQ(log.only(c.load()).status, RequestStatus::kShutDown);
  expect_error<ShutDown>(log.only(c.load()));
  expect_output(log.only(a), 0);
  EXPECT_EQ(log.size(), 3u);
  EXPECT_EQ(rows_.load(), 1);
  auto m = q.metrics();
  EXPECT_EQ(m.expired, 1u);
  EXPECT_EQ(m.shut_down, 1u);
  expect_counts_add_up(m);
}

// ---- Bad input -------------------------------------------------------------------------

TEST_F(BatchQueueCallbackTest, BadInputOrAnEmptyCallbackThrowsAndNeverCallsTheCallback) {
  auto o = manual();
  o.reject_nan = true;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  std::atomic<int> called{0};
  auto cb = [&](const Completion&) { called.fetch_add(1); };
  std::vector<float> short_input(kIn - 1, 0.5f);
  try {
    q.submit(short_input, cb);
    FAIL() << "a short input was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("[BatchQueue::submit]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(q.submit(std::vector<float>(kIn + 1, 0.f), cb), InvalidArgument);
  auto nan_input = input(0);
  nan_input[5] = std::nanf("");
  EXPECT_THROW(q.submit(nan_input, cb), InvalidArgument);
  try {
    q.submit(input(1), CompletionCallback{});
    FAIL() << "an empty callback was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("callback is empty"), std::string::npos) << e.what();
  }
  EXPECT_THROW(q.submit(input(1), CompletionCallback(nullptr), q.deadline_in(1s)), InvalidArgument);
  // A refused input may not be refused later through the callback either.
  EXPECT_EQ(q.step(), 0u);
  q.shutdown();
  EXPECT_EQ(called.load(), 0) << "the callback of an input refused by a throw was called";
  EXPECT_EQ(calls_.load(), 0);
  auto m = q.metrics();
  EXPECT_EQ(m.invalid, 5u);
  EXPECT_EQ(m.submitted, 0u) << "an input refused with InvalidArgument took an id";
  expect_counts_add_up(m);
}

TEST_F(BatchQueueCallbackTest, AnInvalidSubmitTakesNoIdAndTheNextOneStillRuns) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual());
  CallLog log;
  EXPECT_THROW(q.submit(std::vector<float>(3), log.callback()), InvalidArgument);
  const uint64_t id = q.submit(input(4), log.callback());
  EXPECT_EQ(id, 1u) << "ids count the submits that returned";
  EXPECT_EQ(q.step(), 1u);
  ASSERT_EQ(log.size(), 1u);
  expect_output(log.only(id), 4);
  EXPECT_EQ(q.metrics().invalid, 1u);
}

// ---- Group submits (submit_all with callbacks) ------------------------------------------

TEST_F(BatchQueueCallbackTest, AGroupGetsEachRequestItsOwnCallbackOutputAndId) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(8, 0us));
  CallLog log;
  std::vector<std::vector<float>> xs;
  for (int i = 0; i < 5; ++i) xs.push_back(input(i));
  std::vector<std::span<const float>> spans(xs.begin(), xs.end());
  std::vector<CompletionCallback> cbs;
  for (int i = 0; i < 5; ++i) cbs.push_back(log.callback());
  const auto ids = q.submit_all(spans, cbs);
  ASSERT_EQ(ids.size(), 5u);
  for (size_t i = 1; i < ids.size(); ++i) EXPECT_EQ(ids[i], ids[0] + i) << "consecutive ids";
  EXPECT_EQ(log.size(), 0u);
  EXPECT_EQ(q.step(), 5u);
  ASSERT_EQ(log.size(), 5u);
  for (size_t i = 0; i < ids.size(); ++i) expect_output(log.only(ids[i]), static_cast<int>(i));
  for (size_t i = 0; i < ids.size(); ++i)
    EXPECT_EQ(log.calls()[i].id, ids[i]) << "callbacks run in the group's order";
  auto m = q.metrics();
  EXPECT_EQ(m.submitted, 5u);
  EXPECT_EQ(m.completed, 5u);
  expect_counts_add_up(m);
}

TEST_F(BatchQueueCallbackTest, AGroupWithABadInputOrCallbackThrowsAndCallsNoneOfItsCallbacks) {
  auto o = manual();
  o.reject_nan = true;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  std::atomic<int> called{0};
  auto cb = [&](const Completion&) { called.fetch_add(1); };
  std::vector<std::vector<float>> xs{input(0), input(1), input(2)};
  std::vector<std::span<const float>> spans(xs.begin(), xs.end());
  std::vector<CompletionCallback> two{cb, cb};
  try {
    q.submit_all(spans, two);
    FAIL() << "3 inputs with 2 callbacks were accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("one callback per input"), std::string::npos) << e.what();
  }
  std::vector<CompletionCallback> with_empty{cb, CompletionCallback{}, cb};
  try {
    q.submit_all(spans, with_empty);
    FAIL() << "an empty callback was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("callback 1 is empty"), std::string::npos) << e.what();
  }
  xs[2][0] = std::nanf("");
  std::vector<CompletionCallback> three{cb, cb, cb};
  EXPECT_THROW(q.submit_all(spans, three), InvalidArgument);
  // A refused group leaves the caller's callbacks as they were.
  for (const auto& f : three) EXPECT_TRUE(static_cast<bool>(f)) << "a callback was moved from";
  EXPECT_EQ(q.step(), 0u);
  q.shutdown();
  EXPECT_EQ(called.load(), 0) << "a callback of a refused group was called";
  auto m = q.metrics();
  EXPECT_EQ(m.invalid, 3u);
  EXPECT_EQ(m.submitted, 0u) << "a refused group took ids";
  expect_counts_add_up(m);
}

TEST_F(BatchQueueCallbackTest, AGroupsRefusalsAreReportedOnTheSubmittingThreadBeforeItReturns) {
  auto o = manual(4, 0us);
  o.capacity = 2;
  o.when_full = OverflowPolicy::kReject;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  CallLog log;
  bool returned = false;
  int inside = 0;
  std::vector<std::vector<float>> xs;
  for (int i = 0; i < 4; ++i) xs.push_back(input(i));
  std::vector<std::span<const float>> spans(xs.begin(), xs.end());
  std::vector<CompletionCallback> cbs;
  for (int i = 0; i < 4; ++i)
    cbs.push_back(log.callback([&](const Completion&) { inside += !returned; }));
  const auto ids = q.submit_all(spans, cbs);
  returned = true;
  ASSERT_EQ(ids.size(), 4u);
  EXPECT_EQ(inside, 2) << "the two refusals' callbacks ran inside submit_all()";
  ASSERT_EQ(log.size(), 2u) << "only the refused requests are decided";
  for (size_t i : {size_t{2}, size_t{3}}) {
    const Call c = log.only(ids[i]);
    EXPECT_EQ(c.status, RequestStatus::kRejected);
    expect_error<QueueFull>(c, "capacity");
    EXPECT_EQ(c.thread, std::this_thread::get_id());
  }
  EXPECT_EQ(q.step(), 2u);
  expect_output(log.only(ids[0]), 0);
  expect_output(log.only(ids[1]), 1);
  q.shutdown();
  std::vector<CompletionCallback> late;
  for (int i = 0; i < 4; ++i) late.push_back(log.callback());
  const auto shut = q.submit_all(spans, late);
  ASSERT_EQ(log.size(), 8u) << "each request of a group after shutdown is reported at once";
  for (uint64_t id : shut) EXPECT_EQ(log.only(id).status, RequestStatus::kShutDown);
  auto m = q.metrics();
  EXPECT_EQ(m.rejected, 2u);
  EXPECT_EQ(m.shut_down, 4u);
  EXPECT_EQ(m.completed, 2u);
  expect_counts_add_up(m);
}

// ---- Expiry while queued ---------------------------------------------------------------

TEST_F(BatchQueueCallbackTest, ARequestPastItsDeadlineExpiresOnTheSteppingThreadAndNeverRuns) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 100us));
  CallLog log;
  const uint64_t late = q.submit(input(0), log.callback(), q.deadline_in(50us));
  const uint64_t patient = q.submit(input(1), log.callback());
  clock_->advance(49us);
  EXPECT_EQ(q.step(), 0u);
  EXPECT_EQ(log.size(), 0u) << "expired before its deadline";
  clock_->advance(1us);
  const auto stepper = std::this_thread::get_id();
  EXPECT_EQ(q.step(), 0u) << "the deadline passed; the other still waits for company";
  ASSERT_EQ(log.size(), 1u);
  const Call c = log.only(late);
  EXPECT_EQ(c.status, RequestStatus::kExpired);
  expect_error<Timeout>(c, "reached its deadline");
  EXPECT_EQ(c.thread, stepper);
  clock_->advance(50us);
  EXPECT_EQ(q.step(), 1u);
  EXPECT_EQ(rows_.load(), 1) << "the expired request reached the model";
  expect_output(log.only(patient), 1);
  EXPECT_EQ(log.count(late), 1);
  auto m = q.metrics();
  EXPECT_EQ(m.expired, 1u);
  EXPECT_EQ(m.completed, 1u);
  expect_counts_add_up(m);
}

TEST_F(BatchQueueCallbackTest, AWaitingWorkerExpiresACallbackRequestOnItsOwnThread) {
  BatchQueue q(*device_, kIn, kOut, counted(), threaded(1, 8, 1000000us));
  CallLog log;
  std::promise<void> ran;
  const uint64_t id = q.submit(input(0), log.callback([&](const Completion&) { ran.set_value(); }),
                               q.deadline_in(100us));
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(log.size(), 0u) << "expired before the clock reached the deadline";
  clock_->advance(100us);
  ASSERT_EQ(ran.get_future().wait_for(30s), std::future_status::ready)
      << "the worker did not expire the request";
  const Call c = log.only(id);
  EXPECT_EQ(c.status, RequestStatus::kExpired);
  expect_error<Timeout>(c);
  EXPECT_EQ(c.thread_name, "fl-queue-w0") << "Timeout is decided, and reported, by a worker";
  q.shutdown();
  EXPECT_EQ(calls_.load(), 0);
  EXPECT_EQ(log.size(), 1u);
  EXPECT_EQ(q.metrics().expired, 1u);
}

// ---- cancel(id) ------------------------------------------------------------------------

TEST_F(BatchQueueCallbackTest, CancelByIdCancelsAQueuedRequestOnTheCancellingThread) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 100us));
  CallLog log;
  const uint64_t a = q.submit(input(0), log.callback());
  const uint64_t b = q.submit(input(1), log.callback());
  bool returned = false, ran_inside_cancel = false;
  const uint64_t c =
      q.submit(input(2), log.callback([&](const Completion&) { ran_inside_cancel = !returned; }));
  EXPECT_EQ(q.metrics().depth, 3u);
  EXPECT_TRUE(q.cancel(c));
  returned = true;
  EXPECT_TRUE(ran_inside_cancel) << "the callback did not run inside cancel()";
  ASSERT_EQ(log.size(), 1u);
  const Call cc = log.only(c);
  EXPECT_EQ(cc.status, RequestStatus::kCancelled);
  expect_error<Cancelled>(cc, "cancelled");
  EXPECT_EQ(cc.thread, std::this_thread::get_id());
  EXPECT_EQ(q.metrics().depth, 2u) << "a cancelled request leaves the queue at once";
  EXPECT_FALSE(q.cancel(c)) << "cancelled twice";

  clock_->advance(100us);
  EXPECT_EQ(q.step(), 2u);
  EXPECT_EQ(rows_.load(), 2) << "the cancelled request reached the model";
  expect_output(log.only(a), 0);
  expect_output(log.only(b), 1);
  EXPECT_FALSE(q.cancel(a)) << "a completed request was cancelled";
  EXPECT_FALSE(q.cancel(b));
  EXPECT_EQ(log.count(c), 1);
  auto m = q.metrics();
  EXPECT_EQ(m.cancelled, 1u);
  EXPECT_EQ(m.completed, 2u);
  expect_counts_add_up(m);
}

TEST_F(BatchQueueCallbackTest, CancelByIdIsFalseForARequestThatIsRunning) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 0us));
  CallLog log;
  std::atomic<uint64_t> second{0};
  std::atomic<int> cancel_result{-1};
  std::atomic<int> second_status{-1};
  // The first request's callback runs while the second, later in the same
  // batch, is still running (kRunning): cancel must refuse it.
  const uint64_t first = q.submit(input(0), log.callback([&](const Completion&) {
    cancel_result = q.cancel(second.load()) ? 1 : 0;
  }));
  second = q.submit(input(1), log.callback([&](const Completion& c) {
    second_status = static_cast<int>(c.status);
  }));
  EXPECT_EQ(q.step(), 2u);
  EXPECT_EQ(cancel_result.load(), 0) << "a running request was cancelled";
  expect_output(log.only(first), 0);
  expect_output(log.only(second.load()), 1);
  EXPECT_EQ(second_status.load(), static_cast<int>(RequestStatus::kCompleted));
  EXPECT_EQ(q.metrics().cancelled, 0u);
}

TEST_F(BatchQueueCallbackTest, CancelByIdIsFalseForAnUnknownId) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual());
  CallLog log;
  EXPECT_FALSE(q.cancel(0));
  EXPECT_FALSE(q.cancel(1)) << "no request yet";
  const uint64_t id = q.submit(input(0), log.callback());
  EXPECT_FALSE(q.cancel(id + 1));
  EXPECT_FALSE(q.cancel(~uint64_t{0}));
  EXPECT_EQ(log.size(), 0u);
  EXPECT_EQ(q.metrics().depth, 1u);
  EXPECT_EQ(q.step(), 1u);
  expect_output(log.only(id), 0);
  EXPECT_EQ(q.metrics().cancelled, 0u);
}

TEST_F(BatchQueueCallbackTest, CancelByIdWorksForAHandleRequest) {
  std::vector<std::pair<uint64_t, RequestStatus>> hook;  // manual mode: one thread
  auto o = manual(4, 0us);
  o.on_complete = [&](uint64_t id, RequestStatus s) { hook.emplace_back(id, s); };
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  CallLog log;
  RequestHandle h = q.submit(input(0));
  const uint64_t cb = q.submit(input(1), log.callback());
  RequestHandle kept = q.submit(input(2));
  EXPECT_TRUE(q.cancel(h.id()));
  EXPECT_TRUE(h.done());
  EXPECT_EQ(h.status(), RequestStatus::kCancelled);
  EXPECT_FALSE(h.cancel()) << "already cancelled by id";
  EXPECT_FALSE(q.cancel(h.id()));
  std::string msg;
  EXPECT_EQ(outcome_of(h, nullptr, &msg), Outcome::kCancelled);
  EXPECT_NE(msg.find("cancelled"), std::string::npos) << msg;
  EXPECT_EQ(log.size(), 0u) << "cancelling a handle's request called another's callback";
  EXPECT_EQ(q.step(), 2u);
  EXPECT_EQ(rows_.load(), 2);
  expect_output(log.only(cb), 1);
  expect_output(kept, 2);
  EXPECT_FALSE(q.cancel(kept.id())) << "a completed handle request was cancelled";
  ASSERT_EQ(hook.size(), 3u);
  EXPECT_EQ(hook[0], std::make_pair(h.id(), RequestStatus::kCancelled));
  EXPECT_EQ(q.metrics().cancelled, 1u);
}

// ---- Shutdown --------------------------------------------------------------------------

TEST_F(BatchQueueCallbackTest, ShutdownCancelReportsEveryQueuedRequestCancelledOnce) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 1000000us));
  CallLog log;
  std::vector<uint64_t> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(q.submit(input(i), log.callback()));
  EXPECT_EQ(q.step(), 4u) << "a full batch runs";
  EXPECT_EQ(log.size(), 4u);
  const auto closer = std::this_thread::get_id();
  q.shutdown(ShutdownMode::kCancel);
  ASSERT_EQ(log.size(), 6u);
  for (int i = 0; i < 4; ++i) expect_output(log.only(ids[static_cast<size_t>(i)]), i);
  for (int i = 4; i < 6; ++i) {
    const Call c = log.only(ids[static_cast<size_t>(i)]);
    EXPECT_EQ(c.status, RequestStatus::kCancelled);
    expect_error<Cancelled>(c, "shutdown(kCancel)");
    EXPECT_EQ(c.thread, closer) << "shutdown(kCancel)'s caller decides, and reports";
  }
  EXPECT_EQ(rows_.load(), 4);
  q.shutdown(ShutdownMode::kCancel);  // idempotent: nothing is reported twice
  EXPECT_EQ(log.size(), 6u);
  auto m = q.metrics();
  EXPECT_EQ(m.cancelled, 2u);
  EXPECT_EQ(m.completed, 4u);
  expect_counts_add_up(m);
}

TEST_F(BatchQueueCallbackTest, ShutdownDrainRunsQueuedCallbackRequests) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 1000000us));
  CallLog log;
  std::vector<uint64_t> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(q.submit(input(i), log.callback()));
  EXPECT_EQ(q.step(), 4u);
  const auto closer = std::this_thread::get_id();
  q.shutdown(ShutdownMode::kDrain);  // max_delay (1 s on a still clock) is waived
  ASSERT_EQ(log.size(), 6u);
  for (int i = 0; i < 6; ++i) {
    const Call c = log.only(ids[static_cast<size_t>(i)]);
    expect_output(c, i);
    EXPECT_EQ(c.thread, closer);
  }
  EXPECT_EQ(calls_.load(), 2);
  const uint64_t late = q.submit(input(9), log.callback());
  EXPECT_EQ(log.only(late).status, RequestStatus::kShutDown);
  auto m = q.metrics();
  EXPECT_EQ(m.completed, 6u);
  EXPECT_EQ(m.shut_down, 1u);
  expect_counts_add_up(m);
}

TEST_F(BatchQueueCallbackTest, ShutdownDrainWithWorkersRunsThemOnTheWorkers) {
  BatchQueue q(*device_, kIn, kOut, counted(), threaded(2, 4, 1000000us));
  CallLog log;
  std::vector<uint64_t> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(q.submit(input(i), log.callback()));
  q.shutdown(ShutdownMode::kDrain);
  ASSERT_EQ(log.size(), 6u) << "shutdown returned before every callback ran";
  for (int i = 0; i < 6; ++i) {
    const Call c = log.only(ids[static_cast<size_t>(i)]);
    expect_output(c, i);
    EXPECT_EQ(c.thread_name.rfind("fl-queue-w", 0), 0u) << c.thread_name;
  }
}

TEST_F(BatchQueueCallbackTest, TheDestructorDrainsCallbackRequests) {
  CallLog log;
  std::vector<uint64_t> ids;
  {
    BatchQueue q(*device_, kIn, kOut, counted(), manual(2, 1000000us));
    for (int i = 0; i < 3; ++i) ids.push_back(q.submit(input(i), log.callback()));
  }
  ASSERT_EQ(log.size(), 3u);
  for (int i = 0; i < 3; ++i) expect_output(log.only(ids[static_cast<size_t>(i)]), i);
}

// ---- Failing batches -------------------------------------------------------------------

TEST_F(BatchQueueCallbackTest, AFailingBatchReportsItsErrorToEachOfItsCallbacksOnly) {
  BatchQueue q(*device_, kIn, kOut, marked_failing(*model_), manual(2, 0us));
  CallLog log;
  auto bad = input(0);
  bad[0] = kFailMark;
  const uint64_t a = q.submit(bad, log.callback());
  const uint64_t b = q.submit(input(1), log.callback());  // same batch as a
  const uint64_t c = q.submit(input(2), log.callback());
  RequestHandle d = q.submit(input(3));  // the next batch, with c
  EXPECT_EQ(q.step(), 2u);
  ASSERT_EQ(log.size(), 2u);
  for (uint64_t id : {a, b}) {
    const Call call = log.only(id);
    EXPECT_EQ(call.status, RequestStatus::kFailed);
    expect_error<InvalidState>(call, "marked row");
    EXPECT_EQ(call.thread, std::this_thread::get_id());
  }
  EXPECT_EQ(q.step(), 2u);
  expect_output(log.only(c), 2);
  expect_output(d, 3);
  auto m = q.metrics();
  EXPECT_EQ(m.failed, 2u);
  EXPECT_EQ(m.completed, 2u);
  expect_counts_add_up(m);
}

TEST_F(BatchQueueCallbackTest, AFailingBatchOnAWorkerReportsKFailed) {
  BatchQueue q(*device_, kIn, kOut, marked_failing(*model_), threaded(1, 4, 0us));
  CallLog log;
  auto bad = input(0);
  bad[0] = kFailMark;
  std::promise<void> p1, p2;
  const uint64_t a = q.submit(bad, log.callback([&](const Completion&) { p1.set_value(); }));
  ASSERT_EQ(p1.get_future().wait_for(30s), std::future_status::ready);
  const uint64_t b = q.submit(input(1), log.callback([&](const Completion&) { p2.set_value(); }));
  ASSERT_EQ(p2.get_future().wait_for(30s), std::future_status::ready);
  const Call ca = log.only(a);
  EXPECT_EQ(ca.status, RequestStatus::kFailed);
  expect_error<InvalidState>(ca, "marked row");
  EXPECT_EQ(ca.thread_name, "fl-queue-w0");
  expect_output(log.only(b), 1);
}

// ---- Callbacks that throw --------------------------------------------------------------

TEST_F(BatchQueueCallbackTest, ACallbackThatThrowsIsCountedAndTheQueueGoesOn) {
  auto o = manual(2, 100us);
  o.capacity = 2;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  CallLog log;
  auto throws_runtime = log.callback([](const Completion&) { throw std::runtime_error("mine"); });
  auto throws_int = log.callback([](const Completion&) { throw 42; });
  auto throws_flotilla = log.callback([](const Completion&) { throw InvalidState("also mine"); });
  const uint64_t a = q.submit(input(0), throws_runtime);
  const uint64_t b = q.submit(input(1), throws_int);
  // QueueFull: the throw happens inside submit(), which must not pass it on.
  uint64_t full = 0;
  EXPECT_NO_THROW(full = q.submit(input(2), throws_flotilla));
  EXPECT_EQ(log.only(full).status, RequestStatus::kRejected);
  clock_->advance(100us);
  EXPECT_NO_THROW(EXPECT_EQ(q.step(), 2u));
  expect_output(log.only(a), 0);
  expect_output(log.only(b), 1);
  // Cancelled and expired, thrown from cancel() and step().
  const uint64_t c = q.submit(input(3), throws_runtime);
  const uint64_t d = q.submit(input(4), throws_int, q.deadline_in(10us));
  bool cancelled = false;
  EXPECT_NO_THROW(cancelled = q.cancel(c));
  EXPECT_TRUE(cancelled);
  clock_->advance(10us);
  EXPECT_NO_THROW(EXPECT_EQ(q.step(), 0u));
  EXPECT_EQ(log.only(c).status, RequestStatus::kCancelled);
  EXPECT_EQ(log.only(d).status, RequestStatus::kExpired);

  // The queue still works, and a well-behaved callback is not counted.
  const uint64_t e = q.submit(input(5), log.callback());
  clock_->advance(100us);
  EXPECT_EQ(q.step(), 1u);
  expect_output(log.only(e), 5);
  EXPECT_EQ(log.size(), 6u) << "a throwing callback was called again";

  auto m = q.metrics();
  EXPECT_EQ(m.callback_exceptions, 5u);
  EXPECT_EQ(m.submitted, 6u);
  EXPECT_EQ(m.completed, 3u);
  EXPECT_EQ(m.rejected, 1u);
  EXPECT_EQ(m.cancelled, 1u);
  EXPECT_EQ(m.expired, 1u);
  expect_counts_add_up(m);
  EXPECT_EQ(m.to_json().at("callback_exceptions"), 5);
  const std::string p = m.to_prometheus();
  for (const char* line : {"# TYPE flotilla_batch_queue_callback_exceptions_total counter\n",
                           "\nflotilla_batch_queue_callback_exceptions_total 5\n"})
    EXPECT_NE(p.find(line), std::string::npos) << "missing: " << line << "\n" << p;
  EXPECT_NE(m.to_prometheus("x").find("\nx_callback_exceptions_total 5\n"), std::string::npos);
}

TEST_F(BatchQueueCallbackTest, ACallbackThatThrowsOnAWorkerDoesNotStopIt) {
  BatchQueue q(*device_, kIn, kOut, counted(), threaded(1, 4, 0us));
  CallLog log;
  std::promise<void> thrown;
  const uint64_t a = q.submit(input(0), log.callback([&](const Completion&) {
    thrown.set_value();
    throw std::runtime_error("from the worker");
  }));
  ASSERT_EQ(thrown.get_future().wait_for(30s), std::future_status::ready);
  std::promise<void> next;
  const uint64_t b = q.submit(input(1), log.callback([&](const Completion&) { next.set_value(); }));
  ASSERT_EQ(next.get_future().wait_for(30s), std::future_status::ready)
      << "the worker stopped after a callback threw";
  q.shutdown();
  expect_output(log.only(a), 0);
  expect_output(log.only(b), 1);
  auto m = q.metrics();
  EXPECT_EQ(m.callback_exceptions, 1u);
  EXPECT_EQ(m.completed, 2u);
  expect_counts_add_up(m);
}

// ---- Callbacks re-entering the queue ---------------------------------------------------
// A callback never runs under the queue's lock: one that submits (with
// another callback) and cancels on its own queue must not deadlock.

// What a re-entering callback did: the request it submitted (whose own
// callback is `child`), and what cancel() answered for one it submitted and
// then cancelled at once.
struct Reentry {
  std::atomic<uint64_t> submitted{0};
  std::atomic<uint64_t> cancelled_id{0};
  std::atomic<int> cancel_result{-1};
  std::atomic<int> done{0};
};

// A callback that submits input(10) (callback `child`), submits input(11)
// (callback `child`) and cancels it, then marks `r` done.
std::function<void(const Completion&)> reenter(BatchQueue& q, Reentry& r,
                                               const std::function<std::vector<float>(int)>& input,
                                               const CompletionCallback& child) {
  return [&q, &r, input, child](const Completion&) {
    r.submitted = q.submit(input(10), child);
    const uint64_t second = q.submit(input(11), child);
    r.cancelled_id = second;
    r.cancel_result = q.cancel(second) ? 1 : 0;
    r.done.fetch_add(1);
  };
}

TEST_F(BatchQueueCallbackTest, ACompletedCallbackOnAWorkerMaySubmitAndCancel) {
  BatchQueue q(*device_, kIn, kOut, counted(), threaded(1, 4, 0us));
  CallLog log, children;
  Reentry r;
  std::promise<void> child_done;
  const auto in = [this](int i) { return input(i); };
  auto child = children.callback([&](const Completion& c) {
    if (c.status == RequestStatus::kCompleted) child_done.set_value();
  });
  within("a completed request's callback re-entering the queue", [&] {
    const uint64_t id = q.submit(input(0), log.callback(reenter(q, r, in, child)));
    ASSERT_EQ(child_done.get_future().wait_for(30s), std::future_status::ready)
        << "the request submitted from the callback never completed";
    q.shutdown();
    expect_output(log.only(id), 0);
    EXPECT_EQ(log.only(id).thread_name, "fl-queue-w0");
  });
  ASSERT_EQ(r.done.load(), 1);
  // The one worker is busy in the callback: nobody can have started the
  // request it submitted and cancelled.
  EXPECT_EQ(r.cancel_result.load(), 1) << "cancel() of a queued request from a callback";
  const Call cancelled = children.only(r.cancelled_id.load());
  EXPECT_EQ(cancelled.status, RequestStatus::kCancelled);
  expect_error<Cancelled>(cancelled);
  EXPECT_EQ(cancelled.thread_name, "fl-queue-w0") << "cancel() ran on the worker";
  expect_output(children.only(r.submitted.load()), 10);
  EXPECT_EQ(children.size(), 2u);
  auto m = q.metrics();
  EXPECT_EQ(m.submitted, 3u);
  EXPECT_EQ(m.completed, 2u);
  EXPECT_EQ(m.cancelled, 1u);
  expect_counts_add_up(m);
}

// Note [A worker's own submit]: under kBlock, a callback running on the
// thread that runs the batches (step()'s caller, or the one worker) submits
// into a full queue. Waiting for room there would wait for itself: it is
// refused with QueueFull at once, on that thread, and the request that did
// fit still runs. Other threads' submits still wait for room. Without the
// rule this test hangs, and within() ends it.
TEST_F(BatchQueueCallbackTest, ACallbacksSubmitIntoAFullQueueIsRefusedNotLeftWaitingForItself) {
  for (int workers : {0, 1}) {
    SCOPED_TRACE(::testing::Message() << "workers " << workers);
    BatchQueueOptions o = threaded(workers, 1, 0us);
    o.capacity = 1;
    o.when_full = OverflowPolicy::kBlock;
    BatchQueue q(*device_, kIn, kOut, counted(), o);
    CallLog log, children;
    std::atomic<uint64_t> fits{0}, refused{0};
    std::string refused_thread;
    std::promise<void> done;
    within("a callback's submit into a full queue under kBlock", [&] {
      const uint64_t first = q.submit(input(0), log.callback([&](const Completion&) {
        // The queue is empty (the request running here left it): this one
        // takes the one place, and the next finds the queue full.
        fits = q.submit(input(1), children.callback());
        refused = q.submit(input(2), children.callback([&](const Completion&) {
          refused_thread = this_thread_name();
        }));
        done.set_value();
      }));
      run_callback_then_what_it_queued(q, workers, done);
      q.shutdown(ShutdownMode::kDrain);
      expect_output(log.only(first), 0);
    });
    const Call c = children.only(refused.load());
    EXPECT_EQ(c.status, RequestStatus::kRejected);
    expect_error<QueueFull>(c, "could wait for itself");
    EXPECT_EQ(refused_thread, workers == 0 ? this_thread_name() : std::string("fl-queue-w0"))
        << "refused on the submitting thread, inside submit()";
    expect_output(children.only(fits.load()), 1);
    auto m = q.metrics();
    EXPECT_EQ(m.submitted, 3u);
    EXPECT_EQ(m.completed, 2u);
    EXPECT_EQ(m.rejected, 1u);
    expect_counts_add_up(m);
  }
}

// Note [A worker's own submit], for waits: in a callback on the thread that
// runs the batches, get()/wait() on an incomplete handle of the queue,
// step() and shutdown() would each wait for that thread itself. They throw
// InvalidState naming the reason; a completed handle may still be read there.
// Without the checks, the worker case hangs (within() ends it) and the manual
// one deadlocks on step()'s own lock.
TEST_F(BatchQueueCallbackTest, CallsThatWouldWaitForTheCallbacksOwnThreadThrowInvalidState) {
  for (int workers : {0, 1}) {
    SCOPED_TRACE(::testing::Message() << "workers " << workers);
    BatchQueue q(*device_, kIn, kOut, counted(), threaded(workers, 4, 0us));
    RequestHandle early = submit_completed(q, workers, 0);
    std::vector<std::string> errors;
    std::vector<float> early_output;
    RequestHandle inner;
    std::promise<void> done;
    const auto expect_invalid_state = [&](const char* what, const std::function<void()>& call) {
      errors.push_back(std::string(what) + ": " + invalid_state_of(call));
    };
    within("calls that would wait for the callback's own thread", [&] {
      q.submit(input(1), [&](const Completion&) {
        early_output = early.get();  // complete: a read, not a wait
        inner = q.submit(input(2));
        expect_invalid_state("get", [&] { (void)inner.get(); });
        expect_invalid_state("wait", [&] { inner.wait(); });
        expect_invalid_state("step", [&] { (void)q.step(); });
        expect_invalid_state("shutdown", [&] { q.shutdown(); });
        done.set_value();
      });
      run_callback_then_what_it_queued(q, workers, done);
      expect_output(inner, 2);  // from this thread: a wait that ends
      q.shutdown();
    });
    EXPECT_LT(max_rel_error(early_output, model_->host_reference(input(0))), 1e-5);
    ASSERT_EQ(errors.size(), 4u);
    for (size_t i = 0; i < 2; ++i)
      EXPECT_NE(errors[i].find("has not completed, and this thread runs its queue's batches"),
                std::string::npos)
          << errors[i];
    if (workers == 0) {
      EXPECT_NE(errors[2].find("inside one of this queue's batches"), std::string::npos)
          << errors[2];
    } else {
      EXPECT_NE(errors[2].find("step() is for manual mode"), std::string::npos) << errors[2];
    }
    EXPECT_NE(errors[3].find("it would wait for itself to finish"), std::string::npos) << errors[3];
    EXPECT_FALSE(q.metrics().callback_exceptions) << "each throw was caught in the callback";
  }
}

// wait_for() is a wait too: in a callback on the thread that runs the
// batches, the request it waits for cannot complete while it waits (that
// thread would run it), so a loop of bounded waits, each ending with false,
// would never end. It throws InvalidState like get() and wait(); on a
// completed handle it returns true there. Without the check the loop below
// makes its 20 waits of 1 ms, in vain, and returns.
TEST_F(BatchQueueCallbackTest, WaitForFromACallbackOnAnIncompleteHandleThrowsInvalidState) {
  for (int workers : {0, 1}) {
    SCOPED_TRACE(::testing::Message() << "workers " << workers);
    BatchQueue q(*device_, kIn, kOut, counted(), threaded(workers, 4, 0us));
    RequestHandle early = submit_completed(q, workers, 0);
    std::string error;
    int waits = 0;
    bool early_done = false;
    RequestHandle inner;
    std::promise<void> done;
    within("wait_for() in a callback on the thread that runs the batches", [&] {
      q.submit(input(1), [&](const Completion&) {
        early_done = early.wait_for(1ms);  // complete: no wait
        inner = q.submit(input(2));
        error = invalid_state_of([&] {
          while (!inner.wait_for(1ms))
            if (++waits == 20) return;
        });
        done.set_value();
      });
      run_callback_then_what_it_queued(q, workers, done);
      EXPECT_TRUE(inner.wait_for(30s)) << "from this thread: a wait that ends";
      expect_output(inner, 2);
      q.shutdown();
    });
    EXPECT_TRUE(early_done);
    EXPECT_EQ(waits, 0) << "wait_for() waited for its own thread";
    EXPECT_NE(error.find("[RequestHandle::wait_for] request"), std::string::npos) << error;
    EXPECT_NE(error.find("has not completed, and this thread runs its queue's batches"),
              std::string::npos)
        << error;
    EXPECT_FALSE(q.metrics().callback_exceptions) << "the throw was caught in the callback";
  }
}

// The same in manual mode for callbacks that run before step()'s batch (an
// expiry, decided in step()) and in the shutdown drain: step() and
// shutdown() there would wait on locks their own thread holds.
TEST_F(BatchQueueCallbackTest, StepAndShutdownFromAnExpiryOrTheDrainThrowInvalidState) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 1000us));
  std::vector<std::string> errors;
  const auto record = [&](const Completion&) {
    errors.push_back(invalid_state_of([&] { (void)q.step(); }));
    errors.push_back(invalid_state_of([&] { q.shutdown(); }));
  };
  within("step() and shutdown() from an expiry's and the drain's callbacks", [&] {
    (void)q.submit(input(0), record, q.deadline_in(10us));
    clock_->advance(10us);
    EXPECT_EQ(q.step(), 0u);  // expires it: its callback runs inside step()
    (void)q.submit(input(1), record);
    q.shutdown(ShutdownMode::kDrain);  // runs it: its callback runs inside the drain
  });
  ASSERT_EQ(errors.size(), 4u);
  for (const std::string& e : errors)
    EXPECT_NE(e.find("this queue's batches"), std::string::npos) << e;
  EXPECT_EQ(q.metrics().expired, 1u);
  EXPECT_EQ(q.metrics().completed, 1u);
}

// Scopes nest: a callback of queue A that steps queue B runs B's callbacks
// on a thread that is still inside A's batch, so there A's step(),
// shutdown() and a blocking submit into A (full) would wait for the thread
// itself. They are refused as in A's own callback; stepping B from A's
// callback is allowed. Without nesting (one queue remembered per thread)
// this test deadlocks.
TEST_F(BatchQueueCallbackTest, AQueueSteppedFromAnotherQueuesCallbackStillGuardsTheOuterQueue) {
  auto ao = manual(4, 0us);
  ao.capacity = 1;
  ao.when_full = OverflowPolicy::kBlock;
  BatchQueue a(*device_, kIn, kOut, counted(), ao);
  BatchQueue b(*device_, kIn, kOut, counted(), manual(4, 0us));
  std::vector<std::string> errors;
  size_t b_ran = 0;
  RequestStatus blocked_status = RequestStatus::kQueued;
  const auto expect_invalid_state = [&](const std::function<void()>& call) {
    errors.push_back(invalid_state_of(call));
  };
  within("queue A's calls from queue B's callback inside A's batch", [&] {
    (void)a.submit(input(0), [&](const Completion&) {
      (void)b.submit(input(1), [&](const Completion&) {
        expect_invalid_state([&] { (void)a.step(); });
        expect_invalid_state([&] { a.shutdown(); });
        (void)a.submit(input(2), CompletionCallback([](const Completion&) {}));  // takes the room
        (void)a.submit(input(3), [&](const Completion& c) { blocked_status = c.status; });
      });
      b_ran = b.step();  // allowed: B is not this thread's batch
    });
    EXPECT_EQ(a.step(), 1u);
    EXPECT_EQ(a.step(), 1u);  // input(2)
    a.shutdown();
    b.shutdown();
  });
  EXPECT_EQ(b_ran, 1u);
  ASSERT_EQ(errors.size(), 2u);
  for (const std::string& e : errors)
    EXPECT_NE(e.find("this queue's batches"), std::string::npos) << e;
  EXPECT_EQ(blocked_status, RequestStatus::kRejected) << "the full queue's submit waited";
  EXPECT_EQ(a.metrics().rejected, 1u);
  EXPECT_EQ(a.metrics().completed, 2u);
}

TEST_F(BatchQueueCallbackTest, AnExpiredCallbackMaySubmitAndCancel) {
  for (int workers : {0, 1}) {
    SCOPED_TRACE(::testing::Message() << "workers " << workers);
    // max_delay 1 ms: nothing runs before the clock says so.
    BatchQueue q(*device_, kIn, kOut, counted(), threaded(workers, 4, 1000us));
    CallLog log, children;
    Reentry r;
    const auto in = [this](int i) { return input(i); };
    std::promise<void> expired, child_done;
    auto child = children.callback([&](const Completion& c) {
      if (c.status == RequestStatus::kCompleted) child_done.set_value();
    });
    auto parent = log.callback([&, body = reenter(q, r, in, child)](const Completion& c) {
      body(c);
      expired.set_value();
    });
    uint64_t id = 0;
    within("an expired request's callback re-entering the queue", [&] {
      id = q.submit(input(0), parent, q.deadline_in(100us));
      clock_->advance(100us);
      if (workers == 0) {
        EXPECT_EQ(q.step(), 0u) << "expires; the callback queues input(10)";
      }
      ASSERT_EQ(expired.get_future().wait_for(30s), std::future_status::ready)
          << "the request did not expire";
      clock_->advance(1000us);  // input(10) has waited max_delay
      if (workers == 0) {
        EXPECT_EQ(q.step(), 1u) << "the request submitted from the callback runs";
      }
      ASSERT_EQ(child_done.get_future().wait_for(30s), std::future_status::ready);
      q.shutdown();
    });
    const Call c = log.only(id);
    EXPECT_EQ(c.status, RequestStatus::kExpired);
    expect_error<Timeout>(c);
    if (workers == 1) {
      EXPECT_EQ(c.thread_name, "fl-queue-w0");
    }
    ASSERT_EQ(r.done.load(), 1);
    EXPECT_EQ(r.cancel_result.load(), 1);
    EXPECT_EQ(children.only(r.cancelled_id.load()).status, RequestStatus::kCancelled);
    expect_output(children.only(r.submitted.load()), 10);
    EXPECT_EQ(children.size(), 2u);
    EXPECT_EQ(rows_.load(), 1) << "only the request submitted from the callback ran";
    auto m = q.metrics();
    EXPECT_EQ(m.expired, 1u);
    EXPECT_EQ(m.cancelled, 1u);
    EXPECT_EQ(m.completed, 1u);
    expect_counts_add_up(m);
    rows_ = 0;
  }
}

TEST_F(BatchQueueCallbackTest, ACancelledCallbackMaySubmitAndCancel) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 100us));
  CallLog log, children;
  Reentry r;
  const auto in = [this](int i) { return input(i); };
  auto child = children.callback();
  const uint64_t id = q.submit(input(0), log.callback(reenter(q, r, in, child)));
  bool cancelled = false;
  within("a cancelled request's callback re-entering the queue", [&] { cancelled = q.cancel(id); });
  EXPECT_TRUE(cancelled);
  EXPECT_EQ(log.only(id).status, RequestStatus::kCancelled);
  ASSERT_EQ(r.done.load(), 1);
  EXPECT_EQ(r.cancel_result.load(), 1);
  EXPECT_EQ(children.only(r.cancelled_id.load()).status, RequestStatus::kCancelled);
  EXPECT_EQ(children.count(r.submitted.load()), 0) << "ran before the step";
  clock_->advance(100us);
  EXPECT_EQ(q.step(), 1u);
  expect_output(children.only(r.submitted.load()), 10);

  // shutdown(kCancel)'s callbacks may re-enter too: their submits are refused.
  Reentry r2;
  CallLog children2;
  const uint64_t id2 = q.submit(input(1), log.callback(reenter(q, r2, in, children2.callback())));
  within("shutdown(kCancel) with a callback re-entering the queue",
         [&] { q.shutdown(ShutdownMode::kCancel); });
  EXPECT_EQ(log.only(id2).status, RequestStatus::kCancelled);
  ASSERT_EQ(r2.done.load(), 1);
  EXPECT_EQ(r2.cancel_result.load(), 0) << "a request refused with ShutDown was cancelled";
  EXPECT_EQ(children2.only(r2.submitted.load()).status, RequestStatus::kShutDown);
  EXPECT_EQ(children2.only(r2.cancelled_id.load()).status, RequestStatus::kShutDown);
  EXPECT_EQ(calls_.load(), 1);
  expect_counts_add_up(q.metrics());
}

TEST_F(BatchQueueCallbackTest, ARefusalsCallbackMaySubmitAndCancel) {
  auto o = manual(4, 100us);
  o.capacity = 1;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  CallLog log, children;
  const uint64_t queued = q.submit(input(0), log.callback());
  std::atomic<int> cancel_result{-1};
  std::atomic<uint64_t> resubmitted{0};
  // Refused (QueueFull): its callback cancels the queued request, which makes
  // room, and submits again: that one is queued.
  uint64_t full = 0;
  within("a refused request's callback re-entering the queue", [&] {
    full = q.submit(input(1), log.callback([&](const Completion&) {
      cancel_result = q.cancel(queued) ? 1 : 0;
      resubmitted = q.submit(input(1), children.callback());
    }));
  });
  EXPECT_EQ(log.only(full).status, RequestStatus::kRejected);
  EXPECT_EQ(cancel_result.load(), 1);
  EXPECT_EQ(log.only(queued).status, RequestStatus::kCancelled);
  EXPECT_EQ(children.size(), 0u) << "the resubmitted request was refused: " << [&] {
    auto cs = children.calls();
    return cs.empty() ? "" : to_string(cs[0].status);
  }();
  clock_->advance(100us);
  EXPECT_EQ(q.step(), 1u);
  expect_output(children.only(resubmitted.load()), 1);
  auto m = q.metrics();
  EXPECT_EQ(m.submitted, 3u);
  EXPECT_EQ(m.rejected, 1u);
  EXPECT_EQ(m.cancelled, 1u);
  EXPECT_EQ(m.completed, 1u);
  expect_counts_add_up(m);
}

// ---- A queue destroyed by its own batch ------------------------------------------------

// Note [A queue destroyed by its own batch] (batch_queue.cpp): a callback
// that owns the last reference to its queue destroys the queue on the
// thread that runs its batches, inside the batch. The destructor cannot
// join that thread or free what the batch still uses, so the process stops
// with a message saying what happened and what to do. Before the message
// existed it stopped on an InvalidState from shutdown(), which names
// neither the destructor nor the remedy, and this test failed.
class BatchQueueCallbackDeathTest : public BatchQueueCallbackTest {};

TEST_F(BatchQueueCallbackDeathTest, ACallbackDroppingTheLastReferenceToItsQueueStopsSayingWhy) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // the device has threads: no plain fork
  const char* const message =
      "BatchQueue::~BatchQueue. the queue is being destroyed on a thread that runs its "
      "batches.*shutdown\\(\\) from a thread that runs none of its batches";
  // Where the batch runs: the one worker, step()'s caller, the manual drain.
  for (const char* where : {"worker", "step", "drain"}) {
    SCOPED_TRACE(where);
    const int workers = std::string(where) == "worker" ? 1 : 0;
    EXPECT_DEATH(
        {
          auto q = std::make_shared<BatchQueue>(*device_, kIn, kOut, counted(),
                                                threaded(workers, 4, 100us));
          BatchQueue& queue = *q;
          // The callback owns a reference; once the test lets go of its own,
          // that one is the last, dropped when the callback is done with.
          (void)queue.submit(input(0), [q](const Completion&) {});
          q.reset();
          clock_->advance(100us);  // max_delay: now the batch may run
          if (std::string(where) == "step") (void)queue.step();
          if (std::string(where) == "drain") queue.shutdown();
          std::this_thread::sleep_for(30s);  // the worker's batch, or a failure to die
        },
        message);
  }
}

// Note [A queue destroyed on the deciding thread] (batch_queue.cpp): on a
// thread that runs none of the queue's batches (the caller of submit(),
// cancel() or shutdown(kCancel)), a callback that holds the last reference
// destroys the queue inside that call, and the call must touch nothing of
// the queue afterwards. The queue is reached through a plain pointer, as a
// callback-owned queue is. The shutdown(kCancel) case used freed memory
// before the fix (ASan: heap-use-after-free): it ran the next cancelled
// request's callback through the freed core, and then locked the freed
// queue's mutex. The cancel() and submit() cases passed before it too; they
// keep those calls from touching the queue after their callbacks.
TEST_F(BatchQueueCallbackTest, ACallbackMayDropTheLastReferenceOnTheThreadThatDecidedIt) {
  // Each queue is its own heap block (not make_shared's, which the weak_ptr
  // `alive` would keep allocated), so that ASan sees any use after the free.
  // shutdown(kCancel): the first cancelled request's callback owns the
  // queue; two more requests are cancelled after it, one of them a handle's.
  {
    std::shared_ptr<BatchQueue> q(new BatchQueue(*device_, kIn, kOut, counted(), manual(4, 100us)));
    const std::weak_ptr<BatchQueue> alive = q;
    BatchQueue* queue = q.get();
    CallLog log;
    const uint64_t owner = queue->submit(input(0), log.callback([q](const Completion&) {}));
    const uint64_t other = queue->submit(input(1), log.callback());
    RequestHandle h = queue->submit(input(2));
    q.reset();
    ASSERT_FALSE(alive.expired());
    queue->shutdown(ShutdownMode::kCancel);
    EXPECT_TRUE(alive.expired()) << "the owning callback let go of the last reference";
    EXPECT_EQ(log.only(owner).status, RequestStatus::kCancelled);
    EXPECT_EQ(log.only(other).status, RequestStatus::kCancelled);
    EXPECT_EQ(h.status(), RequestStatus::kCancelled);
    EXPECT_THROW(h.get(), Cancelled);
  }
  // cancel(id): the cancelled request's callback owns the queue; another
  // request is still queued and is drained by the destructor, inside cancel().
  {
    std::shared_ptr<BatchQueue> q(new BatchQueue(*device_, kIn, kOut, counted(), manual(4, 100us)));
    const std::weak_ptr<BatchQueue> alive = q;
    BatchQueue* queue = q.get();
    CallLog log;
    const uint64_t owner = queue->submit(input(0), log.callback([q](const Completion&) {}));
    RequestHandle h = queue->submit(input(1));
    q.reset();
    EXPECT_TRUE(queue->cancel(owner));
    EXPECT_TRUE(alive.expired());
    EXPECT_EQ(log.only(owner).status, RequestStatus::kCancelled);
    expect_output(h, 1);  // the destructor drained it
  }
  // submit(): a refused request's callback owns the queue (QueueFull).
  {
    auto o = manual(4, 100us);
    o.capacity = 1;
    std::shared_ptr<BatchQueue> q(new BatchQueue(*device_, kIn, kOut, counted(), o));
    const std::weak_ptr<BatchQueue> alive = q;
    BatchQueue* queue = q.get();
    CallLog log;
    RequestHandle h = queue->submit(input(0));
    CompletionCallback owning = log.callback([q](const Completion&) {});
    q.reset();
    const uint64_t refused = queue->submit(input(1), std::move(owning));
    EXPECT_TRUE(alive.expired());
    EXPECT_EQ(log.only(refused).status, RequestStatus::kRejected);
    expect_output(h, 0);
  }
}

// ---- Mixed handles and callbacks -------------------------------------------------------

TEST_F(BatchQueueCallbackTest, HandleAndCallbackRequestsShareABatchAndGetTheirOwnRows) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(6, 0us));
  CallLog log;
  std::vector<RequestHandle> hs;
  std::vector<uint64_t> ids;
  for (int i = 0; i < 6; ++i) {
    if (i % 2 == 0)
      hs.push_back(q.submit(input(i)));
    else
      ids.push_back(q.submit(input(i), log.callback()));
  }
  EXPECT_EQ(hs[1].id(), ids[0] + 1) << "one id sequence for both kinds";
  EXPECT_EQ(q.step(), 6u);
  EXPECT_EQ(calls_.load(), 1) << "all six in one batch";
  ASSERT_EQ(log.size(), 3u);
  for (size_t k = 0; k < 3; ++k) {
    expect_output(hs[k], static_cast<int>(2 * k));
    expect_output(log.only(ids[k]), static_cast<int>(2 * k + 1));
  }
  auto m = q.metrics();
  EXPECT_EQ(m.batch_sizes.at(6), 1u);
  EXPECT_EQ(m.completed, 6u);
}

TEST_F(BatchQueueCallbackTest, MixedRequestsWithRecordedBatchesGetTheirOwnRows) {
  auto o = manual(4, 0us);
  o.record_batches = true;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  CallLog log;
  int next = 0;
  for (int size : {3, 3, 1}) {  // 3 runs as 4 (padded), then replays
    std::vector<std::pair<int, RequestHandle>> hs;
    std::vector<std::pair<int, uint64_t>> ids;
    for (int i = 0; i < size; ++i, ++next) {
      if (next % 2)
        hs.emplace_back(next, q.submit(input(next)));
      else
        ids.emplace_back(next, q.submit(input(next), log.callback()));
    }
    EXPECT_EQ(q.step(), static_cast<size_t>(size));
    for (auto& [i, h] : hs) expect_output(h, i);
    for (auto& [i, id] : ids) expect_output(log.only(id), i);
  }
}

}  // namespace
}  // namespace flotilla::serve::test
