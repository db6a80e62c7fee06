// Many threads running one model at once get exactly the outputs one thread
// gets (bit for bit: the same kernels on the same device), under both stream
// policies and with more threads than streams (shared streams).
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <latch>
#include <thread>

#include "flotilla/nn/mlp.h"
#include "nn_test_util.h"

namespace flotilla::nn {
namespace {

struct Case {
  StreamPolicy policy;
  int pool_size;
  int threads;
  DType dtype;
};

void run_case(const Case& c, uint64_t seed) {
  SCOPED_TRACE(std::string(to_string(c.policy)) + ", pool " + std::to_string(c.pool_size) + ", " +
               std::to_string(c.threads) + " threads, " + to_string(c.dtype));
  Config cfg;
  cfg.policy = c.policy;
  cfg.pool_size = c.pool_size;
  cfg.exclusive_when_full = WhenFull::kShare;
  auto dev = Device::create(test::kBackend, 0, cfg);
  const MlpWeights w = MlpWeights::random({64, 192, 192, 48}, ops::Activation::kGelu, seed);
  const Stream s0 = dev->default_stream();
  const Mlp model(w, c.dtype, s0);

  // Inputs of several batch sizes, and their single-thread outputs.
  constexpr int kInputs = 6;
  std::vector<std::vector<float>> inputs, refs;
  for (int k = 0; k < kInputs; ++k) {
    const int64_t batch = 1 + 7 * k;
    inputs.push_back(random_uniform(static_cast<size_t>(batch * 64), seed * 31 + k));
    refs.push_back(test::run_model(model, s0, inputs.back(), c.dtype));
  }

  const int rounds = test::scaled(12, 2);
  std::atomic<int> mismatches{0}, errors{0}, checks{0};  // relaxed: read after join
  std::latch start(c.threads);
  std::vector<std::thread> threads;
  for (int t = 0; t < c.threads; ++t) {
    threads.emplace_back([&, t] {
      start.arrive_and_wait();  // all threads hit the model together
      try {
        const Stream s = dev->current_stream();
        for (int r = 0; r < rounds; ++r) {
          const int k = (t + r) % kInputs;
          const auto y = test::run_model(model, s, inputs[k], c.dtype);
          checks.fetch_add(1, std::memory_order_relaxed);
          if (y.size() != refs[k].size() ||
              std::memcmp(y.data(), refs[k].data(), y.size() * sizeof(float)) != 0)
            mismatches.fetch_add(1, std::memory_order_relaxed);
        }
      } catch (const Error& e) {
        errors.fetch_add(1, std::memory_order_relaxed);
        ADD_FAILURE() << "thread " << t << ": " << e.what();
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(checks.load(), c.threads * rounds);
  EXPECT_EQ(mismatches.load(), 0) << "outputs under concurrency differ from one thread's";
}

class NN_SUITE(MlpThreads) : public ::testing::Test {
 protected:
  void SetUp() override { NN_SKIP_WITHOUT_DEVICE(); }
};

TEST_F(NN_SUITE(MlpThreads), ManyThreadsGetTheOutputsOfOne) {
  const uint64_t seed = test::test_seed();
  std::vector<DType> dtypes{DType::kF32};
  if (test::kBackend != "cpu") dtypes.push_back(DType::kBF16);
  for (int rep = 0; rep < 2; ++rep)
    for (DType dt : dtypes) {
      run_case({StreamPolicy::kRoundRobin, 32, 8, dt}, seed + rep);
      run_case({StreamPolicy::kExclusive, 32, 8, dt}, seed + rep);
      // More threads than pooled streams: threads share streams.
      run_case({StreamPolicy::kRoundRobin, 4, 12, dt}, seed + rep);
      run_case({StreamPolicy::kExclusive, 4, 12, dt}, seed + rep);
    }
}

}  // namespace
}  // namespace flotilla::nn
