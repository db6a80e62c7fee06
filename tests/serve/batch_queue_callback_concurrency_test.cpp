// BatchQueue completion callbacks under concurrency: exactly-once callbacks
// under races of submit, cancel(id), deadlines (a ManualClock moved by its
// own thread), callbacks that re-enter the queue, and shutdown (kDrain and
// kCancel) mid-way; callbacks chaining submits on many workers; and where a
// decision's callback runs when the deciding calls race. Threads start
// together on a latch; the racing test repeats with a printed seed
// (FLOTILLA_TEST_SEED replays it).
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <latch>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "serve/serve_test_util.h"

namespace flotilla::serve::test {
namespace {

using namespace std::chrono_literals;

// Whether `c` is consistent: kCompleted with out_features values and no
// error, or another final status with the matching error type and no output.
bool well_formed(const Completion& c, size_t out_features) {
  if (c.status == RequestStatus::kCompleted) return !c.error && c.output.size() == out_features;
  if (!c.error || !c.output.empty()) return false;
  try {
    std::rethrow_exception(c.error);
  } catch (const Error& e) {
    switch (c.status) {
      case RequestStatus::kFailed:
        return std::string(e.what()).find("marked row") != std::string::npos;
      case RequestStatus::kExpired: return e.code() == ErrorCode::kTimeout;
      case RequestStatus::kCancelled: return e.code() == ErrorCode::kCancelled;
      case RequestStatus::kRejected: return e.code() == ErrorCode::kQueueFull;
      case RequestStatus::kShutDown: return e.code() == ErrorCode::kShutDown;
      default: return false;
    }
  } catch (...) {
    return false;
  }
}

// Polls `pred` for up to `limit` of real time. A callback that deadlocks the
// queue cannot be recovered from (the queue's destructor would wait too), so
// on a timeout the process stops with a message instead of hanging.
void await_or_abort(const char* what, const std::function<bool()>& pred,
                    std::chrono::seconds limit = 60s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) {
      std::fprintf(stderr, "FATAL: %s not within %lld s: a deadlock or a lost callback\n", what,
                   static_cast<long long>(limit.count()));
      std::fflush(stderr);
      std::abort();
    }
    std::this_thread::sleep_for(1ms);
  }
}

