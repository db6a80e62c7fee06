// Shutdown under many threads (label concurrency): from many threads at once,
// and while other threads submit. A Watchdog turns a hang into a named failure.
#include <atomic>
#include <cstring>
#include <latch>
#include <random>
#include <thread>
#include <vector>

#include "runtime/runtime_test_util.h"

namespace flotilla::test {
namespace {

using backend::KernelArgs;
using std::chrono::milliseconds;

class ShutdownConcurrencyTest : public RuntimeTest {};

// 16 threads call shutdown() at once with work in flight: every call
// returns (none throws), the work drains once, callbacks run once.
TEST_F(ShutdownConcurrencyTest, ShutdownFromManyThreadsAtOnce) {
  constexpr int kThreads = 16;
  for (int iter = 0; iter < scaled(10, 2); ++iter) {
    Watchdog dog(std::chrono::seconds(60), "shutdown from 16 threads");
    Config c = test_config();
    c.sync_mode = SyncMode::kNone;
    auto dev = make_device(c);
    const bool slow = has_kernel(*dev, "sleep_us");
    std::atomic<int> callbacks{0};
    for (int i = 1; i <= 8; ++i) {
      Stream s = dev->streams().at(i);
      if (slow) s.dispatch("sleep_us", KernelArgs().i64(2000));
      s.add_callback([&] { callbacks.fetch_add(1); });
      if (slow) s.dispatch("sleep_us", KernelArgs().i64(1000));  // left uncommitted
    }
    std::atomic<int> errors{0};
    std::latch go(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&] {
        go.arrive_and_wait();
        try {
          dev->shutdown();
          // Every caller returns only after the drain: nothing is pending.
          if (!dev->is_shut_down()) errors.fetch_add(1);
          if (callbacks.load() != 8) errors.fetch_add(1);
        } catch (const std::exception& e) {
          ADD_FAILURE() << e.what();
          errors.fetch_add(1);
        }
      });
    for (auto& t : threads) t.join();
    EXPECT_EQ(errors.load(), 0) << "iteration " << iter;
    EXPECT_EQ(callbacks.load(), 8);
  }
}

// Threads submit while another shuts the device down. Each submitter stops at
// its first ShutDown; any other error fails. Nothing hangs (a commit that
// slipped past the drain would leave a waiter hanging), and on the cpu
// backend, where kernels write host memory, every kernel whose dispatch()
// returned without error has run: accepted work is never dropped.
void shutdown_while_submitting(SyncMode mode) {
  constexpr int kThreads = 8;
  constexpr int kMax = 1 << 16;
  std::mt19937_64 rng(test_seed());
  for (int iter = 0; iter < scaled(30, 4); ++iter) {
    Watchdog dog(std::chrono::seconds(60), "shutdown while threads submit");
    Config c = test_config();
    c.sync_mode = mode;
    c.adaptive_commit_kernels = 8;
    // 8 threads on 2 streams, each driver call a few microseconds: callers
    // queue on the stream locks, and so sit between the device's usable
    // check and the stream lock when the shutdown starts.
    c.pool_size = 3;
    c.cpu_encode_cost = std::chrono::microseconds(5);
    auto dev = make_device(c);
    std::vector<std::unique_ptr<backend::Buffer>> arrays;
    for (int t = 0; t < kThreads; ++t) {
      arrays.push_back(dev->driver().allocate(kMax * sizeof(float)));
      if (is_cpu()) std::memset(arrays.back()->host_ptr(), 0, kMax * sizeof(float));
    }
    std::vector<int> accepted(kThreads, 0);
    std::atomic<int> errors{0}, stopped_by_shutdown{0};
    std::latch go(kThreads + 1);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, t] {
        auto* base = static_cast<float*>(arrays[static_cast<size_t>(t)]->device_ptr());
        go.arrive_and_wait();
        try {
          Stream s = dev->current_stream();
          for (int k = 0; k < kMax; ++k) {
            s.dispatch("fill_f32", KernelArgs().ptr(base + k).f64(k + 1.0).size(1));
            accepted[static_cast<size_t>(t)] = k + 1;
            if (k % 64 == 63) s.synchronize();
          }
        } catch (const ShutDown&) {
          stopped_by_shutdown.fetch_add(1);
        } catch (const std::exception& e) {
          ADD_FAILURE() << "submitter " << t << ": " << e.what();
          errors.fetch_add(1);
        }
      });
    go.arrive_and_wait();
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 5000));
    dev->shutdown();
    for (auto& t : threads) t.join();
    ASSERT_EQ(errors.load(), 0) << "iteration " << iter;
    EXPECT_TRUE(dev->is_shut_down());
    if (!is_cpu()) continue;
    for (int t = 0; t < kThreads; ++t) {
      const auto* h = static_cast<const float*>(arrays[static_cast<size_t>(t)]->host_ptr());
      const int n = accepted[static_cast<size_t>(t)];
      int lost = 0;
      for (int k = 0; k < n; ++k)
        if (h[k] != k + 1.0f) ++lost;
      EXPECT_EQ(lost, 0) << "iteration " << iter << ", submitter " << t << ": " << lost << " of "
                         << n << " accepted kernels never ran";
    }
  }
}

TEST_F(ShutdownConcurrencyTest, ShutdownWhileSubmittingNone) {
  shutdown_while_submitting(SyncMode::kNone);
}
TEST_F(ShutdownConcurrencyTest, ShutdownWhileSubmittingAdaptive) {
  shutdown_while_submitting(SyncMode::kAdaptive);
}
TEST_F(ShutdownConcurrencyTest, ShutdownWhileSubmittingCommitAndWait) {
  shutdown_while_submitting(SyncMode::kCommitAndWait);
}

}  // namespace
}  // namespace flotilla::test
