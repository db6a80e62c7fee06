// BatchQueue under concurrency: exactly-once completion under races of
// submit, cancel, deadlines (a ManualClock moved by its own thread) and
// shutdown; bounded depth under overload; many clients' batched outputs
// against unbatched references. Threads start together on a latch; the
// racing test repeats with a printed seed (FLOTILLA_TEST_SEED replays it).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <latch>
#include <map>
#include <semaphore>
#include <thread>

#include "flotilla/nn/mlp.h"
#include "serve/serve_test_util.h"

namespace flotilla::serve::test {
namespace {

using namespace std::chrono_literals;

Outcome expected_outcome(RequestStatus s) {
  switch (s) {
    case RequestStatus::kCompleted: return Outcome::kCompleted;
    case RequestStatus::kFailed: return Outcome::kFailed;
    case RequestStatus::kExpired: return Outcome::kTimeout;
    case RequestStatus::kCancelled: return Outcome::kCancelled;
    case RequestStatus::kRejected: return Outcome::kQueueFull;
    case RequestStatus::kShutDown: return Outcome::kShutDown;
    default: return Outcome::kOther;
  }
}

struct Sent {
  RequestHandle handle;
  std::vector<float> input;
  bool marked = false;
};

TEST(BatchQueueConcurrency, EveryRequestCompletesExactlyOnceUnderRaces) {
  auto device = make_device();
  const TinyModel tiny(*device, 8, 4);
  const uint64_t seed = test_seed();
  const int rounds = scaled(60, 6);
  const int clients = 4;
  const int per_client = scaled(100, 20);
  const int n = clients * per_client;
  std::map<Outcome, uint64_t> totals;

  for (int round = 0; round < rounds; ++round) {
    SCOPED_TRACE(::testing::Message() << "round " << round << " seed " << seed);
    std::mt19937_64 rng(seed * 1000003 + static_cast<uint64_t>(round));
    auto clock = std::make_shared<ManualClock>();
    std::vector<std::atomic<int>> completions(static_cast<size_t>(n) + 1);  // by id
    std::atomic<int> stray_ids{0};

    BatchQueueOptions o;
    o.workers = round % 3;  // 0: manual mode, stepped by a thread below
    o.when_full = round % 2 ? OverflowPolicy::kBlock : OverflowPolicy::kReject;
    const ShutdownMode mode = (round / 2) % 2 ? ShutdownMode::kCancel : ShutdownMode::kDrain;
    o.max_batch = 1 + static_cast<int>(rng() % 6);
    o.max_delay = std::chrono::microseconds(std::array{0, 50, 200}[rng() % 3]);
    // Rounds without deadlines, and with no max_delay: a list taken from
    // the inbox with no deadline in it becomes a batch without the FIFO
    // (Note [Batches straight from the inbox]), racing the cancels, the
    // kBlock waits and the shutdown.
    const bool deadlines = round % 5 != 3;
    if (!deadlines) o.max_delay = 0us;
    o.capacity = 3 + rng() % 10;
    // Spinning waits (Note [Spinning workers]) and recorded batches change
    // the hand-offs; they must lose nothing either.
    o.spin_wait = std::chrono::microseconds((round / 4) % 2 ? 30 : 0);
    o.record_batches = (round / 8) % 2 == 1;
    // Two batches in flight per worker: a worker with one in flight takes
    // the inbox outside the lock (Note [Inbox walks outside the lock]), as
    // step() always does, while cancels and the shutdown race it.
    o.pipeline_depth = 1 + (round / 3) % 2;
    o.clock = clock;
    o.on_complete = [&](uint64_t id, RequestStatus) {
      // relaxed: the counts are read after every thread has joined
      if (id == 0 || id > static_cast<uint64_t>(n))
        stray_ids.fetch_add(1, std::memory_order_relaxed);
      else
        completions[id].fetch_add(1, std::memory_order_relaxed);
    };
    const size_t shutdown_after = rng() % static_cast<size_t>(n);
    const uint64_t client_seed = rng();

    // A recorded model must not read its input on the host (marked_failing
    // does): recorded rounds run the plain model, and mark nothing.
    BatchQueue q(*device, tiny.in(), tiny.out(),
                 o.record_batches ? tiny.model() : marked_failing(tiny), o);
    std::vector<std::vector<Sent>> sent(clients);
    std::atomic<size_t> submitted{0};  // acq_rel: the shutdown thread waits on it
    std::latch start(clients + RaceBackground::kThreads);

    std::vector<std::thread> threads;
    for (int c = 0; c < clients; ++c) {
      threads.emplace_back([&, c] {
        std::mt19937_64 r(client_seed + static_cast<uint64_t>(c));
        std::vector<size_t> cancel_later;
        start.arrive_and_wait();
        auto& mine = sent[static_cast<size_t>(c)];
        for (int i = 0; i < per_client;) {
          // Every other round, groups of 1 to 6 (submit_all, Note [Group
          // submits]), one deadline a group: more than the room left in
          // these small queues at times, so groups also take the single
          // path, and races see whole chains pushed onto the inbox.
          const int group = round % 2 ? std::min(per_client - i, 1 + static_cast<int>(r() % 6)) : 1;
          std::optional<Clock::time_point> deadline;
          switch (deadlines ? r() % 4 : 0) {
            case 1: deadline = q.deadline_in(std::chrono::microseconds(r() % 200)); break;
            case 2: deadline = q.deadline_in(std::chrono::microseconds(r() % 20)); break;
            default: break;
          }
          const size_t first = mine.size();
          for (int g = 0; g < group; ++g) {
            Sent s;
            s.input = random_vector(r, static_cast<size_t>(tiny.in()));
            s.marked = r() % 20 == 0 && !o.record_batches;
            if (s.marked) s.input[0] = kFailMark;
            mine.push_back(std::move(s));
          }
          if (round % 2 == 0) {
            mine[first].handle = q.submit(mine[first].input, deadline);
          } else {
            std::vector<std::span<const float>> inputs;
            for (size_t k = first; k < mine.size(); ++k) inputs.emplace_back(mine[k].input);
            auto handles = q.submit_all(inputs, deadline);
            EXPECT_EQ(handles.size(), inputs.size());
            for (size_t k = 0; k < handles.size(); ++k)
              mine[first + k].handle = std::move(handles[k]);
          }
          submitted.fetch_add(static_cast<size_t>(group), std::memory_order_acq_rel);
          i += group;
          for (size_t k = first; k < mine.size(); ++k) {
            const auto action = r() % 10;
            if (action < 2) mine[k].handle.cancel();
            if (action == 2) cancel_later.push_back(k);
          }
        }
        for (size_t k : cancel_later) sent[static_cast<size_t>(c)][k].handle.cancel();
      });
    }
    {
      RaceBackground background(q, *clock, client_seed, start, submitted, shutdown_after, mode);
      for (auto& t : threads) t.join();
      background.join_shutdown();  // shutdown has returned: nothing is queued or running
    }

    std::map<Outcome, uint64_t> counts;
    for (auto& per : sent) {
      for (Sent& s : per) {
        ASSERT_TRUE(s.handle.done()) << "request " << s.handle.id() << " is "
                                     << to_string(s.handle.status()) << " after shutdown";
        const RequestStatus st = s.handle.status();
        std::vector<float> y;
        std::string msg;
        const Outcome out = outcome_of(s.handle, &y, &msg);
        EXPECT_EQ(out, expected_outcome(st)) << to_string(st) << ": " << msg;
        ++counts[out];
        EXPECT_EQ(completions[s.handle.id()].load(), 1)
            << "request " << s.handle.id() << " (" << to_string(st) << ")";
        if (out == Outcome::kCompleted) {
          EXPECT_FALSE(s.marked) << "a marked request completed";
          EXPECT_LT(max_rel_error(y, tiny.host_reference(s.input)), 1e-5);
        }
        if (out == Outcome::kFailed) {
          EXPECT_NE(msg.find("marked row"), std::string::npos) << msg;
        }
      }
    }
    int total_completions = 0;
    for (auto& c : completions) total_completions += c.load();
    EXPECT_EQ(total_completions, n) << "completions that belong to no handle";
    EXPECT_EQ(stray_ids.load(), 0);

    const auto m = q.metrics();
    EXPECT_EQ(m.submitted, static_cast<uint64_t>(n));
    EXPECT_EQ(m.submitted,
              m.completed + m.rejected + m.expired + m.cancelled + m.failed + m.shut_down);
    EXPECT_EQ(m.completed, counts[Outcome::kCompleted]);
    EXPECT_EQ(m.depth, 0u);
    EXPECT_LE(m.max_depth, o.capacity);
    if (o.when_full == OverflowPolicy::kBlock) {
      EXPECT_EQ(m.rejected, 0u);
    }
    for (auto& [k, v] : counts) totals[k] += v;
  }

  std::printf("outcomes over %d rounds:", rounds);
  for (auto& [k, v] : totals)
    std::printf(" %s=%llu", outcome_name(k), static_cast<unsigned long long>(v));
  std::printf("\n");
  for (Outcome o : {Outcome::kCompleted, Outcome::kTimeout, Outcome::kCancelled,
                    Outcome::kQueueFull, Outcome::kShutDown, Outcome::kFailed})
    EXPECT_GT(totals[o], 0u) << "outcome " << outcome_name(o) << " never occurred: the race "
                             << "did not exercise it";
  EXPECT_EQ(totals[Outcome::kOther], 0u);
}

// Note [Batches straight from the inbox]: a worker with a batch in flight
// makes a batch of the list it takes from the inbox without the FIFO. Here
// clients without deadlines race such workers with cancels (right after a
// submit, and later) and kBlock waits for room, and a shutdown of either
// kind ends each round: every request completes exactly once, with the
// right output when it ran; a cancel() that returned true never ran; and
// one that returned false was not cancelled by it. The hook counts the
// straight batches: the test fails if the races never took that path.
std::atomic<int> g_direct_batches{0};
void count_direct_batch() { g_direct_batches.fetch_add(1, std::memory_order_relaxed); }
// Note [Lists longer than a batch]: lists split, the rest returned.
std::atomic<int> g_split_lists{0};
void count_split_list() { g_split_lists.fetch_add(1, std::memory_order_relaxed); }

TEST(BatchQueueConcurrency, BatchesStraightFromTheInboxCompleteEveryRequestExactlyOnce) {
  auto device = make_device();
  const TinyModel tiny(*device, 8, 4);
  const uint64_t seed = test_seed();
  const int rounds = scaled(24, 6);
  const int clients = 4;
  const int per_client = scaled(400, 100);
  const int n = clients * per_client;
  detail::set_took_direct_hook_for_testing(&count_direct_batch);
  detail::set_split_list_hook_for_testing(&count_split_list);
  g_direct_batches = 0;
  g_split_lists = 0;
  // Until a list was split and more batches than rounds went the straight
  // way (at most 4x the rounds): at the sanitizer lanes' scale a round may
  // end before its workers fall behind, or take the straight way once (a
  // TSan run of 6 rounds took it 6 times).
  const auto enough = [&] { return g_split_lists.load() > 0 && g_direct_batches.load() > rounds; };
  for (int round = 0; round < rounds || (!enough() && round < 4 * rounds); ++round) {
    SCOPED_TRACE(::testing::Message() << "round " << round << " seed " << seed);
    std::mt19937_64 rng(seed * 1000033 + static_cast<uint64_t>(round));
    std::vector<std::atomic<int>> completions(static_cast<size_t>(n) + 1);  // by id
    BatchQueueOptions o;
    o.workers = 1 + round % 3;
    o.pipeline_depth = 2;
    o.capacity = 8 + rng() % 64;
    // A list longer than max_batch is split (Note [Lists longer than a
    // batch]), and one longer than kSplitLists batches goes through the
    // FIFO: half the rounds let every list fit, the others mix the paths
    // (with 2 to 5 a batch, 32 requests in flight split lists in every
    // round, also at the sanitizer lanes' scale).
    o.max_batch = round % 4 == 3   ? 1 + static_cast<int>(rng() % 16)
                  : round % 4 == 1 ? 2 + static_cast<int>(rng() % 4)
                                   : static_cast<int>(o.capacity);
    o.max_delay = 0us;
    o.when_full = round % 2 ? OverflowPolicy::kBlock : OverflowPolicy::kReject;
    const ShutdownMode mode = (round / 2) % 2 ? ShutdownMode::kCancel : ShutdownMode::kDrain;
    o.on_complete = [&](uint64_t id, RequestStatus) {
      if (id >= 1 && id <= static_cast<uint64_t>(n))  // relaxed: read after the joins
        completions[id].fetch_add(1, std::memory_order_relaxed);
    };
    BatchQueue q(*device, tiny.in(), tiny.out(), tiny.model(), o);
    struct Client {
      std::vector<Sent> sent;
      std::vector<int> cancel_said;  // -1: not cancelled; else what cancel() returned
    };
    std::vector<Client> cs(clients);
    std::atomic<int> submitted{0};  // acquire/release: the closer waits on it
    const int close_after = static_cast<int>(rng() % static_cast<uint64_t>(n));
    const uint64_t client_seed = rng();
    std::latch start(clients + 1);
    std::vector<std::thread> ts;
    for (int c = 0; c < clients; ++c) {
      ts.emplace_back([&, c] {
        std::mt19937_64 r(client_seed + static_cast<uint64_t>(c));
        Client& me = cs[static_cast<size_t>(c)];
        std::vector<size_t> later;
        start.arrive_and_wait();
        for (int i = 0; i < per_client;) {
          // Rounds 2, 5, 8, ... refill in groups of 1 to 8 (submit_all,
          // Note [Group submits]): whole chains in the lists taken and split.
          const int group =
              round % 3 == 2 ? std::min(per_client - i, 1 + static_cast<int>(r() % 8)) : 1;
          // A window of 8 in flight, as a serving client keeps: the queue
          // is not always full, so lists fit and the FIFO empties.
          for (int j = std::max(0, i - 8); j < i + group - 8; ++j)
            while (!me.sent[static_cast<size_t>(j)].handle.done()) std::this_thread::yield();
          const size_t first = me.sent.size();
          for (int g = 0; g < group; ++g) {
            Sent s;
            s.input = random_vector(r, static_cast<size_t>(tiny.in()));
            me.sent.push_back(std::move(s));
          }
          if (group == 1 && round % 3 != 2) {
            me.sent[first].handle = q.submit(me.sent[first].input);
          } else {
            std::vector<std::span<const float>> inputs;
            for (size_t k = first; k < me.sent.size(); ++k) inputs.emplace_back(me.sent[k].input);
            auto handles = q.submit_all(inputs);
            for (size_t k = 0; k < handles.size(); ++k)
              me.sent[first + k].handle = std::move(handles[k]);
          }
          submitted.fetch_add(group, std::memory_order_release);
          i += group;
          for (size_t k = first; k < me.sent.size(); ++k) {
            int said = -1;
            const auto action = r() % 10;
            if (action == 0) said = me.sent[k].handle.cancel() ? 1 : 0;
            if (action == 1) later.push_back(k);
            me.cancel_said.push_back(said);
          }
        }
        for (size_t k : later) me.cancel_said[k] = me.sent[k].handle.cancel() ? 1 : 0;
      });
    }
    std::thread closer([&] {
      start.arrive_and_wait();
      while (submitted.load(std::memory_order_acquire) < close_after) std::this_thread::yield();
      q.shutdown(mode);
    });
    for (auto& t : ts) t.join();
    closer.join();

    uint64_t ran = 0;
    for (Client& c : cs)
      for (size_t k = 0; k < c.sent.size(); ++k) {
        Sent& s = c.sent[k];
        ASSERT_TRUE(s.handle.done()) << "request " << s.handle.id() << " after shutdown";
        EXPECT_EQ(completions[s.handle.id()].load(), 1) << "request " << s.handle.id();
        std::vector<float> y;
        std::string msg;
        const Outcome out = outcome_of(s.handle, &y, &msg);
        if (c.cancel_said[k] == 1) {
          EXPECT_EQ(out, Outcome::kCancelled) << msg;
        }
        if (c.cancel_said[k] == 0 && out == Outcome::kCancelled) {
          EXPECT_EQ(mode, ShutdownMode::kCancel) << "cancel() said no, yet: " << msg;
          EXPECT_NE(msg.find("shutdown"), std::string::npos) << msg;
        }
        if (out == Outcome::kCompleted) {
          ++ran;
          EXPECT_LT(max_rel_error(y, tiny.host_reference(s.input)), 1e-5);
        } else {
          EXPECT_TRUE(out == Outcome::kCancelled || out == Outcome::kQueueFull ||
                      out == Outcome::kShutDown)
              << outcome_name(out) << ": " << msg;
        }
      }
    const auto m = q.metrics();
    EXPECT_EQ(m.submitted, static_cast<uint64_t>(n));
    EXPECT_EQ(m.completed, ran);
    EXPECT_EQ(m.submitted,
              m.completed + m.rejected + m.expired + m.cancelled + m.failed + m.shut_down);
    EXPECT_EQ(m.depth, 0u);
    EXPECT_LE(m.max_depth, o.capacity);
    if (o.when_full == OverflowPolicy::kBlock) {
      EXPECT_EQ(m.rejected, 0u);
    }
  }
  detail::set_took_direct_hook_for_testing(nullptr);
  detail::set_split_list_hook_for_testing(nullptr);
  std::printf("batches taken straight from the inbox: %d, of split lists: %d\n",
              g_direct_batches.load(), g_split_lists.load());
  EXPECT_GT(g_direct_batches.load(), rounds) << "the races never took the straight path";
  EXPECT_GT(g_split_lists.load(), 0) << "the races never split a list";
}

// A producer faster than the device: the queue never holds more than its
// capacity; kReject answers QueueFull, kBlock makes the producers wait.
TEST(BatchQueueConcurrency, OverloadIsBoundedByCapacity) {
  auto device = make_device();
  const TinyModel tiny(*device, 8, 4);
  for (OverflowPolicy policy : {OverflowPolicy::kReject, OverflowPolicy::kBlock}) {
    SCOPED_TRACE(to_string(policy));
    BatchQueueOptions o;
    o.workers = 1;
    o.max_batch = 4;
    o.max_delay = 0us;
    o.capacity = 8;
    o.when_full = policy;
    auto slow = [&tiny](const Stream& s, const Tensor& x) {
      Stream(s).dispatch("sleep_us", backend::KernelArgs().i64(300));
      return tiny(s, x);
    };
    BatchQueue q(*device, tiny.in(), tiny.out(), slow, o);
    const int producers = 4, each = scaled(120, 30);
    std::latch start(producers + 1);
    std::atomic<bool> done{false};  // release/acquire: ends the monitor
    std::atomic<size_t> worst_seen{0};
    std::vector<std::vector<Sent>> sent(producers);
    std::vector<std::thread> ts;
    for (int p = 0; p < producers; ++p) {
      ts.emplace_back([&, p] {
        std::mt19937_64 r(static_cast<uint64_t>(p));
        start.arrive_and_wait();
        for (int i = 0; i < each; ++i) {
          Sent s;
          s.input = random_vector(r, static_cast<size_t>(tiny.in()));
          s.handle = q.submit(s.input);
          sent[static_cast<size_t>(p)].push_back(std::move(s));
        }
      });
    }
    std::thread monitor([&] {
      start.arrive_and_wait();
      while (!done.load(std::memory_order_acquire)) {
        size_t d = q.metrics().depth;
        size_t w = worst_seen.load(std::memory_order_relaxed);  // one writer: relaxed
        if (d > w) worst_seen.store(d, std::memory_order_relaxed);
        std::this_thread::sleep_for(100us);
      }
    });
    for (auto& t : ts) t.join();
    q.shutdown();
    done.store(true, std::memory_order_release);
    monitor.join();

    uint64_t completed = 0, full = 0;
    for (auto& per : sent)
      for (Sent& s : per) {
        std::vector<float> y;
        const Outcome out = outcome_of(s.handle, &y);
        if (out == Outcome::kCompleted) {
          ++completed;
          EXPECT_LT(max_rel_error(y, tiny.host_reference(s.input)), 1e-5);
        } else {
          EXPECT_EQ(out, Outcome::kQueueFull);
          ++full;
        }
      }
    const auto m = q.metrics();
    std::printf("%s: completed=%llu queue_full=%llu max_depth=%zu batches=%llu mean_batch=%.2f\n",
                to_string(policy), static_cast<unsigned long long>(completed),
                static_cast<unsigned long long>(full), m.max_depth,
                static_cast<unsigned long long>(m.batches), m.mean_batch());
    EXPECT_LE(m.max_depth, o.capacity);
    EXPECT_LE(worst_seen.load(), o.capacity);
    EXPECT_GT(completed, 0u);
    if (policy == OverflowPolicy::kReject) {
      EXPECT_GT(full, 0u) << "4 producers never outran a 300 us/batch device";
    } else {
      EXPECT_EQ(full, 0u);
      EXPECT_EQ(completed, static_cast<uint64_t>(producers * each));
      EXPECT_EQ(m.max_depth, o.capacity) << "the producers never had to wait";
    }
  }
}

// A submitter held between taking its room and pushing (the hook) while the
// request it counted ahead of it is picked and run: when it pushes, the one
// worker is asleep waiting for a first request. Would catch a wake-up
// decided by how many requests were queued when the submitter took its room
// (that count is stale by then, and the request would sit in the inbox
// until shutdown: the get() below would time out).
TEST(BatchQueueConcurrency, ASubmitterOvertakenBeforeItsPushStillWakesTheWorker) {
  auto device = make_device();
  const TinyModel tiny(*device, 8, 4);
  std::binary_semaphore model_may_run{0};
  std::atomic<bool> block_next{true};
  BatchQueueOptions o;
  o.workers = 1;
  o.max_batch = 8;
  BatchQueue q(
      *device, 8, 4,
      [&](const Stream& s, const Tensor& x) {
        if (block_next.exchange(false)) model_may_run.acquire();  // the first batch waits
        return tiny(s, x);
      },
      o);
  PushHold hold;
  const std::vector<float> in(8, 0.5f);
  RequestHandle w = q.submit(in);  // runs first, and blocks the worker in the model
  while (q.metrics().depth != 0) std::this_thread::yield();
  RequestHandle x = q.submit(in);  // queued behind w
  RequestHandle a;
  std::thread late([&] {
    PushHold::hold_my_next();
    a = q.submit(in);  // takes its room (x counted ahead of it), then is held
  });
  hold.wait_held();
  model_may_run.release();  // w, then x, run; the worker then waits for a first request
  EXPECT_NO_THROW(w.get());
  EXPECT_NO_THROW(x.get());
  std::this_thread::sleep_for(50ms);  // let the worker fall asleep
  hold.release();
  late.join();
  ASSERT_TRUE(a.wait_for(10s)) << "the held submitter's request was left in the inbox";
  EXPECT_NO_THROW(a.get());
}

// Real time, real threads: many clients, outputs against unbatched runs.
void many_clients_match(Device& device, int64_t in, int64_t out, const BatchQueue::Model& model,
                        int clients, int each, double tolerance, bool spin_and_record = false,
                        bool spin_for_company = false) {
  // References: a few distinct inputs, each run alone ([1, in]).
  const int distinct = 8;
  std::vector<std::vector<float>> xs, refs;
  Stream s = device.streams().acquire_round_robin();
  for (int i = 0; i < distinct; ++i) {
    xs.push_back(nn::random_uniform(static_cast<size_t>(in), 500 + static_cast<uint64_t>(i)));
    Tensor x = Tensor::from_host(xs.back(), {1, in}, DType::kF32, s);
    refs.push_back(model(s, x).to_host(s));
  }
  BatchQueueOptions o;
  o.workers = 2;
  o.max_batch = 16;
  o.max_delay = 2000us;
  if (spin_and_record) {
    o.workers = 3;
    o.max_delay = 0us;
    o.spin_wait = 100us;
    o.record_batches = true;
  }
  if (spin_for_company) {  // the leader spins through max_delay (Note [Spinning workers])
    o.workers = 3;
    o.max_delay = 100us;
    o.spin_wait = 300us;
  }
  BatchQueue q(device, in, out, model, o);
  std::latch start(clients);
  std::atomic<int> wrong{0}, errors{0};  // relaxed: read after join
  std::vector<std::thread> ts;
  for (int c = 0; c < clients; ++c)
    ts.emplace_back([&, c] {
      start.arrive_and_wait();
      for (int i = 0; i < each; ++i) {
        const size_t k = static_cast<size_t>(c + i) % distinct;
        try {
          auto y = q.submit(xs[k]).get();
          double worst = 0;
          for (size_t j = 0; j < y.size(); ++j)
            worst = std::max(worst, static_cast<double>(std::abs(y[j] - refs[k][j])) /
                                        std::max(1e-3, static_cast<double>(std::abs(refs[k][j]))));
          if (y.size() != refs[k].size() || worst > tolerance)
            wrong.fetch_add(1, std::memory_order_relaxed);
        } catch (const Error&) {
          errors.fetch_add(1, std::memory_order_relaxed);
        }
      }
    });
  for (auto& t : ts) t.join();
  const auto m = q.metrics();
  std::printf("clients=%d requests=%llu batches=%llu mean_batch=%.2f queue_wait_p99=%.0fus\n",
              clients, static_cast<unsigned long long>(m.completed),
              static_cast<unsigned long long>(m.batches), m.mean_batch(), m.queue_wait.p99_us);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(m.completed, static_cast<uint64_t>(clients * each));
  if (!spin_and_record) {
    EXPECT_LT(m.batches, m.completed) << "no batch ever held two requests";
  }
}

TEST(BatchQueueConcurrency, ManyClientsGetTheirOwnRowsTinyModel) {
  auto device = make_device();
  const TinyModel tiny(*device, 32, 16);
  many_clients_match(*device, 32, 16, tiny.model(), 16, scaled(60, 10), 1e-5);
}

// Would catch: a request missed while the leader spins (it would wait until
// shutdown: the test's requests would never complete), or rows mixed up
// between recorded batches of different sizes.
TEST(BatchQueueConcurrency, ManyClientsGetTheirOwnRowsSpinningAndRecorded) {
  auto device = make_device();
  const TinyModel tiny(*device, 32, 16);
  many_clients_match(*device, 32, 16, tiny.model(), 12, scaled(80, 10), 1e-5, true);
}

// Would catch: a request missed, or rows mixed up, while the leader spins
// for the rest of max_delay with requests already queued; and a leader that
// never waits for company (no batch of two).
TEST(BatchQueueConcurrency, ManyClientsGetTheirOwnRowsSpinningForCompany) {
  auto device = make_device();
  const TinyModel tiny(*device, 32, 16);
  many_clients_match(*device, 32, 16, tiny.model(), 12, scaled(80, 10), 1e-5, false, true);
}

TEST(BatchQueueConcurrency, ManyClientsGetTheirOwnRowsSeedMlp) {
  auto device = make_device();
  const nn::Mlp mlp(nn::MlpWeights::seed(), DType::kF32, device->default_stream());
  many_clients_match(
      *device, mlp.in_features(), mlp.out_features(),
      [&mlp](const Stream& s, const Tensor& x) { return mlp.forward(s, x); }, 8, scaled(24, 6),
      1e-4);
}

}  // namespace
}  // namespace flotilla::serve::test
