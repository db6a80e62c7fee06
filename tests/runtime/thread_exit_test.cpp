// A thread that exits with uncommitted work (label concurrency).
// Note [Uncommitted work at thread exit] in flotilla/runtime/stream.h: the
// work is committed when the thread exits, so it runs; nobody has to call
// synchronize for it.
//
// The checks never commit the stream themselves before observing that the
// work was committed (commits() == 1) and finished (query(), which does not
// commit), so a missing commit at thread exit fails them instead of being
// papered over by the test.
#include <latch>
#include <thread>
#include <vector>

#include "runtime/runtime_test_util.h"

namespace flotilla::test {
namespace {

using backend::KernelArgs;

class ThreadExitTest : public RuntimeTest {
 protected:
  static Config none_config(StreamPolicy policy) {
    Config c = test_config();
    c.sync_mode = SyncMode::kNone;
    c.policy = policy;
    return c;
  }
};

TEST_F(ThreadExitTest, UncommittedWorkRunsAfterTheThreadExits) {
  auto dev = make_device(none_config(StreamPolicy::kRoundRobin));
  FloatBuffer b(*dev, 128);
  int index = -1;
  std::thread t([&] {
    Stream s = dev->current_stream();
    index = s.index();
    b.fill(s, 1.0f);
    s.dispatch("scale_f32", KernelArgs().ptr(b.ptr()).ptr(b.ptr()).f64(42.0).size(128));
    // exits without commit or synchronize
  });
  t.join();
  Stream s = dev->streams().at(index);
  EXPECT_EQ(s.kernels_encoded(), 2u);
  ASSERT_EQ(s.commits(), 1u) << "the thread's work was not committed when it exited";
  ASSERT_TRUE(eventually([&] { return s.query(); })) << "the committed work never finished";
  EXPECT_EQ(b.read(s)[127], 42.0f);
}

// Many threads at once, each on its own stream or sharing one.
TEST_F(ThreadExitTest, ManyThreadsExitingWithWorkAllRun) {
  for (auto policy : {StreamPolicy::kRoundRobin, StreamPolicy::kExclusive}) {
    SCOPED_TRACE(to_string(policy));
    constexpr int kThreads = 24;
    Config c = none_config(policy);
    c.pool_size = 9;  // 8 pooled streams: round-robin threads share, exclusive ones queue
    c.exclusive_wait = std::chrono::seconds(30);
    auto dev = make_device(c);
    std::vector<std::unique_ptr<FloatBuffer>> bufs;
    for (int t = 0; t < kThreads; ++t) bufs.push_back(std::make_unique<FloatBuffer>(*dev, 16));
    std::vector<int> index(kThreads, -1);
    std::latch go(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, t] {
        go.arrive_and_wait();
        Stream s = dev->current_stream();
        index[static_cast<size_t>(t)] = s.index();
        bufs[static_cast<size_t>(t)]->fill(s, static_cast<float>(t + 1));
      });
    for (auto& t : threads) t.join();
    // Every stream that served a thread committed; wait for each without committing.
    for (int t = 0; t < kThreads; ++t) {
      Stream s = dev->streams().at(index[static_cast<size_t>(t)]);
      ASSERT_GE(s.commits(), 1u) << "thread " << t << "'s stream was never committed";
      ASSERT_TRUE(eventually([&] { return s.query(); }));
    }
    EXPECT_EQ(dev->driver().stats().kernels_executed, static_cast<uint64_t>(kThreads));
    for (int t = 0; t < kThreads; ++t) {
      Stream s = dev->streams().at(index[static_cast<size_t>(t)]);
      EXPECT_EQ(bufs[static_cast<size_t>(t)]->read(s)[15], t + 1.0f) << "thread " << t;
    }
  }
}

// The exit of a thread that never encoded anything commits nothing.
TEST_F(ThreadExitTest, IdleThreadExitCommitsNothing) {
  auto dev = make_device(none_config(StreamPolicy::kRoundRobin));
  int index = -1;
  std::thread t([&] { index = dev->current_stream().index(); });
  t.join();
  EXPECT_EQ(dev->streams().at(index).commits(), 0u);
  EXPECT_EQ(dev->driver().stats().command_buffers_committed, 0u);
}

}  // namespace
}  // namespace flotilla::test
