// How many submits a second one shared cache line allows: the question
// behind BatchQueue's 64-client plateau on the GPU machines (docs/PERF.md,
// "The submit line's ceiling"). Each of T threads repeats what a fast-path
// submit does to QueueCore's submit line (two fetch_adds and a
// compare-and-swap loop on one 128-byte-aligned line), with `work_ns` of
// private work between ops (the rest of a client's request), for `secs`
// seconds; `shards` > 1 spreads the threads over that many lines.
//
// Build: g++ -O2 -std=c++20 -pthread scripts/line_contention.cpp -o line_contention
// Run:   ./line_contention [secs=1]   (prints one line per case)
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

struct alignas(128) Line {
  std::atomic<uint64_t> head{0};
  std::atomic<uint64_t> id{0};
  std::atomic<uint64_t> queued{0};
};

void spin_ns(uint64_t ns) {
  if (ns == 0) return;
  const auto end = std::chrono::steady_clock::now() + std::chrono::nanoseconds(ns);
  while (std::chrono::steady_clock::now() < end) {
  }
}

double run(int threads, int shards, int ops_per_submit, uint64_t work_ns, double secs) {
  std::vector<Line> lines(static_cast<size_t>(shards));
  std::atomic<bool> go{false}, stop{false};
  std::vector<uint64_t> counts(static_cast<size_t>(threads) * 16, 0);
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      Line& l = lines[static_cast<size_t>(t % shards)];
      uint64_t n = 0;
      while (!go.load(std::memory_order_acquire)) {
      }
      while (!stop.load(std::memory_order_relaxed)) {
        if (ops_per_submit >= 3) l.queued.fetch_add(1, std::memory_order_relaxed);
        if (ops_per_submit >= 2) l.id.fetch_add(1, std::memory_order_relaxed);
        uint64_t h = l.head.load(std::memory_order_relaxed);
        while (!l.head.compare_exchange_weak(h, h + 1, std::memory_order_seq_cst,
                                             std::memory_order_relaxed)) {
        }
        ++n;
        spin_ns(work_ns);
      }
      counts[static_cast<size_t>(t) * 16] = n;
    });
  }
  go.store(true, std::memory_order_release);
  std::this_thread::sleep_for(std::chrono::duration<double>(secs));
  stop.store(true);
  for (auto& th : ts) th.join();
  uint64_t total = 0;
  for (int t = 0; t < threads; ++t) total += counts[static_cast<size_t>(t) * 16];
  return static_cast<double>(total) / secs;
}

}  // namespace

int main(int argc, char** argv) {
  const double secs = argc > 1 ? std::atof(argv[1]) : 1.0;
  std::printf("%u hardware threads\n", std::thread::hardware_concurrency());
  for (int threads : {16, 64}) {
    for (uint64_t work : {0ull, 1000ull, 1500ull}) {
      for (int shards : {1, 4, 16}) {
        for (int ops : {3, 1}) {
          const double rate = run(threads, shards, ops, work, secs);
          std::printf("threads=%d work_ns=%llu shards=%d rmw_per_submit=%d  %.2fM submits/s\n",
                      threads, static_cast<unsigned long long>(work), shards, ops, rate / 1e6);
          std::fflush(stdout);
        }
      }
    }
  }
}
