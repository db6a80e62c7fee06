// synchronize_all (Device::synchronize) while threads submit (label concurrency).
//
// Each submitter writes element k of its own array in its k-th kernel and then
// publishes k. A synchronize that starts after k was published must return
// only once element k is written: it commits and waits for every stream. The
// checker reads only elements below the published mark, which no later kernel
// touches, so the check itself races with nothing.
#include <atomic>
#include <latch>
#include <thread>
#include <vector>

#include "runtime/runtime_test_util.h"

namespace flotilla::test {
namespace {

class SyncAllTest : public RuntimeTest {};

void run_sync_all_while_submitting(SyncMode mode, StreamPolicy policy) {
  constexpr int kThreads = 6;
  Config c = test_config();
  c.sync_mode = mode;
  c.policy = policy;
  c.adaptive_commit_kernels = 16;
  auto dev = make_device(c);
  const int per_thread = scaled(800, 80);
  std::vector<std::unique_ptr<backend::Buffer>> arrays, hosts;
  for (int t = 0; t < kThreads; ++t) {
    arrays.push_back(dev->driver().allocate(static_cast<size_t>(per_thread) * sizeof(float)));
    hosts.push_back(dev->driver().allocate_host(static_cast<size_t>(per_thread) * sizeof(float)));
  }
  std::vector<std::atomic<int>> published(kThreads);  // elements [0, published) were encoded
  std::atomic<int> errors{0}, done{0};
  std::latch go(kThreads + 1);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      auto* base = static_cast<float*>(arrays[static_cast<size_t>(t)]->device_ptr());
      go.arrive_and_wait();
      try {
        Stream s = dev->current_stream();
        for (int k = 0; k < per_thread; ++k) {
          s.dispatch("fill_f32",
                     backend::KernelArgs().ptr(base + k).f64(static_cast<double>(k + 1)).size(1));
          // release: a checker that sees k + 1 sees the encode before it.
          published[static_cast<size_t>(t)].store(k + 1, std::memory_order_release);
        }
      } catch (const std::exception& e) {
        ADD_FAILURE() << "submitter " << t << ": " << e.what();
        errors.fetch_add(1);
      }
      done.fetch_add(1);
    });
  go.arrive_and_wait();
  // The checker: a synchronize, then a look at what it must have finished.
  // Copying to host memory runs on a stream of its own after the synchronize.
  Stream checker = dev->streams().at(0);
  int checks = 0, missing = 0;
  while (done.load() < kThreads || checks < 3) {
    std::vector<int> mark(kThreads);
    for (int t = 0; t < kThreads; ++t)
      mark[static_cast<size_t>(t)] =
          published[static_cast<size_t>(t)].load(std::memory_order_acquire);
    dev->synchronize();
    for (int t = 0; t < kThreads; ++t) {
      const int n = mark[static_cast<size_t>(t)];
      if (n == 0) continue;
      checker.dispatch("copy_bytes", backend::KernelArgs()
                                         .ptr(hosts[static_cast<size_t>(t)]->device_ptr())
                                         .ptr(arrays[static_cast<size_t>(t)]->device_ptr())
                                         .size(static_cast<size_t>(n) * sizeof(float)));
    }
    checker.synchronize();
    for (int t = 0; t < kThreads; ++t) {
      const auto* h = static_cast<const float*>(hosts[static_cast<size_t>(t)]->host_ptr());
      for (int k = 0; k < mark[static_cast<size_t>(t)]; ++k)
        if (h[k] != static_cast<float>(k + 1)) ++missing;
    }
    ++checks;
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(missing, 0) << "elements encoded before a synchronize_all were not written after it";
  EXPECT_GE(checks, 3);
  EXPECT_EQ(dev->driver().stats().violations, 0u);
  dev->synchronize();
  EXPECT_EQ(dev->driver().stats().kernels_executed,
            static_cast<uint64_t>(kThreads * per_thread) + dev->streams().at(0).kernels_encoded());
}

TEST_F(SyncAllTest, WhileThreadsSubmitNoneMode) {
  run_sync_all_while_submitting(SyncMode::kNone, StreamPolicy::kRoundRobin);
}
TEST_F(SyncAllTest, WhileThreadsSubmitAdaptiveMode) {
  run_sync_all_while_submitting(SyncMode::kAdaptive, StreamPolicy::kExclusive);
}
TEST_F(SyncAllTest, WhileThreadsSubmitCommitMode) {
  run_sync_all_while_submitting(SyncMode::kCommit, StreamPolicy::kRoundRobin);
}

}  // namespace
}  // namespace flotilla::test