// Stops the process, naming `what`, unless destroyed within `limit` of real
// time: a round that deadlocks fails with a message instead of hanging.
class Watchdog {
 public:
  Watchdog(std::string what, std::chrono::seconds limit)
      : what_(std::move(what)), thread_([this, limit] {
          std::unique_lock<std::mutex> lock(mu_);
          if (!cv_.wait_for(lock, limit, [this] { return done_; })) {
            std::fprintf(stderr, "FATAL: %s not done within %lld s: a deadlock\n", what_.c_str(),
                         static_cast<long long>(limit.count()));
            std::fflush(stderr);
            std::abort();
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  const std::string what_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;  // last: starts once the members above exist
};

constexpr int kStatuses = static_cast<int>(RequestStatus::kShutDown) + 1;

// Many threads submit callback requests (some with deadlines, some failing
// their batch, some whose callbacks throw or re-enter the queue) while two
// threads cancel random ids and one shuts the queue down mid-way. Every
// submit's callback must run exactly once, with its own id, a well-formed
// completion and, when completed, the model's output for its own input; and
// the metrics must agree with what the callbacks saw.
TEST(BatchQueueCallbackConcurrency, EveryCallbackRunsExactlyOnceUnderRaces) {
  auto device = make_device();
  const TinyModel tiny(*device, 8, 4);
  const size_t out = static_cast<size_t>(tiny.out());
  const uint64_t seed = test_seed();
  const int rounds = scaled(48, 12);
  const int submitters = 8;
  const int per = scaled(48, 12);
  const int n = submitters * per;
  std::array<uint64_t, kStatuses> totals{};
  uint64_t total_children = 0, total_true_cancels = 0;

  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(::testing::Message() << "round " << round << " seed " << seed);
    const Watchdog watchdog(::flotilla::detail::str_cat("round ", round, " (seed ", seed, ")"),
                            120s);
    std::mt19937_64 rng(seed * 1000003 + static_cast<uint64_t>(round));
    auto clock = std::make_shared<ManualClock>();

    BatchQueueOptions o;
    // Every combination of workers and mode within six rounds (the sanitizer
    // lanes run twelve), and kBlock and spinning waits among them.
    o.workers = round % 3;  // 0: manual mode, stepped by a thread below
    const ShutdownMode mode = round % 2 ? ShutdownMode::kCancel : ShutdownMode::kDrain;
    // kBlock only without re-entering callbacks: a worker's callback must not
    // submit under kBlock (it could wait for itself).
    o.when_full = round % 5 == 4 ? OverflowPolicy::kBlock : OverflowPolicy::kReject;
    const bool reenter = o.when_full == OverflowPolicy::kReject;
    o.spin_wait = std::chrono::microseconds(round % 4 >= 2 ? 30 : 0);
    o.max_batch = 1 + static_cast<int>(rng() % 6);
    o.max_delay = std::chrono::microseconds(std::array{0, 50, 200}[rng() % 3]);
    o.capacity = 4 + rng() % 60;
    o.clock = clock;
    const size_t shutdown_after = rng() % static_cast<size_t>(n);
    const uint64_t client_seed = rng();

    // Inputs and their references, made before the race.
    std::vector<std::vector<float>> inputs(static_cast<size_t>(n));
    std::vector<std::vector<double>> refs(static_cast<size_t>(n));
    std::vector<char> marked(static_cast<size_t>(n));
    for (int k = 0; k < n; ++k) {
      auto& x = inputs[static_cast<size_t>(k)];
      x = random_vector(rng, static_cast<size_t>(tiny.in()));
      marked[static_cast<size_t>(k)] = rng() % 16 == 0;
      if (marked[static_cast<size_t>(k)]) x[0] = kFailMark;
      refs[static_cast<size_t>(k)] = tiny.host_reference(x);
    }

    // What the callbacks saw. Relaxed: read after every thread has joined.
    const size_t max_ids = 2 * static_cast<size_t>(n) + 1;  // parents and children
    std::vector<std::atomic<int>> by_id(max_ids + 1);       // callback calls per id
    std::vector<std::atomic<int>> cancel_won(max_ids + 1);  // cancel(id) returned true
    std::vector<std::atomic<int>> status_of(max_ids + 1);   // the status its callback saw
    std::vector<std::atomic<int>> by_request(static_cast<size_t>(n));  // per parent
    std::vector<std::atomic<uint64_t>> id_seen(static_cast<size_t>(n));
    std::vector<uint64_t> id_returned(static_cast<size_t>(n));  // each written by its submitter
    std::array<std::atomic<uint64_t>, kStatuses> statuses{};
    std::atomic<int> stray_ids{0}, malformed{0}, wrong_output{0}, marked_completed{0};
    std::atomic<int> thrown{0}, children{0}, child_calls{0};
    std::atomic<uint64_t> true_cancels{0};

    auto note = [&](const Completion& c) {
      if (c.id == 0 || c.id > max_ids) {
        stray_ids.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      by_id[c.id].fetch_add(1, std::memory_order_relaxed);
      status_of[c.id].store(static_cast<int>(c.status), std::memory_order_relaxed);
      statuses[static_cast<size_t>(c.status)].fetch_add(1, std::memory_order_relaxed);
      if (!well_formed(c, out)) malformed.fetch_add(1, std::memory_order_relaxed);
    };

    std::unique_ptr<BatchQueue> qp =
        std::make_unique<BatchQueue>(*device, tiny.in(), tiny.out(), marked_failing(tiny), o);
    BatchQueue& q = *qp;
    // A child: submitted by request k's callback, with k's input.
    auto child_cb = [&](int k) {
      return [&, k](const Completion& c) {
        const auto kk = static_cast<size_t>(k);
        note(c);
        child_calls.fetch_add(1, std::memory_order_relaxed);
        if (c.status == RequestStatus::kCompleted) {
          if (marked[kk]) marked_completed.fetch_add(1, std::memory_order_relaxed);
          if (max_rel_error(c.output, refs[kk]) > 1e-5)
            wrong_output.fetch_add(1, std::memory_order_relaxed);
        }
      };
    };
    auto parent_cb = [&](int k) {
      return [&, k](const Completion& c) {
        const auto kk = static_cast<size_t>(k);
        note(c);
        by_request[kk].fetch_add(1, std::memory_order_relaxed);
        id_seen[kk].store(c.id, std::memory_order_relaxed);
        if (c.status == RequestStatus::kCompleted) {
          if (marked[kk]) marked_completed.fetch_add(1, std::memory_order_relaxed);
          if (max_rel_error(c.output, refs[kk]) > 1e-5)
            wrong_output.fetch_add(1, std::memory_order_relaxed);
        }
        if (reenter && k % 5 == 1) {
          // Re-enter: cancel a neighbour, and submit a child with this input.
          if (q.cancel(c.id + 1)) {
            if (c.id + 1 <= max_ids) cancel_won[c.id + 1].fetch_add(1, std::memory_order_relaxed);
            true_cancels.fetch_add(1, std::memory_order_relaxed);
          }
          children.fetch_add(1, std::memory_order_relaxed);
          q.submit(inputs[kk], child_cb(k));
        }
        if (k % 11 == 3) {
          thrown.fetch_add(1, std::memory_order_relaxed);
          throw std::runtime_error("[test callback] throws");
        }
      };
    };

    std::atomic<size_t> submitted{0};  // acq_rel: the closer waits on it
    std::atomic<uint64_t> max_id{0};   // the highest id returned so far: cancellers aim at it
    std::atomic<int> submitters_left{submitters};
    std::latch start(submitters + 2 + RaceBackground::kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < submitters; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 r(client_seed + static_cast<uint64_t>(t));
        start.arrive_and_wait();
        for (int i = 0; i < per;) {
          // Rounds 3-5, 9-11, ...: groups of 1 to 5 (submit_all, Note
          // [Group submits]), one deadline a group, in every worker count.
          const bool groups = (round / 3) % 2 == 1;
          const int group = groups ? std::min(per - i, 1 + static_cast<int>(r() % 5)) : 1;
          const int k0 = t * per + i;
          std::optional<Clock::time_point> deadline;
          switch (r() % 4) {
            case 1: deadline = q.deadline_in(std::chrono::microseconds(r() % 200)); break;
            case 2: deadline = q.deadline_in(std::chrono::microseconds(r() % 20)); break;
            default: break;
          }
          std::vector<uint64_t> ids;
          if (!groups) {
            ids.push_back(q.submit(inputs[static_cast<size_t>(k0)], parent_cb(k0), deadline));
          } else {
            std::vector<std::span<const float>> xs;
            std::vector<CompletionCallback> cbs;
            for (int k = k0; k < k0 + group; ++k) {
              xs.emplace_back(inputs[static_cast<size_t>(k)]);
              cbs.emplace_back(parent_cb(k));
            }
            ids = q.submit_all(xs, cbs, deadline);
            EXPECT_EQ(ids.size(), xs.size());
          }
          for (size_t g = 0; g < ids.size(); ++g) {
            const uint64_t id = ids[g];
            id_returned[static_cast<size_t>(k0) + g] = id;
            uint64_t seen = max_id.load(std::memory_order_relaxed);
            while (seen < id && !max_id.compare_exchange_weak(seen, id)) {
            }
          }
          submitted.fetch_add(static_cast<size_t>(group), std::memory_order_acq_rel);
          i += group;
          // Now and then a pause, so that not every request meets a full queue.
          if (r() % 4 == 0) std::this_thread::sleep_for(std::chrono::microseconds(r() % 50));
          for (const uint64_t id : ids) {
            if (r() % 8 == 0 && q.cancel(id)) {
              cancel_won[id].fetch_add(1, std::memory_order_relaxed);
              true_cancels.fetch_add(1, std::memory_order_relaxed);
            }
          }
        }
        submitters_left.fetch_sub(1, std::memory_order_acq_rel);
      });
    }
    for (int c = 0; c < 2; ++c) {
      threads.emplace_back([&, c] {  // cancel random ids, some unknown
        std::mt19937_64 r(client_seed ^ (0xca9ce1 + static_cast<uint64_t>(c)));
        start.arrive_and_wait();
        while (submitters_left.load(std::memory_order_acquire) > 0) {
          const uint64_t id = 1 + r() % (max_id.load(std::memory_order_relaxed) + 4);
          if (q.cancel(id)) {
            if (id <= max_ids) cancel_won[id].fetch_add(1, std::memory_order_relaxed);
            true_cancels.fetch_add(1, std::memory_order_relaxed);
          }
          std::this_thread::yield();
        }
      });
    }
    {
      RaceBackground background(q, *clock, client_seed, start, submitted, shutdown_after, mode);
      for (auto& t : threads) t.join();
      background.join_shutdown();  // shutdown has returned: nothing is queued or running
    }

    const auto m = q.metrics();
    const uint64_t total = static_cast<uint64_t>(n) + static_cast<uint64_t>(children.load());
    EXPECT_EQ(m.submitted, total);
    EXPECT_EQ(child_calls.load(), children.load()) << "a child's callback is missing";
    EXPECT_EQ(stray_ids.load(), 0);
    EXPECT_EQ(malformed.load(), 0) << "a completion whose status, error and output disagree";
    EXPECT_EQ(wrong_output.load(), 0) << "a completed request got another's (or no) output";
    EXPECT_EQ(marked_completed.load(), 0) << "a request of a failing batch completed";
    for (int k = 0; k < n; ++k) {
      const auto kk = static_cast<size_t>(k);
      ASSERT_EQ(by_request[kk].load(), 1)
          << "request " << k << " (id " << id_returned[kk] << "): its callback ran this many times";
      EXPECT_EQ(id_seen[kk].load(), id_returned[kk]) << "request " << k;
    }
    for (uint64_t id = 1; id <= total; ++id) {
      ASSERT_EQ(by_id[id].load(), 1) << "id " << id;
      if (cancel_won[id].load() > 0) {
        EXPECT_EQ(cancel_won[id].load(), 1) << "id " << id << " was cancelled twice";
        EXPECT_EQ(status_of[id].load(), static_cast<int>(RequestStatus::kCancelled))
            << "cancel(" << id << ") returned true, but the callback saw "
            << to_string(static_cast<RequestStatus>(status_of[id].load()));
      }
    }
    for (size_t id = total + 1; id < by_id.size(); ++id) EXPECT_EQ(by_id[id].load(), 0);

    // The metrics agree with the callbacks.
    EXPECT_EQ(m.completed, statuses[static_cast<size_t>(RequestStatus::kCompleted)].load());
    EXPECT_EQ(m.failed, statuses[static_cast<size_t>(RequestStatus::kFailed)].load());
    EXPECT_EQ(m.expired, statuses[static_cast<size_t>(RequestStatus::kExpired)].load());
    EXPECT_EQ(m.cancelled, statuses[static_cast<size_t>(RequestStatus::kCancelled)].load());
    EXPECT_EQ(m.rejected, statuses[static_cast<size_t>(RequestStatus::kRejected)].load());
    EXPECT_EQ(m.shut_down, statuses[static_cast<size_t>(RequestStatus::kShutDown)].load());
    EXPECT_EQ(m.submitted,
              m.completed + m.rejected + m.expired + m.cancelled + m.failed + m.shut_down);
    EXPECT_EQ(m.callback_exceptions, static_cast<uint64_t>(thrown.load()));
    EXPECT_EQ(m.invalid, 0u);
    EXPECT_EQ(m.depth, 0u);
    EXPECT_LE(m.max_depth, o.capacity);
    uint64_t cancels_won = 0;
    for (auto& c : cancel_won) cancels_won += static_cast<uint64_t>(c.load());
    if (mode == ShutdownMode::kDrain) {
      EXPECT_EQ(m.cancelled, cancels_won) << "kDrain cancels nothing: every cancel is a cancel()";
    } else {
      EXPECT_GE(m.cancelled, cancels_won);
    }
    if (o.when_full == OverflowPolicy::kBlock) {
      EXPECT_EQ(m.rejected, 0u);
    }
    for (int s = 0; s < kStatuses; ++s) totals[static_cast<size_t>(s)] += statuses[s].load();
    total_children += static_cast<uint64_t>(children.load());
    total_true_cancels += true_cancels.load();
    qp.reset();  // the destructor drains an already shut down queue: nothing more runs
    for (uint64_t id = 1; id <= total; ++id) ASSERT_EQ(by_id[id].load(), 1) << "id " << id;
  }

  std::printf("callbacks over %d rounds:", rounds);
  for (int s = 0; s < kStatuses; ++s)
    if (totals[static_cast<size_t>(s)])
      std::printf(" %s=%llu", to_string(static_cast<RequestStatus>(s)),
                  static_cast<unsigned long long>(totals[static_cast<size_t>(s)]));
  std::printf(" (children=%llu, cancel()=true %llu)\n",
              static_cast<unsigned long long>(total_children),
              static_cast<unsigned long long>(total_true_cancels));
  for (RequestStatus s :
       {RequestStatus::kCompleted, RequestStatus::kFailed, RequestStatus::kExpired,
        RequestStatus::kCancelled, RequestStatus::kRejected, RequestStatus::kShutDown})
    EXPECT_GT(totals[static_cast<size_t>(s)], 0u)
        << "status " << to_string(s) << " never occurred: the race did not exercise it";
}

// Callbacks that chain: each completion submits the next request of its
// chain from the worker that runs it (and cancels a request it just
// submitted), on three workers at once with real time. Would catch a callback
// run under the queue's lock (a deadlock: the chains never finish) and
// outputs mixed up between chains.
TEST(BatchQueueCallbackConcurrency, CallbacksChainSubmitsAndCancelsOnManyWorkers) {
  auto device = make_device();
  const TinyModel tiny(*device, 8, 4);
  BatchQueueOptions o;
  o.workers = 3;
  o.max_batch = 8;
  o.max_delay = 50us;
  o.capacity = 4096;
  BatchQueue q(*device, tiny.in(), tiny.out(), tiny.model(), o);
  const int chains = 16, length = scaled(40, 10);
  std::vector<std::vector<float>> xs;
  std::vector<std::vector<double>> refs;
  std::mt19937_64 rng(11);
  for (int c = 0; c < chains; ++c) {
    xs.push_back(random_vector(rng, static_cast<size_t>(tiny.in())));
    refs.push_back(tiny.host_reference(xs.back()));
  }
  std::atomic<int> finished{0}, wrong{0}, not_completed{0}, decoys{0}, decoys_done{0};
  std::atomic<int> decoys_cancelled{0};
  const CompletionCallback decoy_cb = [&](const Completion& c) {
    decoys_done.fetch_add(1);
    if (c.status == RequestStatus::kCancelled) decoys_cancelled.fetch_add(1);
  };
  // Step `step` of chain `c`: checks its output, then submits step + 1.
  std::function<void(int, int, const Completion&)> on_step = [&](int c, int step,
                                                                 const Completion& done) {
    const auto cc = static_cast<size_t>(c);
    if (done.status != RequestStatus::kCompleted) {
      not_completed.fetch_add(1);
      finished.fetch_add(1);
      return;
    }
    if (max_rel_error(done.output, refs[cc]) > 1e-5) wrong.fetch_add(1);
    if (step + 1 == length) {
      finished.fetch_add(1);
      return;
    }
    decoys.fetch_add(1);
    q.cancel(q.submit(xs[cc], decoy_cb));  // cancelled, or already picked: either is fine
    q.submit(xs[cc], [&, c, step](const Completion& next) { on_step(c, step + 1, next); });
  };
  for (int c = 0; c < chains; ++c)
    q.submit(xs[static_cast<size_t>(c)], [&, c](const Completion& first) { on_step(c, 0, first); });
  await_or_abort("every chain finishing", [&] { return finished.load() == chains; });
  q.shutdown();
  EXPECT_EQ(not_completed.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(decoys_done.load(), decoys.load());
  const auto m = q.metrics();
  EXPECT_EQ(m.submitted, static_cast<uint64_t>(chains * length + decoys.load()));
  EXPECT_EQ(m.completed + m.cancelled, m.submitted);
  EXPECT_EQ(m.cancelled, static_cast<uint64_t>(decoys_cancelled.load()));
  std::printf("chains=%d length=%d decoys=%d cancelled=%d batches=%llu mean_batch=%.2f\n", chains,
              length, decoys.load(), decoys_cancelled.load(),
              static_cast<unsigned long long>(m.batches), m.mean_batch());
}

// Pages of their own for a client's borrowed inputs, one per buffer, so
// that a buffer can be made unreadable (seal) while its request is over.
class GuardedPages {
 public:
  explicit GuardedPages(size_t count)
      : page_(static_cast<size_t>(::sysconf(_SC_PAGESIZE))),
        bytes_(count * page_),
        base_(static_cast<char*>(
            ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))) {
    if (base_ == MAP_FAILED) throw std::runtime_error("mmap failed");
  }
  ~GuardedPages() { ::munmap(base_, bytes_); }
  GuardedPages(const GuardedPages&) = delete;
  GuardedPages& operator=(const GuardedPages&) = delete;
  float* page(size_t i) const { return reinterpret_cast<float*>(base_ + i * page_); }
  // A read of a sealed page faults: the process stops with SIGSEGV.
  void seal(size_t i) const { protect(i, PROT_NONE); }
  void open(size_t i) const { protect(i, PROT_READ | PROT_WRITE); }

 private:
  void protect(size_t i, int prot) const {
    if (::mprotect(base_ + i * page_, page_, prot) != 0) std::abort();
  }
  const size_t page_, bytes_;
  char* const base_;
};

// Where a client of the read-before-completion tests below keeps the
// inputs of its `window` slots: a page of its own for each, sealed while
// the queue must not read it (BorrowedInputs), or rows of an InputBuffer.
class PagedInputs {
 public:
  PagedInputs(BatchQueue& q, size_t window)
      : pages_(window), in_(static_cast<size_t>(q.in_features())) {}
  std::span<float> row(size_t k) const { return {pages_.page(k), in_}; }
  BorrowedInput input(size_t k) const { return BorrowedInput(row(k)); }
  // The request of slot k has completed: a read of its page faults from now
  // until the client opens it to write the next input (after letting the
  // queue's threads run a moment).
  void completed(size_t k) const { pages_.seal(k); }
  void before_write(size_t k) const {
    std::this_thread::yield();
    pages_.open(k);
  }

