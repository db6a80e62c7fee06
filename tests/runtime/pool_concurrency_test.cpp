// StreamPool under many threads (label concurrency): round-robin distribution
// and sharing; exclusive slots recycled over hundreds of short-lived threads;
// what happens beyond 31 concurrent threads (wait then Timeout, or share).
#include <array>
#include <atomic>
#include <chrono>
#include <latch>
#include <map>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "runtime/runtime_test_util.h"

namespace flotilla::test {
namespace {

using backend::KernelArgs;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

class PoolConcurrencyTest : public RuntimeTest {};

// Every request gets a unique counter value, so with a multiple of `pooled`
// requests in all every pooled stream is handed out exactly equally often.
// Would catch: a non-atomic counter (lost increments skew the counts), or
// a modulo that hands out stream 0 or an index past the pool.
TEST_F(PoolConcurrencyTest, RoundRobinDistributesEvenlyUnderManyThreads) {
  constexpr int kThreads = 16;
  auto dev = make_device();
  const int pooled = dev->streams().pooled();
  const int per_thread = pooled * scaled(200, 10);
  std::vector<std::vector<int>> counts(kThreads, std::vector<int>(static_cast<size_t>(pooled + 1)));
  std::latch go(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      auto& mine = counts[static_cast<size_t>(t)];
      go.arrive_and_wait();
      for (int k = 0; k < per_thread; ++k) {
        const int idx = dev->streams().acquire_round_robin().index();
        if (idx < 1 || idx > pooled) {
          mine[0] = -1000000;  // out of range: reported below
          return;
        }
        ++mine[static_cast<size_t>(idx)];
      }
    });
  for (auto& t : threads) t.join();
  std::vector<int> total(static_cast<size_t>(pooled + 1));
  for (const auto& c : counts)
    for (size_t i = 0; i < c.size(); ++i) total[i] += c[i];
  EXPECT_EQ(total[0], 0) << "stream 0 (or an out-of-range index) was handed out";
  const int expected = kThreads * per_thread / pooled;
  for (int i = 1; i <= pooled; ++i)
    EXPECT_EQ(total[static_cast<size_t>(i)], expected) << "stream " << i;
}

// Round-robin threads share streams; each stream serialises its callers, so
// the driver sees no rule violation and every thread's results are right.
// This is the seed's Figure 1 failure, fixed: threads sharing a command buffer.
TEST_F(PoolConcurrencyTest, RoundRobinSharedStreamsSerialiseTheirCallers) {
  constexpr int kThreads = 12;
  Config c = test_config();
  c.pool_size = 3;  // 2 pooled streams for 12 threads
  c.adaptive_commit_kernels = 8;
  // Each driver call stays inside its object this long: without the
  // stream's serialisation, calls of threads sharing a stream overlap and
  // the driver reports concurrent-object-use.
  c.cpu_encode_cost = std::chrono::microseconds(20);
  auto dev = make_device(c);
  const int rounds = scaled(60, 8);
  std::vector<std::unique_ptr<FloatBuffer>> bufs;
  for (int t = 0; t < kThreads; ++t) bufs.push_back(std::make_unique<FloatBuffer>(*dev, 64));
  std::atomic<int> errors{0};
  std::set<int> used;
  Mutex used_mu;
  std::latch go(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      FloatBuffer& b = *bufs[static_cast<size_t>(t)];
      go.arrive_and_wait();
      try {
        Stream s = dev->current_stream();
        {
          MutexLock lock(used_mu);
          used.insert(s.index());
        }
        for (int r = 0; r < rounds; ++r) {
          // b = (t + r) * 2, built from a fill and a scale: order matters.
          b.fill(s, static_cast<float>(t + r));
          s.dispatch("scale_f32", KernelArgs().ptr(b.ptr()).ptr(b.ptr()).f64(2.0).size(64));
          if (r % 7 == 6) {
            auto v = b.read(s);
            if (v[0] != 2.0f * (t + r) || v[63] != 2.0f * (t + r)) errors.fetch_add(1);
          }
        }
        auto v = b.read(s);
        if (v[17] != 2.0f * (t + rounds - 1)) errors.fetch_add(1);
      } catch (const std::exception& e) {
        ADD_FAILURE() << "thread " << t << ": " << e.what();
        errors.fetch_add(1);
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(dev->driver().stats().violations, 0u);
  MutexLock lock(used_mu);
  EXPECT_EQ(used, (std::set<int>{1, 2}));
}

// 500 short-lived threads, up to `kWave` at a time, each binding an exclusive
// slot. A slot is never held by two live threads (checked with an owner table
// the threads claim and clear), slots come back when threads exit (bound()
// returns to 0; with a leak the 32nd thread would time out).
TEST_F(PoolConcurrencyTest, ExclusiveSlotsAreRecycledOverManyThreads) {
  constexpr int kWave = 12;
  Config c = test_config();
  c.policy = StreamPolicy::kExclusive;
  c.exclusive_when_full = WhenFull::kWait;
  c.exclusive_wait = milliseconds(5000);
  auto dev = make_device(c);
  const int total = scaled(500, 100);
  std::array<std::atomic<int>, 64> owner{};  // slot -> owning thread number + 1, 0 if free
  std::atomic<int> double_owned{0}, bad_index{0}, max_bound{0};
  std::set<int> slots_seen;
  Mutex seen_mu;
  int started = 0;
  while (started < total) {
    const int n = std::min(kWave, total - started);
    std::latch go(n);
    std::vector<std::thread> wave;
    for (int i = 0; i < n; ++i)
      wave.emplace_back([&, me = started + i + 1] {
        go.arrive_and_wait();
        int slot = -1;
        try {
          slot = dev->current_stream().index();
        } catch (const std::exception& e) {
          ADD_FAILURE() << "thread " << me << ": " << e.what();
        }
        if (slot < 1 || slot > 31) {
          bad_index.fetch_add(1);
          return;
        }
        int expected = 0;
        if (!owner[static_cast<size_t>(slot)].compare_exchange_strong(expected, me))
          double_owned.fetch_add(1);
        const int b = dev->streams().bound();
        int m = max_bound.load();
        while (b > m && !max_bound.compare_exchange_weak(m, b)) {
        }
        {
          MutexLock lock(seen_mu);
          slots_seen.insert(slot);
        }
        std::this_thread::yield();
        // Give the slot up in the table before the thread exit returns it.
        owner[static_cast<size_t>(slot)].store(0);
      });
    for (auto& t : wave) t.join();
    started += n;
    ASSERT_EQ(dev->streams().bound(), 0) << "slots still bound after " << started << " threads";
  }
  EXPECT_EQ(double_owned.load(), 0) << "two live threads held one slot";
  EXPECT_EQ(bad_index.load(), 0);
  EXPECT_LE(max_bound.load(), kWave);
  MutexLock lock(seen_mu);
  EXPECT_LE(static_cast<int>(slots_seen.size()), kWave)
      << "the lowest free slots are reused, so at most one wave's worth is ever used";
}

// Holds `n` exclusive slots on `n` threads until release() (or destruction).
class SlotHolders {
 public:
  SlotHolders(Device& dev, int n) : bound_(n) {
    for (int i = 0; i < n; ++i)
      threads_.emplace_back([this, &dev] {
        (void)dev.current_stream();
        bound_.count_down();
        release_.wait();
      });
    bound_.wait();
  }
  ~SlotHolders() {
    release();
    for (auto& t : threads_) t.join();
  }
  void release() {
    if (!released_.exchange(true)) release_.count_down();
  }

 private:
  std::latch bound_;
  std::latch release_{1};
  std::atomic<bool> released_{false};
  std::vector<std::thread> threads_;
};

// Beyond 31 with WhenFull::kWait: the 32nd thread waits exclusive_wait, then
// gets Timeout with a message that says what to do.
TEST_F(PoolConcurrencyTest, ExclusiveBeyondThePoolWaitsThenTimesOut) {
  Config c = test_config();
  c.policy = StreamPolicy::kExclusive;
  c.exclusive_when_full = WhenFull::kWait;
  c.exclusive_wait = milliseconds(150);
  auto dev = make_device(c);
  SlotHolders holders(*dev, 31);
  ASSERT_EQ(dev->streams().bound(), 31);
  std::string message;
  Clock::duration waited{};
  std::thread late([&] {
    const auto start = Clock::now();
    try {
      (void)dev->current_stream();
      message = "no error";
    } catch (const Timeout& e) {
      message = e.what();
    } catch (const std::exception& e) {
      message = std::string("wrong error: ") + e.what();
    }
    waited = Clock::now() - start;
  });
  late.join();
  EXPECT_GE(waited, milliseconds(145)) << "gave up before exclusive_wait";
  EXPECT_EQ(message.rfind("[StreamPool::acquire] all 31 exclusive streams", 0), 0u) << message;
  EXPECT_NE(message.find("exclusive_when_full=share"), std::string::npos) << message;
  EXPECT_NE(message.find("150 ms"), std::string::npos) << message;
  EXPECT_EQ(dev->streams().bound(), 31);
}

// Beyond 31 with kWait: a slot freed during the wait goes to the waiter.
TEST_F(PoolConcurrencyTest, ExclusiveWaiterGetsAFreedSlot) {
  Config c = test_config();
  c.policy = StreamPolicy::kExclusive;
  c.exclusive_when_full = WhenFull::kWait;
  c.exclusive_wait = milliseconds(10000);
  auto dev = make_device(c);
  auto holders = std::make_unique<SlotHolders>(*dev, 30);
  int leaver_slot = -1;
  std::latch leaver_bound(1), leaver_go(1);
  std::thread leaver([&] {
    leaver_slot = dev->current_stream().index();
    leaver_bound.count_down();
    leaver_go.wait();
  });
  leaver_bound.wait();
  EXPECT_EQ(dev->streams().bound(), 31);
  std::atomic<int> got{-1};
  Clock::duration waited{};
  std::latch late_asking(1);
  std::thread late([&] {
    late_asking.count_down();
    const auto start = Clock::now();
    try {
      got = dev->current_stream().index();
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
    }
    waited = Clock::now() - start;
  });
  late_asking.wait();
  std::this_thread::sleep_for(milliseconds(50));
  EXPECT_EQ(got.load(), -1) << "a 32nd thread got a slot while all 31 were bound";
  leaver_go.count_down();  // the leaver exits: its slot is returned
  leaver.join();
  late.join();
  EXPECT_EQ(got.load(), leaver_slot);
  EXPECT_LT(waited, milliseconds(9000)) << "the waiter was not woken when the slot came back";
  holders.reset();
}

// Beyond 31 with WhenFull::kShare: the extra threads share streams round-robin
// and everything still runs right (the shared streams serialise).
TEST_F(PoolConcurrencyTest, ExclusiveBeyondThePoolSharesWhenConfigured) {
  constexpr int kThreads = 40;
  Config c = test_config();
  c.policy = StreamPolicy::kExclusive;
  c.exclusive_when_full = WhenFull::kShare;
  auto dev = make_device(c);
  std::vector<std::unique_ptr<FloatBuffer>> bufs;
  for (int t = 0; t < kThreads; ++t) bufs.push_back(std::make_unique<FloatBuffer>(*dev, 32));
  std::vector<int> index(kThreads, -1);
  std::atomic<int> wrong{0};
  std::latch all_bound(kThreads), go(1);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      Stream s = dev->current_stream();
      index[static_cast<size_t>(t)] = s.index();
      all_bound.count_down();
      go.wait();
      FloatBuffer& b = *bufs[static_cast<size_t>(t)];
      for (int r = 0; r < scaled(20, 4); ++r) {
        b.fill(s, static_cast<float>(t * 100 + r));
        if (b.read(s)[31] != static_cast<float>(t * 100 + r)) wrong.fetch_add(1);
      }
    });
  all_bound.wait();
  EXPECT_EQ(dev->streams().bound(), 31);
  go.count_down();
  for (auto& t : threads) t.join();
  std::map<int, int> per_stream;
  for (int i : index) {
    EXPECT_GE(i, 1);
    EXPECT_LE(i, 31);
    ++per_stream[i];
  }
  EXPECT_EQ(per_stream.size(), 31u) << "every pooled stream serves someone";
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(dev->driver().stats().violations, 0u);
  EXPECT_EQ(dev->streams().bound(), 0);
}

}  // namespace
}  // namespace flotilla::test
