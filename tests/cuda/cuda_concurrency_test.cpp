// Many threads on one GPU: 64 submitting threads under both policies, the
// EncodingLock forced on, events handed between threads. Every result is
// checked; threads are released together and the seed is printed.
#include <atomic>
#include <latch>
#include <random>
#include <thread>

#include "cuda/cuda_test_util.h"
#include "flotilla/nn/mlp.h"
#include "flotilla/serve/batch_queue.h"

namespace flotilla::test {
namespace {

using backend::KernelArgs;

struct Tally {
  std::atomic<uint64_t> checks{0}, wrong{0}, errors{0};
  Mutex mu;
  std::string first_error FL_GUARDED_BY(mu);
  void error(const std::string& what) {
    ++errors;
    MutexLock lock(mu);
    if (first_error.empty()) first_error = what;
  }
  std::string first() {
    MutexLock lock(mu);
    return first_error;
  }
};

// One thread's work: `iterations` rounds of fill, fill, add, scale, checksum
// on its own buffers through its current stream, checking every checksum.
void submit_and_check(Device& dev, uint64_t seed, int tid, int iterations, Tally& tally) {
  constexpr size_t kN = 4096;
  constexpr int kSlots = 8;
  try {
    Stream s = dev.current_stream();
    auto a = dev.driver().allocate(kN * 4), b = dev.driver().allocate(kN * 4),
         c = dev.driver().allocate(kN * 4);
    Mirrored sums(dev, kSlots * 8);
    std::vector<uint64_t> want(kSlots);
    int slot = 0;
    for (int it = 0; it < iterations; ++it) {
      const auto v1 = static_cast<float>(
          (seed + static_cast<uint64_t>(tid) * 7919 + static_cast<uint64_t>(it)) % 1000);
      const auto v2 = static_cast<float>(tid + 1);
      const float k = (it % 2) ? 2.0f : 3.0f;
      s.dispatch("fill_f32", KernelArgs().ptr(a->device_ptr()).f64(v1).size(kN));
      s.dispatch("fill_f32", KernelArgs().ptr(b->device_ptr()).f64(v2).size(kN));
      s.dispatch(
          "add_f32",
          KernelArgs().ptr(a->device_ptr()).ptr(b->device_ptr()).ptr(c->device_ptr()).size(kN));
      s.dispatch("scale_f32",
                 KernelArgs().ptr(c->device_ptr()).ptr(c->device_ptr()).f64(k).size(kN));
      auto* out = static_cast<uint64_t*>(sums.dev()) + slot;
      s.dispatch("checksum_u32", KernelArgs().ptr(c->device_ptr()).ptr(out).size(kN));
      want[static_cast<size_t>(slot)] = uint64_t{float_bits((v1 + v2) * k)} * kN;
      if (++slot == kSlots || it + 1 == iterations) {
        sums.download(s);
        for (int i = 0; i < slot; ++i) {
          ++tally.checks;
          if (sums.host<uint64_t>()[i] != want[static_cast<size_t>(i)]) ++tally.wrong;
        }
        slot = 0;
      }
    }
    s.synchronize();
  } catch (const std::exception& e) {
    tally.error(e.what());
  }
}

void run_threads(Device& dev, int threads, int iterations, uint64_t seed, Tally& tally) {
  std::latch go(threads);
  std::vector<std::thread> ts;
  ts.reserve(static_cast<size_t>(threads));
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      go.arrive_and_wait();  // released together
      submit_and_check(dev, seed, t, iterations, tally);
    });
  for (auto& t : ts) t.join();
}

TEST(CudaConcurrency, SixtyFourThreadsSubmittingGetEveryResultRight) {
  FL_SKIP_WITHOUT_GPU();
  const uint64_t seed = cuda_test_seed();
  for (auto policy : {StreamPolicy::kRoundRobin, StreamPolicy::kExclusive}) {
    SCOPED_TRACE(to_string(policy));
    Config c;
    c.policy = policy;
    c.exclusive_when_full = WhenFull::kShare;  // 64 threads > 31 exclusive slots
    auto dev = Device::create("cuda", 0, c);
    for (int rep = 0; rep < 3; ++rep) {
      Tally tally;
      run_threads(*dev, 64, 40, seed + static_cast<uint64_t>(rep), tally);
      EXPECT_EQ(tally.errors.load(), 0u) << tally.first();
      EXPECT_EQ(tally.wrong.load(), 0u);
      EXPECT_EQ(tally.checks.load(), 64u * 40u);
    }
    EXPECT_EQ(dev->driver().stats().violations, 0u);
    EXPECT_EQ(dev->driver().device_error(), nullptr);
    dev->synchronize();
    const auto st = dev->driver().stats();
    EXPECT_EQ(st.command_buffers_committed, st.command_buffers_completed);
  }
}