 private:
  const GuardedPages pages_;
  const size_t in_;
};

class BufferInputs {
 public:
  BufferInputs(BatchQueue& q, size_t window) : rows_(q.make_input_buffer(window)) {}
  std::span<float> row(size_t k) { return rows_.row(k); }
  BorrowedInput input(size_t k) const { return rows_.input(k); }
  void completed(size_t) const {}
  void before_write(size_t) const {}

 private:
  InputBuffer rows_;
};

struct ReadBeforeCompletion {
  int wrong = 0, not_completed = 0, callbacks = 0, cancelled = 0;
};

// Clients under workers, each keeping `window` inputs in flight (Inputs: its
// slots' memory) by callback (even clients) or by handle (odd ones), and
// rewriting a slot with a new input as soon as its request has completed
// (the callback ran, the handle's get() returned, a cancel() returned true),
// then submitting it again; now and then a callback client cancels. The
// queue may read an input only before its request completes, so every
// output must be the model's for what the slot held at submit(): a read
// after the rewrite gives a wrong output in any build, and one that races
// the rewrite is reported by TSan. Returns the counts; checks that every
// request completed once.
template <typename Inputs>
ReadBeforeCompletion clients_rewriting_completed_inputs(BatchQueue& q, const TinyModel& tiny,
                                                        int clients, int window, int per_client) {
  const uint64_t seed = test_seed();
  std::atomic<int> wrong{0}, not_completed{0}, callbacks{0}, cancelled{0};
  struct Slot {
    std::vector<double> ref;        // the model's output for what the slot holds while in flight
    std::atomic<bool> busy{false};  // in flight: its request has not completed
  };
  std::latch start(clients);
  std::vector<std::thread> threads;
  for (int t = 0; t < clients; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed + static_cast<uint64_t>(t));
      Inputs inputs(q, static_cast<size_t>(window));
      std::vector<Slot> slots(static_cast<size_t>(window));
      const bool by_handle = t % 2 == 1;
      std::vector<RequestHandle> handles(static_cast<size_t>(window));
      auto refill = [&](size_t k) {
        inputs.before_write(k);
        for (float& x : inputs.row(k)) x = std::uniform_real_distribution<float>(-1, 1)(rng);
        slots[k].ref = tiny.host_reference(inputs.row(k));
      };
      auto check = [&](RequestHandle& h, size_t k) {
        std::vector<float> y;
        if (outcome_of(h, &y) != Outcome::kCompleted)
          not_completed.fetch_add(1);
        else if (max_rel_error(y, slots[k].ref) > 1e-5)
          wrong.fetch_add(1);
      };
      start.arrive_and_wait();
      for (int n = 0; n < per_client; ++n) {
        const auto k = static_cast<size_t>(n % window);
        Slot& s = slots[k];
        if (by_handle) {
          if (handles[k].valid()) {
            check(handles[k], k);
            inputs.completed(k);
          }
          refill(k);
          handles[k] = q.submit(inputs.input(k));
          continue;
        }
        while (s.busy.load(std::memory_order_acquire)) std::this_thread::yield();
        refill(k);
        s.busy.store(true, std::memory_order_relaxed);
        const uint64_t id = q.submit(inputs.input(k), [&, k](const Completion& c) {
          callbacks.fetch_add(1);
          if (c.status == RequestStatus::kCancelled)
            cancelled.fetch_add(1);
          else if (c.status != RequestStatus::kCompleted)
            not_completed.fetch_add(1);
          else if (max_rel_error(c.output, slots[k].ref) > 1e-5)
            wrong.fetch_add(1);
          inputs.completed(k);  // the queue must not read it any more
          slots[k].busy.store(false, std::memory_order_release);  // the client may rewrite it now
        });
        // If a cancel succeeds, its callback has run and the slot is the
        // client's again at once.
        if (rng() % 8 == 0 && q.cancel(id)) {
          EXPECT_FALSE(s.busy.load(std::memory_order_acquire));
        }
      }
      for (size_t k = 0; k < slots.size(); ++k) {
        if (by_handle && handles[k].valid()) check(handles[k], k);
        while (slots[k].busy.load(std::memory_order_acquire)) std::this_thread::yield();
      }
      // Every request of this client has completed: its inputs go, while
      // the other clients' requests still run.
    });
  }
  for (auto& th : threads) th.join();
  q.shutdown();
  EXPECT_EQ(callbacks.load(), clients / 2 * per_client) << "every callback ran exactly once";
  const auto m = q.metrics();
  EXPECT_EQ(m.submitted, static_cast<uint64_t>(clients * per_client));
  EXPECT_EQ(m.completed + m.cancelled, m.submitted);
  EXPECT_EQ(m.cancelled, static_cast<uint64_t>(cancelled.load()));
  std::printf("requests=%llu cancelled=%d batches=%llu mean_batch=%.2f\n",
              static_cast<unsigned long long>(m.submitted), cancelled.load(),
              static_cast<unsigned long long>(m.batches), m.mean_batch());
  return {wrong.load(), not_completed.load(), callbacks.load(), cancelled.load()};
}

