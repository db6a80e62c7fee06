// Lazy initialisation under a race (label concurrency): 16 threads released
// at once make the first call, and exactly one creation happens.
//
// The bug this catches is the seed's first class of failure: a check-then-act
// "if (!stream_) stream_ = create()" that two threads both pass, leaving two
// streams (two driver queues) for one slot, a leaked or double-freed one, and
// threads that disagree about which stream is theirs.
#include <atomic>
#include <latch>
#include <set>
#include <thread>
#include <vector>

#include "runtime/runtime_test_util.h"
#include "runtime/stream_state.h"

namespace flotilla::test {
namespace {

constexpr int kThreads = 16;

class LazyInitTest : public RuntimeTest {};

// Runs fn(i) on kThreads threads released together.
template <typename Fn>
void race(Fn fn) {
  std::latch go(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i)
    threads.emplace_back([&, i] {
      go.arrive_and_wait();
      fn(i);
    });
  for (auto& t : threads) t.join();
}

// On the cpu driver, queue ids count up from 1 per driver: the next queue's
// id says how many queues were made so far.
int queues_made(Device& dev) { return dev.driver().new_queue()->id() - 1; }

TEST_F(LazyInitTest, StreamPoolStateIsCreatedOnce) {
  for (int iter = 0; iter < scaled(40, 4); ++iter) {
    auto dev = make_device();
    std::vector<detail::StreamState*> seen(kThreads, nullptr);
    race([&](int i) { seen[static_cast<size_t>(i)] = &dev->streams().state(5); });
    for (auto* s : seen) ASSERT_EQ(s, seen[0]) << "iteration " << iter;
    ASSERT_EQ(dev->streams().created(), 1) << "iteration " << iter;
    if (is_cpu()) {
      ASSERT_EQ(queues_made(*dev), 1) << "one driver queue per slot";
    }
  }
}

// First use through the public API: every thread's kernel lands on the one
// stream, and all of them run.
TEST_F(LazyInitTest, FirstDispatchOnASlotCreatesItOnce) {
  for (int iter = 0; iter < scaled(20, 3); ++iter) {
    auto dev = make_device();
    FloatBuffer b(*dev, kThreads);
    Stream s = dev->streams().at(3);
    race([&](int i) { b.fill(s, static_cast<float>(i + 1), static_cast<size_t>(i), 1); });
    ASSERT_EQ(dev->streams().created(), 1);
    ASSERT_EQ(s.kernels_encoded(), static_cast<uint64_t>(kThreads));
    auto v = b.read(s);
    for (int i = 0; i < kThreads; ++i) ASSERT_EQ(v[static_cast<size_t>(i)], i + 1.0f);
    if (is_cpu()) {
      ASSERT_EQ(queues_made(*dev), 1);
    }
  }
}

// Many slots first used at once: one creation per distinct slot.
TEST_F(LazyInitTest, CurrentStreamsFirstUsedTogether) {
  for (int iter = 0; iter < scaled(20, 3); ++iter) {
    auto dev = make_device();
    FloatBuffer b(*dev, kThreads);
    std::vector<int> index(kThreads, -1);
    race([&](int i) {
      Stream s = dev->current_stream();
      index[static_cast<size_t>(i)] = s.index();
      b.fill(s, 1.0f, static_cast<size_t>(i), 1);
      s.synchronize();
    });
    const std::set<int> distinct(index.begin(), index.end());
    EXPECT_EQ(distinct.size(), static_cast<size_t>(kThreads))
        << "16 threads on a 31-stream round-robin pool share no stream";
    EXPECT_EQ(dev->streams().created(), static_cast<int>(distinct.size()));
    if (is_cpu()) {
      EXPECT_EQ(queues_made(*dev), static_cast<int>(distinct.size()));
    }
  }
}

// The first creation of a slot fails (the device is shut down) while other
// threads wait for it: each gets the error, none waits forever, and nothing
// is created. Would catch: a once-flag that an exception leaves "in
// progress" (ThreadSanitizer's pthread_once does; libstdc++ PR 66146), which
// hangs every thread waiting on it.
TEST_F(LazyInitTest, FailedFirstCreationDoesNotHangTheOthers) {
  for (int iter = 0; iter < scaled(20, 5); ++iter) {
    Watchdog dog(std::chrono::seconds(30), "threads racing a failing stream creation");
    auto dev = make_device();
    dev->shutdown();
    std::atomic<int> shut_down{0};
    race([&](int) {
      try {
        dev->streams().state(6);
      } catch (const ShutDown&) {
        shut_down.fetch_add(1);
      }
    });
    ASSERT_EQ(shut_down.load(), kThreads) << "iteration " << iter;
    ASSERT_EQ(dev->streams().created(), 0);
  }
}

// Two threads each making a private device at once get independent devices.
TEST_F(LazyInitTest, PrivateDevicesAreIndependent) {
  std::vector<std::shared_ptr<Device>> devs(kThreads);
  race([&](int i) { devs[static_cast<size_t>(i)] = make_device(); });
  std::set<uint64_t> ids;
  for (auto& d : devs) ids.insert(d->id());
  EXPECT_EQ(ids.size(), static_cast<size_t>(kThreads));
}

}  // namespace
}  // namespace flotilla::test
