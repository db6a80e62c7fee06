// Events across streams and threads (label concurrency).
#include <atomic>
#include <latch>
#include <random>
#include <thread>
#include <vector>

#include "runtime/runtime_test_util.h"

namespace flotilla::test {
namespace {

using backend::KernelArgs;

class EventConcurrencyTest : public RuntimeTest {};

// A slow producer stream writes a value; a consumer stream waits on the
// producer's event (on the device) and doubles it. Random producer delays
// make the consumer arrive first most of the time: without a working wait it
// reads the previous round's value. Repeated; prints its seed.
TEST_F(EventConcurrencyTest, ConsumerSeesProducersDataAcrossStreams) {
  auto dev = make_device();
  if (!has_kernel(*dev, "sleep_us")) GTEST_SKIP() << "the backend has no sleep_us kernel";
  std::mt19937_64 rng(test_seed());
  std::uniform_int_distribution<int> delay_us(0, 3000);
  constexpr size_t kN = 512;
  FloatBuffer in(*dev, kN), out(*dev, kN);
  Stream producer = dev->streams().at(1), consumer = dev->streams().at(2);
  int stale = 0;
  const int rounds = scaled(60, 10);
  for (int r = 1; r <= rounds; ++r) {
    producer.dispatch("sleep_us", KernelArgs().i64(delay_us(rng)));
    in.fill(producer, static_cast<float>(r));
    Event ready(*dev);
    ready.record(producer);
    ready.wait(consumer);
    consumer.dispatch("scale_f32", KernelArgs().ptr(in.ptr()).ptr(out.ptr()).f64(2.0).size(kN));
    const auto v = out.read(consumer);
    if (v[0] != 2.0f * r || v[kN - 1] != 2.0f * r) ++stale;
  }
  EXPECT_EQ(stale, 0) << "rounds where the consumer did not see the producer's data";
}

// The same across threads: producer threads publish events, consumer threads
// wait on them from their own streams. Each pair runs in its own lane.
TEST_F(EventConcurrencyTest, ProducerAndConsumerThreadsOrderedByEvents) {
  auto dev = make_device();
  if (!has_kernel(*dev, "sleep_us")) GTEST_SKIP() << "the backend has no sleep_us kernel";
  const uint64_t seed = test_seed();
  constexpr int kPairs = 4;
  constexpr size_t kN = 256;
  const int rounds = scaled(30, 5);
  std::vector<std::unique_ptr<FloatBuffer>> in, out;
  for (int p = 0; p < kPairs; ++p) {
    in.push_back(std::make_unique<FloatBuffer>(*dev, kN));
    out.push_back(std::make_unique<FloatBuffer>(*dev, kN));
  }
  // Per pair: a slot for the event of each round, published by the producer.
  struct Lane {
    std::vector<std::unique_ptr<Event>> events;
    std::vector<std::atomic<bool>> published;  // the producer recorded round r
    std::vector<std::atomic<bool>> consumed;   // the consumer has read round r's result
    explicit Lane(int n) : published(static_cast<size_t>(n)), consumed(static_cast<size_t>(n)) {}
  };
  std::vector<std::unique_ptr<Lane>> lanes;
  for (int p = 0; p < kPairs; ++p) {
    lanes.push_back(std::make_unique<Lane>(rounds));
    for (int r = 0; r < rounds; ++r) lanes.back()->events.push_back(std::make_unique<Event>(*dev));
  }
  std::atomic<int> stale{0};
  std::latch go(2 * kPairs);
  std::vector<std::thread> threads;
  for (int p = 0; p < kPairs; ++p) {
    threads.emplace_back([&, p] {  // producer
      std::mt19937_64 rng(seed + static_cast<uint64_t>(p));
      Stream s = dev->streams().at(1 + 2 * p);
      Lane& lane = *lanes[static_cast<size_t>(p)];
      go.arrive_and_wait();
      for (int r = 0; r < rounds; ++r) {
        // Round r overwrites `in`: the consumer must be done with round r - 1.
        while (r > 0 && !lane.consumed[static_cast<size_t>(r - 1)].load(std::memory_order_acquire))
          std::this_thread::yield();
        s.dispatch("sleep_us", KernelArgs().i64(static_cast<int64_t>(rng() % 2000)));
        in[static_cast<size_t>(p)]->fill(s, static_cast<float>(r + 1));
        lane.events[static_cast<size_t>(r)]->record(s);
        lane.published[static_cast<size_t>(r)].store(true, std::memory_order_release);
      }
    });
    threads.emplace_back([&, p] {  // consumer
      Stream s = dev->streams().at(2 + 2 * p);
      Lane& lane = *lanes[static_cast<size_t>(p)];
      go.arrive_and_wait();
      for (int r = 0; r < rounds; ++r) {
        while (!lane.published[static_cast<size_t>(r)].load(std::memory_order_acquire))
          std::this_thread::yield();
        lane.events[static_cast<size_t>(r)]->wait(s);
        s.dispatch("scale_f32", KernelArgs()
                                    .ptr(in[static_cast<size_t>(p)]->ptr())
                                    .ptr(out[static_cast<size_t>(p)]->ptr())
                                    .f64(3.0)
                                    .size(kN));
        const auto v = out[static_cast<size_t>(p)]->read(s);
        if (v[kN / 2] != 3.0f * (r + 1)) stale.fetch_add(1);
        lane.consumed[static_cast<size_t>(r)].store(true, std::memory_order_release);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(stale.load(), 0);
}

// Many threads add callbacks to one pending event at once: each runs exactly
// once, and synchronize() returns only after all of them.
TEST_F(EventConcurrencyTest, CallbacksFromManyThreadsRunOnce) {
  constexpr int kThreads = 16;
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  Event e(*dev);
  std::vector<std::atomic<int>> ran(kThreads);
  {
    Hold hold(s);
    e.record(s);
    std::latch go(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, t] {
        go.arrive_and_wait();
        for (int k = 0; k < 8; ++k) e.then([&, t] { ran[static_cast<size_t>(t)].fetch_add(1); });
      });
    for (auto& t : threads) t.join();
  }
  e.synchronize();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(ran[static_cast<size_t>(t)].load(), 8) << t;
}

// Events created and dropped on many threads while their callbacks run: the
// event pool hands each state to one owner at a time.
TEST_F(EventConcurrencyTest, EventPoolUnderChurn) {
  constexpr int kThreads = 8;
  Config c = test_config();
  c.event_pool_size = 4;  // small: states are both reused and freed
  auto dev = make_device(c);
  std::atomic<int> ran{0}, expected{0};
  std::latch go(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      Stream s = dev->streams().at(1 + t % 4);
      go.arrive_and_wait();
      for (int r = 0; r < scaled(100, 10); ++r) {
        Event e(*dev);
        e.record(s);
        expected.fetch_add(1);
        e.then([&] { ran.fetch_add(1); });
        if (r % 3 == 0) e.synchronize();
      }
    });
  for (auto& t : threads) t.join();
  dev->synchronize();
  EXPECT_TRUE(eventually([&] { return ran.load() == expected.load(); }))
      << ran.load() << " of " << expected.load() << " callbacks ran";
}

}  // namespace
}  // namespace flotilla::test