BatchQueueOptions three_workers(bool record) {
  BatchQueueOptions o;
  o.workers = 3;
  o.max_batch = 8;
  o.pipeline_depth = 2;
  o.capacity = 4096;
  o.record_batches = record;
  return o;
}

// Borrowed inputs (Note [Borrowed inputs]), each on a page of its own that
// is sealed (PROT_NONE) from its request's completion until the client
// rewrites it: a read after completion in that window stops the test with
// SIGSEGV in any build, and a later one races the client's rewrite.
TEST(BatchQueueCallbackConcurrency, BorrowedInputsAreReadOnlyBeforeTheirRequestsComplete) {
  auto device = make_device();
  const TinyModel tiny(*device, 8, 4);
  BatchQueue q(*device, tiny.in(), tiny.out(), tiny.model(), three_workers(false));
  const auto r = clients_rewriting_completed_inputs<PagedInputs>(q, tiny, 6, 4, scaled(400, 60));
  EXPECT_EQ(r.wrong, 0);
  EXPECT_EQ(r.not_completed, 0);
}

// InputBuffer rows, which the device reads in place while the batch runs
// (Note [Inputs the device reads in place]), recorded: a read by the
// device after the completion (a fence taken too early, a table entry left
// over from an earlier batch) runs on the next values. Every request that
// ran must have been read in place.
TEST(BatchQueueCallbackConcurrency, InputBufferRowsAreReadOnlyBeforeTheirRequestsComplete) {
  auto device = make_device();
  const TinyModel tiny(*device, 8, 4);
  BatchQueue q(*device, tiny.in(), tiny.out(), tiny.model(), three_workers(true));
  const auto r = clients_rewriting_completed_inputs<BufferInputs>(q, tiny, 6, 4, scaled(400, 60));
  EXPECT_EQ(r.wrong, 0);
  EXPECT_EQ(r.not_completed, 0);
  const auto m = q.metrics();
  EXPECT_EQ(m.read_in_place, m.completed) << "every request that ran was read in place";
}

