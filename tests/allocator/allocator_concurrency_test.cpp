// 64 threads allocating and freeing at once, on shared streams, with
// record_stream; every block's contents are checked (two live owners of one
// block would overwrite each other), and the statistics add up at the end.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <latch>
#include <random>
#include <thread>
#include <vector>

#include "allocator/alloc_test_util.h"

namespace flotilla::test {
namespace {

#ifdef FLOTILLA_TEST_SANITIZED
constexpr int kIterations = 15;
#else
constexpr int kIterations = 120;
#endif
constexpr int kThreads = 64;
constexpr int kRounds = 3;

struct Held {
  Allocation a;
  size_t count = 0;
  float value = 0;
};

void run_storm(bool caching) {
  Config c = alloc_config(caching);
  c.pool_size = 16;  // 64 threads on 15 pooled streams: streams are shared
  auto dev = Device::create("cpu", 0, c);
  Allocator& al = dev->allocator();
  const uint64_t seed = alloc_test_seed();
  std::atomic<uint64_t> allocations{0};  // relaxed: read after the joins
  std::atomic<int> corrupt{0};           // relaxed: read after the joins
  for (int round = 0; round < kRounds; ++round) {
    std::latch start(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(seed + static_cast<uint64_t>(round * kThreads + t));
        Stream s = dev->streams().at(1 + t % 15);
        std::vector<Held> held;
        start.arrive_and_wait();
        for (int it = 0; it < kIterations; ++it) {
          const int n = 1 + static_cast<int>(rng() % 4);
          for (int k = 0; k < n; ++k) {
            Held h;
            // Small, medium and large classes; few distinct sizes so blocks recycle.
            const size_t sizes[] = {256, 4096, 40000, 300000};
            h.count = sizes[rng() % 4] / sizeof(float);
            h.a = al.allocate(h.count * sizeof(float), s);
            allocations.fetch_add(1, std::memory_order_relaxed);
            h.value = static_cast<float>(t * 100000 + it * 10 + k);
            fill(s, h.a.device_ptr(), h.count, h.value);
            if (rng() % 4 == 0)
              h.a.record_stream(dev->streams().at(1 + static_cast<int>(rng() % 15)));
            held.push_back(std::move(h));
          }
          // Check what this thread holds, then free a random part of it.
          s.synchronize();
          for (const Held& h : held) {
            const auto* p = static_cast<const float*>(h.a.host_ptr());
            for (size_t i = 0; i < h.count; i += 97)
              if (p[i] != h.value) {
                corrupt.fetch_add(1, std::memory_order_relaxed);
                break;
              }
          }
          std::shuffle(held.begin(), held.end(), rng);
          held.resize(held.size() / 2);
        }
      });
    }
    for (auto& th : threads) th.join();
  }
  EXPECT_EQ(corrupt.load(), 0) << "a block was handed to two owners at once";
  AllocatorStats st = al.stats();
  EXPECT_EQ(st.in_use_bytes, 0u) << st.to_string();
  EXPECT_EQ(st.allocations, allocations.load()) << st.to_string();
  EXPECT_EQ(st.cache_hits + st.driver_allocations + st.cross_stream_reuses, st.allocations)
      << st.to_string();
  EXPECT_EQ(st.reserved_bytes, st.cached_bytes) << st.to_string();
  EXPECT_GE(st.peak_in_use_bytes, 256u);
  if (caching) {
    EXPECT_GT(st.cache_hits, st.allocations / 2) << "the cache should serve most requests";
  } else {
    EXPECT_EQ(st.cache_hits, 0u);
  }
  dev->synchronize();
  al.empty_cache();
  st = al.stats();
  EXPECT_EQ(st.reserved_bytes, 0u) << st.to_string();
  EXPECT_EQ(st.cached_bytes, 0u) << st.to_string();
  EXPECT_EQ(st.driver_frees, st.driver_allocations) << st.to_string();
}

TEST(AllocatorConcurrency, SixtyFourThreadsWithCaching) { run_storm(true); }
TEST(AllocatorConcurrency, SixtyFourThreadsWithoutCaching) { run_storm(false); }

}  // namespace
}  // namespace flotilla::test