TEST(CudaConcurrency, EncodingLockForcedOnStillWorks) {
  FL_SKIP_WITHOUT_GPU();
  const uint64_t seed = cuda_test_seed();
  Config c;
  c.encoding_lock = EncodingLockMode::kOn;
  auto dev = Device::create("cuda", 0, c);
  ASSERT_TRUE(dev->encoding_lock().enabled());
  dev->encoding_lock().reset_stats();
  Tally tally;
  run_threads(*dev, 8, 100, seed, tally);
  EXPECT_EQ(tally.errors.load(), 0u) << tally.first();
  EXPECT_EQ(tally.wrong.load(), 0u);
  EXPECT_EQ(tally.checks.load(), 800u);
  // Every dispatch took it: 8 threads x 100 iterations x (5 kernels + copies).
  EXPECT_GE(dev->encoding_lock().stats().acquisitions, 8u * 100u * 5u);
  EXPECT_EQ(dev->driver().stats().violations, 0u);
}

TEST(CudaConcurrency, EventsHandedBetweenThreadsOrderTheirStreams) {
  FL_SKIP_WITHOUT_GPU();
  const uint64_t seed = cuda_test_seed();
  auto dev = Device::create("cuda", 0, Config{});
  constexpr int kPairs = 16, kRounds = 20;
  constexpr size_t kN = 2048;
  Tally tally;
  std::latch go(2 * kPairs);
  std::vector<std::thread> ts;
  for (int p = 0; p < kPairs; ++p) {
    // The producer fills after a sleep and records; the consumer waits on the
    // GPU, scales and checks: without the wait it would read stale values.
    auto shared = std::make_shared<Mirrored>(*dev, kN * 4);
    auto handoff = std::make_shared<std::vector<Event>>();
    for (int r = 0; r < kRounds; ++r) handoff->emplace_back(*dev);
    auto ready = std::make_shared<std::vector<std::atomic<bool>>>(kRounds);
    auto consumed = std::make_shared<std::vector<std::atomic<bool>>>(kRounds);
    ts.emplace_back([&, p, shared, handoff, ready, consumed] {
      go.arrive_and_wait();
      try {
        Stream s = dev->current_stream();
        for (int r = 0; r < kRounds; ++r) {
          if (r > 0)  // the consumer has read the previous round
            while (!(*consumed)[static_cast<size_t>(r - 1)].load()) std::this_thread::yield();
          s.dispatch("sleep_us", KernelArgs().i64(200 + (seed + static_cast<uint64_t>(p)) % 300));
          s.dispatch(
              "fill_f32",
              KernelArgs().ptr(shared->dev()).f64(static_cast<double>(p * 100 + r)).size(kN));
          (*handoff)[static_cast<size_t>(r)].record(s);
          (*ready)[static_cast<size_t>(r)].store(true);
        }
        s.synchronize();
      } catch (const std::exception& e) {
        tally.error(e.what());
        for (auto& f : *ready) f.store(true);
      }
    });
    ts.emplace_back([&, p, shared, handoff, ready, consumed] {
      go.arrive_and_wait();
      try {
        Stream s = dev->current_stream();
        for (int r = 0; r < kRounds; ++r) {
          while (!(*ready)[static_cast<size_t>(r)].load()) std::this_thread::yield();
          (*handoff)[static_cast<size_t>(r)].wait(s);
          s.dispatch("scale_f32",
                     KernelArgs().ptr(shared->dev()).ptr(shared->dev()).f64(2).size(kN));
          shared->download(s);
          const float want = 2.0f * static_cast<float>(p * 100 + r);
          ++tally.checks;
          if (shared->host()[0] != want || shared->host()[kN - 1] != want) ++tally.wrong;
          (*consumed)[static_cast<size_t>(r)].store(true);
        }
      } catch (const std::exception& e) {
        tally.error(e.what());
        for (auto& f : *consumed) f.store(true);
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(tally.errors.load(), 0u) << tally.first();
  EXPECT_EQ(tally.wrong.load(), 0u);
  EXPECT_EQ(tally.checks.load(), static_cast<uint64_t>(kPairs * kRounds));
}

// Recorded batches on CUDA (CUDA graphs; Note [Recorded batches]): many
// clients, several workers each recording on its own stream while the
// others replay, batches of every size; every output equals the eager
// batch-1 forward. Would catch: a graph reading another slot's staging, a
// capture picking up another thread's work, memory a graph writes being
// handed out again, padding rows leaking.
TEST(CudaServe, RecordedBatchesOfTheSeedMlpEqualUnbatched) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = Device::create("cuda", 0, Config::from_env());
  Stream up = dev->default_stream();
  const nn::Mlp mlp(nn::MlpWeights::seed(), DType::kF32, up);
  const int64_t in = mlp.in_features(), out = mlp.out_features();
  constexpr int kInputs = 64;
  std::vector<std::vector<float>> xs, refs;
  for (int i = 0; i < kInputs; ++i) {
    xs.push_back(nn::random_uniform(static_cast<size_t>(in), 500 + i));
    Tensor x = Tensor::from_host(xs.back(), {1, in}, DType::kF32, up);
    refs.push_back(mlp.forward(up, x).to_host(up));
  }
  std::atomic<uint64_t> wrong{0}, done{0};
  {
    serve::BatchQueueOptions o;
    o.workers = 3;
    o.max_batch = 64;
    o.pipeline_depth = 2;
    o.record_batches = true;
    o.capacity = 4096;
    o.when_full = serve::OverflowPolicy::kBlock;
    serve::BatchQueue q(
        *dev, in, out, [&mlp](const Stream& s, const Tensor& x) { return mlp.forward(s, x); }, o);
    // BatchQueueOptions::device_share 0: the queue claims a third of the
    // device on each of its 3 workers' streams (GEMMs of 64 to 512 rows are
    // planned for it; the batches here are mostly smaller).
    for (const Stream& s : q.streams()) EXPECT_EQ(s.device_share(), 3);
    std::vector<std::thread> clients;
    for (int c = 0; c < 16; ++c)
      clients.emplace_back([&, c] {
        std::mt19937 rng(static_cast<unsigned>(c));
        for (int round = 0; round < 60; ++round) {
          // Windows of 1..24 requests: batch sizes vary across all buckets.
          const int window = 1 + static_cast<int>(rng() % 24);
          std::vector<std::pair<int, serve::RequestHandle>> hs;
          for (int k = 0; k < window; ++k) {
            const int i = static_cast<int>(rng() % kInputs);
            hs.emplace_back(i, q.submit(xs[static_cast<size_t>(i)]));
          }
          for (auto& [i, h] : hs) {
            std::vector<float> y;
            try {
              y = h.get();
            } catch (...) {
              wrong.fetch_add(1);
              continue;
            }
            const auto& ref = refs[static_cast<size_t>(i)];
            double worst = 0;
            for (size_t k = 0; k < y.size(); ++k)
              worst = std::max(worst, std::abs(static_cast<double>(y[k]) - ref[k]) /
                                          std::max(1e-3, std::abs(static_cast<double>(ref[k]))));
            if (y.size() != ref.size() || worst > 1e-4) wrong.fetch_add(1);
            done.fetch_add(1);
          }
        }
      });
    for (auto& t : clients) t.join();
    const auto m = q.metrics();
    std::printf("recorded batches: %llu requests, mean batch %.2f\n",
                static_cast<unsigned long long>(m.completed), m.mean_batch());
  }
  EXPECT_EQ(wrong.load(), 0u);
  EXPECT_GT(done.load(), 0u);
  EXPECT_EQ(dev->allocator().stats().held_bytes, 0u);  // the queue's recordings are gone
}

}  // namespace
}  // namespace flotilla::test