// The header promises that a refusal's callback runs in submit() itself, and
// a cancellation's in the cancel() that decided it: on the deciding thread,
// before that call returns. So a client may rely on it (free what the
// callback uses once cancel() returned true, say). Here many threads are
// refused at once, then cancel their queued requests at once, racing for the
// queue's lock; each checks, as its call returns, that the callback has run,
// and on its own thread.
TEST(BatchQueueCallbackConcurrency, ADecisionsCallbackRunsOnTheDecidingThreadBeforeItReturns) {
  auto device = make_device();
  const TinyModel tiny(*device, 8, 4);
  const int rounds = scaled(80, 20);
  const int threads = 8, per = 16;
  const std::vector<float> x(8, 0.25f);
  int refusals = 0, refused_elsewhere = 0, refused_late = 0;
  int cancels = 0, cancelled_elsewhere = 0, cancelled_late = 0;
  for (int round = 0; round < rounds; ++round) {
    BatchQueueOptions o;
    o.workers = 0;  // nothing runs: every request is refused, cancelled or drained
    o.capacity = 32;
    o.max_delay = 1000000us;
    o.clock = std::make_shared<ManualClock>();
    BatchQueue q(*device, 8, 4, tiny.model(), o);
    struct Req {
      std::atomic<bool> ran{false};  // release: after `thread` and `status`
      std::thread::id thread;        // where the callback ran
      RequestStatus status = RequestStatus::kQueued;
      std::thread::id decider;  // who submitted, or who cancelled it
      bool ran_before_return = false;
    };
    std::vector<Req> reqs(static_cast<size_t>(threads * per));
    std::latch start(threads), all_submitted(threads);
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        const auto me = std::this_thread::get_id();
        std::vector<std::pair<size_t, uint64_t>> mine;
        start.arrive_and_wait();
        for (int i = 0; i < per; ++i) {
          const auto k = static_cast<size_t>(t * per + i);
          Req& r = reqs[k];
          const uint64_t id = q.submit(x, [&r](const Completion& c) {
            r.thread = std::this_thread::get_id();
            r.status = c.status;
            r.ran.store(true, std::memory_order_release);
          });
          r.decider = me;
          r.ran_before_return = r.ran.load(std::memory_order_acquire);
          if (!r.ran_before_return) mine.emplace_back(k, id);  // queued (or refused late)
        }
        all_submitted.arrive_and_wait();
        for (auto& [k, id] : mine) {
          Req& r = reqs[k];
          if (!q.cancel(id)) continue;  // a refusal whose callback is late
          r.decider = me;
          r.ran_before_return = r.ran.load(std::memory_order_acquire);
        }
      });
    }
    for (auto& t : ts) t.join();
    q.shutdown(ShutdownMode::kCancel);
    for (Req& r : reqs) {
      ASSERT_TRUE(r.ran.load(std::memory_order_acquire));
      if (r.status == RequestStatus::kRejected) {
        ++refusals;
        refused_elsewhere += r.thread != r.decider;
        refused_late += !r.ran_before_return;
      } else {
        ASSERT_EQ(r.status, RequestStatus::kCancelled);
        ++cancels;
        cancelled_elsewhere += r.thread != r.decider;
        cancelled_late += !r.ran_before_return;
      }
    }
  }
  std::printf(
      "refusals=%d: on another thread %d, after submit() returned %d; cancels=%d: on another "
      "thread %d, after cancel() returned %d\n",
      refusals, refused_elsewhere, refused_late, cancels, cancelled_elsewhere, cancelled_late);
  EXPECT_EQ(refusals, rounds * (threads * per - 32));
  EXPECT_EQ(cancels, rounds * 32);
  EXPECT_EQ(refused_elsewhere, 0) << "a refusal's callback ran on another thread than submit()'s";
  EXPECT_EQ(refused_late, 0) << "a refusal's callback had not run when its submit() returned";
  EXPECT_EQ(cancelled_elsewhere, 0) << "a cancelled request's callback ran on another thread "
                                       "than the cancel() that returned true";
  EXPECT_EQ(cancelled_late, 0)
      << "a cancelled request's callback had not run when the cancel() returned true";
}

}  // namespace
}  // namespace flotilla::serve::test
